"""The encode stage: raw images -> a `latents` artifact of WebDataset shards of VAE moments.

Items are put in a fixed order (a seeded permutation, so every shard mixes classes), cut into
shards of `shard_size`, and shard i is encoded by rank i % world_size. A shard's bytes depend
only on its items, so the output is the same for 1 or N processes and for a run resumed after a
crash: complete shards in the staging directory are kept (their done marker's sha256 still
matches), the rest are redone. Rank 0 writes the manifest once every rank has finished.
A SIGTERM or SIGINT stops the stage after the batch in hand (sitctl/signals.py); the finished
shards stay, and the same command continues.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from pipelines.moments import latent_moments, pixels_to_tensor, resolved_precision
from pipelines.shards import PROGRESS_DIR, Sample, done_record, mark_done, shard_name, write_shard
from pipelines.sources import CroppedImages, ImageSource, SourceError, collate_items, open_source
from sitctl import distributed
from sitctl.artifacts import Artifact, begin_artifact, disk_errors, finish_artifact, output_lock, staging_dir
from sitctl.configs import EncodeConfig
from sitctl.distributed import usable_cores
from sitctl.errors import ArtifactError, SitctlError
from sitctl.identity import check_continues, read_request, record_request
from sitctl.progress import progress_bar
from sitctl.records import LatentsInfo
from sitctl.signals import Interrupted, ignore_stop_signals, stop_on_signals
from sitctl.vae import load_vae

CRASH_AFTER_SHARDS_ENV = "SITCTL_TEST_CRASH_AFTER_SHARDS"  # test hook: exit hard after N shards
ERRORS_FILE = "errors.jsonl"
DEFAULT_WORKERS = 4  # decoding processes when --workers is not given, at most one per usable core




def encode(config: EncodeConfig) -> Artifact | None:
    """Run the stage on this process's share of shards; rank 0 returns the finished artifact."""
    dist = distributed.setup(config.device)
    try:
        # Everything a user can get wrong is checked on every rank before any collective call.
        source = open_source(config.src)
        vae, vae_info = load_vae(config.vae, dist.device)
        if config.image_size % vae_info["downsample"]:
            raise SitctlError(f"--image-size {config.image_size} is not a multiple of the VAE's downsampling {vae_info['downsample']}")
        with stop_on_signals() as stop, output_lock(config.out, dist), disk_errors("write", staging_dir(config.out)):  # full or read-only disk: one line
            staging = begin_artifact(config.out)
            note = read_request(staging)
            if note is not None:  # a partial encode: continue it only with the settings it was begun with
                check_continues(note, config, f"the partial encode {staging}", "rerun with the same options or delete it",
                                error=ArtifactError)
            distributed.barrier(dist)  # every rank has read the note before rank 0 rewrites it
            if dist.is_main:
                record_request(staging, config)  # also lets a rerun of the same command in a workspace resume it
            shards = plan_shards(len(source), config)
            mine = {index: items for index, items in enumerate(shards) if index % dist.world_size == dist.rank}
            finished = encode_shards(source, mine, staging, vae, config, dist.device, show_progress=dist.is_main)
            signum = distributed.stop_signal(dist, stop.signum, finished)  # every rank stops, or none
            if signum:
                done = sum(done_record(staging, index) is not None for index in range(len(shards)))
                raise Interrupted(signum, f"with {done} of {len(shards)} shards finished in {staging}", quiet=not dist.is_main)
            distributed.barrier(dist)
            if not dist.is_main:
                return None
            ran = resolved_precision(dist.device, config.precision)  # what the manifest records, not "auto"
            return _finish(staging, config, source, len(shards), vae_info | {"precision": ran})
    finally:
        distributed.teardown(dist)


def plan_shards(count: int, config: EncodeConfig) -> list[np.ndarray]:
    """Item indices of each shard: the seeded order, cut to --limit, in runs of shard_size."""
    order = np.arange(count) if config.order_seed is None else np.random.default_rng(config.order_seed).permutation(count)
    order = order[: config.limit]
    return [order[start : start + config.shard_size] for start in range(0, len(order), config.shard_size)]


# ---------------------------------------------------------------------------------------------
# Encoding this rank's shards
# ---------------------------------------------------------------------------------------------


def encode_shards(
    source: ImageSource, shards: dict[int, np.ndarray], staging: Path, vae, config: EncodeConfig, device, *, show_progress: bool
) -> bool:
    """Encode every shard in `shards` (global index -> item indices) not already done in `staging`; True when all are.

    A stop signal returns False after the batch in hand: the shard in progress is redone by the rerun.
    """
    pending = {index: items for index, items in shards.items() if done_record(staging, index) is None}
    # Batches never straddle two shards, and are the same whichever rank encodes the shard.
    batches, owners = [], []
    for index, items in sorted(pending.items()):
        for start in range(0, len(items), config.batch_size):
            batches.append(items[start : start + config.batch_size].tolist())
            owners.append((index, start + config.batch_size >= len(items)))
    workers = config.workers if config.workers is not None else min(DEFAULT_WORKERS, usable_cores())
    loader = DataLoader(
        CroppedImages(source, config.image_size), batch_sampler=batches, num_workers=workers, collate_fn=collate_items,
        worker_init_fn=ignore_stop_signals if workers else None,
    )
    crash_after = int(os.environ.get(CRASH_AFTER_SHARDS_ENV, "0"))
    written, samples, errors = 0, [], []
    total = sum(len(items) for items in pending.values())
    with stop_on_signals() as stop, progress_bar("encode", total, unit="images", main=show_progress) as advance:
        for position, ((index, last), batch) in enumerate(zip(owners, loader), start=1):
            batch_samples, batch_errors = _encode_batch(batch, source, vae, config, device)
            samples += batch_samples
            errors += batch_errors
            advance(len(batch))
            if last:
                _write_shard(staging, index, samples, errors, len(source.class_names))
                written, samples, errors = written + 1, [], []
                if written == crash_after:
                    os._exit(75)  # simulate a kill: no cleanup, no finally blocks
            if stop and position < len(owners):
                return False
    return True


def _encode_batch(batch: list, source: ImageSource, vae, config: EncodeConfig, device) -> tuple[list[Sample], list[dict]]:
    """Decoded (index, crop, reason) triples -> stored samples, and error records for the rest."""
    good = [(index, crop) for index, crop, _ in batch if crop is not None]
    errors = [
        {"key": source.keys[index], "path": source.paths[index], "reason": reason}
        for index, crop, reason in batch if crop is None
    ]
    if not good:
        return [], errors
    moments = latent_moments(vae, pixels_to_tensor([crop for _, crop in good], device), config.precision)  # (n, 2, 2, C, h, w)
    keep = config.encoder_targets != "none"  # the unflipped crop; training mirrors it with the latent's view
    image_format = "png" if config.encoder_targets == "png" else "npy"
    samples = [
        Sample(key=source.keys[index], label=source.labels[index], moments=moment, path=source.paths[index],
               image=crop if keep else None, image_format=image_format)
        for (index, crop), moment in zip(good, moments)
    ]
    return samples, errors


def _write_shard(staging: Path, index: int, samples: list[Sample], errors: list[dict], num_classes: int) -> None:
    sha256 = write_shard(staging / shard_name(index), samples)
    histogram = np.bincount([s.label for s in samples], minlength=num_classes).tolist()
    record = {"name": shard_name(index), "count": len(samples), "sha256": sha256, "histogram": histogram, "errors": errors}
    mark_done(staging, index, record)


# ---------------------------------------------------------------------------------------------
# Finishing (rank 0)
# ---------------------------------------------------------------------------------------------


def _finish(staging: Path, config: EncodeConfig, source: ImageSource, num_shards: int, vae_info: dict) -> Artifact:
    """Merge the shards' done markers into errors.jsonl and the manifest, then publish the artifact."""
    records = [done_record(staging, index) for index in range(num_shards)]
    if any(record is None for record in records):
        raise RuntimeError(f"{staging}: shards missing after every rank finished")  # a bug, not user input
    errors = [error for record in records for error in record["errors"]]
    num_samples = sum(record["count"] for record in records)
    if num_samples == 0:
        raise SourceError(f"no readable images in {config.src} ({len(errors)} files failed; see {staging / PROGRESS_DIR})")
    with open(staging / ERRORS_FILE, "w") as handle:
        handle.writelines(json.dumps(error) + "\n" for error in errors)
    side = config.image_size // vae_info["downsample"]
    extra = LatentsInfo(
        shards=[{"name": record["name"], "count": record["count"]} for record in records],
        num_samples=num_samples,
        num_classes=len(source.class_names),
        class_names=source.class_names,
        latent_shape=[vae_info["latent_channels"], side, side],
        scale_factor=vae_info["scale_factor"],
        image_size=config.image_size,
        vae={"name": vae_info["name"], "source": vae_info["source"]},
        class_histogram=np.sum([record["histogram"] for record in records], axis=0).tolist(),
        num_errors=len(errors),
        source={"name": source.name, "root": source.root},
        encoder_targets=config.encoder_targets,
        vae_precision=vae_info["precision"],
    ).to_extra()
    # The progress records (settings included) go only after the rename: see finish_artifact.
    return finish_artifact(staging, config.out, kind="latents", config=asdict(config), extra=extra, private=[PROGRESS_DIR])
