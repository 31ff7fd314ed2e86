"""Benchmarks, one subcommand each: `python -m sitctl.bench model --model SiT-S/2 --batch 8`.

Each subcommand is a thin typer function around a plain `bench_*(...) -> dict` function, so
tests and notebooks can call the function. `all` runs every stage's benchmark (model step,
loader, encode, sampling, Inception features) at sizes that fit the device, writes a `bench`
artifact with results.json, and rewrites this device's section of BENCHMARKS.md. Timings use
wall clock after warm-up steps, with CUDA synchronised, so they include kernel launch overhead
as a real run would.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer

from sitctl.errors import SitctlError
from sitctl.progress import peak_memory_gib

PRECISIONS = ("fp32", "tf32", "bf16")

# Dense peak TFLOP/s per precision (NVIDIA data sheets, SXM parts unless named; no sparsity).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


class BenchError(SitctlError):
    """A benchmark was asked for something it cannot measure."""


app = typer.Typer(
    name="sitctl-bench",
    help="Benchmarks of sitctl's parts on this machine's CPU or GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """Benchmarks of sitctl's parts on this machine's CPU or GPU."""


# ---------------------------------------------------------------------------------------------
# model: forward and AdamW train step of the SiT network
# ---------------------------------------------------------------------------------------------


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for `precision`, or None where it is not in the table (CPUs)."""
    for name, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100" on purpose
        if name in device_name:
            return peaks[precision]
    return None


@contextmanager
def matmul_precision(precision: str, device_type: str):
    """Set fp32 matmuls to exact (fp32) or TF32 and autocast to bf16 (bf16), restoring on exit."""
    import torch

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _seconds_per_call(function, steps: int, warmup: int, device) -> float:
    """Mean wall time of `function()` over `steps` calls after `warmup` untimed ones."""
    import torch

    for _ in range(warmup):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def bench_model(model: str = "SiT-S/2", *, batch: int = 8, precision: str = "fp32", compile: bool = False,
                steps: int = 10, warmup: int = 3, device: str | None = None, **overrides) -> dict[str, object]:
    """Time the forward pass and an AdamW train step of `model` on random inputs; derive FLOP/s and MFU.

    `overrides` are SiTConfig fields (e.g. input_size=16, in_channels=3). The train step loss is
    a plain MSE to a random target: its cost is the network's, as with the real objectives.
    """
    if precision not in PRECISIONS:
        raise BenchError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if batch < 1 or steps < 1 or warmup < 0:
        raise BenchError(f"batch and steps must be at least 1 and warmup at least 0, got {batch}, {steps}, {warmup}")
    import torch

    from model.configs import model_config
    from model.flops import forward_flops, train_step_flops
    from model.network import SiT

    config = model_config(model, **overrides)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    net = SiT(config).to(torch_device)
    runner = torch.compile(net) if compile else net
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
        loss = torch.nn.functional.mse_loss(runner(x, t, y).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
        "input_shape": list(shape[1:]), "parameters": sum(p.numel() for p in net.parameters()),
        "forward_gmacs_per_image": forward_flops(config) / 1e9,
        "forward_ms": forward_s * 1e3, "train_step_ms": train_s * 1e3,
        "forward_images_per_s": batch / forward_s, "train_images_per_s": batch / train_s,
        "train_tflops": achieved / 1e12, "peak_memory_gib": peak_memory_gib(torch_device),
        "mfu": achieved / (peak * 1e12) if peak else None,
    }


@app.command("model")
def model_command(
    model: str = typer.Option("SiT-S/2", help="Model name, e.g. SiT-XL/2."),
    batch: int = typer.Option(8, help="Images per step."),
    precision: str = typer.Option("fp32", help="fp32, tf32 (TF32 matmuls) or bf16 (autocast)."),
    compile: bool = typer.Option(False, "--compile", help="Run the network through torch.compile."),
    steps: int = typer.Option(10, help="Timed steps (after the warm-up)."),
    warmup: int = typer.Option(3, help="Untimed warm-up steps (compilation happens here)."),
    input_size: int = typer.Option(32, help="Input side in latent cells (32 = 256x256 images)."),
    channels: int = typer.Option(4, help="Input channels (4 for SD-VAE latents)."),
    device: str = typer.Option(None, help="Device; default cuda if present, else cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Forward time, AdamW train-step time, images/s, achieved FLOP/s, peak memory and MFU of a SiT."""
    result = bench_model(model, batch=batch, precision=precision, compile=compile, steps=steps, warmup=warmup,
                         device=device, input_size=input_size, in_channels=channels)
    print_result(result, as_json)


# ---------------------------------------------------------------------------------------------
# encode: decode-and-crop images/s per core, and VAE images/s (sitctl/bench_encode.py)
# ---------------------------------------------------------------------------------------------


@app.command("encode")
def encode_command(
    src: str = typer.Option("synthetic", help="Image folder, digits, fashion-mnist[:DIR], or synthetic (500x375 JPEGs)."),
    image_size: int = typer.Option(256, help="Center-crop side in pixels."),
    vae: str = typer.Option("none", help="ema, mse, none, a local AutoencoderKL directory, or sd-random (SD architecture, random weights)."),
    images: int = typer.Option(64, help="Images to decode for the per-core rate."),
    batch: int = typer.Option(32, help="Images per VAE forward (each with its flip)."),
    steps: int = typer.Option(3, help="Timed VAE batches (after one warm-up)."),
    precision: str = typer.Option("auto", help="VAE autocast: auto, fp32, fp16, bf16."),
    device: str = typer.Option(None, help="Device; default cuda if present, else cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Decode-and-crop images/s on one CPU core, and VAE encode images/s on the device."""
    from sitctl.bench_encode import bench_encode

    result = bench_encode(src, image_size=image_size, vae=vae, images=images, batch=batch, steps=steps,
                          precision=precision, device=device)
    print_result(result, as_json)


# ---------------------------------------------------------------------------------------------
# loader: training latents per second that one core reads from a latents artifact
# ---------------------------------------------------------------------------------------------


def synthetic_latents(out: Path, samples: int, *, shape: tuple[int, int, int] = (4, 32, 32), shard_size: int = 512,
                      num_classes: int = 1000) -> Path:
    """A latents artifact of `samples` random moments of `shape`, written by encode's own shard writer.

    The default shape is ImageNet-256's SD-VAE latent; 512 samples a shard gives 8 shards for the
    default 4096 samples, one per lane of the default 8, so lanes read whole files as on real data.
    """
    import numpy as np

    from pipelines.shards import Sample, shard_name, write_shard
    from sitctl.artifacts import begin_artifact, finish_artifact

    rng = np.random.default_rng(0)
    staging, shards = begin_artifact(out), []
    for index, start in enumerate(range(0, samples, shard_size)):
        batch = [Sample(key=f"{position:08d}", label=position % num_classes, path=f"synthetic/{position}",
                        moments=rng.standard_normal((2, 2, *shape), dtype=np.float32).astype(np.float16))
                 for position in range(start, min(start + shard_size, samples))]
        write_shard(staging / shard_name(index), batch)
        shards.append({"name": shard_name(index), "count": len(batch)})
    extra = {"shards": shards, "num_samples": samples, "num_classes": num_classes, "latent_shape": list(shape),
             "scale_factor": 0.18215, "vae": {"name": "synthetic", "source": None}, "num_errors": 0}
    finish_artifact(staging, out, kind="latents", config={"source": "synthetic"}, extra=extra)
    return out


def _single_core():
    """torch on one intra-op thread for the duration, as in a DataLoader worker: a per-core rate."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    return saved


def time_loader(latents_dir: Path, *, batch: int, lanes: int, buffer: int, seconds: float,
                with_x0: bool = False) -> tuple[float, float, float, int]:
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
                              buffer=buffer, workers=0, start_step=0)
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
                      buffer: int = 1000, seconds: float = 5.0) -> dict[str, object]:
    """Start-up time and steady-state latents/s of the training loader on one core.

    On `latents`, or on `images` synthetic 4x32x32 latents written now (ImageNet-256's shape).
    """
    if images < 1 or batch < 1 or lanes < 1 or buffer < 1 or seconds <= 0:
        raise BenchError(f"images, batch, lanes and buffer must be at least 1 and seconds above 0, "
                         f"got {images}, {batch}, {lanes}, {buffer}, {seconds}")
    from sitctl.data import open_latents

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(latents) if latents else synthetic_latents(Path(scratch) / "latents", images)
        opened = open_latents(path)
        startup, rate, cpu_rate, count = time_loader(path, batch=batch, lanes=lanes, buffer=buffer, seconds=seconds)
        _, rate_with_x0, cpu_rate_with_x0, _ = time_loader(path, batch=batch, lanes=lanes, buffer=buffer, seconds=seconds,
                                                           with_x0=True)
        hashing = sha256_rate(path)
    return {
        "latents": str(latents) if latents else f"synthetic x{images}, written now",
        "num_samples": opened.num_samples, "latent_shape": list(opened.latent_shape),
        "batch": batch, "lanes": lanes, "shuffle_buffer": buffer, "seconds": seconds, "latents_drawn": count,
        "startup_s": startup, "latents_per_s": rate, "latents_per_cpu_s": cpu_rate,
        "latents_per_s_with_x0": rate_with_x0, "latents_per_cpu_s_with_x0": cpu_rate_with_x0,
        "sha256_latents_per_cpu_s": hashing,
    }


@app.command("loader")
def loader_command(
    latents: str = typer.Option(None, help="A latents artifact; default: synthetic 4x32x32 latents written to a temp dir."),
    images: int = typer.Option(4096, help="Synthetic latents to write when no --latents is given."),
    batch: int = typer.Option(256, help="Latents per batch."),
    lanes: int = typer.Option(8, help="Data lanes (the train default)."),
    buffer: int = typer.Option(1000, help="Shuffle buffer per lane (the train default)."),
    seconds: float = typer.Option(5.0, help="How long to draw batches after the first."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Start-up seconds and steady-state latents/s that one core reads, decodes and noises (in-process)."""
    print_result(bench_loader_rate(latents, images=images, batch=batch, lanes=lanes, buffer=buffer, seconds=seconds),
                 as_json)


# ---------------------------------------------------------------------------------------------
# sampling: images/s, NFE and FLOP/s per sampler, step count and guidance scale
# ---------------------------------------------------------------------------------------------


def parse_samplers(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """'ode:heun' -> ('ode', 'heun'), for each spec."""
    parsed = tuple(tuple(spec.split(":")) for spec in specs)
    for spec, pair in zip(specs, parsed):
        if len(pair) != 2:
            raise BenchError(f"--sampler takes MODE:METHOD such as ode:heun or sde:euler, got {spec!r}")
    return parsed


@app.command("sampling")
def sampling_command(
    model: str = typer.Option("SiT-XS/4", help="Model name (random weights), e.g. SiT-XL/2."),
    batch: int = typer.Option(8, help="Images per batch."),
    steps: list[int] = typer.Option([20], "--steps", help="Step counts (repeat the option for several)."),
    cfg_scale: list[float] = typer.Option([1.0, 1.5], "--cfg-scale", help="Guidance scales; 1 is unguided (repeatable)."),
    sampler: list[str] = typer.Option(["ode:heun", "sde:euler"], "--sampler", help="MODE:METHOD (repeatable)."),
    input_size: int = typer.Option(32, help="Input side in latent cells."),
    vae: str = typer.Option("none", help="Decoder: none, ema, mse or a local AutoencoderKL directory."),
    device: str = typer.Option(None, help="Device; default cuda if present, else cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Images/s, network evaluations and FLOP/s of each sampler on a randomly initialised SiT."""
    if batch < 1 or min(steps) < 1:
        raise BenchError(f"--batch and --steps must be at least 1, got {batch} and {min(steps)}")
    from sitctl.sample import bench_sampling

    result = bench_sampling(model, batch_size=batch, steps=tuple(steps), cfg_scales=tuple(cfg_scale),
                            samplers=parse_samplers(sampler), vae=vae, device=device, input_size=input_size)
    rows = result.pop("rows")
    print_result(result | {"rows": rows} if as_json else result, as_json)
    if not as_json:
        print_rows(rows)


# ---------------------------------------------------------------------------------------------
# inception: FID feature extraction images/s
# ---------------------------------------------------------------------------------------------


@app.command("inception")
def inception_command(
    batch: int = typer.Option(32, help="Images per forward."),
    images: int = typer.Option(32, help="Timed images (after one warm-up batch)."),
    image_size: int = typer.Option(256, help="Side of the random uint8 images (resized to 299 inside)."),
    weights: str = typer.Option(None, help="Inception weights file; default: the cached or bundled ones."),
    device: str = typer.Option(None, help="Device; default cuda if present, else cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Images/s of the FID Inception's 2048-d pool features, as `sitctl eval` extracts them."""
    if batch < 1 or images < 1:
        raise BenchError(f"--batch and --images must be at least 1, got {batch} and {images}")
    from sitctl.evaluate.inception import bench_inception

    print_result(bench_inception(batch, images, device=device, weights=weights, image_size=image_size), as_json)


# ---------------------------------------------------------------------------------------------
# all: every benchmark at sizes that fit the device -> bench artifact + BENCHMARKS.md section
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """The sizes `all` runs each benchmark at; written into the bench artifact. Defaults fit a 2-core CPU."""

    device: str | None = None
    """Device; None picks CUDA when present."""
    models: tuple[tuple[str, int, str], ...] = (("SiT-S/2", 8, "fp32"), ("SiT-XS/4", 8, "fp32"))
    """(model, batch, precision) of each model-step benchmark, on 4x32x32 latents (256x256 images)."""
    model_steps: int = 4
    """Timed forward passes and train steps per model."""
    model_warmup: int = 2
    """Untimed warm-up calls per model."""
    loader_latents: str | None = None
    """A latents artifact for the loader; None writes `loader_images` synthetic 4x32x32 latents to a temp dir."""
    loader_images: int = 4096
    """Synthetic latents to write when no loader_latents is given."""
    loader_batch: int = 256
    """Latents per loader batch."""
    loader_seconds: float = 5.0
    """How long the loader draws batches."""
    encode_image_size: int = 256
    """Center-crop side of the encode benchmark, on synthetic 500x375 JPEGs."""
    encode_images: int = 64
    """Images decoded and cropped for the per-core rate."""
    encode_vae: str = "none"
    """VAE timed by the encode benchmark: none, sd-random (the SD architecture, random weights), ema, mse."""
    encode_batch: int = 8
    """Images per VAE forward."""
    sampling_model: str = "SiT-XS/4"
    """Model (random weights) the samplers run."""
    sampling_batch: int = 8
    """Images per sampling batch."""
    sampling_steps: tuple[int, ...] = (20,)
    """Step counts of each sampler."""
    sampling_cfg_scales: tuple[float, ...] = (1.0, 1.5)
    """Guidance scales; 1 is unguided, others double the network batch."""
    sampling_samplers: tuple[tuple[str, str], ...] = (("ode", "heun"), ("sde", "euler"))
    """(mode, method) of each sampler."""
    inception_batch: int = 16
    """Images per Inception forward."""
    inception_images: int = 32
    """Timed Inception images (after one warm-up batch)."""
    inception_image_size: int = 256
    """Side of the random images fed to the Inception."""

    def __post_init__(self):
        for _, batch, precision in self.models:
            if precision not in PRECISIONS or batch < 1:
                raise BenchError(f"model sizes need a batch of at least 1 and a precision in {PRECISIONS}, got {batch}, {precision!r}")
        counts = ("model_steps", "loader_images", "loader_batch", "encode_image_size", "encode_images", "encode_batch",
                  "sampling_batch", "inception_batch", "inception_images", "inception_image_size")
        for name in counts:
            if getattr(self, name) < 1:
                raise BenchError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.loader_seconds <= 0 or self.model_warmup < 0 or min(self.sampling_steps, default=0) < 1:
            raise BenchError("loader_seconds must be above 0, model_warmup at least 0 and sampling_steps at least 1")


# Sizes for a datacenter GPU: the paper's SiT-XL/2 at the batch sizes of a real run.
CUDA_SIZES = dict(
    models=(("SiT-XL/2", 32, "bf16"), ("SiT-XL/2", 256, "bf16"), ("SiT-XL/2", 32, "tf32"), ("SiT-B/2", 256, "bf16")),
    model_steps=10, model_warmup=3, encode_images=256, encode_vae="sd-random", encode_batch=32,
    sampling_model="SiT-XL/2", sampling_batch=64, sampling_steps=(50, 250),
    sampling_samplers=(("ode", "euler"), ("ode", "heun"), ("ode", "dopri5"), ("sde", "euler"), ("sde", "heun")),
    inception_batch=64, inception_images=1024,
)


def sizes_for(device: str | None, **overrides) -> BenchConfig:
    """The CPU defaults, or CUDA_SIZES when the device is a GPU; `overrides` win."""
    import torch

    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return BenchConfig(device=device, **((CUDA_SIZES if on_cuda else {}) | overrides))


def run_benchmarks(config: BenchConfig) -> dict[str, object]:
    """Every benchmark at `config`'s sizes; one entry per stage (model and sampling hold lists)."""
    from sitctl.bench_encode import bench_encode
    from sitctl.evaluate.inception import bench_inception
    from sitctl.sample import bench_sampling

    return {
        "model": [bench_model(model, batch=batch, precision=precision, steps=config.model_steps,
                              warmup=config.model_warmup, device=config.device)
                  for model, batch, precision in config.models],
        "loader": bench_loader_rate(config.loader_latents, images=config.loader_images, batch=config.loader_batch,
                                    seconds=config.loader_seconds),
        "encode": bench_encode("synthetic", image_size=config.encode_image_size, vae=config.encode_vae,
                               images=config.encode_images, batch=config.encode_batch, device=config.device),
        "sampling": bench_sampling(config.sampling_model, batch_size=config.sampling_batch, steps=config.sampling_steps,
                                   cfg_scales=config.sampling_cfg_scales, samplers=config.sampling_samplers,
                                   device=config.device),
        "inception": bench_inception(config.inception_batch, config.inception_images, device=config.device,
                                     image_size=config.inception_image_size),
    }


def device_label(device: str | None) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo) and core count: the BENCHMARKS.md heading."""
    import torch

    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_device.type == "cuda":
        return torch.cuda.get_device_name(torch_device)
    import platform

    name = platform.processor() or platform.machine() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _rate(value: float) -> str:
    """Three significant figures, without an exponent for rates of 1000 and up."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def figure_rows(results: dict) -> list[tuple[str, str, str]]:
    """(benchmark, setting, figures) per measured row, for the BENCHMARKS.md table."""
    rows = []
    for run in results["model"]:
        mfu = f", MFU {run['mfu']:.1%}" if run["mfu"] is not None else ""
        # On a CPU the figure is the process's peak resident set so far, not this model's: left out.
        memory = f", peak memory {run['peak_memory_gib']:.2f} GiB" if run["device"] != "cpu" else ""
        rows.append(("model step", f"{run['model']}, batch {run['batch']}, {run['precision']}",
                     f"train step {run['train_step_ms']:.0f} ms ({_rate(run['train_images_per_s'])} img/s), "
                     f"forward {run['forward_ms']:.0f} ms, {run['train_tflops']:.3g} TFLOP/s{mfu}{memory}"))
    loader = results["loader"]
    shape = "x".join(map(str, loader["latent_shape"]))
    rows.append(("loader", f"{shape} latents, batch {loader['batch']}, 1 core",
                 f"{_rate(loader['latents_per_s'])} latents/s steady, start-up {loader['startup_s']:.2f} s"))
    encode = results["encode"]
    rows.append(("encode", f"decode + crop 500x375 JPEG to {encode['image_size']}px, 1 core",
                 f"{_rate(encode['decode_crop_images_per_s_per_core'])} img/s"))
    rows.append(("encode", f"VAE {encode['vae']}, batch {encode['batch']} (+ flips)", f"{_rate(encode['vae_images_per_s'])} img/s"))
    sampling = results["sampling"]
    for row in sampling["rows"]:
        steps = "adaptive" if row["steps"] is None else f"{row['steps']} steps"
        rows.append(("sampling", f"{sampling['model']} {row['mode']} {row['method']}, {steps}, cfg {row['cfg_scale']:g}, "
                     f"batch {sampling['batch_size']}", f"{_rate(row['images_per_s'])} img/s, NFE {row['nfe']}, "
                     f"{row['tflops']:.3g} TFLOP/s"))
    inception = results["inception"]
    rows.append(("Inception features", f"batch {inception['batch']}, {inception['image_size']}px, {inception['weights']}",
                 f"{_rate(inception['images_per_s'])} img/s"))
    return rows


def device_section(device: str, date: str, results: dict, artifact_id: str) -> str:
    """This device's BENCHMARKS.md section: heading, date and provenance, the figures table."""
    import torch

    lines = [f"## {device}", "",
             f"Measured {date} with `just bench` (torch {torch.__version__}; bench artifact {artifact_id}).", "",
             "| Benchmark | Setting | Figures |", "| --- | --- | --- |"]
    lines += [f"| {stage} | {setting} | {figures} |" for stage, setting, figures in figure_rows(results)]
    return "\n".join(lines) + "\n"


BENCHMARKS_PREAMBLE = """# Benchmarks

Throughput of each sitctl stage, measured by `just bench` (`python -m sitctl.bench all`) at sizes
that fit the device; the exact sizes are the `config` of the bench artifact it writes. One section
per device: rerunning on a device replaces its section. Networks have random weights (speed does
not depend on them); on a GPU, MFU is achieved train-step FLOP/s over the card's dense peak.
"""


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the `## heading` section (up to the next `## `) replaced by `section`, or it appended."""
    lines = text.splitlines(keepends=True)
    starts = [index for index, line in enumerate(lines) if line.startswith("## ")]
    mine = [index for index in starts if lines[index].rstrip("\n") == f"## {heading}"]
    if not mine:
        return text.rstrip("\n") + "\n\n" + section
    begin = mine[0]
    end = next((index for index in starts if index > begin), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:begin]) + section + ("\n" + tail if tail else "")


def bench_all(config: BenchConfig, out: str | Path, benchmarks_md: str | Path | None = None):
    """Run every benchmark, write the bench artifact `out` (results.json) and this device's BENCHMARKS.md section."""
    from sitctl.artifacts import begin_artifact, finish_artifact, open_artifact, write_json_atomic

    staging = begin_artifact(out)  # refuses an existing `out` before spending minutes measuring
    device = device_label(config.device)
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    results = run_benchmarks(config)
    write_json_atomic(staging / "results.json", {"device": device, "date": date, "results": results})
    inputs = [open_artifact(config.loader_latents, "latents")] if config.loader_latents else []
    artifact = finish_artifact(staging, out, kind="bench", config=dataclasses.asdict(config), inputs=inputs,
                               extra={"device": device, "date": date})
    if benchmarks_md is not None:
        path = Path(benchmarks_md)
        text = path.read_text() if path.is_file() else BENCHMARKS_PREAMBLE
        path.write_text(replace_section(text, device, device_section(device, date, results, artifact.id)))
    return artifact


@app.command("all")
def all_command(
    out: str = typer.Option(None, help="Bench artifact to create; default bench-out/<UTC date-time>."),
    benchmarks_md: str = typer.Option("BENCHMARKS.md", help="Markdown file whose section for this device is rewritten."),
    latents: str = typer.Option(None, help="Latents artifact for the loader; default: synthetic 4x32x32 latents written to a temp dir."),
    device: str = typer.Option(None, help="Device; default cuda if present, else cpu."),
) -> None:
    """Every benchmark at sizes that fit this device; writes a bench artifact and updates BENCHMARKS.md."""
    config = sizes_for(device, loader_latents=latents)
    out = out or f"bench-out/{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    artifact = bench_all(config, out, benchmarks_md)
    print(f"bench artifact {artifact.path} ({artifact.id}); {benchmarks_md} section '{artifact.extra['device']}' updated")


def print_result(result: dict[str, object], as_json: bool = False) -> None:
    """One JSON line, or a two-column rich table."""
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def print_rows(rows: list[dict[str, object]]) -> None:
    """A list of same-keyed dicts as one rich table, one row each."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*rows[0].keys())
    for row in rows:
        table.add_row(*(f"{value:.4g}" if isinstance(value, float) else str(value) for value in row.values()))
    Console().print(table)


def main() -> None:
    """Run the benchmark app; user errors print one line and exit with status 2."""
    from sitctl.cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
