"""The network's numbers: attention with qk-norm against its formula, and bf16 against fp32."""

from __future__ import annotations

import math

import pytest
import torch

from model.network import SiT, attention_layer
from tests.helpers import inputs, randomised, tiny_sit_config

# bf16 keeps 8 significant bits (relative rounding 2^-9); through the tiny 2-block network the
# output's relative L2 error measured 1.1-1.5% (qk-norm on / off). A bound of 3% leaves room for
# other CPUs' kernels while a real dtype bug, or large logits without qk-norm (6.8%), exceeds it.
BF16_RELATIVE_ERROR = 0.03


def scale_query_and_key_projections(net: SiT, factor: float) -> None:
    """Multiply the q and k rows of every block's qkv projection: attention logits grow by factor^2."""
    width = net.config.hidden_size
    with torch.no_grad():
        for block in net.blocks:
            block.attn.qkv.weight[: 2 * width] *= factor
            block.attn.qkv.bias[: 2 * width] *= factor


def relative_bf16_error(net: SiT, config) -> float:
    x, t, y = inputs(config, n=8)
    with torch.no_grad():
        exact = net(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t, y)
    assert low.dtype == torch.bfloat16
    return float((low.float() - exact).norm() / exact.norm())


def test_qk_norm_attention_is_softmax_of_rms_normalised_queries_and_keys():
    torch.manual_seed(0)
    attention = attention_layer(hidden_size=8, num_heads=2, qk_norm=True)
    with torch.no_grad():
        attention.q_norm.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        attention.k_norm.weight.copy_(torch.tensor([2.0, 1.0, 0.5, 0.25]))
    x = torch.randn(2, 5, 8)  # (N, T, D)
    # Written out: per head, q <- g_q q / sqrt(mean(q^2) + 1e-6), the same for k, then softmax(q k^T / sqrt(4)) v.
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).split(8, dim=-1)  # (N, T, D) each
    heads = lambda z: z.reshape(2, 5, 2, 4).transpose(1, 2)  # noqa: E731  (N, heads, T, 4)
    q, k, v = heads(q), heads(k), heads(v)
    q = attention.q_norm.weight * q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
    k = attention.k_norm.weight * k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)  # (N, heads, T, T)
    merged = (weights @ v).transpose(1, 2).reshape(2, 5, 8)
    expected = merged @ attention.proj.weight.T + attention.proj.bias
    with torch.no_grad():
        assert torch.allclose(attention(x), expected, atol=1e-5)


def test_qk_norm_makes_the_output_blind_to_the_scale_of_queries_and_keys():
    # RMS normalisation divides out any factor on q and k, so their projections can grow without
    # changing attention; without it the same factor sharpens every softmax.
    x_t_y = inputs(tiny_sit_config(), n=4)
    outputs = {}
    for qk_norm in (True, False):
        net = randomised(SiT(tiny_sit_config(qk_norm=qk_norm)))
        with torch.no_grad():
            before = net(*x_t_y)
            scale_query_and_key_projections(net, 10.0)
            outputs[qk_norm] = (before, net(*x_t_y))
    before, after = outputs[True]
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    before, after = outputs[False]
    assert (after - before).abs().max() > 0.1


@pytest.mark.parametrize("qk_norm", [False, True])
def test_bf16_autocast_forward_is_close_to_fp32(qk_norm):
    config = tiny_sit_config(qk_norm=qk_norm)
    net = randomised(SiT(config))
    assert relative_bf16_error(net, config) < BF16_RELATIVE_ERROR


def test_qk_norm_keeps_bf16_close_to_fp32_when_attention_logits_are_large():
    config = tiny_sit_config(qk_norm=True)
    net = randomised(SiT(config))
    scale_query_and_key_projections(net, 10.0)  # logits x100: bf16's rounding of them would show
    assert relative_bf16_error(net, config) < BF16_RELATIVE_ERROR
