"""Samplers: carry x from noise (t = 0) to data (t = 1) along a velocity field, or back.

Everything here works on a plain callable `velocity(x, t)`, x of shape (N, ...) and t of shape
(N,), so the same solvers serve a network, a guided network or a closed-form field in a test.
Time grids are separate from solvers; every solver is one loop.

ODE (SiT paper Sec. 2.3, probability-flow form):  dx = v(x, t) dt.
SDE (SiT paper Eq. 8 with our forward time):     dx = [v + w_t s(x, t)] dt + sqrt(2 w_t) dW,
where s is the score recovered from v (model.interpolants.velocity_to_score). Any w_t >= 0 keeps
the marginals of the interpolant (the w_t terms cancel in the Fokker-Planck equation), so
w_t = 0 is the ODE.

Randomness is per sample: a sample's noise comes from its own generator seeded by
(seed, sample index), so it never depends on the batch it was drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.interpolants import Interpolant, expand_like, velocity_to_score
from model.objectives import score_coefficient
from model.errors import SitctlError

Velocity = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None



# ---------------------------------------------------------------------------------------------
# Randomness: one generator per sample
# ---------------------------------------------------------------------------------------------


def per_sample_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample index on `device`, seeded from (seed, index) alone.

    On a GPU the noise is then drawn where it is used: no host draw, no copy, no stall per step.
    CPU and CUDA generators are different algorithms, so a CUDA image is not its CPU twin (a
    sample is the same for any batch split and process count on either).
    """
    generators = []
    for index in indices:
        # SeedSequence mixes the pair into a well-spread 63-bit seed (no collisions from seed+index).
        state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
        generators.append(torch.Generator(device).manual_seed(int(state) & (2**63 - 1)))
    return generators


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int], *,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal of the full batch `shape` (N, ...), row i drawn from generators[i] alone."""
    if shape[0] != len(generators):
        raise ValueError(f"shape {tuple(shape)} has {shape[0]} rows but {len(generators)} generators were given")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device if device is not None else rows[0].device)


def noise_like(x: Tensor, generator: Generators) -> Tensor:
    """N(0, I) shaped like x from one generator, a list of per-sample generators, or the global one."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return randn_per_sample(generator, x.shape, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# Time grids and small helpers
# ---------------------------------------------------------------------------------------------


def uniform_grid(t0: float, t1: float, steps: int) -> list[float]:
    """steps + 1 evenly spaced times from t0 to t1 (either direction), as Python floats."""
    return torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()


def shift_time(u: float, shift: float) -> float:
    """SD3's time shift (Esser et al. 2024, eq. 23) in this project's time (noise at 0, data at 1).

    SD3 writes it for the noise level s = 1 - u as s' = shift s / (1 + (shift - 1) s); then
    u' = 1 - s' = u / (u + shift (1 - u)). Monotone on [0, 1], fixes 0 and 1; shift > 1 spends
    more of a grid near the noise end (LightningDiT's --timestep-shift, SD3's shift 3).
    """
    return u / (u + shift * (1.0 - u))


def time_grid(t0: float, t1: float, steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 times from t0 to t1: evenly spaced, or shifted (shift_time on the fraction of the
    way from the noise end), so both ends are kept exactly and shift 1 is the uniform grid itself."""
    grid = uniform_grid(t0, t1, steps)
    if shift == 1.0:
        return grid
    low, high = min(t0, t1), max(t0, t1)
    return [low + (high - low) * shift_time((t - low) / (high - low), shift) if 0 < t - low < high - low else t for t in grid]


def _time(x: Tensor, t: float) -> Tensor:
    """The scalar time t as a per-sample tensor (N,) matching x's dtype and device."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _count(stats: dict | None, key: str, amount: int) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + amount


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise SitctlError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------
# ODE solvers: same signature (drift, x, grid, stats), one loop each
# ---------------------------------------------------------------------------------------------


def ode_euler(drift: Velocity, x: Tensor, grid: Sequence[float], stats: dict | None = None) -> Tensor:
    """Explicit Euler on a fixed grid (first order, one evaluation per step)."""
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * drift(x, _time(x, t_cur))
    _count(stats, "nfe", len(grid) - 1)
    return x


def ode_heun(drift: Velocity, x: Tensor, grid: Sequence[float], stats: dict | None = None) -> Tensor:
    """Heun's method (explicit trapezoid, second order, two evaluations per step); EDM Alg. 1."""
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        step = t_next - t_cur
        d_cur = drift(x, _time(x, t_cur))
        # Euler step.
        x_next = x + step * d_cur
        # 2nd order correction: average the slopes at both ends.
        d_next = drift(x_next, _time(x, t_next))
        x = x + step * 0.5 * (d_cur + d_next)
    _count(stats, "nfe", 2 * (len(grid) - 1))
    return x


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980; Hairer, Norsett & Wanner I, Table II.5.2).
# The last row of A equals the 5th-order weights, so the 7th stage is f(x_new): first same as last.
_DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# 5th-order minus embedded 4th-order weights: the local error estimate.
_DOPRI_E = (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
            -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)


def _rms(x: Tensor) -> Tensor:
    """Root mean square over all but the batch dimension: (N, ...) -> (N,)."""
    return x.flatten(1).pow(2).mean(1).sqrt()


def _dopri5_stages(drift: Velocity, x: Tensor, t: Tensor, step: Tensor, k1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Dormand-Prince trial step of signed per-sample size `step` (N,); returns (x_new, error, f(x_new))."""
    h = expand_like(step, x).to(x.dtype)
    stages = [k1]
    for c, row in zip(_DOPRI_C[1:], _DOPRI_A[1:]):
        x_stage = x + h * sum(a * k for a, k in zip(row, stages) if a != 0.0)
        stages.append(drift(x_stage, (t + c * step).to(x.dtype)))
    error = h * sum(e * k for e, k in zip(_DOPRI_E, stages) if e != 0.0)
    return x_stage, error, stages[-1]


def ode_dopri5(drift: Velocity, x: Tensor, t0: float, t1: float, *, atol: float = 1e-6, rtol: float = 1e-3,
               stats: dict | None = None, max_iterations: int = 10_000) -> Tensor:
    """Adaptive Dormand-Prince 5(4) with one step size per sample, so no sample depends on its batch.

    Every iteration evaluates the whole batch once per stage; samples that have arrived take zero
    steps. Step control as Hairer, Norsett & Wanner I, Sec. II.4 (safety 0.9, factor in [0.2, 10]).
    """
    direction = 1.0 if t1 >= t0 else -1.0
    t = torch.full((x.shape[0],), float(t0), dtype=torch.float64, device=x.device)  # (N,)
    k1 = drift(x, t.to(x.dtype))
    # Initial step: 1% of the state-to-slope ratio in the tolerance norm (Hairer's first guess).
    scale = atol + rtol * x.abs()
    step = (0.01 * _rms(x / scale) / _rms(k1 / scale).clamp_min(1e-10)).double().clamp(1e-6, abs(t1 - t0))
    nfe = 1
    for _ in range(max_iterations):
        remaining = (t1 - t) * direction  # (N,)
        active = remaining > 1e-9 * max(abs(t1 - t0), 1e-9)
        # The one host sync of the loop: it decides when to stop, once per 6 network evaluations
        # (checking less often would spend 6 wasted evaluations per extra iteration instead).
        if not active.any():
            break
        step = torch.where(active, torch.minimum(step, remaining), torch.zeros_like(step))
        x_new, error, k_new = _dopri5_stages(drift, x, t, direction * step, k1)
        nfe += 6
        ratio = _rms(error / (atol + rtol * torch.maximum(x.abs(), x_new.abs()))).double()  # (N,)
        accept = active & (ratio <= 1.0)
        keep = expand_like(accept, x)
        x, k1 = torch.where(keep, x_new, x), torch.where(keep, k_new, k1)
        t = torch.where(accept, t + direction * step, t)
        # New step size from the error ratio; a rejected step always shrinks (factor < 0.9).
        factor = (0.9 * ratio.clamp_min(1e-10).pow(-0.2)).clamp(0.2, 10.0)
        step = torch.where(active, step * factor, step)
    else:
        raise SitctlError(f"dopri5 did not reach t = {t1} in {max_iterations} steps; atol={atol}, rtol={rtol} "
                          "may be too tight for the precision of the velocity")
    _count(stats, "nfe", nfe)
    return x


# Fixed-grid ODE solvers by name; adding one is a function above and an entry here.
FIXED_STEP_ODE_SOLVERS = {"euler": ode_euler, "heun": ode_heun}
ODE_METHODS = (*FIXED_STEP_ODE_SOLVERS, "dopri5")  # dopri5 adapts its own steps


def integrate_ode(drift: Velocity, x: Tensor, t0: float, t1: float, *, method: str = "heun", steps: int = 50,
                  atol: float = 1e-6, rtol: float = 1e-3, shift: float = 1.0, stats: dict | None = None) -> Tensor:
    """Solve dx/dt = drift(x, t) from t0 to t1 (either direction) with a named method; fixed-step
    methods step on time_grid(t0, t1, steps, shift)."""
    _check_choice(method, ODE_METHODS, "ODE method")
    if method == "dopri5":
        return ode_dopri5(drift, x, t0, t1, atol=atol, rtol=rtol, stats=stats)
    if steps < 1:
        raise SitctlError(f"steps must be at least 1, got {steps}")
    return FIXED_STEP_ODE_SOLVERS[method](drift, x, time_grid(t0, t1, steps, shift), stats)


def sample_ode(velocity: Velocity, x0: Tensor, *, method: str = "heun", steps: int = 50, atol: float = 1e-6,
               rtol: float = 1e-3, sample_eps: float = 0.0, reverse: bool = False, shift: float = 1.0,
               stats: dict | None = None) -> Tensor:
    """Probability-flow ODE from noise x0 at t = sample_eps to data at t = 1 - sample_eps.

    With reverse=True, x0 is data and the result is its noise (t runs from 1 - eps down to eps).
    `steps` counts fixed steps (euler: 1 evaluation each, heun: 2); dopri5 ignores it and
    adapts to atol/rtol. `shift` > 1 puts more fixed steps near the noise end (time_grid).
    If `stats` is a dict, it receives "nfe" (network evaluations).
    """
    t0, t1 = sample_eps, 1.0 - sample_eps
    if reverse:
        t0, t1 = t1, t0
    return integrate_ode(velocity, x0, t0, t1, method=method, steps=steps, atol=atol, rtol=rtol, shift=shift, stats=stats)


# ---------------------------------------------------------------------------------------------
# SDE: diffusion schedules, drift, solvers, last step
# ---------------------------------------------------------------------------------------------


# Diffusion forms w_t / w by name, each (interpolant, t) -> tensor of t's shape. As the reference
# `compute_diffusion`, except that "decreasing" is (1 + cos(pi t))^2 / 4 times w (the reference
# puts w inside the square, so w = 0 would not give the ODE) and "increasing-decreasing" can be
# selected (the reference's key is misspelt). Adding a form is one entry.
DiffusionForm = Callable[[Interpolant, Tensor], Tensor]
DIFFUSIONS: dict[str, DiffusionForm] = {
    "constant": lambda interp, t: torch.ones_like(t),
    "SBDM": score_coefficient,  # the VP-SDE's beta/2 for vp: the score-SDE reverse process
    "sigma": lambda interp, t: interp.sigma(t),
    "linear": lambda interp, t: 1 - t,
    "decreasing": lambda interp, t: 0.25 * (torch.cos(math.pi * t) + 1) ** 2,
    "increasing-decreasing": lambda interp, t: torch.sin(math.pi * (1 - t)) ** 2,  # = sin(pi t)^2, exactly 0 at t = 1
}


def diffusion_form(form: str | DiffusionForm) -> DiffusionForm:
    """The diffusion form called `form` (functions pass through)."""
    if callable(form):
        return form
    _check_choice(form, DIFFUSIONS, "diffusion form")
    return DIFFUSIONS[form]


def diffusion_coefficient(form: str | DiffusionForm, interp: Interpolant, t: Tensor, w: float) -> Tensor:
    """w_t of the SDE: the form scaled by w (w = 0 is the ODE); shape of t."""
    return w * diffusion_form(form)(interp, t)


def sde_drift(velocity: Velocity, interp: Interpolant, x: Tensor, t: Tensor, w_t: Tensor) -> Tensor:
    """v + w_t * score, the score recovered from v; w_t of shape (N,).

    Where w_t = 0 the drift is v itself, even where the score is singular (sigma = 0 at t = 1).
    """
    v = velocity(x, t)
    w_t = expand_like(w_t, x)
    return torch.where(w_t == 0, v, v + w_t * velocity_to_score(interp, v, x, t))


def sde_euler(velocity: Velocity, x: Tensor, grid: Sequence[float], *, interp: Interpolant,
              diffusion: str | DiffusionForm, w: float, generator: Generators = None, stats: dict | None = None) -> Tensor:
    """Euler-Maruyama: x += (v + w_t s) dt + sqrt(2 w_t dt) z."""
    diffusion = diffusion_form(diffusion)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt, t = t_next - t_cur, _time(x, t_cur)
        w_t = diffusion_coefficient(diffusion, interp, t, w)
        noise = noise_like(x, generator)
        x = x + dt * sde_drift(velocity, interp, x, t, w_t) + expand_like((2 * w_t * dt).sqrt(), x) * noise
    _count(stats, "nfe", len(grid) - 1)
    return x


def sde_heun(velocity: Velocity, x: Tensor, grid: Sequence[float], *, interp: Interpolant,
             diffusion: str | DiffusionForm, w: float, generator: Generators = None, stats: dict | None = None) -> Tensor:
    """Stochastic Heun as the reference's Heun_step: add the noise first, then a Heun step of the drift."""
    diffusion = diffusion_form(diffusion)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt, t, t_end = t_next - t_cur, _time(x, t_cur), _time(x, t_next)
        w_t = diffusion_coefficient(diffusion, interp, t, w)
        x_hat = x + expand_like((2 * w_t * dt).sqrt(), x) * noise_like(x, generator)
        # Euler step of the drift from the noised point.
        d_cur = sde_drift(velocity, interp, x_hat, t, w_t)
        x_next = x_hat + dt * d_cur
        # 2nd order correction with the drift at the end of the step.
        d_next = sde_drift(velocity, interp, x_next, t_end, diffusion_coefficient(diffusion, interp, t_end, w))
        x = x_hat + dt * 0.5 * (d_cur + d_next)
    _count(stats, "nfe", 2 * (len(grid) - 1))
    return x


# SDE solvers by name; adding one is a function above and an entry here.
SDE_SOLVERS = {"euler": sde_euler, "heun": sde_heun}
SDE_METHODS = tuple(SDE_SOLVERS)
LAST_STEPS = ("none", "mean", "tweedie", "euler")


def sde_last_step(velocity: Velocity, x: Tensor, t: float, *, interp: Interpolant, kind: str,
                  diffusion: str | DiffusionForm, w: float, stats: dict | None = None) -> Tensor:
    """The final jump from t to 1 without noise: "mean" (SDE drift), "euler" (velocity) or "tweedie".

    tweedie: E[x1 | x_t] = (x + sigma^2 score) / alpha (Tweedie's formula for x_t = alpha x1 + sigma x0).
    """
    if kind == "none":
        return x
    time = _time(x, t)
    _count(stats, "nfe", 1)
    if kind == "mean":
        return x + (1.0 - t) * sde_drift(velocity, interp, x, time, diffusion_coefficient(diffusion, interp, time, w))
    v = velocity(x, time)
    if kind == "euler":
        return x + (1.0 - t) * v
    alpha, sigma = interp.alpha(expand_like(time, x)), interp.sigma(expand_like(time, x))
    return (x + sigma**2 * velocity_to_score(interp, v, x, time)) / alpha


def sample_sde(velocity: Velocity, x0: Tensor, *, interp: Interpolant, method: str = "euler",
               steps: int = 250, diffusion: str = "sigma", w: float = 1.0, last_step: str = "mean",
               last_step_size: float = 0.04, generator: Generators = None, sample_eps: float = 0.0,
               shift: float = 1.0, stats: dict | None = None) -> Tensor:
    """SDE from noise x0 at t = sample_eps to data at t = 1.

    `steps` network steps in all, as the reference's --num-sampling-steps: with a last step,
    steps - 1 solver steps to 1 - last_step_size, then the noiseless last step to 1; with
    last_step="none", `steps` solver steps to 1 - sample_eps. "SBDM" is infinite at t = 0 for
    linear and gvp (alpha = 0), so it starts at max(sample_eps, 1e-3), as the reference's eps.
    `shift` > 1 puts more of the solver steps near the noise end (time_grid).
    """
    _check_choice(method, SDE_METHODS, "SDE method")
    _check_choice(diffusion, DIFFUSIONS, "diffusion form")
    _check_choice(last_step, LAST_STEPS, "last step")
    if w < 0:
        raise SitctlError(f"the diffusion scale w must be >= 0, got {w}")
    if steps < (1 if last_step == "none" else 2):
        raise SitctlError(f"steps must be at least {1 if last_step == 'none' else 2}, got {steps}")
    if last_step != "none" and not 0.0 < last_step_size < 1.0 - sample_eps:
        raise SitctlError(f"last_step_size must lie in (0, {1.0 - sample_eps}), got {last_step_size}")
    if last_step == "none" and sample_eps == 0 and method == "heun" and diffusion in ("constant", "SBDM"):
        # Heun's correction would evaluate w_t * score at t = 1, where sigma = 0 and w_t does not vanish.
        raise SitctlError(f"SDE heun with the {diffusion} diffusion needs a last step or sample_eps > 0")
    # SBDM is infinite where alpha = 0; the interpolant says where it may start.
    t0 = max(sample_eps, interp.sbdm_start) if diffusion == "SBDM" else sample_eps
    if last_step == "none":
        grid = time_grid(t0, 1.0 - sample_eps, steps, shift)
    else:
        grid = time_grid(t0, 1.0 - last_step_size, steps - 1, shift)
    form = diffusion_form(diffusion)  # resolved once, not on every step
    x = SDE_SOLVERS[method](velocity, x0, grid, interp=interp, diffusion=form, w=w, generator=generator, stats=stats)
    return sde_last_step(velocity, x, grid[-1], interp=interp, kind=last_step, diffusion=form, w=w, stats=stats)
