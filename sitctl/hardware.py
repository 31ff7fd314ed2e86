"""What sitctl knows about the hardware it runs on: each GPU's dense peak, model FLOP utilisation
(MFU), and the one rule for fp32 against TF32 matmuls.

The stages (train, sample) and the benchmarks (sitctl.bench) share this module; it imports none
of them, so a stage never reaches into the benchmark package for a hardware fact.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from model.flops import train_step_flops

PRECISIONS = ("fp32", "tf32", "bf16")

# Dense peak TFLOP/s per precision (NVIDIA data sheets, SXM parts unless named; no sparsity).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


# ---------------------------------------------------------------------------------------------
# Peaks and MFU
# ---------------------------------------------------------------------------------------------


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for `precision`, or None where it is not in the table (CPUs)."""
    for name, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100" on purpose
        if name in device_name:
            return peaks[precision]
    return None


def training_mfu(model_config, images_per_second: float, device, precision: str, world_size: int,
                 extra_flops_per_image: float = 0.0) -> float | None:
    """Model FLOP utilisation of a training run: each device's share of the step FLOPs (model.flops,
    plus `extra_flops_per_image` for work outside the SiT, such as REPA's: alignment_flops_per_image)
    per second over its dense peak; None where the peak is unknown (CPUs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = peak_tflops(torch.cuda.get_device_name(device), precision)
    if peak is None:
        return None
    return (train_step_flops(model_config, 1) + extra_flops_per_image) * images_per_second / world_size / (peak * 1e12)


def projector_train_flops(projector: nn.Module, tokens: int) -> int:
    """FLOPs of REPA's projector in one image's train step, exact as model.flops counts them: the
    multiply-adds of its linear layers over `tokens` tokens, x2 per multiply-add, x3 for the backward."""
    macs_per_token = sum(layer.in_features * layer.out_features for layer in projector.modules()
                         if isinstance(layer, nn.Linear))
    return 3 * 2 * macs_per_token * tokens


def encoder_forward_flops(network: nn.Module, tokens: int) -> int:
    """FLOPs of one image through a frozen ViT encoder, estimated as 2 x parameters x tokens (each
    weight one multiply-add per token; Kaplan et al. 2020's estimate), forward only.

    Counting it exactly would need the encoder's architecture or a traced forward. The estimate
    leaves out attention's two token-by-token products (T/(6D) of a block's cost) and counts the
    position embedding and norms as weights: for DINOv2 ViT-B/14 at 257 tokens it gives 44.06
    GFLOPs against 46.32 counted by torch's FlopCounterMode, 4.9% low (about 18% low at 1025
    tokens, REPA's 512-px setting). At REPA's sizes it errs low, so the MFU it feeds does too.
    """
    return 2 * sum(parameter.numel() for parameter in network.parameters()) * tokens


def alignment_flops_per_image(alignment: Any, tokens: int) -> float:
    """What REPA adds to one image's train step, for training_mfu's extra_flops_per_image: the
    projector's forward and backward over the SiT's `tokens`, and the frozen encoder's forward over
    as many patches plus its class and register tokens. `alignment` is a sitctl.alignment.Alignment
    (not imported: this module stays below the stages); 0 without REPA."""
    if alignment is None:
        return 0.0
    network = alignment.encoder.network
    return projector_train_flops(alignment.projector, tokens) + encoder_forward_flops(network, tokens + network.num_prefix_tokens)


# ---------------------------------------------------------------------------------------------
# Precision: the one rule for fp32 against TF32, and bf16 autocast
# ---------------------------------------------------------------------------------------------


def set_matmul_precision(precision: str) -> None:
    """fp32: exact fp32 matmuls and cuDNN convolutions; tf32 and bf16 (any other): TF32 tensor cores
    for both (under bf16 autocast, for the ops autocast leaves in fp32).

    Matmuls are set through torch.set_float32_matmul_precision only, never also through the legacy
    torch.backends.cuda.matmul.allow_tf32: on torch 2.14, set_float32_matmul_precision("high")
    followed by allow_tf32 = False leaves the backends disagreeing, and every later
    torch.get_float32_matmul_precision() raises. Convolutions have no such global setting: cuDNN's
    own flag is set beside it (the two do not clash).
    """
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")
    torch.backends.cudnn.allow_tf32 = precision != "fp32"


def autocast(device_type: str, precision: str):
    """bf16 autocast under bf16; under fp32 and tf32 a disabled autocast (the network runs in fp32)."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextmanager
def matmul_precision(precision: str, device_type: str) -> Iterator[None]:
    """set_matmul_precision and autocast for the duration, the previous settings restored on exit."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    set_matmul_precision(precision)
    try:
        with autocast(device_type, precision):
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
