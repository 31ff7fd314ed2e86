"""Benchmark of the samplers: images/s, network evaluations and FLOP/s per sampler, step count and guidance."""

from __future__ import annotations

from typing import Any

from model.interpolants import interpolant
from sitctl.configs import SampleConfig
from sitctl.decode import load_decoder
from sitctl.errors import BenchError
from sitctl.hardware import set_matmul_precision
from sitctl.sample import class_labels, draw_latents
from sitctl.sample_source import Source


def parse_samplers(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """'ode:heun' -> ('ode', 'heun'), for each spec."""
    parsed = tuple(tuple(spec.split(":")) for spec in specs)
    for spec, pair in zip(specs, parsed):
        if len(pair) != 2:
            raise BenchError(f"--sampler takes MODE:METHOD such as ode:heun or sde:euler, got {spec!r}")
    return parsed


# (mode, method) pairs timed by bench_sampling; dopri5 adapts its steps, so it is timed once.
BENCH_SAMPLERS = (("ode", "euler"), ("ode", "heun"), ("ode", "dopri5"), ("sde", "euler"), ("sde", "heun"))


def bench_sampling(model: str = "SiT-XL/2", *, batch_size: int = 16, steps: tuple[int, ...] = (50, 250),
                   cfg_scales: tuple[float, ...] = (1.0, 1.5), samplers=BENCH_SAMPLERS, vae: str = "none",
                   device: str | None = None, tf32: bool = True, **overrides) -> dict[str, Any]:
    """Time one batch per (sampler, steps, cfg) on a randomly initialised `model`; return a dict of rows.

    Each row: images/s end to end, the share of time spent decoding latents with `vae`, the
    network evaluations (NFE) and the achieved FLOP/s = 2 x forward MACs x NFE x images (x2 under
    guidance: cond and uncond run as one doubled batch). The zero-initialised layers get random
    weights, so the velocity is not trivially 0; dopri5's step count on a random network is not
    that of a trained one. `overrides` are SiTConfig fields (e.g. input_size=16).
    """
    import time

    import torch

    from model.configs import model_config
    from model.flops import forward_flops
    from model.network import SiT

    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_matmul_precision("tf32" if tf32 else "fp32")
    config = model_config(model, **overrides)
    net = _randomised(SiT(config)).to(torch_device).eval()
    source = Source(net=net, model_config=config, interp=interpolant("linear"), pred="velocity", vae=vae, scale_factor=None,
                    artifact=None, identity="bench")
    decoder = load_decoder(source, torch_device)
    labels = class_labels(batch_size, config.num_classes, 0, "uniform")

    def run(settings: SampleConfig) -> tuple[float, float, int]:
        stats: dict[str, int] = {}
        _synchronize(torch_device)
        start = time.perf_counter()
        with torch.no_grad():
            latents = draw_latents(source, settings, list(range(batch_size)), labels, torch_device, stats)
            _synchronize(torch_device)
            middle = time.perf_counter()
            decoder(latents)
        _synchronize(torch_device)
        return middle - start, time.perf_counter() - middle, stats.get("nfe", 0)

    run(SampleConfig(checkpoint="-", out="-", mode="ode", method="euler", steps=2, num=batch_size))  # warm-up
    rows = []
    for mode, method in samplers:
        for count in steps[:1] if method == "dopri5" else steps:
            for cfg_scale in cfg_scales:
                settings = SampleConfig(checkpoint="-", out="-", mode=mode, method=method, steps=count,
                                        cfg_scale=cfg_scale, num=batch_size, batch_size=batch_size)
                sampling_s, decode_s, nfe = run(settings)
                forwards = nfe * batch_size * (2 if cfg_scale != 1.0 else 1)
                rows.append({
                    "mode": mode, "method": method, "steps": None if method == "dopri5" else count,
                    "cfg_scale": cfg_scale, "nfe": nfe, "images_per_s": batch_size / (sampling_s + decode_s),
                    "decode_share": decode_s / (sampling_s + decode_s),
                    "tflops": 2 * forward_flops(config) * forwards / sampling_s / 1e12,
                })
    device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    return {"model": model, "device": device_name, "batch_size": batch_size, "vae": vae, "tf32": tf32,
            "input_shape": [config.in_channels, config.input_size, config.input_size], "rows": rows}


def _randomised(net):
    """Give the zero-initialised adaLN and output layers small random weights (a stand-in for training)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.02, generator=generator)
    return net


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
