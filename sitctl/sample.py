"""The sample stage: draw images from a checkpoint and write a `samples` artifact.

One code path serves one process or any number under torchrun. Sample i's noise and label
depend on (seed, i) alone, and the indices are cut into blocks of `batch_size` dealt to the
ranks round-robin (block b -> rank b % world), so the same batches form whatever the world size
and an image is byte-identical on 1 or N processes. Each rank appends its blocks to its own HDF5
file in the staging directory; a killed run resumes there, redrawing only missing blocks (a
SIGTERM or SIGINT stops it after the block in hand, sitctl/signals.py). Rank 0
then writes `samples.h5` (a virtual dataset presenting the rank files in index order), a preview
grid and optionally the ADM evaluator's `.npz`, and renames the staging directory into place.

Sources: a checkpoint artifact (or a run dir: its latest), whose lineage names the model, the
interpolant, the prediction target and (through the latents ancestor) the VAE and scale factor;
or a published SiT-XL/2 `.pt` state dict, a linear-interpolant velocity model that carries no
lineage, so --model and --vae name what it needs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import torch

from model.guidance import GuidedVelocity
from model.samplers import per_sample_generators, randn_per_sample, sample_ode, sample_sde
from sitctl import distributed
from sitctl.artifacts import (
    begin_artifact, disk_errors, finish_artifact, open_artifact, output_lock, staging_dir, write_failure
)
from sitctl.configs import SampleConfig, resolve_sample
from sitctl.decode import Decoder, load_decoder
from sitctl.distributed import barrier
from sitctl.errors import ArtifactError, SampleError
from sitctl.hardware import set_matmul_precision
from sitctl.identity import check_continues, read_request, record_request
from sitctl.plots import save_image_grid
from sitctl.progress import progress_bar
from sitctl.records import SamplesInfo
from sitctl.sample_source import Source, open_source
from sitctl.sample_store import (
    VIRTUAL_FILE, SampleWriter, export_npz, image_shape, rank_file, repair_rank_file, stored_indices,
    write_virtual_dataset
)
from sitctl.signals import Interrupted, stop_on_signals

SD_SCALE_FACTOR = 0.18215  # Stable Diffusion VAE latents are scaled by this to unit variance
PREVIEW_FILE = "preview.png"
NPZ_FILE = "samples.npz"
CRASH_HOOK = "SITCTL_TEST_SAMPLE_CRASH_AFTER_BATCHES"  # tests: exit abruptly after k batches


# =============================================================================================
# Which images a rank draws, and how
# =============================================================================================


def class_labels(num: int, num_classes: int, seed: int, scheme: str) -> np.ndarray:
    """Labels of all `num` images (num,) int64, a function of (num, num_classes, seed, scheme) alone.

    "balanced": the classes 0..K-1 repeated over the indices, then shuffled by the seed, so each
    class appears floor(num/K) or ceil(num/K) times; "uniform": i.i.d. draws as the reference's.
    """
    generator = torch.Generator().manual_seed(seed)
    if scheme == "balanced":
        return (torch.randperm(num, generator=generator) % num_classes).numpy().astype(np.int64)
    return torch.randint(num_classes, (num,), generator=generator).numpy().astype(np.int64)


def rank_blocks(num: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The index blocks of one rank: block b = [b B, (b+1) B) goes to rank b mod world_size."""
    starts = range(rank * batch_size, num, world_size * batch_size)
    return [range(start, min(start + batch_size, num)) for start in starts]


def ode_steps(config: SampleConfig) -> int:
    """Fixed ODE steps to take: --steps, or N - 1 for the reference's N grid points (--reference-steps)."""
    return config.steps - 1 if config.reference_steps else config.steps


def draw_latents(source: Source, config: SampleConfig, indices: list[int], labels: np.ndarray, device,
                 stats: dict | None = None):
    """Integrate from noise (t=0) to data (t=1) for the given sample indices -> (n, C, H, W) latents."""
    side, channels = source.model_config.input_size, source.model_config.in_channels
    generators = per_sample_generators(config.seed, indices, device)  # drawn on the sampling device
    x0 = randn_per_sample(generators, (len(indices), channels, side, side), device=device)  # (n, C, H, W)
    velocity = GuidedVelocity(
        source.net, torch.as_tensor(labels, dtype=torch.long, device=device), interp=source.interp,
        pred=source.pred, cfg_scale=config.cfg_scale, null_class=source.model_config.num_classes,
        interval=config.guidance_interval, guided_channels=config.guided_channels,
    )
    eps = config.sample_eps  # --sample-eps, else what the checkpoint recorded, else the interpolant's default
    if eps is None:
        eps = source.sample_eps if source.sample_eps is not None else source.interp.default_eps(source.pred)[1]
    if config.mode == "ode":
        return sample_ode(velocity, x0, method=config.method, steps=ode_steps(config), atol=config.atol,
                          rtol=config.rtol, sample_eps=eps, shift=config.time_shift, stats=stats)
    # The SDE's noise continues each sample's own generator after its initial draw.
    return sample_sde(velocity, x0, interp=source.interp, method=config.method, steps=config.steps,
                      diffusion=config.diffusion, w=config.w, last_step=config.last_step,
                      last_step_size=config.last_step_size, generator=generators, sample_eps=eps,
                      shift=config.time_shift, stats=stats)


# =============================================================================================
# Staging: resume a killed run where it stopped
# =============================================================================================


def check_resumable(staging: Path, config: SampleConfig, source: Source) -> None:
    """Refuse to continue a staging dir that was drawn with other settings or other weights."""
    note = read_request(staging)
    if note is None:
        return
    hint = "rerun with the same settings to resume, or delete it to start afresh"
    check_continues(note, config, f"the interrupted {staging}", hint, error=SampleError)
    if note.get("source") not in (None, source.identity):
        raise SampleError(f"cannot continue the interrupted {staging}: it was drawn from other weights; {hint}")


def prepare_staging(staging: Path, config: SampleConfig, source: Source, d) -> set[int]:
    """Make the staging dir consistent and return the indices already drawn (by any rank).

    All ranks compare settings first (read-only), rank 0 then truncates partial batches, and
    only after a barrier does anyone read; a world size that changed between runs is fine.
    """
    check_resumable(staging, config, source)
    barrier(d)
    if d.is_main:
        # Also lets a rerun of the same command in a workspace find this staging dir and resume it.
        record_request(staging, config, source=source.identity)
        for path in sorted(staging.glob("images-rank*.h5")):
            repair_rank_file(path)
    barrier(d)
    done = set(stored_indices(staging).tolist())
    barrier(d)  # nobody opens its file for writing while others still read
    return done


def _maybe_crash(batches_written: int) -> None:
    """Test hook: die like a killed process (no cleanup) after k batches."""
    limit = os.environ.get(CRASH_HOOK)
    if limit is not None and batches_written >= int(limit):
        os._exit(17)


# =============================================================================================
# The stage
# =============================================================================================


def sample_stage(config: SampleConfig):
    """Draw `config.num` images into a new samples artifact at `config.out` and return it.

    Run it as one process or under torchrun; every rank returns the finished Artifact.
    """
    config = resolve_sample(config)  # the mode's solver and steps, as the manifest records them
    d = distributed.setup(config.device)
    if d.device.type == "cuda":
        set_matmul_precision("tf32" if config.tf32 else "fp32")
    try:
        if config.cuda_graphs and d.device.type != "cuda":
            raise SampleError(f"--cuda-graphs needs a CUDA device; this run is on {d.device.type} (drop --cuda-graphs, or use --compile)")
        # Everything a user can get wrong is checked here, before the first network evaluation.
        source = with_precision(open_source(config, d.device), config)
        decoder = load_decoder(source, d.device)
        # A second run on this --out stops at the lock, naming the first; a full disk is one line.
        with stop_on_signals() as stop, output_lock(config.out, d), disk_errors("write samples into", staging_dir(config.out)):
            staging = begin_artifact(config.out)
            done = prepare_staging(staging, config, source, d)
            labels = class_labels(config.num, source.model_config.num_classes, config.seed, config.labels)
            blocks = rank_blocks(config.num, config.batch_size, d.rank, d.world_size)
            finished = draw_blocks(source, decoder, config, staging, blocks, labels, done, d)
            signum = distributed.stop_signal(d, stop.signum, finished)  # every rank stops, or none
            if signum:
                raise _stopped(signum, staging, config, quiet=not d.is_main)
            distributed.barrier(d)
            if d.is_main:
                try:
                    finish_samples(staging, config, source, decoder, labels, d.world_size)
                except OSError as error:  # e.g. a full disk: nothing is renamed into place, a rerun finishes
                    raise SampleError(f"{write_failure('finish', staging, error)}; free space and rerun to resume") from None
            distributed.barrier(d)
        return open_artifact(config.out, "samples")
    finally:
        distributed.teardown(d)


def _stopped(signum: int, staging: Path, config: SampleConfig, quiet: bool):
    """The Interrupted of a run stopped between blocks; every rank has closed its file, so rank 0 counts them all."""
    drawn = "" if quiet else f" with {len(stored_indices(staging))} of {config.num} images"
    return Interrupted(signum, f"{drawn} drawn into {staging}".lstrip(), quiet=quiet)


def with_precision(source: Source, config: SampleConfig) -> Source:
    """The source's network in the requested precision (bf16: autocast, fp32 out), compiled if asked."""
    class Bfloat16(torch.nn.Module):
        """The network under bf16 autocast, returning fp32 so the sampler integrates in fp32."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, y):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.net(x, t, y).float()

    class GraphReplay(torch.nn.Module):
        """A reduce-overhead compiled network whose output is copied out of the graph's memory.

        A replay overwrites the previous replay's output, and heun and guidance hold one output
        while asking for the next, so each is cloned (one (N, C, H, W) copy per evaluation).
        """

        def __init__(self, net):
            super().__init__()
            self.net = torch.compile(net, mode="reduce-overhead")

        def forward(self, x, t, y):
            torch.compiler.cudagraph_mark_step_begin()
            return self.net(x, t, y).clone()

    net = Bfloat16(source.net) if config.precision == "bf16" else source.net
    if config.cuda_graphs:
        net = GraphReplay(net)
    elif config.compile:
        net = torch.compile(net)
    return dataclasses.replace(source, net=net)


def draw_blocks(source: Source, decoder: Decoder, config: SampleConfig, staging: Path, blocks: list[range],
                labels: np.ndarray, done: set[int], d) -> bool:
    """Draw this rank's blocks not yet on disk and append each to the rank's HDF5 file; True when all are.

    A stop signal returns False after the block in hand (it is on disk; the rerun draws the rest).
    """
    # A block drawn before the kill is skipped whole; one cut short (batch size changed) is redrawn
    # without its finished indices.
    todo = [[i for i in block if i not in done] for block in blocks]
    todo = [indices for indices in todo if indices]
    writer = None
    with stop_on_signals() as stop, progress_bar("sampling", sum(map(len, todo)) * d.world_size, unit="img", main=d.is_main) as advance:
        try:
            for batches, indices in enumerate(todo, start=1):
                with torch.no_grad():
                    images = decoder(draw_latents(source, config, indices, labels[indices], d.device))  # (n, H, W, C)
                if writer is None:
                    writer = SampleWriter(rank_file(staging, d.rank), tuple(images.shape[1:]))
                _append(writer, images, labels[indices], np.asarray(indices, dtype=np.int64), staging)
                advance(len(indices) * d.world_size)  # rank 0 speaks for all ranks
                _maybe_crash(batches)
                if stop and batches < len(todo):
                    return False
        finally:
            if writer is not None:
                writer.close()
    return True


def _append(writer, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, staging: Path) -> None:
    try:
        writer.append(images, labels, indices)
    except OSError as error:  # a full disk: the committed rows stay valid, the run can resume
        raise SampleError(f"{write_failure('write samples into', staging, error)}; free space and rerun to resume") from None


# =============================================================================================
# Finishing: the merged view, preview, export, manifest
# =============================================================================================


def finish_samples(staging: Path, config: SampleConfig, source: Source, decoder: Decoder, labels: np.ndarray,
                   world_size: int):
    """Check every index is drawn exactly once, write samples.h5, preview and npz, then publish."""
    indices = np.sort(stored_indices(staging))
    if len(indices) != config.num or not np.array_equal(indices, np.arange(config.num)):
        raise ArtifactError(f"{staging} holds {len(indices)} samples, not indices 0..{config.num - 1} once each; delete it and rerun")
    write_virtual_dataset(staging, config.num)
    if config.preview:
        with h5py.File(staging / VIRTUAL_FILE, "r") as handle:
            save_image_grid(handle["images"][: config.preview], staging / PREVIEW_FILE)
    if config.npz:
        export_npz(staging, staging / NPZ_FILE)
    height, width, channels = image_shape(staging)
    extra = SamplesInfo(
        num_samples=config.num, image_size=height, image_shape=[height, width, channels],
        num_classes=source.model_config.num_classes,
        class_counts=np.bincount(labels, minlength=source.model_config.num_classes).tolist(),
        model_config=asdict(source.model_config), interp=source.interp.name, pred=source.pred, vae=decoder.record,
        scale_factor=decoder.scale_factor, source=source.description, world_size=world_size,
        virtual_file=VIRTUAL_FILE, npz=NPZ_FILE if config.npz else None,
    ).to_extra()
    inputs = [source.artifact] if source.artifact is not None else []
    # The settings record goes only after the rename (see finish_artifact), so a kill while
    # finishing cannot let a rerun with other settings publish these images.
    return finish_artifact(staging, config.out, kind="samples", config=asdict(config), inputs=inputs, extra=extra)


def export_samples_npz(samples: str | Path, path: str | Path) -> Path:
    """Write a finished samples artifact as the ADM reference evaluator's .npz (arr_0 uint8 NHWC)."""
    artifact = open_artifact(samples, "samples")
    return export_npz(artifact.path, Path(path))
