"""sitctl.hardware: one precision rule that leaves torch's matmul precision readable whatever came
before, and MFU that counts REPA's encoder and projector beside the SiT."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.configs import model_config
from model.flops import train_step_flops
from model.repa import Projector
from sitctl import hardware
from sitctl.hardware import (alignment_flops_per_image, encoder_forward_flops, matmul_precision, projector_train_flops,
                             set_matmul_precision, training_mfu)


@pytest.fixture(autouse=True)
def restore_precision():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.mark.parametrize("order", [hardware.PRECISIONS, hardware.PRECISIONS[::-1]])
def test_every_precision_in_either_order_leaves_the_matmul_precision_readable(order):
    for precision in order:
        set_matmul_precision(precision)
        assert torch.get_float32_matmul_precision() == ("highest" if precision == "fp32" else "high")
        assert torch.backends.cudnn.allow_tf32 == (precision != "fp32")


def test_fp32_after_a_global_tf32_setting_elsewhere_stays_readable():
    # What train then sample in one process did: train's "high", then sample's fp32 (--no-tf32).
    torch.set_float32_matmul_precision("high")
    set_matmul_precision("fp32")
    assert torch.get_float32_matmul_precision() == "highest"


def test_the_legacy_flag_after_the_global_setting_makes_the_precision_unreadable():
    # Why the rule never touches torch.backends.cuda.matmul.allow_tf32 (the fixture's global setting mends it after).
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = False
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()


def test_matmul_precision_autocasts_bf16_and_restores_the_settings_on_exit():
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    with matmul_precision("bf16", "cpu"):
        assert torch.get_float32_matmul_precision() == "high" and torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with matmul_precision("tf32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32


def test_mfu_adds_the_extra_flops_per_image_to_the_sits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    config = model_config("SiT-T/4")
    plain = training_mfu(config, 100.0, "cuda", "bf16", 2)
    assert plain == train_step_flops(config, 1) * 100.0 / 2 / 989e12
    assert training_mfu(config, 100.0, "cuda", "bf16", 2, extra_flops_per_image=3e9) == pytest.approx(
        plain + 3e9 * 100.0 / 2 / 989e12, rel=1e-12)
    assert training_mfu(config, 100.0, "cpu", "bf16", 1, extra_flops_per_image=3e9) is None


def test_projector_flops_are_those_torch_counts_in_its_forward_and_backward():
    projector = Projector(8, 6, width=16)
    hidden = torch.randn(2, 5, 8, requires_grad=True)  # (N, T, D): the SiT's tokens, which take gradients
    with FlopCounterMode(display=False) as counter:
        projector(hidden).sum().backward()
    assert counter.get_total_flops() == 2 * projector_train_flops(projector, tokens=5)  # two images


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    network = VisionTransformer(img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=2, num_classes=0).eval()
    for block in network.blocks:
        block.attn.fused_attn = False  # explicit q @ k^T products, which the counter sees
    return network  # 4x4 patches and a class token


def test_encoder_estimate_is_within_five_percent_of_the_flops_torch_counts():
    network = tiny_vit()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network.forward_features(torch.randn(1, 3, 56, 56))
    estimate = encoder_forward_flops(network, tokens=16 + network.num_prefix_tokens)
    assert estimate == 2 * sum(parameter.numel() for parameter in network.parameters()) * 17
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_alignment_flops_are_the_projectors_over_the_sit_tokens_and_the_encoders_over_its_own():
    network, projector = tiny_vit(), Projector(32, 96, width=64)
    alignment = SimpleNamespace(encoder=SimpleNamespace(network=network), projector=projector)
    assert alignment_flops_per_image(alignment, 16) == projector_train_flops(projector, 16) + encoder_forward_flops(network, 17)
    assert alignment_flops_per_image(None, 16) == 0.0
