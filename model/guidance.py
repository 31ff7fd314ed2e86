"""Classifier-free guidance (Ho & Salimans 2022) as a velocity callable for the samplers.

v_guided = v_uncond + scale * (v_cond - v_uncond), on all channels by default. The conversion from
the network's prediction to a velocity is affine in the prediction at fixed (x, t), so guiding the
velocities equals guiding the raw predictions and converting once.

The reference sampler (DiT's forward_with_cfg, kept by SiT) guides only the first three output
channels and leaves the rest conditional; `guided_channels=3` reproduces that for published FIDs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.interpolants import Interpolant, expand_like
from model.objectives import prediction_to_velocity


class GuidedVelocity:
    """velocity(x, t) of a class-conditional net under guidance; cond and uncond in one batched forward.

    Outside the guidance interval [lo, hi] of t, a sample follows its plain conditional velocity.
    With cfg_scale == 1, or no sample inside the interval, only the conditional half is run.
    """

    def __init__(self, net: nn.Module, y: Tensor, *, interp: Interpolant, pred: str, cfg_scale: float,
                 null_class: int, interval: tuple[float, float] = (0.0, 1.0), guided_channels: int | None = None):
        self.net = net
        self.y = y  # (N,) class labels
        self.interp = interp
        self.pred = pred
        self.cfg_scale = float(cfg_scale)
        self.null_class = int(null_class)
        self.interval = (float(interval[0]), float(interval[1]))
        self.whole_interval = self.interval[0] <= 0.0 and self.interval[1] >= 1.0
        self.guided_channels = guided_channels  # None: all channels

    def _velocity(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return prediction_to_velocity(output, x, t, interp=self.interp, pred=self.pred)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.cfg_scale == 1.0:
            return self._velocity(self.net(x, t, self.y), x, t)
        inside = (t >= self.interval[0]) & (t <= self.interval[1])  # (N,)
        # Skipping the unconditional half when no sample is inside needs a host sync; only a
        # partial interval can skip, so the default [0, 1] never waits on the device.
        if not self.whole_interval and not bool(inside.any()):
            return self._velocity(self.net(x, t, self.y), x, t)
        null = torch.full_like(self.y, self.null_class)
        output = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, null]))  # (2N, ...)
        v_cond, v_uncond = self._velocity(output, torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        guided = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        if self.guided_channels is not None:  # (N, C, ...): channels past the first k stay conditional
            guided = torch.cat([guided[:, : self.guided_channels], v_cond[:, self.guided_channels :]], dim=1)
        return torch.where(expand_like(inside, x), guided, v_cond)
