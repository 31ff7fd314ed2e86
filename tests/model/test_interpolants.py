"""Interpolants: derivatives, boundary values, and the velocity/score/noise conversions."""

from __future__ import annotations

import math

import pytest
import torch

from model.interpolants import (
    NAMES,
    interpolant,
    interpolate,
    noise_to_score,
    noise_to_velocity,
    score_to_noise,
    score_to_velocity,
    velocity_to_noise,
    velocity_to_score,
)
from tests.model.gaussian import GaussianMixture

DATA = GaussianMixture.single([1.0, -0.5], [[0.6, 0.25], [0.25, 0.4]])


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autograd(name):
    interp = interpolant(name)
    t = torch.linspace(0.01, 0.99, 41, dtype=torch.float64, requires_grad=True)
    for value, derivative in ((interp.alpha, interp.d_alpha), (interp.sigma, interp.d_sigma)):
        (expected,) = torch.autograd.grad(value(t).sum(), t)
        torch.testing.assert_close(derivative(t.detach()), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_boundary_values(name):
    interp = interpolant(name)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    alpha, sigma = interp.alpha(ends), interp.sigma(ends)
    assert alpha[1].item() == pytest.approx(1.0) and sigma[1].item() == pytest.approx(0.0, abs=1e-12)
    if name == "vp":
        # data fully drowned at t = 0: alpha(0) = exp(-(b1 - b0)/4 - b0/2), sigma^2 = 1 - alpha^2
        assert alpha[0].item() == pytest.approx(math.exp(-19.9 / 4 - 0.05))
        assert sigma[0].item() == pytest.approx(math.sqrt(1 - math.exp(-19.9 / 2 - 0.1)))
    else:
        assert alpha[0].item() == pytest.approx(0.0, abs=1e-12) and sigma[0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ("gvp", "vp"))
def test_variance_preserving_paths_keep_unit_sum_of_squares(name):
    interp = interpolant(name)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(interp.alpha(t) ** 2 + interp.sigma(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("name", NAMES)
def test_interpolate_velocity_is_time_derivative_of_path(name):
    interp = interpolant(name)
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(5, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    _, u_t = interpolate(interp, t, x0, x1)
    jacobian = torch.func.jacrev(lambda tt: interpolate(interp, tt, x0, x1)[0])(t)  # (5, 3, 5)
    torch.testing.assert_close(u_t, torch.einsum("nin->ni", jacobian))


@pytest.mark.parametrize("name", NAMES)
def test_conversions_round_trip(name):
    interp = interpolant(name)
    gen = torch.Generator().manual_seed(1)
    x, field = torch.randn(2, 8, 4, generator=gen, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    torch.testing.assert_close(noise_to_velocity(interp, velocity_to_noise(interp, field, x, t), x, t), field)
    torch.testing.assert_close(score_to_velocity(interp, velocity_to_score(interp, field, x, t), x, t), field)
    torch.testing.assert_close(score_to_noise(interp, noise_to_score(interp, field, x, t), x, t), field)


@pytest.mark.parametrize("name", NAMES)
def test_conversions_exact_for_gaussian_data(name):
    """E[x0 | x_t] is known for Gaussian data: noise, score and velocity must agree exactly."""
    interp = interpolant(name)
    gen = torch.Generator().manual_seed(2)
    t = torch.linspace(0.02, 0.98, 64, dtype=torch.float64)
    x_t, _ = interpolate(interp, t, torch.randn(64, 2, generator=gen, dtype=torch.float64), DATA.sample(64, gen))
    e_x1, e_x0 = DATA.posterior_means(interp, x_t, t)
    velocity = DATA.velocity(interp, x_t, t)
    # score of N(a m, a^2 S + s^2 I) at x_t, by autograd of its log-density
    x_req = x_t.clone().requires_grad_(True)
    marginal = GaussianMixture.single(DATA.means[0], DATA.covs[0])
    log_p = sum(
        torch.distributions.MultivariateNormal(
            interp.alpha(t[i]) * marginal.means[0],
            interp.alpha(t[i]) ** 2 * marginal.covs[0] + interp.sigma(t[i]) ** 2 * torch.eye(2, dtype=torch.float64),
        ).log_prob(x_req[i])
        for i in range(64)
    )
    (score,) = torch.autograd.grad(log_p, x_req)
    torch.testing.assert_close(DATA.score(interp, x_t, t), score)
    torch.testing.assert_close(noise_to_score(interp, e_x0, x_t, t), score)
    torch.testing.assert_close(noise_to_velocity(interp, e_x0, x_t, t), velocity)
    torch.testing.assert_close(velocity_to_score(interp, velocity, x_t, t), score)
    torch.testing.assert_close(velocity_to_noise(interp, velocity, x_t, t), e_x0)
    # and the posterior means are consistent with the path itself: x = a E[x1|x] + s E[x0|x]
    a, s = interp.alpha(t)[:, None], interp.sigma(t)[:, None]
    torch.testing.assert_close(a * e_x1 + s * e_x0, x_t)


def test_unknown_name_is_refused_naming_the_interpolants():
    with pytest.raises(ValueError) as error:
        interpolant("cosine")
    assert str(error.value) == "unknown interpolant 'cosine'; choose one of linear, gvp, vp"
