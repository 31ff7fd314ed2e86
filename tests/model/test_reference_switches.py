"""Switches that make our sampler count and guide exactly as the paper's reference code does."""

import torch

from model.interpolants import interpolant

from model.guidance import GuidedVelocity


class AffineNet(torch.nn.Module):
    """out = x * (1 + y) + t: conditional and null outputs differ, so guidance is visible per channel."""

    def forward(self, x, t, y):
        return x * (1 + y.float()).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def test_three_guided_channels_leave_the_fourth_conditional_as_the_reference():
    x, t, y = torch.randn(2, 4, 3, 3), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    null, scale = 5, 4.0
    cond, uncond = AffineNet()(x, t, y), AffineNet()(x, t, torch.full_like(y, null))
    guided = uncond + scale * (cond - uncond)  # DiT forward_with_cfg on channels 0-2
    out = GuidedVelocity(AffineNet(), y, interp=interpolant("linear"), pred="velocity", cfg_scale=scale, null_class=null,
                         guided_channels=3)(x, t)
    torch.testing.assert_close(out[:, :3], guided[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], rtol=0, atol=0)
    every = GuidedVelocity(AffineNet(), y, interp=interpolant("linear"), pred="velocity", cfg_scale=scale, null_class=null)(x, t)
    torch.testing.assert_close(every, guided, rtol=0, atol=0)


def test_reference_step_count_takes_n_minus_one_ode_steps(tmp_path):
    from model.samplers import sample_ode

    stats = {}
    sample_ode(lambda x, t: -x, torch.ones(1, 1), method="euler", steps=4, stats=stats)
    assert stats["nfe"] == 4  # ours: N steps for N
    from sitctl.configs import SampleConfig
    from sitctl.sample import ode_steps

    reference = SampleConfig(checkpoint="-", out="-", mode="ode", method="euler", steps=5, reference_steps=True)
    assert ode_steps(reference) == 4  # the reference's linspace of 5 points: 4 steps
    assert ode_steps(SampleConfig(checkpoint="-", out="-", mode="ode", method="euler", steps=5)) == 5
