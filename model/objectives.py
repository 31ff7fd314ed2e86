"""Training objectives: what the network predicts, how its error is weighted, which t it sees.

For x_t = alpha x1 + sigma x0 (model.interpolants) the network may predict
    velocity  u_t = alpha' x1 + sigma' x0          (SiT paper Eq. 3, the default)
    noise     x0
    score     -x0 / sigma                           (learnt as sigma * score ~ -x0, as the reference)
and the three are tied by one identity (primes are d/dt):
    v(x, t) = (alpha'/alpha) x + c(t) score(x, t),   c(t) = (alpha'/alpha) sigma^2 - sigma sigma'.
c(t) is the reference's "drift variance" (`compute_drift`); it is beta(t)/2 on the VP path.

Weights for score and noise prediction (the reference's `training_losses`, whose math checks out):
    "none"        plain error in noise space: |eps_hat - x0|^2, or |sigma s_hat + x0|^2 for score;
    "velocity"    that error times (c / sigma)^2, which is exactly the velocity error the
                  prediction implies, |v_hat - u_t|^2 (v_hat converted as prediction_to_velocity);
    "likelihood"  that error times c / sigma^2, i.e. c |s_hat - s|^2: the weighting under which
                  the score loss bounds the negative log-likelihood (Song et al. 2021, g^2 = 2c).
For velocity prediction "velocity" is the same as "none"; "likelihood" is refused (the reference
silently ignores a weight there, which hides a mistake).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from model.interpolants import (
    NAMES as INTERPOLANTS,
    Interpolant,
    expand_like,
    interpolate,
    noise_to_velocity,
    score_to_velocity,
)
from model.errors import SitctlError

def _velocity_itself(interp: Interpolant, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
    return output


# What the network predicts -> the conversion of its output to a velocity (model.interpolants).
PREDICTIONS = {"velocity": _velocity_itself, "score": score_to_velocity, "noise": noise_to_velocity}
WEIGHTS = ("none", "velocity", "likelihood")


def check_objective(interp_name: str, pred: str, weight: str) -> None:
    """Raise SitctlError unless interpolant, prediction and weight are known and fit together."""
    if interp_name not in INTERPOLANTS:
        raise SitctlError(f"unknown interpolant {interp_name!r}; choose one of {', '.join(INTERPOLANTS)}")
    if pred not in PREDICTIONS:
        raise SitctlError(f"unknown prediction {pred!r}; choose one of {', '.join(PREDICTIONS)}")
    if weight not in WEIGHTS:
        raise SitctlError(f"unknown loss weight {weight!r}; choose one of {', '.join(WEIGHTS)}")
    if pred == "velocity" and weight == "likelihood":
        raise SitctlError("loss weight 'likelihood' applies to score or noise prediction, not velocity")


def score_coefficient(interp: Interpolant, t: Tensor) -> Tensor:
    """c(t) = (alpha'/alpha) sigma^2 - sigma sigma', the factor of the score in v (module docstring)."""
    alpha, sigma = interp.alpha(t), interp.sigma(t)
    return interp.d_alpha(t) / alpha * sigma**2 - sigma * interp.d_sigma(t)


def prediction_to_velocity(output: Tensor, x: Tensor, t: Tensor, *, interp: Interpolant, pred: str) -> Tensor:
    """Turn a network output at (x, t), t of shape (N,), into the velocity it implies.

    `pred` was checked where it was read (check_objective), so it is a key of PREDICTIONS here."""
    return PREDICTIONS[pred](interp, output, x, t)


# ---------------------------------------------------------------------------------------------
# Training time: a distribution on [0, 1] given by its quantile function, so the loader's
# per-sample uniforms (sitctl/data.py) become times by one monotone map
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniformTime:
    """t ~ U[0, 1], the SiT paper's."""

    def quantile(self, u: Tensor) -> Tensor:
        return u


@dataclass(frozen=True)
class LogitNormalTime:
    """SD3's logit-normal time (Esser et al. 2024, sec. 3.1), as LightningDiT and REPA use it.

    SD3 draws the noise level s = sigmoid(n), n ~ N(mean, std), with s = 1 pure noise; in this
    project's time (noise at t = 0) that is t = 1 - s = sigmoid(-n), and -n ~ N(-mean, std). So
    `mean` keeps SD3's meaning (mean > 0 favours the noisy end) and the quantile is
    sigmoid(-mean + std * Phi^-1(u)).
    """

    mean: float = 0.0
    std: float = 1.0

    def quantile(self, u: Tensor) -> Tensor:
        return torch.sigmoid(-self.mean + self.std * torch.special.ndtri(u))


TimeDistribution = UniformTime | LogitNormalTime
TIME_DISTRIBUTIONS = {"uniform": UniformTime, "logit-normal": LogitNormalTime}


def times_from_uniform(u: Tensor, *, train_eps: float, discrete_steps: int | None = None,
                       distribution: TimeDistribution = UniformTime()) -> Tensor:
    """Map uniforms u in [0, 1) to t in [eps, 1 - eps] drawn from `distribution`, or to a grid of
    `discrete_steps` points on it.

    The train loop draws its uniforms per sample (sitctl/data.py) and maps them here, so its t
    match what sample_times draws from the same generator.
    """
    u = distribution.quantile(u)
    if discrete_steps is not None:
        if discrete_steps < 2:
            raise SitctlError(f"discrete_steps must be at least 2, got {discrete_steps}")
        # floor(u K) is uniform on {0, ..., K-1}; the clamp only guards u == 1.
        index = torch.clamp((u * discrete_steps).floor(), max=discrete_steps - 1)
        u = index / (discrete_steps - 1)
    return train_eps + (1 - 2 * train_eps) * u


def sample_times(n: int, *, train_eps: float, discrete_steps: int | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """t ~ U[eps, 1 - eps], or uniform over a grid of `discrete_steps` points on it; shape (n,)."""
    draw_on = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=draw_on)  # (n,)
    return times_from_uniform(u, train_eps=train_eps, discrete_steps=discrete_steps).to(device)


def training_loss(net: Callable[[Tensor, Tensor, Tensor], Tensor], x1: Tensor, y: Tensor, *,
                  interp: Interpolant, pred: str = "velocity", weight: str = "none",
                  train_eps: float | None = None, discrete_steps: int | None = None, t: Tensor | None = None,
                  x0: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample loss (N,) of net(x_t, t, y) at data x1 (N, ...); t and x0 drawn if not given.

    train_eps defaults to interp.default_eps(pred)[0]. Averaged over all non-batch dimensions.
    The names pred and weight were checked once where they were read (check_objective), not per call.
    """
    if train_eps is None:
        train_eps = interp.default_eps(pred)[0]
    if t is None:
        t = sample_times(x1.shape[0], train_eps=train_eps, discrete_steps=discrete_steps,
                         generator=generator, device=x1.device).to(x1.dtype)
    if x0 is None:
        draw_on = generator.device if generator is not None else x1.device
        x0 = torch.randn(x1.shape, generator=generator, device=draw_on, dtype=x1.dtype).to(x1.device)
    x_t, u_t = interpolate(interp, t, x0, x1)  # (N, ...) each
    output = net(x_t, t, y)  # (N, ...)
    if pred == "velocity":
        return (output - u_t).pow(2).flatten(1).mean(1)
    tt = expand_like(t, x1)
    sigma = interp.sigma(tt)
    error = output - x0 if pred == "noise" else sigma * output + x0  # noise-space error
    factor = torch.ones_like(tt)
    if weight == "velocity":
        factor = (score_coefficient(interp, tt) / sigma) ** 2
    elif weight == "likelihood":
        factor = score_coefficient(interp, tt) / sigma**2
    return (factor * error.pow(2)).flatten(1).mean(1)
