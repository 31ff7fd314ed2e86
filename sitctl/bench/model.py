"""Benchmark of the network: forward and AdamW train-step time, images/s, FLOP/s, peak memory and MFU."""

from __future__ import annotations

import time

from sitctl.errors import BenchError
from sitctl.hardware import PRECISIONS, matmul_precision, peak_tflops
from sitctl.progress import peak_memory_gib


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
