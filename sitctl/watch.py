"""Watching the EMA weights during training: a preview grid every --preview-every steps and the FID
every --eval-every steps. Both draw through the sample stage's own pieces, so what they show is
what `sitctl sample` would draw from the checkpoint saved at that step.

The FID is not a second sampler or a second FID. The images are drawn by the sample stage's
`draw_latents` with a `SampleConfig` made from the run's --eval-* settings and decoded by its
`Decoder`; their features come from the eval stage's `extract_features` and the number from its
`compute_metrics`, against the reference `sitctl eval fid` would use. So the value equals

    sitctl sample CHECKPOINT --mode M --method (euler | heun) --steps S --cfg G --num N --seed SEED
    sitctl eval fid --num-expected N

on the checkpoint saved at that step (`--precision bf16` too for a bf16 run). The sample indices
are dealt to the ranks in blocks exactly as the sample stage deals them (per-sample noise and
labels, so the images do not depend on the number of processes); each rank extracts its own
images' features and rank 0 gathers them in index order and computes the FID.

A preview integrates the ODE with Heun from fixed noise and labels (one grid is comparable with
the next); in a bf16 run only the network runs under autocast and returns fp32, as `sitctl sample
--precision bf16` runs it: guidance, the solver and the VAE stay in fp32.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.guidance import GuidedVelocity
from model.samplers import sample_ode

from sitctl import distributed
from sitctl.configs import EvalConfig, SampleConfig, TrainConfig
from sitctl.decode import Decoder, load_decoder
from sitctl.errors import OtherRankStopped, SitctlError
from sitctl.evaluate.auto_reference import reference_for
from sitctl.evaluate.inception import INCEPTION_PRECISION, POOL_FEATURES, create_extractor, extract_features, resolve_weights
from sitctl.evaluate.reference import Reference, load_reference
from sitctl.evaluate.results import sampler_text
from sitctl.evaluate.stage import check_reference, compute_metrics
from sitctl.metrics_log import append_row, metrics_path
from sitctl.plots import save_image_grid, save_metric_curve
from sitctl.records import LatentsInfo
from sitctl.sample import class_labels, draw_latents, rank_blocks, with_precision
from sitctl.sample_source import Source, lineage_vae
from sitctl.workspace import MARKER, find_root

EVAL_METHOD = {"sde": "euler", "ode": "heun"}  # fixed-step solvers, so the cost is known in advance
FID_PLOT = "fid.png"
PREVIEW_DIR = "previews"


def sampling_precision(config: TrainConfig) -> str:
    """The sample stage's --precision that draws as this run trains: bf16 for a bf16 run, else fp32."""
    return "bf16" if config.precision == "bf16" else "fp32"


def ema_source(run, settings: SampleConfig) -> Source:
    """The run's EMA network (updated in place by training) as the sample stage's Source, in `settings`' precision."""
    vae, scale_factor = lineage_vae(run.latents.artifact, None)
    source = Source(net=run.ema, model_config=run.model_config, interp=run.interp, pred=run.config.pred, vae=vae,
                    scale_factor=scale_factor, artifact=None, identity="training",
                    sample_eps=run.sample_eps)  # what the checkpoint records
    return with_precision(source, settings)


@dataclass
class TrainingEval:
    """What one rank needs to measure the FID of the EMA weights, prepared once before training."""

    settings: SampleConfig  # the `sitctl sample` settings the images are drawn with
    source: Source  # the run's EMA network (updated in place) and its lineage
    decoder: Decoder
    extractor: Any  # the FID Inception network on this rank's device
    labels: np.ndarray  # (num,) class of every sample index
    blocks: list[range]  # this rank's sample indices
    reference: Reference | None  # on rank 0
    eval_config: EvalConfig  # what compute_metrics is given, as `sitctl eval fid` gives it


def sample_settings(config: TrainConfig) -> SampleConfig:
    """The `sitctl sample` settings of the FID during training."""
    return SampleConfig(mode=config.eval_mode, method=EVAL_METHOD[config.eval_mode], steps=config.eval_steps,
                        cfg_scale=config.eval_cfg, num=config.eval_num, batch_size=config.eval_batch, seed=config.seed,
                        precision=sampling_precision(config), preview=0)


def eval_steps_ahead(config: TrainConfig, step: int) -> bool:
    """Whether a multiple of eval_every lies in (step, config.steps]."""
    return bool(config.eval_every) and config.steps // config.eval_every > step // config.eval_every


# =============================================================================================
# Before training: the reference, the Inception network, the decoder
# =============================================================================================


def prepare_eval(run, required: bool = True) -> TrainingEval | None:
    """Everything the FID needs, checked before the first step; None when no FID is due in this run.

    Without a reference (the latents' source images are unknown or gone, or the run is in no
    workspace and has no --eval-ref): an error when the FID was asked for (`required`: --eval-every
    given), else rank 0 says so once and the run trains on. A wrong --eval-ref or no Inception
    network is always an error.
    """
    config, d = run.config, run.dist
    if not eval_steps_ahead(config, run.step):
        return None
    reference, missing = find_reference(run) if d.is_main else (None, None)
    if not distributed.all_agree(d, reference is not None or not d.is_main):
        if required and not d.is_main:  # every rank stops here; rank 0 says why
            raise OtherRankStopped("rank 0 found no reference for --eval-every")
        if required:
            raise SitctlError(f"--eval-every {config.eval_every} needs a reference: {missing}; pass --eval-ref "
                              "(a reference artifact or an ADM .npz), or --eval-every 0")
        if d.is_main:
            print(f"warning: no FID during training: {missing}; training goes on without it", file=sys.stderr, flush=True)
        return None
    eval_config = EvalConfig(metrics=("fid",), num_expected=config.eval_num, device=str(d.device))
    weights = resolve_weights(eval_config.inception_weights, fetch=eval_config.fetch_weights)
    extractor = create_extractor(weights, [POOL_FEATURES], d.device)
    settings = sample_settings(config)
    source = ema_source(run, settings)
    labels = class_labels(settings.num, run.model_config.num_classes, settings.seed, settings.labels)
    return TrainingEval(settings=settings, source=source, decoder=load_decoder(source, d.device), extractor=extractor,
                        labels=labels, blocks=rank_blocks(settings.num, settings.batch_size, d.rank, d.world_size),
                        reference=reference, eval_config=eval_config)


def find_reference(run) -> tuple[Reference | None, str | None]:
    """--eval-ref, else the workspace reference of the latents' source (built once if missing);
    else (None, why there is none)."""
    config = run.config
    image_size = LatentsInfo.from_artifact(run.latents.artifact).image_size
    if config.eval_ref is not None:
        reference = load_reference(config.eval_ref)
        if image_size is not None:
            check_reference(reference, image_size)
        return reference, None
    settings = EvalConfig(metrics=("fid",), device=str(run.dist.device))
    root = workspace_root(config.out)
    if root is None:  # never make a folder a workspace (and fill it with references) behind the user's back
        return None, f"{config.out} is in no workspace"
    try:
        path = reference_for(run.latents.artifact, root, settings, say=print)
    except SitctlError as error:
        return None, str(error)
    return load_reference(path), None


def workspace_root(out: str) -> Path | None:
    """The workspace holding the run directory, else the one holding the current directory, else None."""
    for start in (Path(out).resolve().parent, Path.cwd()):
        root = find_root(start)
        if (root / MARKER).is_file():
            return root
    return None


# =============================================================================================
# At an eval step
# =============================================================================================


def measure_fid(evaluation: TrainingEval, d) -> dict[str, Any] | None:
    """Draw this rank's images, extract their features, gather them on rank 0: its metrics row, else None."""
    started = time.perf_counter()
    settings = evaluation.settings

    def images():
        for block in evaluation.blocks:
            indices = list(block)
            with torch.no_grad():
                yield evaluation.decoder(draw_latents(evaluation.source, settings, indices, evaluation.labels[indices], d.device))

    count = sum(map(len, evaluation.blocks))
    features = extract_features(evaluation.extractor, images(), device=d.device, total=count, label="FID samples")
    gathered = gather_in_index_order(features[POOL_FEATURES], evaluation.blocks, settings, d)
    if gathered is None:
        return None
    values = compute_metrics(evaluation.eval_config, {POOL_FEATURES: gathered}, evaluation.reference)
    # The Inception's precision is its own (fp32, no TF32), not the run's: recorded as `sitctl eval` records it.
    return {"fid": values["fid"], "fid_num": settings.num, "fid_sampler": sampler_text(asdict(settings)),
            "fid_inception_precision": INCEPTION_PRECISION, "fid_seconds": time.perf_counter() - started}


def gather_in_index_order(features: torch.Tensor, blocks: list[range], settings: SampleConfig, d) -> torch.Tensor | None:
    """(num, 2048) features of every rank in sample-index order on rank 0 (None on the others)."""
    if not d.active:
        return features  # one rank's blocks are already in index order
    # Every rank's share is known from rank_blocks, so the padding needs no exchange of sizes.
    most = max(sum(map(len, rank_blocks(settings.num, settings.batch_size, rank, d.world_size)))
               for rank in range(d.world_size))
    padded = torch.zeros(most, features.shape[1], device=d.device)
    padded[: len(features)] = features.to(d.device)
    indices = torch.full((most,), -1, dtype=torch.long, device=d.device)
    indices[: len(features)] = torch.tensor([i for block in blocks for i in block], dtype=torch.long)
    all_features = [torch.empty_like(padded) for _ in range(d.world_size)]
    all_indices = [torch.empty_like(indices) for _ in range(d.world_size)]
    torch.distributed.all_gather(all_features, padded)
    torch.distributed.all_gather(all_indices, indices)
    if not d.is_main:
        return None
    indices, features = torch.cat(all_indices).cpu(), torch.cat(all_features).cpu()
    kept = indices >= 0
    order = torch.argsort(indices[kept])
    return features[kept][order]  # (num, 2048)


def record_fid(out: str, step: int, row: dict[str, Any]) -> None:
    """Rank 0: the row into metrics.jsonl, and fid.png redrawn beside loss.png."""
    append_row(out, {"step": step, **row})
    save_metric_curve(metrics_path(out), Path(out) / FID_PLOT, key="fid", title="FID during training (EMA)")


# =============================================================================================
# Previews
# =============================================================================================


@dataclass
class Preview:
    """What rank 0 needs for a preview grid, prepared before the first step (so a missing VAE fails early)."""

    source: Source  # the EMA network in the run's sampling precision
    decoder: Decoder
    x0: torch.Tensor  # (n, C, H, W) the same noise at every preview
    labels: torch.Tensor  # (n,) classes 0, 1, ... in turn
    settings: SampleConfig  # the ODE's solver, steps and guidance scale


def prepare_preview(run) -> Preview | None:
    """Rank 0's preview pieces; None off rank 0 or when previews are off."""
    config, device = run.config, run.dist.device
    if not config.preview_every or not run.dist.is_main:
        return None
    settings = SampleConfig(mode="ode", method="heun", steps=config.preview_steps, cfg_scale=config.preview_cfg,
                            num=config.preview_images, seed=config.seed, precision=sampling_precision(config), preview=0)
    source = ema_source(run, settings)
    n, shape = config.preview_images, run.latents.latent_shape
    x0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(config.seed)).to(device)
    labels = (torch.arange(n) % run.latents.num_classes).to(device)
    return Preview(source=source, decoder=load_decoder(source, device), x0=x0, labels=labels, settings=settings)


def draw_preview(preview: Preview, out: str, step: int) -> Path:
    """Rank 0: the grid of the EMA weights now, saved as previews/step-NNNNNNN.png under `out`."""
    source, settings = preview.source, preview.settings
    velocity = GuidedVelocity(source.net, preview.labels, interp=source.interp, pred=source.pred,
                              cfg_scale=settings.cfg_scale, null_class=source.model_config.num_classes)
    with torch.no_grad():
        latents = sample_ode(velocity, preview.x0, method=settings.method, steps=settings.steps,
                             sample_eps=source.sample_eps)
    path = Path(out) / PREVIEW_DIR / f"step-{step:07d}.png"
    save_image_grid(preview.decoder(latents), path)  # (n, H, W, C) uint8
    return path


def read_png(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of a PNG, as the tracker shows it."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
