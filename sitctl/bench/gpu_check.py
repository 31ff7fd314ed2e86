"""`just gpu-check` (`python -m sitctl.bench gpu-check`): the first thing to run where sitctl meets a GPU.

One command, designed to finish in under 8 minutes on one H100:
  1. `sitctl doctor` (versions, kernels, offline files, the measured check);
  2. `just bench` at the GPU sizes, its sampling rows trimmed to 50 steps (the 250-step and dopri5
     rows alone take about six minutes of SiT-XL/2; `just bench` runs them);
  3. SiT-XL/2 trained 200 steps twice on the same synthetic latents and seed, `--precision auto`
     (bf16) against `--precision tf32`: the logged losses must agree within LOSS_TOLERANCE;
  4. 256 images sampled from that run with `--precision bf16 --compile --cuda-graphs` against
     fp32 without TF32: the pixel difference is stated.
Training and sampling run as the real `sitctl` commands in child processes (each frees its GPU
memory on exit). The VAE is the Stable Diffusion architecture with random weights (offline nodes
lack the real one; speed and numerics do not depend on the weights). It writes a bench artifact
and two BENCHMARKS.md sections: the device's `just bench` table and `GPU check: <device>`.

`--cpu-dry-run` runs the same steps at tiny sizes on a CPU (no compile, no CUDA graphs): it checks
the plumbing where no GPU is at hand; its figures mean nothing.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sitctl import sample_store
from sitctl.bench.configs import GpuCheck
from sitctl.bench.encode import SD_VAE_ARCHITECTURE
from sitctl.bench.loader import synthetic_latents
from sitctl.bench.report import BenchConfig, bench_all, device_label, replace_section, sizes_for
from sitctl.configs import DoctorConfig
from sitctl.doctor import doctor, measured_text
from sitctl.errors import BenchError
from sitctl.metrics_log import metrics_path

LOSS_TOLERANCE = 0.05  # largest relative difference between the two runs' logged losses (each a mean over log_every steps)
TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


@dataclass(frozen=True)
class CheckPlan:
    """The sizes of one gpu-check: the GPU's, or the CPU dry run's."""

    device: str
    model: str
    latent_shape: tuple[int, int, int]
    latents: int
    shard_size: int
    vae: dict[str, Any]
    train_steps: int
    global_batch: int
    log_every: int
    samples: int
    sample_batch: int
    sample_steps: int
    fast_sampling: tuple[str, ...]
    doctor_measures: bool
    bench: BenchConfig = field(repr=False)
    extra_train_args: tuple[str, ...] = ()


def gpu_plan() -> CheckPlan:
    bench = sizes_for("cuda", sampling_steps=(50,), sampling_samplers=(("ode", "euler"), ("ode", "heun"), ("sde", "euler")))
    return CheckPlan("cuda", "SiT-XL/2", (4, 32, 32), 4096, 512, SD_VAE_ARCHITECTURE, train_steps=200, global_batch=32,
                     log_every=10, samples=256, sample_batch=128, sample_steps=20,
                     fast_sampling=("--precision", "bf16", "--compile", "--cuda-graphs"), doctor_measures=True, bench=bench)


def cpu_dry_run_plan() -> CheckPlan:
    bench = BenchConfig(device="cpu", models=(("SiT-T/4", 2, "fp32"),), model_steps=1, model_warmup=0, loader_images=64,
                        loader_batch=16, loader_seconds=0.2, encode_images=2, encode_batch=1, sampling_model="SiT-T/4",
                        sampling_batch=2, sampling_steps=(2,), sampling_cfg_scales=(1.0,), sampling_samplers=(("ode", "euler"),),
                        inception_batch=2, inception_images=2, inception_image_size=16)
    return CheckPlan("cpu", "SiT-T/4", (4, 8, 8), 64, 8, TINY_VAE, train_steps=6, global_batch=8, log_every=2, samples=8,
                     sample_batch=8, sample_steps=3, fast_sampling=("--precision", "bf16"), doctor_measures=False, bench=bench,
                     extra_train_args=("--loader-workers", "0", "--shuffle-buffer", "16"))


# ---------------------------------------------------------------------------------------------
# Inputs: a random-weight VAE and synthetic latents recorded as encoded by it
# ---------------------------------------------------------------------------------------------


def random_vae(directory: Path, architecture: dict[str, Any]) -> Path:
    """A diffusers AutoencoderKL with random weights, saved as `sitctl sample` loads a local VAE."""
    import torch
    from diffusers import AutoencoderKL

    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**architecture).save_pretrained(directory)
    return directory


def prepare_inputs(plan: CheckPlan, out: Path) -> Path:
    """The latents artifact training reads (reused when a rerun finds it)."""
    vae = random_vae(out / "random-vae", plan.vae)
    latents = out / "latents"
    if not latents.exists():
        synthetic_latents(latents, plan.latents, shape=plan.latent_shape, shard_size=plan.shard_size,
                          vae={"name": "local", "source": str(vae.resolve())})
    return latents


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------


def sitctl(*args: str) -> float:
    """Run one `sitctl` command in a child process; its wall seconds, or a BenchError naming its last error line."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sitctl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"gpu-check: `sitctl {' '.join(args[:2])} ...` failed: {last}")
    return time.perf_counter() - started


def train_pair(plan: CheckPlan, latents: Path, out: Path) -> dict[str, Any]:
    """The same 200-step run under --precision auto and tf32; their logged losses compared."""
    runs = {}
    for precision in ("auto", "tf32"):
        run = out / f"run-{precision}"
        seconds = sitctl("train", str(latents), "--out", str(run), "--model", plan.model, "--steps", str(plan.train_steps),
                         "--global-batch", str(plan.global_batch), "--precision", precision, "--log-every", str(plan.log_every),
                         "--ckpt-every", str(plan.train_steps), "--preview-every", "0", "--device", plan.device,
                         *plan.extra_train_args)
        rows = [json.loads(line) for line in metrics_path(run).read_text().splitlines()]
        runs[precision] = {"seconds": seconds, "losses": [row["loss"] for row in rows],
                           "images_per_s": rows[-1]["images_per_sec"], "run": str(run)}
    return compare_losses(runs["auto"], runs["tf32"]) | {"runs": runs}


def compare_losses(auto: dict[str, Any], tf32: dict[str, Any]) -> dict[str, Any]:
    """Largest relative difference of the logged losses, and whether it is within LOSS_TOLERANCE."""
    first, second = np.asarray(auto["losses"]), np.asarray(tf32["losses"])
    if first.shape != second.shape or not len(first):
        raise BenchError(f"gpu-check: the two runs logged {len(first)} and {len(second)} losses")
    difference = float(np.max(np.abs(first - second) / np.abs(second)))
    return {"max_relative_difference": difference, "tolerance": LOSS_TOLERANCE, "within": difference <= LOSS_TOLERANCE,
            "final": [float(first[-1]), float(second[-1])]}


def sample_pair(plan: CheckPlan, run: str, out: Path) -> dict[str, Any]:
    """The same images drawn in fp32 (no TF32) and with the fast settings; their pixel difference."""
    common = ("--num", str(plan.samples), "--batch-size", str(plan.sample_batch), "--mode", "ode", "--method", "euler",
              "--steps", str(plan.sample_steps), "--no-ema", "--preview", "0", "--device", plan.device)
    exact, fast = out / "samples-fp32", out / "samples-fast"
    seconds = {"fp32": sitctl("sample", run, "--out", str(exact), "--precision", "fp32", "--no-tf32", *common),
               "fast": sitctl("sample", run, "--out", str(fast), *plan.fast_sampling, *common)}
    return pixel_difference(exact, fast) | {"seconds": seconds, "fast_flags": " ".join(plan.fast_sampling)}


def pixel_difference(first: Path, second: Path) -> dict[str, float]:
    """|a - b| over every pixel of two samples artifacts, in uint8 levels."""
    one = np.concatenate([images for images, _ in sample_store.iter_batches(first)]).astype(np.int16)
    two = np.concatenate([images for images, _ in sample_store.iter_batches(second)]).astype(np.int16)
    difference = np.abs(one - two)
    return {"images": len(one), "mean_levels": float(difference.mean()), "p99_levels": float(np.percentile(difference, 99)),
            "max_levels": int(difference.max()), "share_over_16_levels": float((difference > 16).mean())}


# ---------------------------------------------------------------------------------------------
# The whole check and its BENCHMARKS.md section
# ---------------------------------------------------------------------------------------------


def gpu_check(config: GpuCheck) -> dict[str, Any]:
    """Every part in order; writes the bench artifact, BENCHMARKS.md's sections and results.json under config.out."""
    import torch

    if not config.cpu_dry_run and not torch.cuda.is_available():
        raise BenchError("gpu-check needs a CUDA GPU; here, run `sitctl doctor`, or `gpu-check --cpu-dry-run` to test the plumbing")
    plan = cpu_dry_run_plan() if config.cpu_dry_run else gpu_plan()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = Path(config.benchmarks_md or (out / "BENCHMARKS.md" if config.cpu_dry_run else "BENCHMARKS.md"))
    seconds, started = {}, time.perf_counter()
    report = doctor(DoctorConfig(device=plan.device, measure=plan.doctor_measures))
    seconds["doctor"] = time.perf_counter() - started
    bench = bench_all(plan.bench, out / f"bench-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}", markdown)
    seconds["bench"] = time.perf_counter() - started - sum(seconds.values())
    training = train_pair(plan, prepare_inputs(plan, out), out)
    seconds["training"] = time.perf_counter() - started - sum(seconds.values())
    sampling = sample_pair(plan, training["runs"]["auto"]["run"], out)
    seconds["sampling"] = time.perf_counter() - started - sum(seconds.values())
    results = {"device": device_label(plan.device), "dry_run": config.cpu_dry_run, "plan": {"model": plan.model,
               "train_steps": plan.train_steps, "global_batch": plan.global_batch, "samples": plan.samples,
               "sample_steps": plan.sample_steps},
               "doctor": report, "bench_artifact": bench.id, "training": training, "sampling": sampling, "seconds": seconds}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    heading = f"GPU check: {results['device']}" + (" (CPU dry run, figures meaningless)" if config.cpu_dry_run else "")
    text = markdown.read_text()
    markdown.write_text(replace_section(text, heading, check_section(heading, results)))
    if not training["within"]:
        raise BenchError(f"gpu-check: losses under --precision auto and tf32 differ by {training['max_relative_difference']:.1%}, "
                         f"more than {LOSS_TOLERANCE:.0%} (see {out / 'results.json'})")
    return results


def check_section(heading: str, results: dict[str, Any]) -> str:
    """`## GPU check: <device>`: what ran, what it measured, and the verdicts."""
    import torch

    plan, training, sampling, doctor = results["plan"], results["training"], results["sampling"], results["doctor"]
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    runs = training["runs"]
    lines = [f"## {heading}", "",
             f"Measured {date} with `just gpu-check` (torch {torch.__version__}; bench artifact {results['bench_artifact']}; "
             f"{sum(results['seconds'].values()):.0f} s in all: "
             + ", ".join(f"{part} {value:.0f} s" for part, value in results["seconds"].items()) + ").", "",
             "| Part | Setting | Result |", "| --- | --- | --- |",
             f"| doctor | versions, kernels, offline files | verdict: {doctor['verdict']}"
             + "".join(f"; {problem}" for problem in doctor["problems"]) + " |"]
    lines += [f"| doctor, measured | {row['check']} | {measured_text(row)}: {row['verdict']} |" for row in doctor["measured"]]
    lines += [f"| bench | `just bench` at the GPU sizes, sampling rows at 50 steps | the `## {results['device']}` section |",
              f"| training | {plan['model']}, {plan['train_steps']} steps, batch {plan['global_batch']}, synthetic latents, "
              f"`--precision auto` vs `tf32` | final loss {training['final'][0]:.4f} vs {training['final'][1]:.4f}; largest relative "
              f"difference of the logged losses {training['max_relative_difference']:.2%} (tolerance {training['tolerance']:.0%}): "
              f"{'pass' if training['within'] else 'FAIL'}; {runs['auto']['images_per_s']:.0f} vs {runs['tf32']['images_per_s']:.0f} img/s |",
              f"| sampling | {sampling['images']} images, ODE Euler {plan['sample_steps']} steps, no EMA: `{sampling['fast_flags']}` vs fp32 "
              f"without TF32 | mean difference {sampling['mean_levels']:.2f} levels, 99th percentile {sampling['p99_levels']:.0f}, "
              f"max {sampling['max_levels']}, {sampling['share_over_16_levels']:.2%} of pixels over 16 levels; command wall time "
              f"{sampling['seconds']['fast']:.0f} s vs {sampling['seconds']['fp32']:.0f} s (with start-up and compilation) |"]
    return "\n".join(lines) + "\n"
