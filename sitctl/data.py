"""Streaming latent shards into training batches that are the same for 1 or N processes.

The global batch of B samples is cut into L *lanes* (`--data-lanes`); lane l fills the B/L
consecutive global positions [l B/L, (l+1) B/L) of every step. A lane is an endless stream:
in its epoch e it reads the shard units that a permutation seeded by (seed, e) deals to it,
through a shuffle buffer seeded by (seed, e, l), then starts epoch e+1.
Ranks own contiguous blocks of lanes (the split by node) and a rank's DataLoader workers own
contiguous blocks of its lanes (the split by worker). So what sits at global position p of step
s depends on (seed, s, p) alone, never on the number of processes; and every rank gets exactly
one chunk per step, so no rank ever meets an epoch end its peers do not (DDP cannot hang there).

A shard unit is a shard, or a 1/k residue class of its samples when there are fewer shards than
lanes (k = ceil(L / shards)), so tiny data sets still feed every lane.

Every random number a lane's chunk needs in a step (the latents' posterior noise, the flips, the
label-dropout and time uniforms) comes from one generator seeded by (seed, step, lane) and drawn
for the whole chunk at once, where the chunk is loaded (in the loader workers). The interpolant's
noise x0, half of all normals, is drawn where training runs instead (`interpolant_noise`), from a
generator of (seed, step, lane) on that device, so no loader core spends time on it and nothing
crosses to the GPU for it. A lane is never split between readers or ranks, so the draws too are
the same for any number of processes and workers (on one device type: CPU and CUDA generators differ).

Shards are read by pipelines/shards.py: each is checked against the manifest's sha256 and indexed
the first time a reader process opens it; its arrays are then views into the mapped file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipelines.shards import ShardIndex, open_shard
from sitctl.artifacts import Artifact, open_artifact
from sitctl.errors import ArtifactError, SitctlError
from sitctl.records import LatentsInfo
from sitctl.signals import ignore_stop_signals

# ---------------------------------------------------------------------------------------------
# The latents artifact
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latents:
    """A latents artifact as the trainer needs it: its shards and what one latent looks like."""

    artifact: Artifact
    shard_paths: tuple[str, ...]
    shard_counts: tuple[int, ...]
    shard_sha256: tuple[str, ...]  # as recorded in the manifest; the loader checks each shard against it
    latent_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    scale_factor: float
    image_size: int | None = None  # side of the encoded crops
    encoder_targets: str = "none"  # images or png: each sample also holds its crop (for REPA)

    @property
    def num_samples(self) -> int:
        return sum(self.shard_counts)


def open_latents(path: str | Path) -> Latents:
    """Open a latents artifact; a wrong kind, missing shard or empty set is one ArtifactError line."""
    artifact = open_artifact(path, "latents")
    info = LatentsInfo.from_artifact(artifact)
    paths, counts, hashes = [], [], []
    for shard in info.shards:  # open_artifact has checked that each is one of its files, present and in it
        paths.append(str(artifact.path / shard["name"]))
        counts.append(int(shard["count"]))
        hashes.append(artifact.manifest["files"][shard["name"]]["sha256"])
    if sum(counts) == 0:
        raise ArtifactError(f"{artifact.path}: the latents artifact holds no samples")
    return Latents(
        artifact=artifact,
        shard_paths=tuple(paths),
        shard_counts=tuple(counts),
        shard_sha256=tuple(hashes),
        latent_shape=tuple(int(n) for n in info.latent_shape),
        num_classes=int(info.num_classes),
        scale_factor=float(info.scale_factor),
        image_size=info.image_size,
        encoder_targets=info.encoder_targets,
    )


def latents_from_moments(view: torch.Tensor, noise: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Training latents (mean + std * noise) * scale, a draw from the VAE posterior of the chosen view.

    view (N, 2, C, H, W) float16 [mean/std] of the original or flipped image; noise (N, C, H, W)
    float32 -> (N, C, H, W) float32, written into `out` when given.
    """
    return torch.addcmul(view[:, 0], view[:, 1], noise, out=out).mul_(scale)  # float16 promoted inside the kernel


# ---------------------------------------------------------------------------------------------
# Lanes: which shard units a lane reads in an epoch
# ---------------------------------------------------------------------------------------------


# Tags keep the seeds of the four uses of randomness apart.
_SHARD_ORDER, _SHUFFLE_BUFFER, _SAMPLE_DRAWS, _INTERPOLANT_NOISE = 0, 1, 2, 3


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


def buffer_order(count: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a streaming shuffle buffer of `buffer` slots emits items 0..count-1.

    Items arrive in reading order; each emission takes a uniformly chosen slot and the next item
    refills it. Reads stay sequential within a window of `buffer` items, and being a function of
    (count, buffer, rng) alone, a resumed lane recomputes its epoch's order instead of replaying it.
    """
    picks = rng.random(count)
    slots = list(range(min(buffer, count)))
    order, incoming = np.empty(count, np.int64), len(slots)
    for emitted in range(count):
        chosen = int(picks[emitted] * len(slots))
        slots[chosen], slots[-1] = slots[-1], slots[chosen]
        order[emitted] = slots.pop()
        if incoming < count:
            slots.append(incoming)
            incoming += 1
    return order


def lane_epoch(counts: tuple[int, ...], lanes: int, lane: int, seed: int, epoch: int, buffer: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, sample within the shard) of each item lane `lane` yields in `epoch`, in yield order.

    A lane always has a unit: there are at least as many units as lanes (`lane_units`).
    """
    units = lane_units(counts, lanes, lane, seed, epoch)
    shards = np.concatenate([np.full(_unit_size(counts, unit), unit[0]) for unit in units])
    samples = np.concatenate([np.arange(residue, counts[shard], parts) for shard, residue, parts in units])
    order = buffer_order(len(shards), buffer, np.random.default_rng(_seed(seed, _SHUFFLE_BUFFER, epoch, lane)))
    return shards.astype(np.int64)[order], samples.astype(np.int64)[order]


class LaneReader:
    """One lane's endless stream of (shard, sample) pairs, starting after its first `consumed`."""

    def __init__(self, counts: tuple[int, ...], lanes: int, lane: int, seed: int, buffer: int, consumed: int):
        self.counts, self.lanes, self.lane, self.seed, self.buffer = counts, lanes, lane, seed, buffer
        self.epoch, self.position = lane_position(counts, lanes, lane, seed, consumed)
        self.shards, self.samples = lane_epoch(counts, lanes, lane, seed, self.epoch, buffer)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` (shard, sample) pairs, as two (count,) arrays; crosses epochs as needed."""
        shards, samples = [], []
        while count:
            if self.position == len(self.shards):
                self.epoch, self.position = self.epoch + 1, 0
                self.shards, self.samples = lane_epoch(self.counts, self.lanes, self.lane, self.seed, self.epoch, self.buffer)
            end = min(self.position + count, len(self.shards))
            shards.append(self.shards[self.position : end])
            samples.append(self.samples[self.position : end])
            count -= end - self.position
            self.position = end
        return np.concatenate(shards), np.concatenate(samples)


class ShardCache:
    """The shards one reader process has opened: each is hashed and indexed once, then reused."""

    def __init__(self, latents: Latents):
        self.latents, self.opened = latents, {}

    def __call__(self, shard: int) -> ShardIndex:
        if shard not in self.opened:
            latents = self.latents
            index = open_shard(latents.shard_paths[shard], (2, 2, *latents.latent_shape), latents.shard_sha256[shard])
            if len(index) != latents.shard_counts[shard]:
                raise ArtifactError(f"shard {index.path} holds {len(index)} samples, its manifest says {latents.shard_counts[shard]}")
            self.opened[shard] = index
        return self.opened[shard]


def gather_images(cache: ShardCache, shards: np.ndarray, samples: np.ndarray, flip: np.ndarray, out: torch.Tensor) -> None:
    """Write the kept crops of n samples into `out` (n, S, S, 3) uint8, mirrored where their latent's
    flipped view was chosen (the same `flip`), so the encoder sees the view the latent is of."""
    for shard in np.unique(shards).tolist():
        rows = np.flatnonzero(shards == shard)
        index = cache(shard)
        if index.images is None or index.images.side != out.shape[1]:
            raise ArtifactError(f"{index.path} holds no {out.shape[1]}-px images, though its manifest says it does")
        if len(rows) == len(out):  # the usual case: the chunk lies in one shard, read in place
            index.images.read_into(samples, out.numpy(), index.path)
            continue
        block = np.empty((len(rows), *out.shape[1:]), np.uint8)
        index.images.read_into(samples[rows], block, index.path)
        out[torch.from_numpy(rows)] = torch.from_numpy(block)
    mirrored = torch.from_numpy(np.flatnonzero(flip))
    out[mirrored] = out[mirrored].flip(2)  # along the width, as encode flipped the image for the latent; torch's flip
    # is ~10x numpy's strided copy


def gather_views(cache: ShardCache, shards: np.ndarray, samples: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(moments of the chosen views (n, 2, C, H, W) float16, labels (n,) int64) of n samples.

    A stored sample holds [original, flipped] views back to back; only the chosen half is copied,
    with one numpy gather per shard (a chunk touches one or two shards).
    """
    first = cache(int(shards[0]))
    views = np.empty((len(shards), 2 * int(np.prod(first.moments_shape[1:]))), np.uint8)  # float16 bytes
    labels = np.empty(len(shards), np.int64)
    for shard in np.unique(shards).tolist():
        rows = np.flatnonzero(shards == shard)
        index = cache(shard)
        views[rows] = index.view_bytes(samples[rows], flip[rows])
        labels[rows] = index.labels[samples[rows]]
    return views.view(np.float16).reshape(len(shards), *first.moments_shape[1:]), labels


# ---------------------------------------------------------------------------------------------
# The per-rank dataset
# ---------------------------------------------------------------------------------------------


def lane_draws(seed: int, step: int, lane: int, noise: torch.Tensor) -> torch.Tensor:
    """Fill `noise` (count, C, H, W) with lane `lane`'s posterior noise for `step`.

    One generator per (seed, step, lane) draws the whole chunk's numbers; returns its uniforms
    (count, 3): flip, label dropout and time, one row per sample.
    """
    generator = torch.Generator().manual_seed(_seed(seed, _SAMPLE_DRAWS, step, lane))
    uniforms = torch.rand((len(noise), 3), generator=generator)
    torch.randn(noise.shape, generator=generator, out=noise)
    return uniforms


def interpolant_noise(seed: int, step: int, positions: torch.Tensor, per_lane: int, shape: tuple[int, ...],
                      device: torch.device) -> torch.Tensor:
    """The interpolant's noise x0 (n, C, H, W) of a rank's chunk at global `positions` of `step`, drawn on `device`.

    Lane l's rows come from one generator of (seed, step, l) on the device, so they do not depend
    on how lanes are split over ranks.
    """
    lanes = (positions[::per_lane] // per_lane).tolist()  # a chunk is whole lanes, in order
    parts = []
    for lane in lanes:
        generator = torch.Generator(device).manual_seed(_seed(seed, _INTERPOLANT_NOISE, step, lane))
        parts.append(torch.randn((per_lane, *shape), generator=generator, device=device))
    return torch.cat(parts)


class LaneChunks(torch.utils.data.IterableDataset):
    """Yields, step after step, this rank's (or this worker's) lanes' chunks of the global batch.

    Each item holds, for n samples in global position order: x1 (n, C, H, W) float32 training
    latents, labels (n,) int64, drop and time uniforms (n,), positions (n,).
    A user error (a corrupt shard) is yielded as {"error": message} and ends the stream, so that
    it reaches the training process as one line even from a worker process.
    """

    def __init__(self, latents: Latents, *, lanes: list[int], num_lanes: int, per_lane: int, seed: int, buffer: int,
                 start_step: int, flip: bool, images: bool):
        super().__init__()
        self.latents, self.lanes, self.num_lanes = latents, lanes, num_lanes
        self.per_lane, self.seed, self.buffer, self.start_step = per_lane, seed, buffer, start_step
        self.flip, self.images = flip, images

    def _my_lanes(self) -> list[int]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.lanes
        share = len(self.lanes) // info.num_workers  # contiguous block per worker, in lane order
        return self.lanes[info.id * share : (info.id + 1) * share]

    def __iter__(self):
        try:
            yield from self._chunks()
        except SitctlError as error:
            yield {"error": str(error)}

    def _chunks(self) -> Iterator[dict]:
        lanes, cache, shape = self._my_lanes(), ShardCache(self.latents), self.latents.latent_shape
        consumed, k = self.start_step * self.per_lane, self.per_lane
        readers = [LaneReader(self.latents.shard_counts, self.num_lanes, lane, self.seed, self.buffer, consumed) for lane in lanes]
        positions = torch.tensor([lane * k + j for lane in lanes for j in range(k)])
        noise = torch.empty((k, *shape))  # scratch: the posterior noise of one lane's chunk
        step = self.start_step
        while True:
            # Each lane writes its rows of the chunk in place (no concatenation of per-lane tensors).
            n = len(positions)
            chunk = {"x1": torch.empty((n, *shape)), "labels": torch.empty(n, dtype=torch.int64),
                     "drop": torch.empty(n), "time": torch.empty(n), "positions": positions.clone()}
            if self.images:  # (n, S, S, 3) uint8 crops for the alignment encoder
                chunk["images"] = torch.empty((n, self.latents.image_size, self.latents.image_size, 3), dtype=torch.uint8)
            for row, reader in zip(range(0, n, k), readers):
                rows = slice(row, row + k)
                uniforms = lane_draws(self.seed, step, reader.lane, noise)
                flip = (uniforms[:, 0] < 0.5).numpy() & self.flip
                shards, samples = reader.take(k)
                views, labels = gather_views(cache, shards, samples, flip)
                if self.images:
                    gather_images(cache, shards, samples, flip, chunk["images"][rows])
                latents_from_moments(torch.from_numpy(views), noise, self.latents.scale_factor, out=chunk["x1"][rows])
                chunk["labels"][rows] = torch.from_numpy(labels)
                chunk["drop"][rows], chunk["time"][rows] = uniforms[:, 1], uniforms[:, 2]
            yield chunk
            step += 1


def rank_batches(
    latents: Latents, *, global_batch: int, num_lanes: int, rank: int, world_size: int,
    seed: int, buffer: int, workers: int, start_step: int, flip: bool = True, pin_memory: bool = False,
    images: bool = False,
) -> Iterator[dict]:
    """This rank's slice of every global batch from `start_step` on: positions [r B/W, (r+1) B/W).

    With `images`, each batch also holds "images" (n, S, S, 3) uint8: the crops the latents were
    encoded from, each in the view (original or flipped) of its latent.

    Raises SitctlError when lanes do not split evenly over batch, ranks and workers, and
    ArtifactError (one line, also from a worker process) when a shard is corrupt. `pin_memory`
    puts batches in page-locked memory so that copies to a GPU can be asynchronous.
    """
    check_lanes(num_lanes, global_batch, world_size, workers, latents.num_samples)
    per_rank = num_lanes // world_size
    lanes = list(range(rank * per_rank, (rank + 1) * per_rank))
    dataset = LaneChunks(
        latents, lanes=lanes, num_lanes=num_lanes, per_lane=global_batch // num_lanes,
        seed=seed, buffer=buffer, start_step=start_step, flip=flip, images=images,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals if workers else None, in_order=True, pin_memory=pin_memory,
    )
    return _join_workers(iter(loader), max(workers, 1), pin_memory)


def _joined(parts: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    """The workers' parts end to end; in page-locked memory when they were (a plain cat returns pageable
    memory, and a copy from it to a GPU is synchronous whatever `non_blocking` says)."""
    if not pin_memory:
        return torch.cat(parts)
    out = torch.empty((sum(len(part) for part in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
    return torch.cat(parts, out=out)


def _join_workers(items: Iterator[dict], workers: int, pin_memory: bool = False) -> Iterator[dict]:
    """One rank batch per step; closing this generator stops the loader's worker processes."""
    try:
        while True:
            # The loader returns worker items round-robin, so `workers` consecutive items are one step.
            parts = [next(items) for _ in range(workers)]
            for part in parts:
                if "error" in part:
                    raise ArtifactError(part["error"])
            yield parts[0] if workers == 1 else {key: _joined([part[key] for part in parts], pin_memory) for key in parts[0]}
    finally:
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


DEFAULT_LANES = 8  # the lane count runs have used since the start: kept where it works, so their data order stays


def default_lanes(global_batch: int, world_size: int, workers: int) -> int:
    """--data-lanes when not given: the smallest multiple of the readers (ranks x loader workers)
    from DEFAULT_LANES up that divides the global batch (8 for up to 8 readers and a batch of 8k),
    else one lane per reader (check_lanes then says why that cannot work)."""
    readers = world_size * max(workers, 1)
    for lanes in range(readers, global_batch + 1, readers):
        if lanes >= DEFAULT_LANES and global_batch % lanes == 0:
            return lanes
    return readers


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
