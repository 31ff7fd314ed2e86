"""Log-likelihood of data under the probability-flow ODE (instantaneous change of variables).

Along dx/dt = v(x, t), d/dt log p_t(x_t) = -div v(x_t, t) (Chen et al. 2018, Thm. 1; SiT paper
Sec. 2.3). Integrating the pair (x, l) with dl/dt = div v backwards from data x1 at t = 1 - eps
to noise x0 at t = eps gives l = -int div v dt, hence
    log p_1(x1) = log N(x0; 0, I) + l.
The divergence is exact (one backward pass per dimension, for small inputs) or Hutchinson's
unbiased estimate eps^T (dv/dx) eps with one Rademacher probe per sample, fixed along the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model.samplers import Generators, Velocity, integrate_ode, noise_like
from model.errors import SitctlError

DIVERGENCES = ("hutchinson", "exact")


@dataclass(frozen=True)
class _AugmentedDrift:
    """d/dt of the flattened state (N, D + 1) = [x, l]: [v(x, t), div v(x, t)]."""

    velocity: Velocity
    shape: tuple[int, ...]  # per-sample shape of x, e.g. (C, H, W)
    probe: Tensor | None  # (N, *shape) Rademacher probe, or None for the exact divergence

    def __call__(self, state: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x = state[:, :-1].detach().reshape(-1, *self.shape).requires_grad_(True)
            v = self.velocity(x, t)  # (N, *shape)
            if self.probe is not None:
                (vjp,) = torch.autograd.grad((v * self.probe).sum(), x)  # probe^T dv/dx
                divergence = (vjp * self.probe).flatten(1).sum(1)
            else:
                divergence = _exact_divergence(v, x)
        return torch.cat([v.detach().flatten(1), divergence.detach()[:, None].to(state.dtype)], dim=1)


def _exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """Trace of dv/dx per sample, one backward pass per dimension; samples must not interact."""
    v_flat = v.flatten(1)  # (N, D)
    total = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for i in range(v_flat.shape[1]):
        (grad,) = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=True)
        total = total + grad.flatten(1)[:, i]
    return total


def log_likelihood(velocity: Velocity, x1: Tensor, *, method: str = "dopri5", steps: int = 50,
                   atol: float = 1e-6, rtol: float = 1e-3, sample_eps: float = 0.0,
                   divergence: str = "hutchinson", generator: Generators = None,
                   stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """(log p(x1) in nats (N,), the noise x0 (N, ...) it maps to) for data x1 (N, ...).

    Do not call under torch.inference_mode: the divergence needs autograd through `velocity`.
    `generator` (one, or one per sample) draws the Hutchinson probes.
    """
    if divergence not in DIVERGENCES:
        raise SitctlError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    probe = None
    if divergence == "hutchinson":
        probe = torch.sign(noise_like(x1, generator))  # Rademacher +-1, drawn once per path
    drift = _AugmentedDrift(velocity, tuple(x1.shape[1:]), probe)
    state = torch.cat([x1.flatten(1), x1.new_zeros(x1.shape[0], 1)], dim=1)  # (N, D + 1), l = 0 at data
    state = integrate_ode(drift, state, 1.0 - sample_eps, sample_eps, method=method, steps=steps,
                          atol=atol, rtol=rtol, stats=stats)
    x0, change = state[:, :-1], state[:, -1]
    prior = -0.5 * (x0.pow(2).sum(1) + x0.shape[1] * math.log(2 * math.pi))  # log N(x0; 0, I)
    return prior + change, x0.reshape(x1.shape)


def bits_per_dim(log_p: Tensor, x: Tensor) -> Tensor:
    """Negative log-likelihood in bits per dimension, -log p / (D ln 2), of a continuous density.

    No dequantisation offset is added: for 8-bit images scaled to [-1, 1], add log2(128) by hand.
    """
    return -log_p / (x[0].numel() * math.log(2))
