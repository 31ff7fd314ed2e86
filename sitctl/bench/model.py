"""Benchmark of the network: forward and AdamW train-step time, images/s, FLOP/s, peak memory and MFU."""

from __future__ import annotations

import time
from contextlib import contextmanager

from sitctl.errors import BenchError
from sitctl.progress import peak_memory_gib

PRECISIONS = ("fp32", "tf32", "bf16")

# Dense peak TFLOP/s per precision (NVIDIA data sheets, SXM parts unless named; no sparsity).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for `precision`, or None where it is not in the table (CPUs)."""
    for name, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100" on purpose
        if name in device_name:
            return peaks[precision]
    return None


def training_mfu(model_config, images_per_second: float, device, precision: str, world_size: int) -> float | None:
    """Model FLOP utilisation of a training run: each device's share of the step FLOPs (model.flops)
    per second over its dense peak; None where the peak is unknown (CPUs)."""
    import torch

    from model.flops import train_step_flops

    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = peak_tflops(torch.cuda.get_device_name(device), precision)
    if peak is None:
        return None
    return train_step_flops(model_config, 1) * images_per_second / world_size / (peak * 1e12)


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
