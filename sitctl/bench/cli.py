"""`python -m sitctl.bench NAME`: one command per benchmark, options generated from sitctl/bench/configs.py."""

from __future__ import annotations

import datetime
from typing import Any, Callable

import typer

from sitctl.bench import configs
from sitctl.cli import run_app
from sitctl.errors import BenchError
from sitctl.options import config_command

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


def _command(name: str, config_class: type, run: Callable[[Any], None], doc: str) -> None:
    app.command(name)(config_command(config_class, run, doc=doc))


def _model(config: configs.ModelBench) -> None:
    from sitctl.bench.model import bench_model  # start-up cost: `--help` loads no benchmark
    from sitctl.bench.report import print_result  # start-up cost: `--help` loads no benchmark

    print_result(bench_model(config.model, batch=config.batch, precision=config.precision, compile=config.compile,
                             steps=config.steps, warmup=config.warmup, device=config.device,
                             input_size=config.input_size, in_channels=config.channels), config.as_json)


def _encode(config: configs.EncodeBench) -> None:
    from sitctl.bench.encode import bench_encode  # start-up cost: `--help` loads no benchmark
    from sitctl.bench.report import print_result  # start-up cost: `--help` loads no benchmark

    print_result(bench_encode(config.src, image_size=config.image_size, vae=config.vae, images=config.images,
                              batch=config.batch, steps=config.steps, precision=config.precision,
                              device=config.device), config.as_json)


def _loader(config: configs.LoaderBench) -> None:
    from sitctl.bench.loader import bench_loader_rate  # start-up cost: `--help` loads no benchmark
    from sitctl.bench.report import print_result  # start-up cost: `--help` loads no benchmark

    print_result(bench_loader_rate(config.latents, images=config.images, batch=config.batch, lanes=config.lanes,
                                   buffer=config.buffer, seconds=config.seconds, encoder_targets=config.encoder_targets),
                 config.as_json)


def _sampling(config: configs.SamplingBench) -> None:
    if config.batch < 1 or min(config.steps) < 1:
        raise BenchError(f"--batch and --steps must be at least 1, got {config.batch} and {min(config.steps)}")
    from sitctl.bench.report import print_result, print_rows  # start-up cost: `--help` loads no benchmark
    from sitctl.bench.sampling import bench_sampling, parse_samplers  # start-up cost: `--help` loads no benchmark

    result = bench_sampling(config.model, batch_size=config.batch, steps=config.steps, cfg_scales=config.cfg_scale,
                            samplers=parse_samplers(list(config.sampler)), vae=config.vae, device=config.device,
                            input_size=config.input_size)
    rows = result.pop("rows")
    print_result(result | {"rows": rows} if config.as_json else result, config.as_json)
    if not config.as_json:
        print_rows(rows)


def _inception(config: configs.InceptionBench) -> None:
    if config.batch < 1 or config.images < 1:
        raise BenchError(f"--batch and --images must be at least 1, got {config.batch} and {config.images}")
    from sitctl.bench.inception import bench_inception  # start-up cost: `--help` loads no benchmark
    from sitctl.bench.report import print_result  # start-up cost: `--help` loads no benchmark

    print_result(bench_inception(config.batch, config.images, device=config.device, weights=config.weights,
                                 image_size=config.image_size), config.as_json)


def _all(config: configs.AllBench) -> None:
    from sitctl.bench.report import bench_all, sizes_for  # start-up cost: `--help` loads no benchmark

    sizes = sizes_for(config.device, loader_latents=config.latents)
    out = config.out or f"bench-out/{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    artifact = bench_all(sizes, out, config.benchmarks_md)
    print(f"bench artifact {artifact.path} ({artifact.id}); {config.benchmarks_md} section '{artifact.extra['device']}' updated")


def _gpu_check(config: configs.GpuCheck) -> None:
    from sitctl.bench.gpu_check import gpu_check  # start-up cost: `--help` loads no benchmark

    results = gpu_check(config)
    statuses = [verdict["status"] for verdict in results["verdicts"]]
    print(f"gpu-check ({config.gpus} GPU{'s' if config.gpus > 1 else ''}) done in {sum(results['seconds'].values()):.0f} s: "
          f"{statuses.count('pass')} of {len(statuses)} verdicts pass, {statuses.count('GPU only')} GPU only; "
          f"details in {config.out}")


_command("model", configs.ModelBench, _model,
         "Forward time, AdamW train-step time, images/s, achieved FLOP/s, peak memory and MFU of a SiT.")
_command("encode", configs.EncodeBench, _encode,
         "Decode-and-crop images/s on one CPU core, and VAE encode images/s on the device.")
_command("loader", configs.LoaderBench, _loader,
         "Start-up seconds and steady-state latents/s that one core reads, decodes and noises (in-process).")
_command("sampling", configs.SamplingBench, _sampling,
         "Images/s, network evaluations and FLOP/s of each sampler on a randomly initialised SiT.")
_command("inception", configs.InceptionBench, _inception,
         "Images/s of the FID Inception's 2048-d pool features, as `sitctl eval` extracts them.")
_command("all", configs.AllBench, _all,
         "Every benchmark at sizes that fit this device; writes a bench artifact and updates BENCHMARKS.md.")
_command("gpu-check", configs.GpuCheck, _gpu_check,
         "On a new GPU node, verdicts against stated thresholds (under 8 minutes on an H100): doctor, XL/2 training auto vs "
         "tf32, sampling bf16+compile+graphs vs fp32, FID on CUDA vs CPU, B/2 compile+micro-batch+resume; --gpus 2: DDP "
         "training, the FID gather and the sampling merge under torchrun. Writes BENCHMARKS.md's GPU check section.")


def main() -> None:
    """Run the benchmark app; user errors print one line and exit with status 2."""
    run_app(app)
