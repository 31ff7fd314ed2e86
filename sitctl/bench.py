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
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer

from sitctl.errors import SitctlError

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


def _peak_memory_gib(device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set size."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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
        "train_tflops": achieved / 1e12, "peak_memory_gib": _peak_memory_gib(torch_device),
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
# encode: decode-and-crop images/s per core, and VAE images/s (pipelines/bench_encode.py)
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
    from pipelines.bench_encode import bench_encode

    result = bench_encode(src, image_size=image_size, vae=vae, images=images, batch=batch, steps=steps,
                          precision=precision, device=device)
    print_result(result, as_json)


# ---------------------------------------------------------------------------------------------
# loader: training latents per second that one core reads from a latents artifact
# ---------------------------------------------------------------------------------------------


def digits_latents(out: Path, images: int) -> Path:
    """Encode the first `images` 8x8 digits, upscaled to 32x32 pixels (vae none), as a latents artifact."""
    from sitctl.encode import EncodeConfig, encode

    # Four shards at least, so the loader's lanes draw from several files as on real data.
    encode(EncodeConfig(src="digits", out=str(out), image_size=32, vae="none", shard_size=max(images // 4, 1),
                        workers=0, limit=images, device="cpu"))
    return out


def bench_loader_rate(latents: str | None = None, *, images: int = 512, batch: int = 256,
                      seconds: float = 5.0) -> dict[str, object]:
    """Latents/s of the training loader on one core, on `latents` or on `images` digits encoded now."""
    if images < 1 or batch < 1 or seconds <= 0:
        raise BenchError(f"images and batch must be at least 1 and seconds above 0, got {images}, {batch}, {seconds}")
    from sitctl.data import bench_loader, open_latents

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(latents) if latents else digits_latents(Path(scratch) / "latents", images)
        opened = open_latents(path)
        rate = bench_loader(path, seconds=seconds, batch=batch)
    return {
        "latents": str(latents) if latents else f"digits x{images}, encoded now",
        "num_samples": opened.num_samples, "latent_shape": list(opened.latent_shape),
        "batch": batch, "seconds": seconds, "latents_per_s": rate,
    }


@app.command("loader")
def loader_command(
    latents: str = typer.Option(None, help="A latents artifact; default: encode digits (32x32 pixels) to a temp dir."),
    images: int = typer.Option(512, help="Digits to encode when no --latents is given."),
    batch: int = typer.Option(256, help="Latents per batch."),
    seconds: float = typer.Option(5.0, help="How long to draw batches."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Training latents per second that one core reads, decodes and noises (DataLoader in-process)."""
    print_result(bench_loader_rate(latents, images=images, batch=batch, seconds=seconds), as_json)


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
    try:
        app(standalone_mode=False)
    except SitctlError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:  # click usage errors carry their own exit code and message
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
