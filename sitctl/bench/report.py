"""`bench all`: every benchmark at sizes that fit the device -> a bench artifact and its BENCHMARKS.md section."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sitctl.artifacts import begin_artifact, finish_artifact, open_artifact, write_json_atomic
from sitctl.bench.encode import bench_encode
from sitctl.bench.inception import bench_inception
from sitctl.bench.loader import bench_loader_rate
from sitctl.bench.model import bench_model
from sitctl.bench.sampling import bench_sampling
from sitctl.errors import BenchError
from sitctl.hardware import PRECISIONS

@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """The sizes `all` runs each benchmark at; written into the bench artifact. Defaults fit a 2-core CPU."""

    device: str | None = None
    """Device; None picks CUDA when present."""
    models: tuple[tuple[str, int, str], ...] = (("SiT-S/2", 8, "fp32"), ("SiT-XS/4", 8, "fp32"))
    """(model, batch, precision) of each model-step benchmark, on 4x32x32 latents (256x256 images)."""
    compiled_models: tuple[tuple[str, int, str], ...] = ()
    """(model, batch, precision) benchmarked again with the network under torch.compile (warm-up compiles)."""
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
        for _, batch, precision in self.models + self.compiled_models:
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
    compiled_models=(("SiT-XL/2", 256, "bf16"), ("SiT-B/2", 256, "bf16")),
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
    return {
        "model": [bench_model(model, batch=batch, precision=precision, steps=config.model_steps,
                              warmup=config.model_warmup, device=config.device, compile=compiled)
                  for models, compiled in ((config.models, False), (config.compiled_models, True))
                  for model, batch, precision in models],
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


def model_step_row(run: dict) -> tuple[str, str, str]:
    """(benchmark, setting, figures) of one bench_model result; a batch trained in micro-batches says so."""
    mfu = f", MFU {run['mfu']:.1%}" if run["mfu"] is not None else ""
    # On a CPU the figure is the process's peak resident set so far, not this model's: left out.
    memory = f", peak memory {run['peak_memory_gib']:.2f} GiB" if run["device"] != "cpu" else ""
    compiled = ", compile" if run.get("compile") else ""
    micro = run.get("micro_batch", run["batch"])  # results written before rows planned their micro-batch lack it
    split = f" in micro-batches of {micro}" if micro < run["batch"] else ""
    return ("model step", f"{run['model']}, batch {run['batch']}{split}, {run['precision']}{compiled}",
            f"train step {run['train_step_ms']:.0f} ms ({_rate(run['train_images_per_s'])} img/s), "
            f"forward {run['forward_ms']:.0f} ms, {run['train_tflops']:.3g} TFLOP/s{mfu}{memory}")


def figure_rows(results: dict) -> list[tuple[str, str, str]]:
    """(benchmark, setting, figures) per measured row, for the BENCHMARKS.md table."""
    rows = [model_step_row(run) for run in results["model"]]
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
