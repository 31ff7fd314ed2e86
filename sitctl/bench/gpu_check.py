"""`just gpu-check` (`python -m sitctl.bench gpu-check`): the first thing to run where sitctl meets a GPU.

A list of steps, each judged against a stated threshold (BENCHMARKS.md, "GPU check: what each step
proves", gives the reasons and the time each step should take; under 8 minutes on one H100):
  doctor     `sitctl doctor` finds no problem; its compiled SiT-XL/2 train step (batch 32, bf16)
             reaches the MFU doctor expects of a healthy node;
  precision  SiT-XL/2 trained 200 steps under `--precision auto` (bf16) and `tf32` on the same
             latents and seed: the logged losses agree; the bf16 run keeps an MFU floor;
  sampling   an odd number of images (so the short last block runs) drawn with the fast settings
             (bf16, compile, CUDA graphs) and in fp32 without TF32: the pixels agree;
  fid        `sitctl eval fid` of the fp32 images with the Inception on the GPU and on the CPU;
  resume     SiT-B/2 under `--compile --micro-batch` for half its steps, then `--resume`, against an
             eager whole-batch run: the logged losses agree.
`--gpus 2` runs the NCCL steps instead, each a real `torchrun` of two processes against one:
  ddp        training: the logged losses agree;
  fid gather the FID measured during the 2-process training equals `sitctl eval fid` of the same
             images drawn by one process from the same checkpoint;
  merge      `sitctl sample` over 2 processes (an odd count) gives one process's images.
Training, sampling and evaluation run as the real `sitctl` commands in child processes (each frees
its GPU memory on exit). The VAE is the Stable Diffusion architecture with random weights (offline
nodes lack the real one; speed and numerics do not depend on the weights); the FID's reference is
the statistics of uniform-noise images (a fixed stand-in: the node may hold no real images).
Doctor's compiled train step is the only compilation in this process, and sitctl.measure compiles
a static graph per shape (dynamic=False), so no later compiled row could inherit a dynamic graph.
Results go to OUT/results.json (results-2-gpus.json) and a `GPU check` section of BENCHMARKS.md;
any failed verdict ends it with status 2 after both are written. The figures table of the device
is `just bench`'s (its compiled rows and 250-step samplers alone would take this check's 8 minutes).

`--cpu-dry-run` runs the same steps at tiny sizes on the CPU (the 2-process ones on gloo): every
verdict is computed, those that only a GPU has (MFU) are marked "GPU only"; its figures mean nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sitctl import sample_store
from sitctl.artifacts import open_artifact
from sitctl.bench.configs import GpuCheck
from sitctl.bench.encode import SD_VAE_ARCHITECTURE
from sitctl.bench.loader import synthetic_latents
from sitctl.bench.report import BENCHMARKS_PREAMBLE, device_label, replace_section
from sitctl.configs import DoctorConfig
from sitctl.doctor import EXPECTED_MFU, SLOW_BELOW, doctor
from sitctl.errors import BenchError
from sitctl.evaluate.inception import POOL_FEATURES, create_extractor, extract_features, resolve_weights
from sitctl.evaluate.metrics import feature_statistics
from sitctl.metrics_log import metrics_path
from sitctl.records import MetricsInfo
from sitctl.watch import EVAL_METHOD

# The thresholds. Each is the line between rounding (what a healthy node shows) and a fault.
LOSS_TOLERANCE = 0.05
"""bf16 against TF32 over 200 steps: largest relative difference of the logged losses (each a mean over log_every steps)."""
RUN_TOLERANCE = 0.01
"""The same run two ways in one precision (compiled, micro-batched and resumed; or over 2 processes): the same batches,
so only summation order and kernel choice differ; a rank or a resume that trains on other batches moves a window's
mean loss by the batch-to-batch spread, a few percent at these batch sizes."""
FAST_SAMPLING_LEVELS = 1.0
"""Mean |fast - fp32| over every pixel, in uint8 levels: bf16 rounds the network's output to 8 bits of mantissa (0.4%),
about 0.2-0.3 levels of a decoded image; a graph replayed on stale inputs, or a wrong short block, moves tens."""
MERGE_LEVELS = 1
"""Largest |2 processes - 1| in levels: the same blocks of the same size in fp32 give the same pixels, up to one
rounding step where a reduction's order differs; a block missing, doubled or out of order moves tens of levels."""
FID_TOLERANCE = 1e-3
"""Relative difference of two FIDs of the same images: it moves a FID near 2 (SiT-XL/2's) by 0.002, under the 0.01
the papers report. fp32 features move by about 1e-6 with the order of a sum (channels-last did so on the CPU);
TF32's 10-bit mantissa would be expected near 1e-3."""
MFU_FLOOR = EXPECTED_MFU["train"]
"""Doctor's compiled XL/2 train step: the share of the bf16 dense peak doctor expects of a healthy node."""
COMMAND_MFU_FLOOR = SLOW_BELOW * EXPECTED_MFU["train"]
"""`sitctl train` itself (eager, with loader, EMA and logging): doctor's line between "ok" and "slow"."""
GPU_ONLY = "GPU only"

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
    samples: int  # odd, so that the last block is short
    sample_batch: int
    sample_steps: int
    fast_sampling: tuple[str, ...]
    doctor_measures: bool
    small_model: str  # the resume step and the 2-GPU steps
    small_steps: int
    small_batch: int
    micro_batch: int
    small_log_every: int
    eval_num: int  # the FID during the 2-process training: odd, so one rank has a short block
    eval_batch: int
    eval_steps: int
    extra_train_args: tuple[str, ...] = ()
    child_env: tuple[tuple[str, str], ...] = ()


def gpu_plan() -> CheckPlan:
    return CheckPlan("cuda", "SiT-XL/2", (4, 32, 32), 4096, 512, SD_VAE_ARCHITECTURE, train_steps=200, global_batch=32,
                     log_every=10, samples=255, sample_batch=128, sample_steps=20,
                     fast_sampling=("--precision", "bf16", "--compile", "--cuda-graphs"), doctor_measures=True,
                     small_model="SiT-B/2", small_steps=20, small_batch=64, micro_batch=16, small_log_every=5,
                     eval_num=101, eval_batch=16, eval_steps=10)


def cpu_dry_run_plan() -> CheckPlan:
    # The fast sampler is not compiled on the CPU (another cold inductor build, about 1.5 minutes on 2 cores;
    # the resume step already compiles there); CUDA graphs exist only on CUDA.
    return CheckPlan("cpu", "SiT-T/4", (4, 8, 8), 64, 8, TINY_VAE, train_steps=6, global_batch=8, log_every=2, samples=7,
                     sample_batch=4, sample_steps=3, fast_sampling=("--precision", "bf16"), doctor_measures=False,
                     small_model="SiT-T/4", small_steps=4, small_batch=8, micro_batch=4, small_log_every=1,
                     eval_num=9, eval_batch=4, eval_steps=2,
                     extra_train_args=("--loader-workers", "0", "--shuffle-buffer", "16"),
                     child_env=(("CUDA_VISIBLE_DEVICES", ""), ("OMP_NUM_THREADS", "1")))


# ---------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One figure against its threshold: status is "pass", "FAIL" or GPU_ONLY (a figure a CPU does not have)."""

    check: str
    threshold: str
    measured: str
    status: str


def judge(check: str, value: float | None, limit: float, shown: Callable[[float], str], *, floor: bool = False) -> Verdict:
    """`value` against `limit`, a ceiling (or a floor); None is a GPU-only figure on a CPU, not judged."""
    threshold = ("at least " if floor else "at most ") + shown(limit)
    if value is None:
        return Verdict(check, threshold, "-", GPU_ONLY)
    passed = value >= limit if floor else value <= limit
    return Verdict(check, threshold, shown(value), "pass" if passed else "FAIL")


def judge_count(check: str, found: int, wanted: int) -> Verdict:
    return Verdict(check, f"{wanted} images", f"{found} images", "pass" if found == wanted else "FAIL")


def percent(value: float) -> str:
    return f"{value * 100:.3g}%"


def levels(value: float) -> str:
    return f"{value:.3g} level{'' if value == 1 else 's'}"


def relative(value: float) -> str:
    return f"{value:.2g} relative"


# ---------------------------------------------------------------------------------------------
# Inputs: a random-weight VAE, synthetic latents recorded as encoded by it, a noise reference
# ---------------------------------------------------------------------------------------------


def random_vae(directory: Path, architecture: dict[str, Any]) -> Path:
    """A diffusers AutoencoderKL with random weights, saved as `sitctl sample` loads a local VAE."""
    from diffusers import AutoencoderKL  # start-up cost

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


def noise_reference(out: Path, count: int, image_size: int) -> Path:
    """An ADM-format .npz of the pool statistics of `count` seeded uniform-noise images, extracted on the CPU."""
    path = out / f"noise-reference-{image_size}px.npz"
    if not path.is_file():
        images = np.random.default_rng(0).integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
        cpu = torch.device("cpu")
        extractor = create_extractor(resolve_weights(None, fetch=False), [POOL_FEATURES], cpu)
        features = extract_features(extractor, np.array_split(images, -(-count // 64)), device=cpu, label="noise reference")
        statistics = feature_statistics(features[POOL_FEATURES])
        np.savez(path, mu=statistics.mu, sigma=statistics.sigma)
    return path


# ---------------------------------------------------------------------------------------------
# Child commands and what they leave
# ---------------------------------------------------------------------------------------------


def sitctl(plan: CheckPlan, *args: str, processes: int = 1) -> float:
    """Run one `sitctl` command in a child process (under torchrun for 2); its wall seconds, or a BenchError."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *launcher, "-m", "sitctl", *args], capture_output=True, text=True,
                            env={**os.environ, **dict(plan.child_env)})
    if result.returncode != 0:  # sitctl's own one-line `error: ...`, which torchrun follows with its summary
        lines = result.stderr.strip().splitlines() or ["no output"]
        last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1])
        raise BenchError(f"gpu-check: `sitctl {' '.join(args[:2])} ...` failed: {last}")
    return time.perf_counter() - started


def logged(run: Path, key: str) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl that hold `key` (loss rows, or FID rows)."""
    rows = [json.loads(line) for line in metrics_path(run).read_text().splitlines()]
    return [row for row in rows if key in row]


def loss_difference(first: Path, second: Path) -> float:
    """Largest relative difference between two runs' logged losses, step by step."""
    one, two = logged(first, "loss"), logged(second, "loss")
    if [row["step"] for row in one] != [row["step"] for row in two] or not one:
        raise BenchError(f"gpu-check: {first.name} and {second.name} logged losses at different steps")
    losses = np.array([[row["loss"] for row in one], [row["loss"] for row in two]])
    return float(np.max(np.abs(losses[0] - losses[1]) / np.abs(losses[1])))


def images_of(samples: Path) -> np.ndarray:
    return np.concatenate([images for images, _ in sample_store.iter_batches(samples)]).astype(np.int16)


def pixel_difference(first: Path, second: Path) -> dict[str, float]:
    """|a - b| over every pixel of two samples artifacts of as many images, in uint8 levels."""
    difference = np.abs(images_of(first) - images_of(second))
    return {"mean_levels": float(difference.mean()), "p99_levels": float(np.percentile(difference, 99)),
            "max_levels": int(difference.max()), "share_over_16_levels": float((difference > 16).mean())}


def eval_fid(plan: CheckPlan, samples: Path, reference: Path, out: Path, device: str, count: int) -> dict[str, Any]:
    """`sitctl eval fid` of `samples` on `device`: the value and the Inception precision its artifact records."""
    seconds = sitctl(plan, "eval", "fid", str(samples), "--ref", str(reference), "--device", device, "--out", str(out),
                     "--results", str(out.parent / "eval-results.jsonl"), "--num-expected", str(count), "--no-fetch")
    metrics = MetricsInfo.from_artifact(open_artifact(out, "metrics"))
    return {"fid": metrics.values["fid"], "inception_precision": metrics.inception.get("precision"), "seconds": seconds}


def image_size(plan: CheckPlan) -> int:
    """Side of a decoded image: the latent's, times 2 per VAE block after the first."""
    return plan.latent_shape[1] * 2 ** (len(plan.vae["block_out_channels"]) - 1)


def train_args(plan: CheckPlan, latents: Path, run: Path, model: str, steps: int, batch: int, log_every: int) -> list[str]:
    return ["train", str(latents), "--out", str(run), "--model", model, "--steps", str(steps), "--global-batch", str(batch),
            "--log-every", str(log_every), "--preview-every", "0", *plan.extra_train_args]


# ---------------------------------------------------------------------------------------------
# The steps on one GPU
# ---------------------------------------------------------------------------------------------


def check_doctor(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """`sitctl doctor` in this process: its problems, and the MFU of its compiled XL/2 train step."""
    report = doctor(DoctorConfig(device=plan.device, measure=plan.doctor_measures))
    train = next((row for row in report["measured"] if row["check"] == "train step"), {})
    measured = report["verdict"] + "".join(f"; {problem}" for problem in report["problems"])
    parts = "versions, kernels, offline files" + (", measured check" if plan.doctor_measures else "")
    return {"report": report, "verdicts": [
        Verdict(f"doctor: {parts}", "no problems", measured, "pass" if not report["problems"] else "FAIL"),
        judge(f"doctor: MFU of the train step ({train.get('setting', 'not measured on a CPU')})", train.get("mfu"), MFU_FLOOR,
              percent, floor=True)]}


def check_precision(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """The same run under --precision auto (bf16 on a GPU) and tf32: the logged losses, the bf16 run's MFU."""
    runs = {}
    for precision in ("auto", "tf32"):
        run = out / f"run-{precision}"
        seconds = sitctl(plan, *train_args(plan, found["latents"], run, plan.model, plan.train_steps, plan.global_batch,
                                           plan.log_every), "--precision", precision, "--ckpt-every", str(plan.train_steps),
                         "--device", plan.device)
        last = logged(run, "loss")[-1]
        runs[precision] = {"run": str(run), "seconds": seconds, "final_loss": last["loss"],
                           "images_per_s": last["images_per_sec"], "mfu": last["mfu"]}
    difference = loss_difference(out / "run-auto", out / "run-tf32")
    setting = f"{plan.model}, {plan.train_steps} steps, batch {plan.global_batch}"
    return {"runs": runs, "max_relative_difference": difference, "verdicts": [
        judge(f"precision: logged losses, `--precision auto` vs `tf32` ({setting})", difference, LOSS_TOLERANCE, percent),
        judge(f"precision: MFU of `sitctl train --precision auto` ({setting}, eager; training_mfu)", runs["auto"]["mfu"],
              COMMAND_MFU_FLOOR, percent, floor=True)]}


def check_sampling(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """An odd number of images from the bf16 run, with the fast settings and in fp32 without TF32: their pixels."""
    common = ("--num", str(plan.samples), "--batch-size", str(plan.sample_batch), "--mode", "ode", "--method", "euler",
              "--steps", str(plan.sample_steps), "--no-ema", "--preview", "0", "--device", plan.device)
    run, exact, fast = found["precision"]["runs"]["auto"]["run"], out / "samples-fp32", out / "samples-fast"
    seconds = {"fp32": sitctl(plan, "sample", run, "--out", str(exact), "--precision", "fp32", "--no-tf32", *common),
               "fast": sitctl(plan, "sample", run, "--out", str(fast), *plan.fast_sampling, *common)}
    count = sample_store.num_samples(fast)
    difference = pixel_difference(exact, fast) if count == sample_store.num_samples(exact) else {"mean_levels": float("inf")}
    flags = " ".join(plan.fast_sampling)
    return {"seconds": seconds, "fast_flags": flags, "images": count, **difference, "verdicts": [
        judge_count(f"sampling: `--num {plan.samples}` in blocks of {plan.sample_batch} (a short last block), `{flags}`",
                    count, plan.samples),
        judge(f"sampling: mean pixel difference, `{flags}` vs fp32 without TF32 (ODE Euler, {plan.sample_steps} steps)",
              difference["mean_levels"], FAST_SAMPLING_LEVELS, levels)]}


def check_fid(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """`sitctl eval fid` of the fp32 images with the Inception on this device and on the CPU."""
    samples = out / "samples-fp32"
    reference = noise_reference(out, plan.samples, image_size(plan))
    scores = {"device": eval_fid(plan, samples, reference, out / "metrics-device", plan.device, plan.samples),
              "cpu": eval_fid(plan, samples, reference, out / "metrics-cpu", "cpu", plan.samples)}
    difference = abs(scores["device"]["fid"] - scores["cpu"]["fid"]) / scores["cpu"]["fid"]
    precisions = sorted({score["inception_precision"] for score in scores.values()}, key=str)
    return {"scores": scores, "relative_difference": difference, "verdicts": [
        judge(f"fid: FID of the {plan.samples} fp32 images against {plan.samples} noise images, Inception on "
              f"{plan.device} vs on the CPU", difference, FID_TOLERANCE, relative),
        Verdict("fid: the Inception's precision both metrics artifacts record", "fp32", ", ".join(map(str, precisions)),
                "pass" if precisions == ["fp32"] else "FAIL")]}


def check_resume(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """Half the steps compiled and micro-batched, then --resume to the end, against one eager whole-batch run."""
    half, resumed, straight = plan.small_steps // 2, out / "run-resumed", out / "run-straight"
    compiled = ("--compile", "--micro-batch", str(plan.micro_batch), "--ckpt-every", str(half), "--device", plan.device)

    def train(run: Path, steps: int, *more: str) -> float:
        return sitctl(plan, *train_args(plan, found["latents"], run, plan.small_model, steps, plan.small_batch,
                                        plan.small_log_every), *more)

    seconds = [train(resumed, half, *compiled), train(resumed, plan.small_steps, *compiled, "--resume"),
               train(straight, plan.small_steps, "--ckpt-every", str(plan.small_steps), "--device", plan.device)]
    difference = loss_difference(resumed, straight)
    return {"seconds": seconds, "max_relative_difference": difference, "verdicts": [
        judge(f"resume: logged losses, {plan.small_model} `--compile --micro-batch {plan.micro_batch}` for {half} steps "
              f"then `--resume` to {plan.small_steps}, vs eager batch {plan.small_batch}", difference, RUN_TOLERANCE, percent)]}


# ---------------------------------------------------------------------------------------------
# The steps on two GPUs (torchrun, NCCL; gloo in the dry run)
# ---------------------------------------------------------------------------------------------


def check_ddp(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """The same fp32 run by one process and by two; the two-process one also measures the FID at its last step."""
    reference = noise_reference(out, plan.eval_num, image_size(plan))
    one, two = out / "ddp-one", out / "ddp-two"
    common = ("--precision", "fp32", "--ckpt-every", str(plan.small_steps), "--eval-mode", "sde")
    seconds = {"one": sitctl(plan, *train_args(plan, found["latents"], one, plan.small_model, plan.small_steps, plan.small_batch,
                                               plan.small_log_every), *common, "--eval-every", "0", "--device", plan.device),
               "two": sitctl(plan, *train_args(plan, found["latents"], two, plan.small_model, plan.small_steps, plan.small_batch,
                                               plan.small_log_every), *common, "--eval-every", str(plan.small_steps),
                             "--eval-num", str(plan.eval_num), "--eval-batch", str(plan.eval_batch),
                             "--eval-steps", str(plan.eval_steps), "--eval-ref", str(reference), processes=2)}
    difference = loss_difference(one, two)
    return {"seconds": seconds, "max_relative_difference": difference, "reference": str(reference), "verdicts": [
        judge(f"ddp: logged losses, {plan.small_model} fp32 {plan.small_steps} steps, batch {plan.small_batch}, "
              "2 processes vs 1", difference, RUN_TOLERANCE, percent)]}


def eval_sampling_args(plan: CheckPlan) -> tuple[str, ...]:
    """`sitctl sample` as the FID during an fp32 run draws (sitctl.watch.sample_settings; the run keeps TF32 off)."""
    return ("--batch-size", str(plan.eval_batch), "--mode", "sde", "--method", EVAL_METHOD["sde"], "--steps",
            str(plan.eval_steps), "--precision", "fp32", "--no-tf32", "--preview", "0")


def check_fid_gather(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """The FID the 2-process run gathered, against `sitctl eval fid` of one process's images from its checkpoint."""
    samples = out / "samples-one"
    seconds = sitctl(plan, "sample", str(out / "ddp-two"), "--out", str(samples), "--num", str(plan.eval_num),
                     *eval_sampling_args(plan), "--device", plan.device)
    score = eval_fid(plan, samples, Path(found["ddp"]["reference"]), out / "metrics-one", plan.device, plan.eval_num)
    [row] = logged(out / "ddp-two", "fid")
    difference = abs(row["fid"] - score["fid"]) / score["fid"]
    return {"seconds": seconds, "training_fid": row["fid"], "eval_fid": score["fid"], "relative_difference": difference,
            "verdicts": [judge(f"fid gather: FID of {plan.eval_num} images during 2-process training vs `sitctl eval fid` "
                               "of one process's", difference, FID_TOLERANCE, relative)]}


def check_merge(plan: CheckPlan, out: Path, found: dict[str, Any]) -> dict[str, Any]:
    """`sitctl sample` over two processes (an odd count) against one process's images."""
    merged = out / "samples-two"
    seconds = sitctl(plan, "sample", str(out / "ddp-two"), "--out", str(merged), "--num-samples", str(plan.eval_num),
                     *eval_sampling_args(plan), processes=2)
    count = sample_store.num_samples(merged)
    difference = pixel_difference(out / "samples-one", merged) if count == plan.eval_num else {"max_levels": float("inf")}
    return {"seconds": seconds, "images": count, **difference, "verdicts": [
        judge_count(f"merge: `--num-samples {plan.eval_num}` over 2 processes, blocks of {plan.eval_batch}", count, plan.eval_num),
        judge("merge: largest pixel difference, 2 processes vs 1", difference["max_levels"], MERGE_LEVELS, levels)]}


# ---------------------------------------------------------------------------------------------
# The whole check and its BENCHMARKS.md section
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A step of the check: its function, and the steps whose results it reads."""

    name: str
    run: Callable[[CheckPlan, Path, dict[str, Any]], dict[str, Any]]
    needs: tuple[str, ...] = ()


ONE_GPU = (Step("doctor", check_doctor), Step("precision", check_precision), Step("sampling", check_sampling, ("precision",)),
           Step("fid", check_fid, ("sampling",)), Step("resume", check_resume))
TWO_GPUS = (Step("ddp", check_ddp), Step("fid gather", check_fid_gather, ("ddp",)),
            Step("merge", check_merge, ("fid gather",)))
CHECKS = {1: ("GPU check", "gpu-check", ONE_GPU, "results.json"),  # title, recipe, steps, results file
          2: ("GPU check, 2 GPUs", "gpu-check-2", TWO_GPUS, "results-2-gpus.json")}


def run_steps(steps: tuple[Step, ...], plan: CheckPlan, out: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Each step in order; a step that fails (a command's error) is one FAIL verdict, and the steps needing it are skipped."""
    started = time.perf_counter()
    found: dict[str, Any] = {"latents": prepare_inputs(plan, out)}
    seconds = {"inputs": time.perf_counter() - started}
    for step in steps:
        started, missing = time.perf_counter(), [need for need in step.needs if need not in found]
        try:
            if missing:
                raise BenchError(f"skipped: it needs the `{missing[0]}` step")
            found[step.name] = step.run(plan, out, found)
        except BenchError as error:
            found[step.name + " (failed)"] = {"verdicts": [Verdict(f"{step.name}: runs to the end", "no error", str(error), "FAIL")]}
        seconds[step.name] = time.perf_counter() - started
    return {name: result for name, result in found.items() if name != "latents"}, seconds


def gpu_check(config: GpuCheck) -> dict[str, Any]:
    """Every step of the 1- or 2-GPU check; writes OUT/results*.json and the BENCHMARKS.md section, then fails on a FAIL."""
    title, recipe, steps, results_file = CHECKS[config.gpus]
    if not config.cpu_dry_run and torch.cuda.device_count() < config.gpus:
        raise BenchError(f"gpu-check needs {config.gpus} CUDA GPU(s), found {torch.cuda.device_count()}; here, run "
                         "`sitctl doctor`, or `gpu-check --cpu-dry-run` to test the plumbing")
    plan = cpu_dry_run_plan() if config.cpu_dry_run else gpu_plan()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    found, seconds = run_steps(steps, plan, out)
    verdicts = [verdict for result in found.values() for verdict in result.pop("verdicts")]
    results = {"device": device_label(plan.device), "gpus": config.gpus, "dry_run": config.cpu_dry_run, "plan": asdict(plan),
               "verdicts": [asdict(verdict) for verdict in verdicts], "steps": found, "seconds": seconds}
    (out / results_file).write_text(json.dumps(results, indent=2) + "\n")
    heading = f"{title}: {results['device']}" + (" (CPU dry run, figures meaningless)" if config.cpu_dry_run else "")
    markdown = Path(config.benchmarks_md or (out / "BENCHMARKS.md" if config.cpu_dry_run else "BENCHMARKS.md"))
    text = markdown.read_text() if markdown.is_file() else BENCHMARKS_PREAMBLE
    markdown.write_text(replace_section(text, heading, check_section(heading, recipe, verdicts, seconds)))
    failed = [verdict for verdict in verdicts if verdict.status == "FAIL"]
    if failed:
        raise BenchError(f"gpu-check: {len(failed)} of {len(verdicts)} verdicts FAIL, first: {failed[0].check}: "
                         f"{failed[0].measured} (threshold {failed[0].threshold}); see {out / results_file}")
    return results


def check_section(heading: str, recipe: str, verdicts: list[Verdict], seconds: dict[str, float]) -> str:
    """`## GPU check: <device>`: when and in how long it ran, then one row per verdict."""
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    times = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    lines = [f"## {heading}", "",
             f"Measured {date} with `just {recipe}` (torch {torch.__version__}; {sum(seconds.values()):.0f} s in all: {times}). "
             "What each step proves, and why its threshold: the section \"GPU check: what each step proves\".", "",
             "| Check | Threshold | Measured | Verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {verdict.check} | {verdict.threshold} | {verdict.measured} | {verdict.status} |" for verdict in verdicts]
    return "\n".join(lines) + "\n"
