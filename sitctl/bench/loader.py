"""Benchmark of the training loader: start-up and steady-state latents/s that one core reads."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from sitctl.errors import BenchError

def photo_crops(count: int, side: int = 256, seed: int = 0):
    """`count` (side, side, 3) uint8 crops at random places of scikit-learn's two sample photos
    (427x640 JPEGs): photographic content, so PNG sizes and decode times are those of real images."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos, rng = load_sample_images().images, np.random.default_rng(seed)
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
        yield np.ascontiguousarray(photo[top : top + side, left : left + side])


def synthetic_latents(out: Path, samples: int, *, shape: tuple[int, int, int] = (4, 32, 32), shard_size: int = 512,
                      num_classes: int = 1000, vae: dict | None = None, encoder_targets: str = "none") -> Path:
    """A latents artifact of `samples` random moments of `shape`, written by encode's own shard writer.

    The default shape is ImageNet-256's SD-VAE latent; 512 samples a shard gives 8 shards for the
    default 4096 samples, one per lane of the default 8, so lanes read whole files as on real data.
    `vae` is the {name, source} recorded as the encoder (a local VAE folder lets `sitctl sample` decode).
    With encoder_targets images or png each sample also keeps a 256-px photo crop, as encode does for REPA.
    """
    import numpy as np

    from pipelines.shards import Sample, shard_name, write_shard
    from sitctl.artifacts import begin_artifact, finish_artifact

    rng = np.random.default_rng(0)
    crops = photo_crops(samples) if encoder_targets != "none" else None
    staging, shards = begin_artifact(out), []
    for index, start in enumerate(range(0, samples, shard_size)):
        batch = [Sample(key=f"{position:08d}", label=position % num_classes, path=f"synthetic/{position}",
                        moments=rng.standard_normal((2, 2, *shape), dtype=np.float32).astype(np.float16),
                        image=next(crops) if crops else None, image_format="png" if encoder_targets == "png" else "npy")
                 for position in range(start, min(start + shard_size, samples))]
        write_shard(staging / shard_name(index), batch)
        shards.append({"name": shard_name(index), "count": len(batch)})
    extra = {"shards": shards, "num_samples": samples, "num_classes": num_classes, "latent_shape": list(shape),
             "scale_factor": 0.18215, "vae": vae or {"name": "synthetic", "source": None}, "num_errors": 0,
             "image_size": 256, "encoder_targets": encoder_targets}
    finish_artifact(staging, out, kind="latents", config={"source": "synthetic"}, extra=extra)
    return out


def _single_core():
    """torch on one intra-op thread for the duration, as in a DataLoader worker: a per-core rate."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    return saved


def time_loader(latents_dir: Path, *, batch: int, lanes: int, buffer: int, seconds: float,
                with_x0: bool = False, images: bool = False) -> tuple[float, float, float, int]:
    """(seconds to the first batch, steady-state latents/s after it and per CPU-second, latents drawn).

    The rate per CPU-second (process time) is what one idle core would give; it differs from the
    wall-clock rate when other processes share the cores.

    with_x0 also draws each batch's interpolant noise on this core, as training on a CPU does
    (on a GPU it is drawn there): the work the loader did before it moved to the device.
    """
    import torch

    from sitctl import data
    from sitctl.data import open_latents, rank_batches

    latents = open_latents(latents_dir)
    lanes = min(lanes, latents.num_samples)
    batch = max(batch // lanes, 1) * lanes
    saved = _single_core()
    try:
        started = time.perf_counter()
        stream = rank_batches(latents, global_batch=batch, num_lanes=lanes, rank=0, world_size=1, seed=0,
                              buffer=buffer, workers=0, start_step=0, images=images)
        next(stream)  # start-up: index/open the first shards and fill the shuffle buffers
        first, first_cpu = time.perf_counter(), time.process_time()
        count, step = 0, 0
        while time.perf_counter() - first < seconds:
            chunk = next(stream)
            if with_x0:
                data.interpolant_noise(0, step, chunk["positions"], batch // lanes, latents.latent_shape, torch.device("cpu"))
            count, step = count + len(chunk["labels"]), step + 1
        steady, per_cpu_second = count / (time.perf_counter() - first), count / (time.process_time() - first_cpu)
        stream.close()
    finally:
        torch.set_num_threads(saved)
    return first - started, steady, per_cpu_second, count


def sha256_rate(latents_dir: Path) -> float:
    """Latents per CPU-second that one core hashes: the loader checks each shard's sha256 once per process."""
    from sitctl.artifacts import sha256_file
    from sitctl.data import open_latents

    latents = open_latents(latents_dir)
    started = time.process_time()
    for path in latents.shard_paths:
        sha256_file(Path(path))
    return latents.num_samples / (time.process_time() - started)


def bench_loader_rate(latents: str | None = None, *, images: int = 4096, batch: int = 256, lanes: int = 8,
                      buffer: int = 1000, seconds: float = 5.0, encoder_targets: str = "none") -> dict[str, object]:
    """Start-up time and steady-state latents/s of the training loader on one core.

    On `latents`, or on `images` synthetic 4x32x32 latents written now (ImageNet-256's shape),
    keeping photo crops for REPA's encoder when `encoder_targets` says so. When the latents keep
    crops, the loader reads (and decodes) them too, as a REPA run does.
    """
    if images < 1 or batch < 1 or lanes < 1 or buffer < 1 or seconds <= 0:
        raise BenchError(f"images, batch, lanes and buffer must be at least 1 and seconds above 0, "
                         f"got {images}, {batch}, {lanes}, {buffer}, {seconds}")
    from sitctl.data import open_latents

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(latents) if latents else synthetic_latents(Path(scratch) / "latents", images,
                                                                encoder_targets=encoder_targets)
        opened = open_latents(path)
        kept = opened.encoder_targets != "none"
        startup, rate, cpu_rate, count = time_loader(path, batch=batch, lanes=lanes, buffer=buffer, seconds=seconds,
                                                     images=kept)
        _, rate_with_x0, cpu_rate_with_x0, _ = time_loader(path, batch=batch, lanes=lanes, buffer=buffer, seconds=seconds,
                                                           with_x0=True, images=kept)
        hashing = sha256_rate(path)
        shard_bytes = sum(Path(shard).stat().st_size for shard in opened.shard_paths)
    return {
        "encoder_targets": opened.encoder_targets, "bytes_per_sample": shard_bytes / opened.num_samples,
        "latents": str(latents) if latents else f"synthetic x{images}, written now",
        "num_samples": opened.num_samples, "latent_shape": list(opened.latent_shape),
        "batch": batch, "lanes": lanes, "shuffle_buffer": buffer, "seconds": seconds, "latents_drawn": count,
        "startup_s": startup, "latents_per_s": rate, "latents_per_cpu_s": cpu_rate,
        "latents_per_s_with_x0": rate_with_x0, "latents_per_cpu_s_with_x0": cpu_rate_with_x0,
        "sha256_latents_per_cpu_s": hashing,
    }
