"""`sitctl demo`: the whole chain (encode -> train -> sample -> eval) on scikit-learn's digits, on CPU.

It calls the very same stage functions as the full-size commands; only the configs are small:
the digits are upscaled to 16x16 RGB and trained in pixel space (`--vae none`, since no
pretrained VAE can be fetched offline), with the small SiT-XS/4 for 800 steps.
FID is computed with the real FID Inception network against 200 of the 297 held-out digits,
and printed beside the real-vs-real floor: the FID of as many real training digits against the
same reference. At a few hundred images FID is dominated by its own small-sample bias, so only
the gap between the two numbers says how far the model is from the data.

Every stage leaves its artifact in one folder; a rerun reuses each finished artifact and
resumes an interrupted training run, so nothing already done is lost.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from sitctl.artifacts import Artifact, open_artifact
from sitctl.configs import DemoConfig




def _reuse(path: Path, kind: str) -> Artifact | None:
    """The finished artifact at `path`, or None if it has not been made yet."""
    return open_artifact(path, kind) if (path / "manifest.json").is_file() else None


def encode_digits(config: DemoConfig, out: Path) -> Artifact:
    from sitctl.encode import EncodeConfig, encode

    path = out / "latents"
    return _reuse(path, "latents") or encode(
        EncodeConfig(src="digits:train", out=str(path), image_size=config.image_size, vae="none",
                     shard_size=500, batch_size=256, workers=0, device="cpu")
    )


def reference_digits(config: DemoConfig, out: Path) -> Artifact:
    from sitctl.evaluate.reference import ReferenceConfig, build_reference

    path = out / "reference"
    return _reuse(path, "reference") or build_reference(
        ReferenceConfig(source="digits:holdout", out=str(path), image_size=config.image_size,
                        max_images=config.reference_images, device="cpu")
    )


def floor_digits(config: DemoConfig, out: Path) -> Artifact:
    """Real training digits, as many as the samples, made into a reference: the floor's features."""
    from sitctl.evaluate.reference import ReferenceConfig, build_reference

    path = out / "floor"
    return _reuse(path, "reference") or build_reference(
        ReferenceConfig(source="digits:train", out=str(path), image_size=config.image_size,
                        max_images=config.num_samples, device="cpu")
    )


def real_vs_real_fid(floor: Artifact, reference: Artifact) -> float:
    """FID of the floor's real digits against the reference: what a perfect model would score at this n."""
    from sitctl.evaluate.metrics import frechet_distance
    from sitctl.evaluate.reference import load_reference

    return float(frechet_distance(load_reference(floor.path).statistics, load_reference(reference.path).statistics))


def train_digits(config: DemoConfig, out: Path, latents: Artifact) -> Artifact:
    from sitctl.checkpoint import list_checkpoints
    from sitctl.train import TrainConfig, train

    run = out / "run"
    found = list_checkpoints(run)
    if found and found[-1][0] >= config.steps:
        return open_artifact(found[-1][1], "checkpoint")
    # A fast EMA (decay 0.99, about 100 steps) and a high lr suit a run of several hundred steps.
    return train(
        TrainConfig(latents=str(latents.path), out=str(run), model=config.model, steps=config.steps,
                    global_batch=64, lr=2e-3, ema_decay=0.99, flip=False, precision="fp32", seed=config.seed,
                    data_lanes=4, shuffle_buffer=500, loader_workers=0, ckpt_every=config.steps // 2 or 1,
                    keep_last=1, log_every=50, preview_every=config.steps // 2 or 1, preview_images=40,
                    preview_steps=25, preview_cfg=config.cfg_scale, resume=bool(found), device="cpu")
    )


def sample_digits(config: DemoConfig, out: Path, checkpoint: Artifact) -> Artifact:
    from sitctl.sample import SampleConfig, sample_stage

    path = out / "samples"
    return _reuse(path, "samples") or sample_stage(
        SampleConfig(checkpoint=str(checkpoint.path), out=str(path), mode="sde", w=1.0,
                     steps=config.sample_steps, cfg_scale=config.cfg_scale, num=config.num_samples,
                     batch_size=100, seed=config.seed, preview=100, device="cpu")
    )


def evaluate_digits(config: DemoConfig, samples: Artifact, reference: Artifact) -> Artifact:
    from sitctl.evaluate.stage import EvalConfig, evaluate_stage

    return evaluate_stage(
        EvalConfig(samples=str(samples.path), ref=str(reference.path), metrics=("fid",),
                   num_expected=config.num_samples, device="cpu")
    )


def run_demo(config: DemoConfig, console: Console | None = None) -> dict:
    """Run (or finish) the four stages; return the paths, the FID and the real-vs-real floor FID."""
    console = console or Console()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1/4 encode[/] digits -> pixel-space latents")
    latents = encode_digits(config, out)
    console.rule("[bold]2/4 train[/] " + config.model)
    checkpoint = train_digits(config, out, latents)
    console.rule("[bold]3/4 sample[/] SDE, w = 1")
    samples = sample_digits(config, out, checkpoint)
    console.rule("[bold]4/4 eval[/] FID against held-out digits")
    reference = reference_digits(config, out)
    metrics = evaluate_digits(config, samples, reference)
    floor = floor_digits(config, out)
    result = {
        "fid": float(metrics.extra["values"]["fid"]),
        "floor_fid": real_vs_real_fid(floor, reference),
        "grid": str(samples.path / "preview.png"),
        "loss_curve": str(out / "run" / "loss.png"),
        "metrics": str(metrics.path),
    }
    console.print(f"FID ({config.num_samples} samples vs {reference.extra['num_images']} held-out digits): "
                  f"[bold]{result['fid']:.2f}[/]   real-vs-real floor ({floor.extra['num_images']} training digits "
                  f"vs the same held-out digits): {result['floor_fid']:.2f}")
    console.print(f"sample grid: {result['grid']}")
    console.print(f"loss curve:  {result['loss_curve']}")
    console.print(f"lineage:     sitctl show {result['metrics']}")
    return result

