"""Forward multiply-add counts against the published Gflops of the DiT/SiT papers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.configs import model_config
from model.flops import forward_flops
from model.network import SiT


def test_sit_xl2_matches_the_published_118_6_gflops():
    assert forward_flops(model_config("SiT-XL/2")) / 1e9 == pytest.approx(118.6, rel=0.01)


@pytest.mark.parametrize(
    "name, published",
    [("SiT-S/2", 6.1), ("SiT-B/2", 23.0), ("SiT-L/2", 80.7), ("SiT-XL/4", 29.1), ("SiT-XL/8", 7.39), ("SiT-B/4", 5.56)],
)
def test_other_sizes_match_the_dit_table(name, published):
    assert forward_flops(model_config(name)) / 1e9 == pytest.approx(published, rel=0.02)


def count_macs_by_hooks(net: SiT, x, t, y) -> int:
    """Independent count: run the network and sum MACs of every linear/conv/attention call."""
    total = 0

    def on_linear(module, args, output):
        nonlocal total
        total += output.numel() * module.in_features

    def on_conv(module, args, output):
        nonlocal total
        total += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

    for module in net.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(on_linear)
        elif isinstance(module, nn.Conv2d):
            module.register_forward_hook(on_conv)
    net(x, t, y)
    config = net.config
    attention = 2 * config.num_tokens**2 * config.hidden_size * config.depth  # not a module: add by hand
    return total + attention


def test_count_agrees_with_the_layers_actually_run():
    config = model_config("SiT-T/4", input_size=16, in_channels=3, mlp_ratio=3.0, num_classes=10)
    x = torch.randn(1, 3, 16, 16)
    measured = count_macs_by_hooks(SiT(config), x, torch.rand(1), torch.tensor([2]))
    assert forward_flops(config) == measured


def test_model_benchmark_reports_flops_of_the_layers_actually_run():
    from sitctl.bench import bench_model

    result = bench_model("SiT-T/2", batch=2, steps=1, warmup=0, device="cpu", input_size=8, in_channels=3)
    config = model_config("SiT-T/2", input_size=8, in_channels=3)
    # Expected from the hook count, not from model.flops: forward MACs per image, and a train step
    # of batch 2 as forward + backward = 3 forwards at 2 floating-point operations per MAC.
    macs = count_macs_by_hooks(SiT(config), torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([2]))
    assert result["forward_gmacs_per_image"] * 1e9 == macs
    seconds = result["train_step_ms"] / 1e3
    assert result["train_tflops"] * 1e12 * seconds == pytest.approx(3 * 2 * macs * 2)
    assert result["mfu"] is None  # no known peak for a CPU


def test_model_benchmark_refuses_an_unknown_precision_in_one_line(capsys):
    from sitctl.bench.cli import app
    from sitctl.cli import run_app

    with pytest.raises(SystemExit) as done:  # `python -m sitctl.bench model --precision fp16`, in this process
        run_app(app, ["model", "--precision", "fp16"], prog_name="sitctl.bench")
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == "error: unknown precision 'fp16'; choose one of fp32, tf32, bf16"


def test_mfu_peaks_tell_h100_sxm_from_pcie():
    from sitctl.bench import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("cpu", "bf16") is None
