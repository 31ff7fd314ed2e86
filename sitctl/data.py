"""Streaming latent shards into training batches that are the same for 1 or N processes.

The global batch of B samples is cut into L *lanes* (`--data-lanes`); lane l fills the B/L
consecutive global positions [l B/L, (l+1) B/L) of every step. A lane is an endless stream:
in its epoch e it reads the shard units that a permutation seeded by (seed, e) deals to it,
through a webdataset shuffle buffer seeded by (seed, e, l), then starts epoch e+1.
Ranks own contiguous blocks of lanes (the split by node) and a rank's DataLoader workers own
contiguous blocks of its lanes (the split by worker). So what sits at global position p of step
s depends on (seed, s, p) alone, never on the number of processes; and every rank gets exactly
one chunk per step, so no rank ever meets an epoch end its peers do not (DDP cannot hang there).

A shard unit is a shard, or a 1/k residue class of its samples when there are fewer shards than
lanes (k = ceil(L / shards)), so tiny data sets still feed every lane.

Every random number a sample needs in a step (the latent's posterior noise, the flip, the
label-dropout and time uniforms, the interpolant's noise x0) comes from one generator seeded by
(seed, step, global position), drawn where the sample is loaded (in the loader workers).
"""

from __future__ import annotations

import io
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from sitctl.artifacts import Artifact, open_artifact
from sitctl.errors import ArtifactError, SitctlError

# ---------------------------------------------------------------------------------------------
# The latents artifact
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latents:
    """A latents artifact as the trainer needs it: its shards and what one latent looks like."""

    artifact: Artifact
    shard_paths: tuple[str, ...]
    shard_counts: tuple[int, ...]
    latent_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    scale_factor: float

    @property
    def num_samples(self) -> int:
        return sum(self.shard_counts)


def open_latents(path: str | Path) -> Latents:
    """Open a latents artifact; a wrong kind, missing shard or empty set is one ArtifactError line."""
    artifact = open_artifact(path, "latents")
    extra = artifact.extra
    for key in ("shards", "latent_shape", "num_classes", "scale_factor"):
        if key not in extra:
            raise ArtifactError(f"{artifact.path}: manifest extra lacks '{key}'; re-encode it with this sitctl")
    paths, counts = [], []
    for shard in extra["shards"]:
        file = artifact.path / shard["name"]
        if not file.is_file():
            raise ArtifactError(f"{artifact.path}: shard {shard['name']} is missing")
        paths.append(str(file))
        counts.append(int(shard["count"]))
    if sum(counts) == 0:
        raise ArtifactError(f"{artifact.path}: the latents artifact holds no samples")
    return Latents(
        artifact=artifact,
        shard_paths=tuple(paths),
        shard_counts=tuple(counts),
        latent_shape=tuple(int(n) for n in extra["latent_shape"]),
        num_classes=int(extra["num_classes"]),
        scale_factor=float(extra["scale_factor"]),
    )


def latents_from_moments(moments: torch.Tensor, noise: torch.Tensor, flip: torch.Tensor, scale: float) -> torch.Tensor:
    """A training latent (mean + std * noise) * scale of the original or the flipped view.

    moments (N, 2, 2, C, H, W) [view, mean/std]; noise (N, C, H, W); flip (N,) bool -> (N, C, H, W).
    """
    chosen = moments[torch.arange(len(moments)), flip.long()].float()  # (N, 2, C, H, W)
    return (chosen[:, 0] + chosen[:, 1] * noise) * scale


# ---------------------------------------------------------------------------------------------
# Lanes: which shard units a lane reads in an epoch
# ---------------------------------------------------------------------------------------------


# Tags keep the seeds of the three uses of randomness apart.
_SHARD_ORDER, _SHUFFLE_BUFFER, _SAMPLE_DRAWS = 0, 1, 2


def _seed(*parts: int) -> int:
    """A 64-bit seed from integers, the same in every process (unlike hash())."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def lane_units(counts: tuple[int, ...], lanes: int, lane: int, seed: int, epoch: int) -> list[tuple[int, int, int]]:
    """The (shard, residue, modulus) units lane `lane` reads in `epoch`, in reading order."""
    parts = math.ceil(lanes / len(counts))
    units = [(shard, residue, parts) for shard in range(len(counts)) for residue in range(parts)]
    order = np.random.default_rng(_seed(seed, _SHARD_ORDER, epoch)).permutation(len(units))
    return [units[i] for i in order[lane::lanes]]


def _unit_size(counts: tuple[int, ...], unit: tuple[int, int, int]) -> int:
    shard, residue, parts = unit
    return len(range(residue, counts[shard], parts))


def lane_position(counts: tuple[int, ...], lanes: int, lane: int, seed: int, consumed: int) -> tuple[int, int]:
    """(epoch, samples into it) of a lane that has yielded `consumed` samples since step 0."""
    epoch = 0
    while True:
        size = sum(_unit_size(counts, unit) for unit in lane_units(counts, lanes, lane, seed, epoch))
        if consumed < size:
            return epoch, consumed
        consumed -= size
        epoch += 1


def _read_unit(path: str, residue: int, parts: int) -> Iterator[dict]:
    samples = wds.tarfile_to_samples()(iter([{"url": path}]))
    for index, sample in enumerate(samples):
        if index % parts == residue:
            yield sample


def lane_stream(latents: Latents, lanes: int, lane: int, seed: int, buffer: int, consumed: int) -> Iterator[dict]:
    """Raw tar samples of one lane, endless, starting after its first `consumed` samples."""
    epoch, skip = lane_position(latents.shard_counts, lanes, lane, seed, consumed)
    while True:
        units = lane_units(latents.shard_counts, lanes, lane, seed, epoch)
        raw = (s for shard, residue, parts in units for s in _read_unit(latents.shard_paths[shard], residue, parts))
        shuffled = wds.shuffle(buffer, initial=buffer, rng=random.Random(_seed(seed, _SHUFFLE_BUFFER, epoch, lane)))(raw)
        for index, sample in enumerate(shuffled):
            if index >= skip:  # replaying the buffer up to the resume point keeps resume exact
                yield sample
        epoch, skip = epoch + 1, 0


def decode_sample(sample: dict, latent_shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """(moments float16 (2, 2, C, H, W), label) of one raw tar sample."""
    moments = np.load(io.BytesIO(sample["moments.npy"]), allow_pickle=False)
    if moments.shape != (2, 2, *latent_shape):
        raise ArtifactError(
            f"{sample.get('__url__')}: sample {sample['__key__']} has moments {moments.shape}, expected {(2, 2, *latent_shape)}"
        )
    return moments, int(sample["cls"])


# ---------------------------------------------------------------------------------------------
# The per-rank dataset
# ---------------------------------------------------------------------------------------------


def sample_draws(seed: int, step: int, positions: list[int], shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The random numbers of the samples at `positions` of `step`, each from its own generator.

    Returns latent_noise and x0 (n, *shape) standard normal, flip, drop and time uniforms (n,).
    """
    noise, x0, uniforms = [], [], []
    for position in positions:
        generator = torch.Generator().manual_seed(_seed(seed, _SAMPLE_DRAWS, step, position))
        noise.append(torch.randn(shape, generator=generator))
        x0.append(torch.randn(shape, generator=generator))
        uniforms.append(torch.rand(3, generator=generator))
    u = torch.stack(uniforms)  # (n, 3)
    return {"latent_noise": torch.stack(noise), "x0": torch.stack(x0), "flip": u[:, 0], "drop": u[:, 1], "time": u[:, 2]}


class LaneChunks(torch.utils.data.IterableDataset):
    """Yields, step after step, this rank's (or this worker's) lanes' chunks of the global batch.

    Each item holds, for n samples in global position order: x1 (n, C, H, W) float32 training
    latents, labels (n,) int64, x0 (n, C, H, W) noise, drop and time uniforms (n,), positions (n,).
    """

    def __init__(self, latents: Latents, *, lanes: list[int], num_lanes: int, per_lane: int, seed: int, buffer: int,
                 start_step: int, flip: bool = True):
        super().__init__()
        self.latents, self.lanes, self.num_lanes = latents, lanes, num_lanes
        self.per_lane, self.seed, self.buffer, self.start_step = per_lane, seed, buffer, start_step
        self.flip = flip

    def _my_lanes(self) -> list[int]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.lanes
        share = len(self.lanes) // info.num_workers  # contiguous block per worker, in lane order
        return self.lanes[info.id * share : (info.id + 1) * share]

    def __iter__(self):
        lanes = self._my_lanes()
        consumed = self.start_step * self.per_lane
        streams = [lane_stream(self.latents, self.num_lanes, lane, self.seed, self.buffer, consumed) for lane in lanes]
        positions = [lane * self.per_lane + j for lane in lanes for j in range(self.per_lane)]
        step = self.start_step
        while True:
            decoded = [decode_sample(next(stream), self.latents.latent_shape) for stream in streams for _ in range(self.per_lane)]
            moments = torch.from_numpy(np.stack([m for m, _ in decoded]))  # (n, 2, 2, C, H, W) float16
            draws = sample_draws(self.seed, step, positions, self.latents.latent_shape)
            x1 = latents_from_moments(moments, draws["latent_noise"], (draws["flip"] < 0.5) & self.flip, self.latents.scale_factor)
            labels = torch.tensor([label for _, label in decoded], dtype=torch.int64)
            yield {"x1": x1, "labels": labels, "x0": draws["x0"], "drop": draws["drop"], "time": draws["time"],
                   "positions": torch.tensor(positions)}
            step += 1


def _quiet_worker(_: int) -> None:
    # Ctrl-C reaches the whole process group; only the training process should act on it (it
    # saves a checkpoint at the next step boundary). SIGTERM stays fatal: it is how the loader
    # and multiprocessing stop workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def rank_batches(
    latents: Latents, *, global_batch: int, num_lanes: int, rank: int, world_size: int,
    seed: int, buffer: int, workers: int, start_step: int, flip: bool = True,
) -> Iterator[dict]:
    """This rank's slice of every global batch from `start_step` on: positions [r B/W, (r+1) B/W).

    Raises SitctlError when lanes do not split evenly over batch, ranks and workers.
    """
    check_lanes(num_lanes, global_batch, world_size, workers, latents.num_samples)
    per_rank = num_lanes // world_size
    lanes = list(range(rank * per_rank, (rank + 1) * per_rank))
    dataset = LaneChunks(
        latents, lanes=lanes, num_lanes=num_lanes, per_lane=global_batch // num_lanes,
        seed=seed, buffer=buffer, start_step=start_step, flip=flip,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        worker_init_fn=_quiet_worker if workers else None, in_order=True,
    )
    return _join_workers(iter(loader), max(workers, 1))


def _join_workers(items: Iterator[dict], workers: int) -> Iterator[dict]:
    """One rank batch per step; closing this generator stops the loader's worker processes."""
    try:
        while True:
            # The loader returns worker items round-robin, so `workers` consecutive items are one step.
            parts = [next(items) for _ in range(workers)]
            yield {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    finally:
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def check_lanes(num_lanes: int, global_batch: int, world_size: int, workers: int, num_samples: int) -> None:
    """One-line errors for a lane count that cannot feed this batch, world size and worker count."""
    readers = world_size * max(workers, 1)
    if global_batch % num_lanes:
        raise SitctlError(f"--data-lanes {num_lanes} does not divide the global batch {global_batch}")
    if num_lanes % readers:
        raise SitctlError(
            f"--data-lanes {num_lanes} is not a multiple of {world_size} ranks x {max(workers, 1)} loader workers; "
            f"pass --data-lanes {readers * math.ceil(num_lanes / readers)} (or fewer --loader-workers)"
        )
    if num_samples < num_lanes:
        raise SitctlError(f"the latents hold {num_samples} samples, fewer than --data-lanes {num_lanes}")


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def bench_loader(latents_dir: str | Path, seconds: float = 10.0, batch: int = 256, lanes: int = 8) -> float:
    """Training latents per second that one core reads, decodes and draws (with all per-sample noise)."""
    latents = open_latents(latents_dir)
    lanes = min(lanes, latents.num_samples)
    batch = max(batch // lanes, 1) * lanes
    stream = rank_batches(
        latents, global_batch=batch, num_lanes=lanes, rank=0, world_size=1, seed=0, buffer=1000, workers=0, start_step=0
    )
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(stream)["labels"])
    return count / (time.perf_counter() - start)
