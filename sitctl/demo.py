"""`sitctl demo`: the whole chain (encode -> train -> sample -> eval) on scikit-learn's digits, on CPU.

It calls the very same stage functions as the full-size commands; only the configs are small:
the digits are upscaled to 16x16 RGB and trained in pixel space (`--vae none`, since no
pretrained VAE can be fetched offline), with the small SiT-XS/4 for 800 steps.
FID is computed with the real FID Inception network against 200 of the 297 held-out digits,
and printed beside the real-vs-real floor: the FID of as many real training digits against the
same reference. At a few hundred images FID is dominated by its own small-sample bias, so only
the gap between the two numbers says how far the model is from the data.

The demo folder is a workspace (`sitctl ls` inside it lists latents/v1, runs/v1, samples/v1,
references/v1 and v2, metrics/v1). A rerun reuses a finished version only if its settings and its inputs
are exactly what the demo would make now, resumes an interrupted training run, and otherwise
writes the next version, so nothing already done is lost or silently reused. A SIGTERM or
SIGINT stops the stage running at its next unit of work, after saving what it keeps, and ends the
whole demo there (exit 128 + the signal): a rerun continues, and nothing half-trained is sampled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from sitctl import workspace
from sitctl.artifacts import Artifact
from sitctl.checkpoint import list_checkpoints
from sitctl.configs import (
    DemoConfig, EncodeConfig, EvalConfig, ReferenceConfig, SampleConfig, TrainConfig, resolve_sample
)
from sitctl.encode import encode
from sitctl.evaluate.metrics import frechet_distance
from sitctl.evaluate.reference import build_reference, load_reference
from sitctl.evaluate.stage import evaluate_stage
from sitctl.identity import made_otherwise
from sitctl.records import MetricsInfo, ReferenceInfo
from sitctl.sample import sample_stage
from sitctl.signals import Interrupted, stop_on_signals
from sitctl.train import resolve, train


def _matching(root: Path, kind: str, config: Any, inputs: list[Artifact]) -> Artifact | None:
    """The newest finished version made with exactly `config` from exactly `inputs` (by id), if any."""
    for version in reversed(workspace.finished_versions(root, kind)):
        if made_otherwise(version.artifact, config, [artifact.id for artifact in inputs]) is None:
            return version.artifact
    return None


def _make(root: Path, kind: str, config: Any, inputs: list[Artifact], stage: Callable[[Any], Artifact]) -> Artifact:
    """Reuse the matching finished version, or run `stage` into the next version of `kind`."""
    found = _matching(root, kind, config, inputs)
    if found is not None:
        return found
    return stage(dataclasses.replace(config, out=str(workspace.next_version(root, kind))))


def encode_digits(config: DemoConfig, root: Path) -> Artifact:
    settings = EncodeConfig(src="digits:train", out="-", image_size=config.image_size, vae="none",
                            shard_size=500, batch_size=256, workers=0, device="cpu")
    return _make(root, "latents", settings, [], encode)


def reference_digits(config: DemoConfig, root: Path, source: str = "digits:holdout",
                     max_images: int | None = None) -> Artifact:
    """Real digits as a reference: the held-out ones for FID, or (floor) as many training digits as samples."""
    settings = ReferenceConfig(source=source, out="-", image_size=config.image_size,
                               max_images=max_images or config.reference_images, device="cpu")
    return _make(root, "reference", settings, [], build_reference)


def floor_digits(config: DemoConfig, root: Path) -> Artifact:
    """Real training digits, as many as the samples, made into a reference: the floor's features."""
    return reference_digits(config, root, "digits:train", config.num_samples)


def real_vs_real_fid(floor: Artifact, reference: Artifact) -> float:
    """FID of the floor's real digits against the reference: what a perfect model would score at this n."""
    return float(frechet_distance(load_reference(floor.path).statistics, load_reference(reference.path).statistics))


def train_digits(config: DemoConfig, root: Path, latents: Artifact) -> Artifact:
    """The finished run of these settings, or the one to resume, or a new run; stops the demo on a signal."""
    # A fast EMA (decay 0.99, about 100 steps) and a high lr suit a run of several hundred steps.
    settings = TrainConfig(
        latents=str(latents.path), out="-", model=config.model, steps=config.steps, global_batch=64, lr=2e-3,
        ema_decay=0.99, flip=False, precision="fp32", seed=config.seed, data_lanes=4, shuffle_buffer=500,
        loader_workers=0, ckpt_every=config.steps // 2 or 1, keep_last=1, log_every=50,
        preview_every=config.steps // 2 or 1, preview_images=40, preview_steps=25, preview_cfg=config.cfg_scale,
        device="cpu")
    run_dir, recorded = None, resolve(settings, torch.device(settings.device))  # as a run records its settings
    for version in reversed(workspace.finished_versions(root, "checkpoint")):  # newest run of these settings
        if made_otherwise(version.artifact, recorded, [latents.id]) is None:
            if list_checkpoints(version.path)[-1][0] >= config.steps:
                return version.artifact
            run_dir = version.path  # interrupted: resume it
            break
    out = run_dir or workspace.next_version(root, "checkpoint")
    try:
        return train(dataclasses.replace(settings, out=str(out), resume=run_dir is not None))
    except Interrupted as stopped:  # the demo resumes the run when rerun as it is: no --resume to add
        raise Interrupted(stopped.signum, f"while training {stopped.done}", quiet=stopped.quiet) from None


def sample_digits(config: DemoConfig, root: Path, checkpoint: Artifact) -> Artifact:
    # Resolved (the mode's solver filled in) as the samples manifest records it, so a rerun finds it.
    settings = resolve_sample(SampleConfig(
        checkpoint=str(checkpoint.path), out="-", mode="sde", w=1.0, steps=config.sample_steps, cfg_scale=config.cfg_scale,
        num=config.num_samples, batch_size=100, seed=config.seed, preview=100, device="cpu"))
    return _make(root, "samples", settings, [checkpoint], sample_stage)


def evaluate_digits(config: DemoConfig, root: Path, samples: Artifact, reference: Artifact) -> Artifact:
    settings = EvalConfig(samples=str(samples.path), ref=str(reference.path), metrics=("fid",),
                          num_expected=config.num_samples, device="cpu")
    return _make(root, "metrics", settings, [samples, reference], evaluate_stage)


def run_demo(config: DemoConfig, console: Console | None = None) -> dict:
    """Run (or finish) the four stages; return the paths, the FID and the real-vs-real floor FID."""
    with stop_on_signals():  # one request for every stage, so a signal between two stops the next
        return _run_demo(config, console or Console())


def _run_demo(config: DemoConfig, console: Console) -> dict:
    root = Path(config.out).resolve()
    workspace.claim(root)
    console.rule("[bold]1/4 encode[/] digits -> pixel-space latents")
    latents = encode_digits(config, root)
    console.rule("[bold]2/4 train[/] " + config.model)
    checkpoint = train_digits(config, root, latents)
    console.rule("[bold]3/4 sample[/] SDE, w = 1")
    samples = sample_digits(config, root, checkpoint)
    console.rule("[bold]4/4 eval[/] FID against held-out digits")
    reference = reference_digits(config, root)
    metrics = evaluate_digits(config, root, samples, reference)
    floor = floor_digits(config, root)
    result = {
        "fid": float(MetricsInfo.from_artifact(metrics).values["fid"]),
        "floor_fid": real_vs_real_fid(floor, reference),
        "grid": str(samples.path / "preview.png"),
        "loss_curve": str(checkpoint.path.parent / "loss.png"),
        "logs": str(checkpoint.path.parent / "logs"),  # TensorBoard event files of the training run
        "metrics": str(metrics.path),
    }
    console.print(f"FID ({config.num_samples} samples vs {ReferenceInfo.from_artifact(reference).num_images} held-out digits): "
                  f"[bold]{result['fid']:.2f}[/]   real-vs-real floor ({ReferenceInfo.from_artifact(floor).num_images} training digits "
                  f"vs the same held-out digits): {result['floor_fid']:.2f}")
    console.print(f"sample grid: {result['grid']}")
    console.print(f"loss curve:  {result['loss_curve']}")
    console.print(f"tensorboard: tensorboard --logdir {result['logs']}")
    console.print(f"lineage:     sitctl show {result['metrics']}")
    return result

