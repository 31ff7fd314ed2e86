"""REPA's math (model/repa.py): the alignment loss, the block output it reads, where its gradient goes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.configs import ModelConfigError, default_repa_depth
from model.network import SiT
from model.repa import AlignedSiT, Projector, alignment_loss
from tests.helpers import inputs, randomised, tiny_sit_config


def test_alignment_loss_is_minus_the_mean_cosine_over_tokens_per_sample():
    generator = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 5, 7, generator=generator)
    target = torch.randn(3, 5, 7, generator=generator) * 10  # scale must not matter
    expected = torch.tensor([-sum(F.cosine_similarity(projected[i, k], target[i, k], dim=0) for k in range(5)) / 5
                             for i in range(3)])
    torch.testing.assert_close(alignment_loss(projected, target), expected)
    # REPA's loss.py: sum over samples of the token mean of -<z/|z|, z~/|z~|>, divided by the batch size.
    repa = -(F.normalize(target, dim=-1) * F.normalize(projected, dim=-1)).sum(-1).mean(-1).sum() / 3
    torch.testing.assert_close(alignment_loss(projected, target).mean(), repa)
    assert alignment_loss(target, target).allclose(torch.full((3,), -1.0))


def test_alignment_loss_normalises_in_fp32_whatever_the_inputs():
    projected = torch.randn(2, 4, 8) * 1e3  # |z|^2 ~ 1e7 overflows fp16 (max 65504) if normalised there
    target = torch.randn(2, 4, 8)
    loss = alignment_loss(projected.half(), target.half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, alignment_loss(projected.half().float(), target.half().float()))


def test_the_hidden_state_is_block_k_output_and_leaves_the_prediction_bitwise_unchanged():
    config = tiny_sit_config(depth=3)
    net = randomised(SiT(config)).eval()
    x, t, y = inputs(config)
    with torch.no_grad():
        plain = net(x, t, y)
        output, hidden = net(x, t, y, hidden_depth=2)
        tokens = net.x_embedder(x) + net.pos_embed
        c = net.t_embedder(t) + net.y_embedder(y)
        for block in net.blocks[:2]:
            tokens = block(tokens, c)
    assert torch.equal(output, plain)
    torch.testing.assert_close(hidden, tokens, rtol=0, atol=0)
    assert hidden.shape == (3, config.num_tokens, config.hidden_size)


def test_the_alignment_gradient_reaches_the_blocks_up_to_depth_and_nothing_after():
    config = tiny_sit_config(depth=4)
    net = randomised(SiT(config))
    aligned = AlignedSiT(net, Projector(config.hidden_size, 6, width=16), depth=2)
    x, t, y = inputs(config)
    _, projected = aligned(x, t, y)
    alignment_loss(projected, torch.randn(3, config.num_tokens, 6)).mean().backward()

    def moved(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert all(moved(block) for block in net.blocks[:2]) and moved(net.x_embedder) and moved(aligned.projector)
    assert not any(moved(module) for module in (*net.blocks[2:], net.final_layer))


def test_projector_is_repas_mlp_with_xavier_weights_and_zero_biases():
    projector = Projector(12, 5, width=32)
    assert [type(layer).__name__ for layer in projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [(layer.in_features, layer.out_features) for layer in list(projector)[::2]] == [(12, 32), (32, 32), (32, 5)]
    assert all(layer.bias.abs().sum() == 0 for layer in list(projector)[::2])
    bound = (6 / (32 + 32)) ** 0.5  # xavier-uniform's
    assert projector[2].weight.abs().max() <= bound and projector[2].weight.abs().max() > 0.9 * bound


def test_default_depths_are_repas():
    assert [default_repa_depth(f"SiT-{size}/2") for size in ("XL", "L", "B", "S")] == [8, 8, 4, 4]
    with pytest.raises(ModelConfigError) as error:
        default_repa_depth("SiT-XXL/2")
    assert str(error.value).startswith("unknown model 'SiT-XXL/2'; choose one of SiT-T/2, SiT-T/4, SiT-XS/2, ")
