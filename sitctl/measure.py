"""Timed runs of the work a node must sustain: the network's forward and train step, the samplers,
and the training loader; each a plain function returning JSON-ready figures.

`sitctl doctor` runs them at small sizes and judges the figures against this hardware's
(sitctl.hardware); `python -m sitctl.bench` runs them at full sizes and tabulates them. Both import
this module and it imports neither. Timings use wall clock after warm-up, with CUDA synchronised.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.configs import model_config
from model.flops import forward_flops, train_step_flops
from model.interpolants import interpolant
from model.network import SiT
from pipelines.shards import Sample, shard_name, write_shard
from sitctl.artifacts import begin_artifact, finish_artifact, sha256_file
from sitctl.configs import SampleConfig
from sitctl.data import interpolant_noise, open_latents, rank_batches
from sitctl.decode import load_decoder
from sitctl.errors import BenchError
from sitctl.hardware import PRECISIONS, matmul_precision, peak_tflops, set_matmul_precision
from sitctl.memory import micro_batch_for_device
from sitctl.progress import peak_memory_gib
from sitctl.sample import class_labels, draw_latents
from sitctl.sample_source import Source


# ---------------------------------------------------------------------------------------------
# The network: forward and AdamW train step
# ---------------------------------------------------------------------------------------------


def _seconds_per_call(function, steps: int, warmup: int, device) -> float:
    """Mean wall time of `function()` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        function()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _micro_batch(config, precision: str, batch: int, device: torch.device) -> int:
    """The whole batch on a CPU (no device memory to plan); on a GPU the train stage's micro-batch (sitctl.memory)."""
    return micro_batch_for_device(config, precision, batch, device) if device.type == "cuda" else batch


def bench_model(model: str = "SiT-S/2", *, batch: int = 8, precision: str = "fp32", compile: bool = False,
                steps: int = 10, warmup: int = 3, device: str | None = None, **overrides) -> dict[str, object]:
    """Time the forward pass and an AdamW train step of `model` on random inputs; derive FLOP/s and MFU.

    `overrides` are SiTConfig fields (e.g. input_size=16, in_channels=3). The train step loss is
    a plain MSE to a random target: its cost is the network's, as with the real objectives. A batch
    whose activations do not fit the GPU trains in the micro-batches train would choose (the row
    says which), accumulating gradients: the same step and FLOPs. The forward, which saves nothing
    for a backward, runs the whole batch.
    """
    if precision not in PRECISIONS:
        raise BenchError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if batch < 1 or steps < 1 or warmup < 0:
        raise BenchError(f"batch and steps must be at least 1 and warmup at least 0, got {batch}, {steps}, {warmup}")
    config = model_config(model, **overrides)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    micro = _micro_batch(config, precision, batch, torch_device)
    net = SiT(config).to(torch_device)
    # Static graphs: the whole-batch forward and the micro-batch train step are two shapes, each
    # compiled for its own, not one graph for any batch.
    runner = torch.compile(net, dynamic=False) if compile else net
    generator = torch.Generator(torch_device).manual_seed(0)
    shape = (batch, config.in_channels, config.input_size, config.input_size)
    x = torch.randn(shape, device=torch_device, generator=generator)
    target = torch.randn(shape, device=torch_device, generator=generator)
    t = torch.rand(batch, device=torch_device, generator=generator)
    y = torch.randint(0, config.num_classes + 1, (batch,), device=torch_device, generator=generator)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def forward() -> None:
        with torch.no_grad():
            runner(x, t, y)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, batch, micro):
            part = slice(start, start + micro)
            loss = torch.nn.functional.mse_loss(runner(x[part], t[part], y[part]).float(), target[part])
            (loss * (micro / batch)).backward()  # the mean of equal parts' means: the whole batch's mean
        optimizer.step()

    with matmul_precision(precision, torch_device.type):
        forward_s = _seconds_per_call(forward, steps, warmup, torch_device)
        if torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(torch_device)
        train_s = _seconds_per_call(train_step, steps, warmup, torch_device)
    achieved = train_step_flops(config, batch) / train_s
    peak = peak_tflops(device_name, precision)
    return {
        "model": model, "device": device_name, "precision": precision, "compile": compile, "batch": batch,
        "micro_batch": micro,
        "input_shape": list(shape[1:]), "parameters": sum(p.numel() for p in net.parameters()),
        "forward_gmacs_per_image": forward_flops(config) / 1e9,
        "forward_ms": forward_s * 1e3, "train_step_ms": train_s * 1e3,
        "forward_images_per_s": batch / forward_s, "train_images_per_s": batch / train_s,
        "train_tflops": achieved / 1e12, "peak_memory_gib": peak_memory_gib(torch_device),
        "mfu": achieved / (peak * 1e12) if peak else None,
    }


# ---------------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------------


# (mode, method) pairs timed by bench_sampling; dopri5 adapts its steps, so it is timed once.
BENCH_SAMPLERS = (("ode", "euler"), ("ode", "heun"), ("ode", "dopri5"), ("sde", "euler"), ("sde", "heun"))


def bench_sampling(model: str = "SiT-XL/2", *, batch_size: int = 16, steps: tuple[int, ...] = (50, 250),
                   cfg_scales: tuple[float, ...] = (1.0, 1.5), samplers=BENCH_SAMPLERS, vae: str = "none",
                   device: str | None = None, tf32: bool = True, **overrides) -> dict[str, Any]:
    """Time one batch per (sampler, steps, cfg) on a randomly initialised `model`; return a dict of rows.

    Each row: images/s end to end, the share of time spent decoding latents with `vae`, the
    network evaluations (NFE) and the achieved FLOP/s = 2 x forward MACs x NFE x images (x2 under
    guidance: cond and uncond run as one doubled batch). The zero-initialised layers get random
    weights, so the velocity is not trivially 0; dopri5's step count on a random network is not
    that of a trained one. `overrides` are SiTConfig fields (e.g. input_size=16).
    """
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_matmul_precision("tf32" if tf32 else "fp32")
    config = model_config(model, **overrides)
    net = _randomised(SiT(config)).to(torch_device).eval()
    source = Source(net=net, model_config=config, interp=interpolant("linear"), pred="velocity", vae=vae, scale_factor=None,
                    artifact=None, identity="bench")
    decoder = load_decoder(source, torch_device)
    labels = class_labels(batch_size, config.num_classes, 0, "uniform")

    def run(settings: SampleConfig) -> tuple[float, float, int]:
        stats: dict[str, int] = {}
        _synchronize(torch_device)
        start = time.perf_counter()
        with torch.no_grad():
            latents = draw_latents(source, settings, list(range(batch_size)), labels, torch_device, stats)
            _synchronize(torch_device)
            middle = time.perf_counter()
            decoder(latents)
        _synchronize(torch_device)
        return middle - start, time.perf_counter() - middle, stats.get("nfe", 0)

    run(SampleConfig(checkpoint="-", out="-", mode="ode", method="euler", steps=2, num=batch_size))  # warm-up
    rows = []
    for mode, method in samplers:
        for count in steps[:1] if method == "dopri5" else steps:
            for cfg_scale in cfg_scales:
                settings = SampleConfig(checkpoint="-", out="-", mode=mode, method=method, steps=count,
                                        cfg_scale=cfg_scale, num=batch_size, batch_size=batch_size)
                sampling_s, decode_s, nfe = run(settings)
                forwards = nfe * batch_size * (2 if cfg_scale != 1.0 else 1)
                rows.append({
                    "mode": mode, "method": method, "steps": None if method == "dopri5" else count,
                    "cfg_scale": cfg_scale, "nfe": nfe, "images_per_s": batch_size / (sampling_s + decode_s),
                    "decode_share": decode_s / (sampling_s + decode_s),
                    "tflops": 2 * forward_flops(config) * forwards / sampling_s / 1e12,
                })
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    return {"model": model, "device": device_name, "batch_size": batch_size, "vae": vae, "tf32": tf32,
            "input_shape": [config.in_channels, config.input_size, config.input_size], "rows": rows}


def _randomised(net):
    """Give the zero-initialised adaLN and output layers small random weights (a stand-in for training)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.02, generator=generator)
    return net


# ---------------------------------------------------------------------------------------------
# The training loader
# ---------------------------------------------------------------------------------------------


def photo_crops(count: int, side: int = 256, seed: int = 0):
    """`count` (side, side, 3) uint8 crops at random places of scikit-learn's two sample photos
    (427x640 JPEGs): photographic content, so PNG sizes and decode times are those of real images."""
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
                interpolant_noise(0, step, chunk["positions"], batch // lanes, latents.latent_shape, torch.device("cpu"))
            count, step = count + len(chunk["labels"]), step + 1
        steady, per_cpu_second = count / (time.perf_counter() - first), count / (time.process_time() - first_cpu)
        stream.close()
    finally:
        torch.set_num_threads(saved)
    return first - started, steady, per_cpu_second, count


def sha256_rate(latents_dir: Path) -> float:
    """Latents per CPU-second that one core hashes: the loader checks each shard's sha256 once per process."""
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
