"""Samplers, guidance and likelihood against closed-form Gaussian transport (tests/model/gaussian.py).

Data is 2-D: N(m, S), or a two-mode mixture, in float64. For one Gaussian the probability-flow
ODE has a known flow map, so ODE solvers are checked sample by sample; SDE samplers are checked
on the mean and covariance of 4000 samples. The sampling error alone of those statistics is
about 0.013 (one standard deviation), so the stated tolerance of 0.06 leaves room for the
solver's own bias but not for a wrong drift or noise scale (a noise missing its factor 2 moves
the covariance by ~0.25).
"""

from __future__ import annotations

import math

import pytest
import torch

from model.configs import model_config
from model.guidance import GuidedVelocity
from model.interpolants import interpolant, interpolate
from model.likelihood import bits_per_dim, log_likelihood
from model.network import SiT
from model.samplers import (
    DIFFUSIONS,
    diffusion_coefficient,
    integrate_ode,
    per_sample_generators,
    randn_per_sample,
    sample_ode,
    sample_sde,
    sde_drift,
    sde_last_step,
    time_grid,
)
from sitctl.errors import SitctlError
from tests.model.gaussian import ExactVelocity, GaussianMixture

DATA = GaussianMixture.single([1.0, -0.5], [[0.6, 0.25], [0.25, 0.4]])
MIXTURE = GaussianMixture(
    torch.tensor([0.3, 0.7], dtype=torch.float64),
    torch.tensor([[-1.5, 0.5], [1.0, -0.5]], dtype=torch.float64),
    torch.tensor([[[0.2, 0.05], [0.05, 0.3]], [[0.3, -0.1], [-0.1, 0.25]]], dtype=torch.float64),
)
STAT_TOL = 0.06


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_distribution(x: torch.Tensor, data: GaussianMixture, tol: float = STAT_TOL) -> None:
    mean_error = (x.mean(0) - data.mean()).abs().max().item()
    cov_error = (torch.cov(x.T) - data.cov()).abs().max().item()
    assert mean_error < tol and cov_error < tol, f"mean error {mean_error:.4f}, covariance error {cov_error:.4f}"


class Recording:
    """A velocity that records the time of each evaluation (its first sample's) before it answers."""

    def __init__(self, velocity):
        self.velocity, self.times = velocity, []

    def __call__(self, x, t):
        self.times.append(float(t[0]))
        return self.velocity(x, t)


# ---------------------------------------------------------------------------------------------
# ODE
# ---------------------------------------------------------------------------------------------

# (method, steps, largest pathwise error allowed): euler is first order, heun second, dopri5 adaptive.
# dopri5 runs at rtol 1e-5: at the default 1e-3 a few vp paths take one accepted step over
# t = 0.09 .. 0.93 (the field is nearly zero early on) and land 0.07 off; local error control
# bounds no global error.
ODE_CASES = [("euler", 100, 0.05), ("heun", 30, 5e-3), ("dopri5", 0, 5e-3)]


@pytest.mark.parametrize("name", ("linear", "gvp", "vp"))
@pytest.mark.parametrize("method, steps, tol", ODE_CASES)
def test_ode_follows_exact_flow_map_and_reaches_target(name, method, steps, tol):
    interp = interpolant(name)
    eps = interpolant(name).default_eps("velocity")[1]
    x0 = noise(4000)
    x1 = sample_ode(ExactVelocity(DATA, interp), x0, method=method, steps=steps, sample_eps=eps, rtol=1e-5)
    exact = DATA.flow_map(interp, x0, eps, 1 - eps)
    assert (x1 - exact).abs().max().item() < tol
    assert_distribution(x1, DATA)


def test_error_shrinks_with_steps_first_order_euler_second_order_heun():
    interp = interpolant("linear")
    x0 = noise(500)
    exact = DATA.flow_map(interp, x0, 0.0, 1.0)

    def error(method: str, steps: int) -> float:
        x1 = sample_ode(ExactVelocity(DATA, interp), x0, method=method, steps=steps)
        return (x1 - exact).abs().max().item()

    euler_ratio, heun_ratio = error("euler", 40) / error("euler", 20), error("heun", 40) / error("heun", 20)
    assert 0.4 < euler_ratio < 0.6  # halving the step halves the error
    assert 0.18 < heun_ratio < 0.32  # ... and quarters it
    assert error("heun", 20) < error("euler", 40) / 10  # same 40 evaluations, far more accurate


def test_dopri5_tolerance_controls_error_and_reports_evaluations():
    interp = interpolant("gvp")
    x0 = noise(200)
    exact = DATA.flow_map(interp, x0, 0.0, 1.0)
    loose, tight = {}, {}
    error_loose = (sample_ode(ExactVelocity(DATA, interp), x0, method="dopri5", rtol=1e-3, stats=loose) - exact).abs().max()
    error_tight = (sample_ode(ExactVelocity(DATA, interp), x0, method="dopri5", rtol=1e-7, atol=1e-9, stats=tight) - exact).abs().max()
    assert error_tight < 1e-6 < error_loose
    assert 1 < loose["nfe"] < tight["nfe"]
    assert (loose["nfe"] - 1) % 6 == 0  # one first evaluation, then 6 per trial step (FSAL)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("method", ("euler", "heun", "dopri5"))
def test_the_state_keeps_its_dtype_in_every_evaluation(method, dtype):
    """Times are kept in float64 between steps, but the network sees x and t in the state's dtype (bf16/fp32 nets
    on GPU); dx/dt = -x lands at x0 e^-1."""
    seen = []

    def decay(x, t):
        seen.append((x.dtype, t.dtype))
        return -x

    x0 = noise(8).to(dtype)
    x1 = sample_ode(decay, x0, method=method, steps=200)
    assert x1.dtype == dtype and set(seen) == {(dtype, dtype)}
    torch.testing.assert_close(x1, x0 * math.exp(-1), atol=1e-2, rtol=0)


@pytest.mark.parametrize("method, tol", [("heun", 5e-4), ("dopri5", 1e-4)])
def test_reverse_ode_maps_data_to_its_noise(method, tol):
    interp = interpolant("linear")
    velocity = ExactVelocity(DATA, interp)
    x1 = DATA.sample(300, torch.Generator().manual_seed(3))
    back = sample_ode(velocity, x1, method=method, steps=100, rtol=1e-6, reverse=True)
    torch.testing.assert_close(back, DATA.flow_map(interp, x1, 1.0, 0.0), atol=tol, rtol=0)
    again = sample_ode(velocity, back, method=method, steps=100, rtol=1e-6)
    torch.testing.assert_close(again, x1, atol=2 * tol, rtol=0)


def test_dopri5_sample_does_not_depend_on_its_batch():
    velocity = ExactVelocity(MIXTURE, interpolant("linear"))
    x0 = noise(4)
    whole = sample_ode(velocity, x0, method="dopri5")
    halves = torch.cat([sample_ode(velocity, x0[:2], method="dopri5"), sample_ode(velocity, x0[2:], method="dopri5")])
    torch.testing.assert_close(whole, halves, atol=1e-12, rtol=0)


# Dormand-Prince 5(4), typed from Hairer, Norsett & Wanner I, Table II.5.2 (not imported from model/samplers.py).
DP_C = (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1)
DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DP_B4 = (5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def reference_dopri5(f, x, t0, t1, atol, rtol):
    """Hairer's step control on plain Python floats: the times of every evaluation, the end state, the rejections.

    First step 0.01 ||x0|| / ||f(x0)|| in the norm sqrt(mean((v_i / (atol + rtol |x_i|))^2)), within [1e-6, |t1 - t0|];
    a step is accepted when the error norm (scale atol + rtol max(|x_i|, |x_new_i|)) is at most 1; the next step is
    h * min(10, max(0.2, 0.9 err^-1/5)); the last step is cut to land on t1.
    """
    def norm(v, scale):
        return math.sqrt(sum((a / b) ** 2 for a, b in zip(v, scale)) / len(v))

    times, direction, t, span, rejected = [t0], 1.0 if t1 >= t0 else -1.0, t0, abs(t1 - t0), 0
    k1 = f(x, t0)
    scale = [atol + rtol * abs(a) for a in x]
    h = min(max(0.01 * norm(x, scale) / max(norm(k1, scale), 1e-10), 1e-6), span)
    while (t1 - t) * direction > 1e-9 * span:
        h = min(h, (t1 - t) * direction)
        stages = [k1]
        for c, row in zip(DP_C[1:], DP_A[1:]):
            point = [a + direction * h * sum(w * k[i] for w, k in zip(row, stages)) for i, a in enumerate(x)]
            times.append(t + direction * c * h)
            stages.append(f(point, t + direction * c * h))
        error = [h * sum((b5 - b4) * k[i] for b5, b4, k in zip((*DP_A[6], 0), DP_B4, stages)) for i in range(len(x))]
        ratio = norm(error, [atol + rtol * max(abs(a), abs(b)) for a, b in zip(x, point)])
        if ratio <= 1:
            x, t, k1 = point, t + direction * h, stages[-1]
        else:
            rejected += 1
        h *= min(10.0, max(0.2, 0.9 * max(ratio, 1e-10) ** -0.2))
    return times, x, rejected


def oscillator(x, t):  # a damped oscillator pulled by cos(4t), and a slow decay: components of different scales
    return [x[1], -9 * x[0] - 0.5 * x[1] + 3 * math.cos(4 * t), -0.3 * x[2]]


def burst(x, t):  # no slope at t = 0: the first trial step is the whole span, and fails by a factor past 0.2
    return [1e3 * math.sin(20 * t)]


def climb(x, t):  # a slope so steep that the first guess (1e-7) is below the smallest first step
    return [1e5]


# (problem, start, t0, t1, atol, rtol, rejections at least); start times not exact in float32
DOPRI5_CASES = [
    (oscillator, [1.0, 0.0, 40.0], 0.1, 2.0, 1e-6, 1e-3, 1),
    (oscillator, [1.0, 0.0, 40.0], 1.3, 0.25, 1e-8, 1e-5, 0),
    (oscillator, [1.0, 0.0, 40.0], 0.0, 1.0, 1e-2, 1e-1, 0),
    (burst, [1.0], 0.0, 1.0, 1e-6, 1e-6, 10),
    (burst, [1.0], 0.0, 1.0, 1e-1, 1e-1, 1),  # no slope but a loose norm: the first guess 0.05, not the span
    (climb, [1.0], 0.0, 1.0, 1e-6, 1e-3, 0),
]


@pytest.mark.parametrize("f, start, t0, t1, atol, rtol, rejections", DOPRI5_CASES,
                         ids=("oscillator", "backwards", "loose", "burst", "burst-loose", "climb"))
def test_dopri5_takes_hairers_steps(f, start, t0, t1, atol, rtol, rejections):
    """Every evaluation time and the end state equal an independent scalar implementation of the documented
    controller."""
    seen = []

    def drift(x, t):
        seen.extend(t.tolist())
        return torch.tensor([f(row, float(time)) for row, time in zip(x.tolist(), t)], dtype=x.dtype)

    times, end, rejected = reference_dopri5(f, start, t0, t1, atol, rtol)
    stats = {}
    x = integrate_ode(drift, torch.tensor([start], dtype=torch.float64), t0, t1, method="dopri5", atol=atol, rtol=rtol,
                      stats=stats)
    assert stats["nfe"] == len(seen) == len(times) > 13 and rejected >= rejections
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(times), atol=1e-12, rtol=0)
    torch.testing.assert_close(x[0], torch.tensor(end, dtype=torch.float64), atol=1e-12, rtol=0)


def test_dopri5_that_cannot_arrive_is_a_user_error_naming_its_settings():
    with pytest.raises(SitctlError) as error:
        integrate_ode(lambda x, t: x * float("nan"), noise(2), 0.0, 1.0, method="dopri5", atol=1e-5, rtol=1e-4)
    assert str(error.value) == ("dopri5 did not reach t = 1.0 in 10000 steps; atol=1e-05, rtol=0.0001 may be too tight "
                                "for the precision of the velocity")


@pytest.mark.parametrize("method, per_step", [("euler", 1), ("heun", 2)])
def test_fixed_step_solvers_report_their_evaluations(method, per_step):
    velocity, stats = Recording(lambda x, t: -x), {"nfe": 5}  # counts add up over calls
    sample_ode(velocity, noise(3), method=method, steps=7, stats=stats)
    assert stats == {"nfe": 5 + 7 * per_step} and len(velocity.times) == 7 * per_step


# ---------------------------------------------------------------------------------------------
# SDE
# ---------------------------------------------------------------------------------------------

# Every diffusion form, w in {0, 0.5, 1, 2}, every last step, both methods, each interpolant.
SDE_CASES = [
    ("linear", "euler", "sigma", 1.0, "mean"),
    ("linear", "heun", "constant", 1.0, "tweedie"),
    ("gvp", "euler", "linear", 2.0, "euler"),
    ("vp", "euler", "SBDM", 1.0, "mean"),
    ("vp", "heun", "decreasing", 0.5, "none"),
    ("linear", "euler", "increasing-decreasing", 1.0, "mean"),
    ("gvp", "heun", "sigma", 0.0, "mean"),
    ("linear", "euler", "SBDM", 0.5, "tweedie"),
]


@pytest.mark.parametrize("name, method, diffusion, w, last_step", SDE_CASES)
def test_sde_reaches_gaussian_target(name, method, diffusion, w, last_step):
    interp = interpolant(name)
    x = sample_sde(ExactVelocity(DATA, interp), noise(4000), interp=interp, method=method, steps=100,
                   diffusion=diffusion, w=w, last_step=last_step, sample_eps=interpolant(name).default_eps("velocity")[1],
                   # vp is far from its data at the reference's 0.04 last step (sigma = 0.14)
                   last_step_size=0.005 if name == "vp" else 0.04,
                   generator=torch.Generator().manual_seed(1))
    assert_distribution(x, DATA)


# "mean" as the last step with constant w_t = 1 would shrink the narrow modes by ~20% (a noiseless
# score step of 0.04 against a variance of 0.2): the reference's behaviour, so tweedie is used there.
@pytest.mark.parametrize("method, diffusion, last_step", [("euler", "sigma", "mean"), ("heun", "constant", "tweedie")])
def test_sde_reaches_mixture_target_with_right_mode_weights(method, diffusion, last_step):
    interp = interpolant("linear")
    x = sample_sde(ExactVelocity(MIXTURE, interp), noise(6000, seed=10), interp=interp, method=method, steps=100,
                   diffusion=diffusion, last_step=last_step, generator=torch.Generator().manual_seed(2))
    assert_distribution(x, MIXTURE)
    # mass left of -0.25 from the two components' normal CDFs (about 0.307)
    spread = MIXTURE.covs[:, 0, 0].sqrt()
    expected = (MIXTURE.weights * torch.distributions.Normal(MIXTURE.means[:, 0], spread).cdf(torch.tensor(-0.25))).sum()
    assert (x[:, 0] < -0.25).double().mean().item() == pytest.approx(expected.item(), abs=0.015)


@pytest.mark.parametrize("method", ("euler", "heun"))
def test_sde_with_w0_equals_ode(method):
    velocity = ExactVelocity(MIXTURE, interpolant("gvp"))
    x0 = noise(64)
    ode = sample_ode(velocity, x0, method=method, steps=20)
    sde = sample_sde(velocity, x0, interp=interpolant("gvp"), method=method, steps=20, w=0.0, last_step="none",
                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sde, ode, atol=1e-12, rtol=0)


@pytest.mark.parametrize("diffusion", ("sigma", "linear", "decreasing", "increasing-decreasing"))
def test_heun_sde_may_end_at_t1_where_its_diffusion_vanishes(diffusion):
    x = sample_sde(ExactVelocity(DATA, interpolant("linear")), noise(500), interp=interpolant("linear"), method="heun",
                   steps=50, diffusion=diffusion, last_step="none", generator=torch.Generator().manual_seed(8))
    assert torch.isfinite(x).all()
    assert_distribution(x, DATA, tol=0.1)  # 500 samples: sampling error ~0.035


@pytest.mark.parametrize("method", ("euler", "heun"))
def test_sde_sample_does_not_depend_on_its_batch(method):
    velocity = ExactVelocity(MIXTURE, interpolant("linear"))
    generators = per_sample_generators(7, range(4))
    x0 = randn_per_sample(generators, (4, 2), dtype=torch.float64)
    whole = sample_sde(velocity, x0, interp=interpolant("linear"), method=method, steps=30, generator=generators)
    halves = []
    for indices in ((0, 1), (2, 3)):
        gens = per_sample_generators(7, indices)
        start = randn_per_sample(gens, (2, 2), dtype=torch.float64)
        halves.append(sample_sde(velocity, start, interp=interpolant("linear"), method=method, steps=30, generator=gens))
    torch.testing.assert_close(whole, torch.cat(halves), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ("euler", "heun"))
def test_one_sde_step_adds_plus_sqrt_2_w_dt_times_the_samples_own_noise(method):
    """x_hat = x + sqrt(2 w_t dt) z with z the sample's own draw (the sign fixes which image a seed gives), then the
    drift v + w_t s: an Euler step from x_hat (euler uses the drift at x), or Heun's average (heun)."""
    interp = interpolant("linear")
    velocity = ExactVelocity(DATA, interp)
    x0 = noise(3, seed=4)
    t0, t1 = 0.2, 0.8  # sample_eps 0.2: one step from 0.2 to 1 - 0.2
    z = randn_per_sample(per_sample_generators(9, range(3)), (3, 2), dtype=torch.float64)
    x = sample_sde(velocity, x0, interp=interp, method=method, steps=1, diffusion="constant", w=0.7, last_step="none",
                   sample_eps=0.2, generator=per_sample_generators(9, range(3)))
    full = lambda value: torch.full((3,), value, dtype=torch.float64)  # noqa: E731
    w_start, w_end = diffusion_coefficient("constant", interp, full(t0), 0.7), diffusion_coefficient("constant", interp, full(t1), 0.7)
    jump = (2 * w_start[:, None] * (t1 - t0)).sqrt() * z
    if method == "euler":
        expected = x0 + (t1 - t0) * sde_drift(velocity, interp, x0, full(t0), w_start) + jump
    else:
        d_start = sde_drift(velocity, interp, x0 + jump, full(t0), w_start)
        d_end = sde_drift(velocity, interp, x0 + jump + (t1 - t0) * d_start, full(t1), w_end)
        expected = x0 + jump + (t1 - t0) * 0.5 * (d_start + d_end)
    torch.testing.assert_close(x, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method, per_step", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("last_step", ("none", "mean"))
def test_sde_solvers_report_their_evaluations(method, per_step, last_step):
    interp, stats = interpolant("linear"), {}
    velocity = Recording(ExactVelocity(DATA, interp))
    sample_sde(velocity, noise(3), interp=interp, method=method, steps=5, last_step=last_step, sample_eps=0.05,
               generator=per_sample_generators(0, range(3)), stats=stats)
    solver_steps = 5 if last_step == "none" else 4
    assert stats == {"nfe": len(velocity.times)} and len(velocity.times) == solver_steps * per_step + (last_step != "none")


def test_sample_ode_defaults_to_50_heun_steps_on_the_uniform_grid():
    velocity, stats = Recording(lambda x, t: -x), {}
    sample_ode(velocity, noise(2), stats=stats)
    grid = [i / 50 for i in range(51)]
    assert stats == {"nfe": 100}
    assert velocity.times == pytest.approx([time for a, b in zip(grid, grid[1:]) for time in (a, b)], abs=1e-12)


def test_sample_ode_dopri5_defaults_to_atol_1e_6_and_rtol_1e_3():
    velocity, x0 = ExactVelocity(DATA, interpolant("gvp")), noise(50)
    default, explicit = {}, {}
    x = sample_ode(velocity, x0, method="dopri5", stats=default)
    torch.testing.assert_close(x, sample_ode(velocity, x0, method="dopri5", atol=1e-6, rtol=1e-3, stats=explicit), atol=0, rtol=0)
    assert default == explicit


def test_sample_ode_passes_its_shift_to_the_grid():
    velocity = Recording(lambda x, t: -x)
    sample_ode(velocity, noise(2), method="euler", steps=4, shift=3.0)
    assert velocity.times == pytest.approx(time_grid(0.0, 1.0, 4, 3.0)[:-1], abs=1e-12)
    assert velocity.times != pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_per_sample_seeds_are_seedsequence_of_seed_and_index_cut_to_63_bits():
    """The seed of sample i is fixed forever (a samples store resumed by a later version draws the same noise)."""
    import numpy as np

    for seed, index in ((0, 0), (0, 1), (7, 123), (2**40, 49_999)):
        word = int(np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)[0])
        assert per_sample_generators(seed, [index])[0].initial_seed() == word % 2**63
    seeds = {g.initial_seed() for g in per_sample_generators(0, range(64))}
    assert len(seeds) == 64 and max(seeds) > 2**62  # all 63 bits are used, none beyond


def test_per_sample_noise_is_each_generators_own_draw_in_the_asked_dtype():
    generators = per_sample_generators(3, [0, 1])
    x = randn_per_sample(generators, (2, 3, 2), dtype=torch.float64)
    assert x.dtype == torch.float64
    for row, g in zip(x, per_sample_generators(3, [0, 1])):
        torch.testing.assert_close(row, torch.randn(3, 2, generator=g, dtype=torch.float64), atol=0, rtol=0)
    with pytest.raises(ValueError) as error:
        randn_per_sample(generators, (3, 2))
    assert str(error.value) == "shape (3, 2) has 3 rows but 2 generators were given"


def test_per_sample_generators_depend_on_seed_and_index_only():
    first = randn_per_sample(per_sample_generators(0, [5, 6]), (2, 3))
    torch.testing.assert_close(first[1:], randn_per_sample(per_sample_generators(0, [6]), (1, 3)))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, randn_per_sample(per_sample_generators(1, [5, 6]), (2, 3)))
    with pytest.raises(ValueError, match="2 generators"):
        randn_per_sample(per_sample_generators(0, [5, 6]), (3, 3))


def test_diffusion_forms_scale_with_w_and_vanish_at_w0():
    interp, t = interpolant("vp"), torch.linspace(0.01, 0.99, 9)
    for form in DIFFUSIONS:
        one = diffusion_coefficient(form, interp, t, 1.0)
        assert (one >= 0).all() and one.max() > 0, form
        torch.testing.assert_close(diffusion_coefficient(form, interp, t, 2.5), 2.5 * one)
        assert (diffusion_coefficient(form, interp, t, 0.0) == 0).all()
    # SBDM on the vp path is the VP-SDE's beta(1 - t) / 2
    beta = 0.1 + (1 - t) * (20 - 0.1)
    torch.testing.assert_close(diffusion_coefficient("SBDM", interp, t, 1.0), beta / 2)


def test_tweedie_last_step_is_posterior_mean():
    interp = interpolant("gvp")
    x0, x1 = noise(50), MIXTURE.sample(50, torch.Generator().manual_seed(4))
    t = torch.full((50,), 0.9, dtype=torch.float64)
    x_t, _ = interpolate(interp, t, x0, x1)
    out = sde_last_step(ExactVelocity(MIXTURE, interp), x_t, 0.9, interp=interp, kind="tweedie",
                        diffusion="sigma", w=1.0)
    torch.testing.assert_close(out, MIXTURE.posterior_means(interp, x_t, t)[0])


@pytest.mark.parametrize("kind", ("mean", "euler"))
def test_mean_and_euler_last_steps_jump_to_one_along_the_sde_drift_or_the_velocity(kind):
    interp = interpolant("gvp")  # on the linear path an Euler jump to 1 is exactly Tweedie's posterior mean
    velocity, x, t = ExactVelocity(MIXTURE, interp), noise(4), 0.9
    time = torch.full((4,), t, dtype=torch.float64)
    out = sde_last_step(velocity, x, t, interp=interp, kind=kind, diffusion="sigma", w=0.5)
    w_t = diffusion_coefficient("sigma", interp, time, 0.5)
    slope = sde_drift(velocity, interp, x, time, w_t) if kind == "mean" else velocity(x, time)
    torch.testing.assert_close(out, x + 0.1 * slope, atol=1e-12, rtol=0)
    assert not torch.allclose(sde_drift(velocity, interp, x, time, w_t), velocity(x, time))  # the two differ here


def test_sample_sde_defaults_to_250_steps_w_1_sigma_diffusion_and_the_mean_last_step():
    interp = interpolant("linear")
    velocity = ExactVelocity(DATA, interp)
    default, explicit = {}, {}
    x = sample_sde(velocity, noise(3), interp=interp, generator=per_sample_generators(1, range(3)), stats=default)
    same = sample_sde(velocity, noise(3), interp=interp, method="euler", steps=250, diffusion="sigma", w=1.0,
                      last_step="mean", last_step_size=0.04, generator=per_sample_generators(1, range(3)), stats=explicit)
    torch.testing.assert_close(x, same, atol=0, rtol=0)
    assert default == explicit == {"nfe": 250}


@pytest.mark.parametrize("options, message", [
    ({"steps": 0, "last_step": "none"}, "steps must be at least 1, got 0"),
    ({"steps": 1, "last_step": "mean"}, "steps must be at least 2, got 1"),
    ({"last_step_size": 0.9, "sample_eps": 0.1}, "last_step_size must lie in (0, 0.9), got 0.9"),
    ({"last_step_size": 0.95, "sample_eps": 0.1}, "last_step_size must lie in (0, 0.9), got 0.95"),
], ids=("one-step", "two-steps", "size-at-bound", "size-past-bound"))
def test_sde_step_counts_and_last_step_sizes_at_their_bounds(options, message):
    """One step is enough without a last step and two with one; a last step may not reach back to the start. The
    same options one notch inside the bounds sample."""
    velocity, interp = ExactVelocity(DATA, interpolant("linear")), interpolant("linear")
    with pytest.raises(SitctlError) as error:
        sample_sde(velocity, noise(2), interp=interp, **options)
    assert str(error.value) == message
    inside = options | ({"steps": options["steps"] + 1} if "steps" in options else {"last_step_size": 0.85})
    assert torch.isfinite(sample_sde(velocity, noise(2), interp=interp, **inside)).all()
    if "steps" not in options:  # without a last step its size is not looked at
        assert torch.isfinite(sample_sde(velocity, noise(2), interp=interp, last_step="none", **options)).all()


def test_sde_solver_steps_follow_the_shifted_grid_and_the_last_step_starts_at_one_minus_its_size():
    interp = interpolant("linear")
    velocity = Recording(ExactVelocity(DATA, interp))
    sample_sde(velocity, noise(2), interp=interp, steps=5, shift=3.0, last_step="euler", last_step_size=0.1,
               generator=per_sample_generators(0, range(2)))
    assert velocity.times == pytest.approx(time_grid(0.0, 0.9, 4, 3.0), abs=1e-12)  # 4 solver steps, then the jump
    velocity.times.clear()
    sample_sde(velocity, noise(2), interp=interp, steps=4, shift=3.0, last_step="none", sample_eps=0.05,
               generator=per_sample_generators(0, range(2)))
    assert velocity.times == pytest.approx(time_grid(0.05, 0.95, 4, 3.0)[:-1], abs=1e-12)


@pytest.mark.parametrize("make", (lambda: None, lambda: torch.Generator().manual_seed(3)), ids=("global", "one"))
def test_sde_noise_comes_from_the_given_generator_or_the_global_one(make):
    """None draws from torch's global generator; one generator draws the whole batch and ignores the global one."""
    interp = interpolant("linear")

    def draw(global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return sample_sde(ExactVelocity(DATA, interp), noise(3), interp=interp, steps=3, generator=make())

    assert torch.equal(draw(0), draw(0))
    assert torch.equal(draw(0), draw(1)) == (make() is not None)


def test_an_unknown_diffusion_form_is_a_user_error_naming_the_forms():
    with pytest.raises(SitctlError) as error:
        diffusion_coefficient("cosine", interpolant("linear"), torch.tensor([0.5]), 1.0)
    assert str(error.value) == f"unknown diffusion form 'cosine'; choose one of {', '.join(DIFFUSIONS)}"


def test_fewer_than_one_ode_step_is_a_user_error():
    with pytest.raises(SitctlError) as error:
        sample_ode(ExactVelocity(DATA, interpolant("linear")), noise(2), method="euler", steps=0)
    assert str(error.value) == "steps must be at least 1, got 0"


@pytest.mark.parametrize("options, message", [
    ({"method": "rk4"}, "unknown SDE method"),
    ({"diffusion": "increasing_decreasing"}, "unknown diffusion form"),
    ({"last_step": "Mean"}, "unknown last step"),
    ({"w": -1.0}, "w must be >= 0"),
    ({"last_step_size": 0.0}, "last_step_size"),
    ({"method": "heun", "diffusion": "constant", "last_step": "none"}, "needs a last step"),
    ({"method": "heun", "diffusion": "SBDM", "last_step": "none"}, "needs a last step"),
])
def test_bad_sde_options_are_user_errors(options, message):
    with pytest.raises(SitctlError, match=message):
        sample_sde(ExactVelocity(DATA, interpolant("linear")), noise(2), interp=interpolant("linear"), **options)


def test_bad_ode_method_is_a_user_error():
    with pytest.raises(SitctlError, match="unknown ODE method"):
        sample_ode(ExactVelocity(DATA, interpolant("linear")), noise(2), method="rk45")


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------


class ClassGaussians(torch.nn.Module):
    """A 'network' whose class k is component k of MIXTURE; the null class is the whole mixture.

    Predicts the velocity or the noise E[x0 | x_t] exactly, and records each forward's batch size.
    """

    def __init__(self, interp, pred: str):
        super().__init__()
        self.interp, self.pred, self.batches = interp, pred, []
        self.classes = [GaussianMixture.single(MIXTURE.means[k], MIXTURE.covs[k]) for k in range(2)]

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        out = torch.empty_like(x)
        for k, data in enumerate([*self.classes, MIXTURE]):
            rows = y == k
            if rows.any():
                if self.pred == "velocity":
                    out[rows] = data.velocity(self.interp, x[rows], t[rows])
                else:
                    out[rows] = data.posterior_means(self.interp, x[rows], t[rows])[1]
        return out


def class_velocity(net: ClassGaussians, x, t, y):
    """Each sample's velocity under its own class (the conditional velocity), from the closed form."""
    return torch.stack([net.classes[k].velocity(net.interp, x[i:i + 1], t[i:i + 1])[0] for i, k in enumerate(y.tolist())])


@pytest.mark.parametrize("pred", ("velocity", "noise"))
def test_guidance_combines_cond_and_uncond_in_one_forward(pred):
    interp = interpolant("linear")
    net = ClassGaussians(interp, pred)
    x, y = noise(6), torch.tensor([0, 1, 0, 1, 1, 0])
    t = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.95], dtype=torch.float64)
    guided = GuidedVelocity(net, y, interp=interp, pred=pred, cfg_scale=4.0, null_class=2)(x, t)
    assert net.batches == [12]
    v_cond, v_uncond = class_velocity(net, x, t, y), MIXTURE.velocity(interp, x, t)
    torch.testing.assert_close(guided, v_uncond + 4.0 * (v_cond - v_uncond))


def test_guidance_interval_and_unit_scale_give_conditional_velocity():
    interp = interpolant("linear")
    net = ClassGaussians(interp, "velocity")
    x, y = noise(4), torch.tensor([0, 1, 1, 0])
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    v_cond = net(x, t, y)
    net.batches.clear()
    inside = GuidedVelocity(net, y, interp=interp, pred="velocity", cfg_scale=3.0, null_class=2, interval=(0.2, 0.7))(x, t)
    torch.testing.assert_close(inside[[0, 3]], v_cond[[0, 3]])  # outside [0.2, 0.7]: plain conditional
    assert not torch.allclose(inside[[1, 2]], v_cond[[1, 2]])
    unit = GuidedVelocity(net, y, interp=interp, pred="velocity", cfg_scale=1.0, null_class=2)(x, t)
    torch.testing.assert_close(unit, v_cond)
    assert net.batches == [8, 4]  # scale 1 skips the unconditional half


@pytest.mark.parametrize("interval", ((0.0, 0.5), (0.5, 1.0), (0.2, 0.4)))
def test_guidance_with_no_sample_inside_a_partial_interval_runs_only_the_conditional_half(interval):
    """A noise-predicting net: the skipped path still converts the prediction at (x, t) to a velocity."""
    interp = interpolant("linear")
    net = ClassGaussians(interp, "noise")
    x, y = noise(3), torch.tensor([0, 1, 0])
    outside = [t for t in (0.1, 0.15, 0.45, 0.6, 0.7, 0.9) if not interval[0] <= t <= interval[1]][:3]
    t = torch.tensor(outside, dtype=torch.float64)
    guided = GuidedVelocity(net, y, interp=interp, pred="noise", cfg_scale=3.0, null_class=2, interval=interval)(x, t)
    assert net.batches == [3]
    torch.testing.assert_close(guided, class_velocity(net, x, t, y))


def test_guidance_interval_includes_both_ends():
    interp = interpolant("linear")
    net = ClassGaussians(interp, "velocity")
    x, y = noise(2), torch.tensor([0, 1])
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    guided = GuidedVelocity(net, y, interp=interp, pred="velocity", cfg_scale=3.0, null_class=2, interval=(0.25, 0.75))(x, t)
    v_cond, v_uncond = class_velocity(net, x, t, y), MIXTURE.velocity(interp, x, t)
    torch.testing.assert_close(guided, v_uncond + 3.0 * (v_cond - v_uncond))


def test_unit_guidance_scale_converts_a_noise_prediction_to_the_conditional_velocity():
    interp = interpolant("gvp")
    net = ClassGaussians(interp, "noise")
    x, y, t = noise(3), torch.tensor([1, 0, 1]), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    unit = GuidedVelocity(net, y, interp=interp, pred="noise", cfg_scale=1.0, null_class=2)(x, t)
    assert net.batches == [3]
    torch.testing.assert_close(unit, class_velocity(net, x, t, y))


@pytest.mark.parametrize("sampler", ("ode", "sde"))
def test_guided_sit_sample_does_not_depend_on_its_batch(sampler):
    """End to end with the real network: 4 samples at once equal the same 4 drawn as 2 + 2."""
    torch.manual_seed(0)
    config = model_config("SiT-T/2", input_size=8, in_channels=1, num_classes=3)
    net = SiT(config).eval()
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)  # a fresh SiT predicts exactly 0
    for block in net.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    labels = torch.tensor([0, 2, 1, 1])

    def draw(indices: list[int]) -> torch.Tensor:
        generators = per_sample_generators(11, indices)
        velocity = GuidedVelocity(net, labels[indices], interp=interpolant("linear"), pred="velocity", cfg_scale=4.0,
                                  null_class=config.num_classes, interval=(0.0, 0.8))
        x0 = randn_per_sample(generators, (len(indices), 1, 8, 8))
        with torch.no_grad():
            if sampler == "ode":
                return sample_ode(velocity, x0, method="heun", steps=4)
            return sample_sde(velocity, x0, interp=interpolant("linear"), steps=5, generator=generators)

    whole = draw([0, 1, 2, 3])
    torch.testing.assert_close(whole, torch.cat([draw([0, 1]), draw([2, 3])]), atol=1e-5, rtol=1e-5)
    assert whole.std() > 0.5 and not torch.allclose(whole[2], whole[3])


# ---------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", (DATA, MIXTURE), ids=("gaussian", "mixture"))
def test_exact_divergence_likelihood_matches_closed_form_density(data):
    interp = interpolant("linear")
    x1 = data.sample(100, torch.Generator().manual_seed(5))
    log_p, x0 = log_likelihood(ExactVelocity(data, interp), x1, divergence="exact", atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(log_p, data.log_density(x1), atol=1e-4, rtol=0)
    expected_bpd = -data.log_density(x1) / (2 * math.log(2))
    torch.testing.assert_close(bits_per_dim(log_p, x1), expected_bpd, atol=1e-4, rtol=0)
    if data is DATA:
        torch.testing.assert_close(x0, DATA.flow_map(interp, x1, 1.0, 0.0), atol=1e-5, rtol=0)


def test_hutchinson_likelihood_is_unbiased_and_batch_independent():
    interp = interpolant("gvp")
    velocity = ExactVelocity(MIXTURE, interp)
    x1 = MIXTURE.sample(1000, torch.Generator().manual_seed(6))
    exact, _ = log_likelihood(velocity, x1, divergence="exact", method="heun", steps=40)
    generators = per_sample_generators(3, range(1000))
    estimate, _ = log_likelihood(velocity, x1, divergence="hutchinson", method="heun", steps=40, generator=generators)
    difference = estimate - exact
    assert difference.std() > 1e-3  # really an estimate
    assert abs(difference.mean()) < 4 * difference.std() / math.sqrt(1000)
    part, _ = log_likelihood(velocity, x1[10:13], method="heun", steps=40, generator=per_sample_generators(3, range(10, 13)))
    torch.testing.assert_close(part, estimate[10:13], atol=1e-10, rtol=0)


def test_unknown_divergence_is_a_user_error_that_names_the_choices():
    with pytest.raises(SitctlError) as error:
        log_likelihood(ExactVelocity(DATA, interpolant("linear")), DATA.sample(2, torch.Generator().manual_seed(0)),
                       divergence="trace")
    assert str(error.value) == "unknown divergence 'trace'; choose one of hutchinson, exact"


@pytest.mark.parametrize("settings", ({"method": "euler"}, {"method": "euler", "steps": 7, "sample_eps": 0.05},
                                      {"method": "heun", "steps": 3, "sample_eps": 0.1}))
def test_likelihood_noise_is_the_reverse_ode_path_with_the_same_solver_settings(settings):
    """Fixed-step solvers: the x part of the augmented state follows sample_ode(reverse=True) exactly,
    over the same grid (the same default steps) and with the same number of evaluations."""
    velocity = ExactVelocity(DATA, interpolant("linear"))
    x1 = DATA.sample(5, torch.Generator().manual_seed(2))
    stats, reverse_stats = {}, {}
    _, x0 = log_likelihood(velocity, x1, divergence="exact", stats=stats, **settings)
    expected = sample_ode(velocity, x1, reverse=True, stats=reverse_stats, **settings)
    torch.testing.assert_close(x0, expected, atol=1e-12, rtol=0)
    assert stats["nfe"] == reverse_stats["nfe"] > 0


def test_likelihood_default_solver_tolerances_reach_the_closed_form_density():
    """dopri5 at the default atol 1e-6, rtol 1e-3: within 2e-3 nats of the closed form on this Gaussian."""
    interp = interpolant("linear")
    x1 = DATA.sample(50, torch.Generator().manual_seed(8))
    log_p, _ = log_likelihood(ExactVelocity(DATA, interp), x1, divergence="exact")
    torch.testing.assert_close(log_p, DATA.log_density(x1), atol=2e-3, rtol=0)


def test_likelihood_absolute_tolerance_reaches_the_solver():
    """At a tight rtol the step size is set by atol: a looser atol takes fewer evaluations."""
    velocity = ExactVelocity(DATA, interpolant("linear"))
    x1 = DATA.sample(5, torch.Generator().manual_seed(3))
    loose, tight = {}, {}
    log_likelihood(velocity, x1, divergence="exact", atol=1e-2, rtol=1e-12, stats=loose)
    log_likelihood(velocity, x1, divergence="exact", atol=1e-8, rtol=1e-12, stats=tight)
    assert loose["nfe"] < tight["nfe"]


def test_bits_per_dim_of_a_single_sample():
    """D is one sample's size (here 2 * 3 * 4), read from the one sample there is."""
    log_p = torch.tensor([-24 * math.log(2) * 1.5])
    torch.testing.assert_close(bits_per_dim(log_p, torch.zeros(1, 2, 3, 4)), torch.tensor([1.5]))
