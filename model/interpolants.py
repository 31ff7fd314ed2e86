"""Interpolants x_t = alpha(t) x1 + sigma(t) x0 (x0 noise at t = 0, x1 data at t = 1).

Each interpolant is a small frozen object with four named methods on tensors. The three
paths are those of the SiT paper (arXiv 2401.08740, Sec. 2 and App. A):

    linear  alpha = t,             sigma = 1 - t
    gvp     alpha = sin(pi t / 2), sigma = cos(pi t / 2)      (alpha^2 + sigma^2 = 1)
    vp      alpha = exp(-1/4 (1-t)^2 (b1 - b0) - 1/2 (1-t) b0), sigma = sqrt(1 - alpha^2),
            the VP-SDE of score-based diffusion with beta running from b0 = 0.1 to b1 = 20,
            written in the data-at-t=1 convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor



class _EndsAtZeroSignal:
    """Defaults shared by paths with alpha(0) = 0 (linear, gvp), the reference's create_transport values.

    A velocity target is finite on all of [0, 1], so t is drawn from [0, 1]; noise and score need
    alpha > 0 to convert to a velocity, so 1e-3 is cut from each end. The SBDM diffusion
    (the score-SDE reverse process) is infinite where alpha = 0, so SDEs using it start at 1e-3.
    """

    sbdm_start: ClassVar[float] = 1e-3

    def default_eps(self, pred: str) -> tuple[float, float]:
        """(train_eps, sample_eps) for a network predicting `pred`."""
        return (0.0, 0.0) if pred == "velocity" else (1e-3, 1e-3)


@dataclass(frozen=True)
class Linear(_EndsAtZeroSignal):
    """alpha = t, sigma = 1 - t: the straight path of rectified flow / flow matching."""

    name: str = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def sigma(self, t: Tensor) -> Tensor:
        return 1 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


@dataclass(frozen=True)
class GVP(_EndsAtZeroSignal):
    """Generalised variance-preserving path: alpha = sin(pi t/2), sigma = cos(pi t/2)."""

    name: str = "gvp"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(t * math.pi / 2)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.cos(t * math.pi / 2)

    def d_alpha(self, t: Tensor) -> Tensor:
        return math.pi / 2 * torch.cos(t * math.pi / 2)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -math.pi / 2 * torch.sin(t * math.pi / 2)


@dataclass(frozen=True)
class VP:
    """The VP-SDE path (beta linear from beta_min to beta_max) with data at t = 1."""

    name: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    # alpha(0) > 0, so SBDM is finite from t = 0 on.
    sbdm_start: ClassVar[float] = 0.0

    def default_eps(self, pred: str) -> tuple[float, float]:
        """(train_eps, sample_eps): sigma' -> -inf at t = 1, so training stays 1e-5 away whatever `pred`."""
        return 1e-5, 1e-3

    def _log_alpha(self, t: Tensor) -> Tensor:
        s = 1 - t  # diffusion time of the score-SDE convention (0 at data)
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        # 1 - alpha^2 through expm1 keeps precision where alpha is near 1 (t near 1).
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        # d/dt log alpha = 1/2 (1-t)(b1 - b0) + 1/2 b0 = beta(1-t) / 2
        d_log_alpha = 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min
        return self.alpha(t) * d_log_alpha

    def d_sigma(self, t: Tensor) -> Tensor:
        # sigma^2 = 1 - alpha^2  =>  d_sigma = -alpha d_alpha / sigma
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


Interpolant = Linear | GVP | VP
# Adding an interpolant is one class above and one entry here.
INTERPOLANTS: dict[str, type] = {"linear": Linear, "gvp": GVP, "vp": VP}
NAMES = tuple(INTERPOLANTS)


def interpolant(name: str | Interpolant) -> Interpolant:
    """Return the interpolant called `name` ("linear", "gvp" or "vp"); objects pass through."""
    if not isinstance(name, str):
        return name
    if name not in INTERPOLANTS:
        raise ValueError(f"unknown interpolant {name!r}; choose one of {', '.join(NAMES)}")
    return INTERPOLANTS[name]()


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time (N,) to broadcast against x (N, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(interp: Interpolant, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
    """Return (x_t, u_t): the point on the path and its velocity d/dt x_t, for t of shape (N,)."""
    tt = expand_like(t, x1)
    x_t = interp.alpha(tt) * x1 + interp.sigma(tt) * x0
    u_t = interp.d_alpha(tt) * x1 + interp.d_sigma(tt) * x0
    return x_t, u_t


# ---------------------------------------------------------------------------------------------
# Conversions between the three prediction targets.
#
# For x_t = a x1 + s x0 with x0 ~ N(0, I), the ideal predictions at (x, t) are
#   noise     eps(x)   = E[x0 | x_t = x]
#   score     score(x) = grad log p_t(x) = -eps(x) / s
#   velocity  v(x)     = E[a' x1 + s' x0 | x_t = x] = (a'/a) x + (s' - a' s / a) eps(x)
# (primes are d/dt). Each function takes x and t of shape (N,) and is exact where a, s > 0.
# ---------------------------------------------------------------------------------------------


def _coefficients(interp: Interpolant, x: Tensor, t: Tensor):
    tt = expand_like(t, x)
    return interp.alpha(tt), interp.sigma(tt), interp.d_alpha(tt), interp.d_sigma(tt)


def noise_to_score(interp: Interpolant, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
    _, s, _, _ = _coefficients(interp, x, t)
    return -eps / s


def score_to_noise(interp: Interpolant, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
    _, s, _, _ = _coefficients(interp, x, t)
    return -s * score


def noise_to_velocity(interp: Interpolant, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
    a, s, da, ds = _coefficients(interp, x, t)
    return (da / a) * x + (ds - da * s / a) * eps


def velocity_to_noise(interp: Interpolant, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
    a, s, da, ds = _coefficients(interp, x, t)
    return (a * velocity - da * x) / (a * ds - da * s)


def score_to_velocity(interp: Interpolant, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
    return noise_to_velocity(interp, score_to_noise(interp, score, x, t), x, t)


def velocity_to_score(interp: Interpolant, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
    # score = (a v - a' x) / (s (a' s - a s')); finite at t = 0 for linear and gvp (a = 0).
    a, s, da, ds = _coefficients(interp, x, t)
    return (a * velocity - da * x) / (s * (da * s - a * ds))
