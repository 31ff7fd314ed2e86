"""Benchmarks, all in this package, one command each: `python -m sitctl.bench model --model SiT-S/2 --batch 8`.

    model.py      forward and AdamW train step of the network (images/s, FLOP/s, MFU)
    encode.py     decode-and-crop per core, and the VAE
    loader.py     training latents per second one core reads
    sampling.py   the samplers (images/s, NFE, FLOP/s)
    inception.py  FID feature extraction
    report.py     `all`: every benchmark at device-sized settings -> a bench artifact + BENCHMARKS.md
    gpu_check.py  `gpu-check`: doctor, `all` at GPU sizes, training and sampling precision checks (a new GPU node)
    configs.py    each command's settings, declared once; cli.py generates the commands from them

Each command is a thin function around a plain `bench_*(...) -> dict`, so tests and notebooks
can call the function. Timings use wall clock after warm-up, with CUDA synchronised. The model,
loader and sampling timings live in sitctl.measure, which `sitctl doctor` runs too, and the
hardware facts (peaks, MFU, precision) in sitctl.hardware: this package imports the stages,
doctor included, and nothing outside it imports this package.
"""

from sitctl.bench.model import bench_model  # noqa: F401
from sitctl.bench.report import BenchConfig, bench_all, device_label, replace_section, sizes_for  # noqa: F401
from sitctl.errors import BenchError  # noqa: F401
from sitctl.hardware import PEAK_TFLOPS, PRECISIONS, peak_tflops  # noqa: F401


def __getattr__(name: str):
    # The typer app is built on first use, so `import sitctl.bench` in a notebook stays light.
    if name == "app":
        from sitctl.bench.cli import app  # start-up cost: building the typer app

        return app
    raise AttributeError(name)
