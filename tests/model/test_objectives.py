"""Training objectives: targets, weights, time sampling and eps defaults."""

from __future__ import annotations

import pytest
import torch

from model.interpolants import NAMES, interpolant, interpolate, velocity_to_score
from model.objectives import (
    check_objective,
    prediction_to_velocity,
    sample_times,
    score_coefficient,
    times_from_uniform,
    training_loss,
)
from sitctl.errors import SitctlError
from tests.model.gaussian import GaussianMixture

DATA = GaussianMixture.single([1.0, -0.5], [[0.6, 0.25], [0.25, 0.4]])


def some_net(x, t, y):
    """An arbitrary smooth, time-dependent 'network' (the identities below hold for any net)."""
    return torch.tanh(x.flip(1)) * (0.5 + t[:, None]) + 0.1 * y[:, None]


def fixed_batch(n: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x1 = DATA.sample(n, gen)
    x0 = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    return x1, x0, t, torch.randint(0, 3, (n,), generator=gen)


def test_default_eps_match_reference():
    assert interpolant("linear").default_eps("velocity") == (0.0, 0.0)
    assert interpolant("gvp").default_eps("velocity") == (0.0, 0.0)
    assert interpolant("linear").default_eps("noise") == (1e-3, 1e-3)
    assert interpolant("gvp").default_eps("score") == (1e-3, 1e-3)
    for pred in ("velocity", "score", "noise"):
        assert interpolant("vp").default_eps(pred) == (1e-5, 1e-3)


@pytest.mark.parametrize("args, message", [
    (("cosine", "velocity", "none"), "unknown interpolant 'cosine'; choose one of linear, gvp, vp"),
    (("linear", "x0", "none"), "unknown prediction 'x0'; choose one of velocity, score, noise"),
    (("linear", "noise", "snr"), "unknown loss weight 'snr'; choose one of none, velocity, likelihood"),
    (("linear", "velocity", "likelihood"), "loss weight 'likelihood' applies to score or noise prediction, not velocity"),
], ids=("interpolant", "prediction", "weight", "likelihood-weight-of-velocity"))
def test_bad_objectives_are_user_errors_naming_the_choices(args, message):
    with pytest.raises(SitctlError) as error:
        check_objective(*args)
    assert str(error.value) == message


def test_continuous_times_fill_the_interval_and_discrete_times_sit_on_the_grid():
    gen = torch.Generator().manual_seed(0)
    t = sample_times(5000, train_eps=0.1, generator=gen)
    assert t.shape == (5000,) and t.min() >= 0.1 and t.max() <= 0.9
    assert t.mean().item() == pytest.approx(0.5, abs=0.01) and len(t.unique()) > 4900
    grid = torch.linspace(0.1, 0.9, 5)
    t = sample_times(5000, train_eps=0.1, discrete_steps=5, generator=gen)
    distance = (t[:, None] - grid[None]).abs()  # (5000, 5)
    assert distance.min(1).values.max() < 1e-6 and (distance < 1e-6).any(0).all()
    with pytest.raises(SitctlError, match="discrete_steps"):
        sample_times(4, train_eps=0.0, discrete_steps=1)


def test_uniforms_map_affinely_onto_the_interval_or_onto_its_grid():
    u = torch.tensor([0.0, 0.19, 0.2, 0.5, 0.999, 1.0])
    t = times_from_uniform(u, train_eps=0.1)
    torch.testing.assert_close(t, 0.1 + 0.8 * u)
    # 5 grid points: u in [k/5, (k+1)/5) -> point k of linspace(0.1, 0.9, 5); u = 1 stays on the last.
    t = times_from_uniform(u, train_eps=0.1, discrete_steps=5)
    torch.testing.assert_close(t, torch.tensor([0.1, 0.1, 0.3, 0.5, 0.9, 0.9]))
    with pytest.raises(SitctlError, match="discrete_steps"):
        times_from_uniform(u, train_eps=0.0, discrete_steps=1)


def test_sample_times_draws_one_uniform_per_sample_and_maps_it_with_times_from_uniform():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    for steps in (None, 5):
        drawn = sample_times(1000, train_eps=0.01, discrete_steps=steps, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(times_from_uniform(u, train_eps=0.01, discrete_steps=steps), drawn)


def test_velocity_loss_is_per_sample_mean_squared_error():
    interp = interpolant("gvp")
    x1, x0, t, y = fixed_batch()
    _, u_t = interpolate(interp, t, x0, x1)
    loss = training_loss(lambda x, tt, yy: torch.zeros_like(x), x1, y, interp=interp, t=t, x0=x0)
    assert loss.shape == (64,)
    torch.testing.assert_close(loss, u_t.pow(2).mean(1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", ("noise", "score"))
def test_velocity_weight_measures_the_implied_velocity_error(name, pred):
    """weight="velocity" on a noise/score net equals the plain loss of its converted velocity."""
    interp = interpolant(name)
    x1, x0, t, y = fixed_batch()

    def as_velocity(x, tt, yy):
        return prediction_to_velocity(some_net(x, tt, yy), x, tt, interp=interp, pred=pred)

    weighted = training_loss(some_net, x1, y, interp=interp, pred=pred, weight="velocity", t=t, x0=x0)
    torch.testing.assert_close(weighted, training_loss(as_velocity, x1, y, interp=interp, t=t, x0=x0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", ("noise", "score"))
def test_likelihood_weight_is_score_error_times_score_coefficient(name, pred):
    interp = interpolant(name)
    x1, x0, t, y = fixed_batch()
    x_t, _ = interpolate(interp, t, x0, x1)
    sigma = interp.sigma(t)[:, None]
    score_hat = velocity_to_score(interp, prediction_to_velocity(some_net(x_t, t, y), x_t, t, interp=interp, pred=pred), x_t, t)
    expected = score_coefficient(interp, t) * (score_hat + x0 / sigma).pow(2).mean(1)
    loss = training_loss(some_net, x1, y, interp=interp, pred=pred, weight="likelihood", t=t, x0=x0)
    torch.testing.assert_close(loss, expected)


def test_unweighted_score_loss_is_in_noise_space():
    interp = interpolant("linear")
    x1, x0, t, y = fixed_batch()
    x_t, _ = interpolate(interp, t, x0, x1)
    sigma = interp.sigma(t)[:, None]
    loss = training_loss(some_net, x1, y, interp=interp, pred="score", t=t, x0=x0)
    torch.testing.assert_close(loss, (sigma * some_net(x_t, t, y) + x0).pow(2).mean(1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred", ("velocity", "noise"))
def test_oracle_loss_equals_conditional_variance(name, pred):
    """The Bayes-optimal prediction's loss is tr Cov(target | x_t) / D, known for Gaussian data."""
    interp, t_value = interpolant(name), 0.4
    a, s, da, ds = (f(torch.tensor(t_value, dtype=torch.float64)) for f in (interp.alpha, interp.sigma, interp.d_alpha, interp.d_sigma))
    cov, eye = DATA.covs[0], torch.eye(2, dtype=torch.float64)
    # target = p x1 + q x0: (p, q) = (a', s') for velocity, (0, 1) for noise
    p, q = (da, ds) if pred == "velocity" else (0.0, 1.0)
    target_cov, cross = p**2 * cov + q**2 * eye, p * a * cov + q * s * eye
    conditional = target_cov - cross @ torch.linalg.solve(a**2 * cov + s**2 * eye, cross.T)

    def oracle(x, tt, yy):
        e_x1, e_x0 = DATA.posterior_means(interp, x, tt)
        return interp.d_alpha(tt)[:, None] * e_x1 + interp.d_sigma(tt)[:, None] * e_x0 if pred == "velocity" else e_x0

    gen = torch.Generator().manual_seed(1)
    x1 = DATA.sample(20000, gen)
    t = torch.full((20000,), t_value, dtype=torch.float64)
    loss = training_loss(oracle, x1, torch.zeros(20000, dtype=torch.long), interp=interp, pred=pred, t=t, generator=gen)
    assert loss.mean().item() == pytest.approx(torch.trace(conditional).item() / 2, rel=0.03)


def test_drawn_t_and_noise_follow_the_generator():
    x1, _, _, y = fixed_batch()
    first = training_loss(some_net, x1, y, interp=interpolant("vp"), pred="noise", generator=torch.Generator().manual_seed(5))
    again = training_loss(some_net, x1, y, interp=interpolant("vp"), pred="noise", generator=torch.Generator().manual_seed(5))
    other = training_loss(some_net, x1, y, interp=interpolant("vp"), pred="noise", generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert torch.isfinite(first).all()




@pytest.mark.parametrize("name, pred, discrete_steps", [("linear", "velocity", None), ("vp", "noise", None), ("gvp", "score", 5)])
def test_drawn_times_are_sample_times_at_the_default_train_eps_then_the_noise(name, pred, discrete_steps):
    """With t and x0 left out, one generator draws t first (sample_times at interp.default_eps(pred)[0], on the
    discrete grid if asked) and then x0 in x1's dtype; the net sees x_t and t in x1's dtype."""
    interp, seen = interpolant(name), []
    x1, _, _, y = fixed_batch(n=16)

    def net(x, t, y):
        seen.extend([x, t])
        return some_net(x, t, y)

    training_loss(net, x1, y, interp=interp, pred=pred, discrete_steps=discrete_steps,
                  generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    t = sample_times(16, train_eps=interp.default_eps(pred)[0], discrete_steps=discrete_steps, generator=generator)
    x0 = torch.randn(x1.shape, generator=generator, dtype=torch.float64)
    assert seen[1].dtype == torch.float64
    torch.testing.assert_close(seen[1], t.double(), atol=0, rtol=0)
    torch.testing.assert_close(seen[0], interpolate(interp, t.double(), x0, x1)[0], atol=1e-12, rtol=0)
    if discrete_steps is not None:
        assert len(set(seen[1].tolist())) <= discrete_steps


def test_drawn_t_and_noise_without_a_generator_come_from_torchs_global_one():
    x1, _, _, y = fixed_batch()

    def loss(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return training_loss(some_net, x1, y, interp=interpolant("linear"), pred="velocity")

    torch.testing.assert_close(loss(0), loss(0), atol=0, rtol=0)
    assert not torch.allclose(loss(0), loss(1))


def test_two_discrete_steps_are_the_two_ends_and_one_is_a_user_error():
    u = torch.tensor([0.0, 0.3, 0.6, 0.99])
    assert times_from_uniform(u, train_eps=0.1, discrete_steps=2).tolist() == pytest.approx([0.1, 0.1, 0.9, 0.9])
    with pytest.raises(SitctlError) as error:
        times_from_uniform(u, train_eps=0.1, discrete_steps=1)
    assert str(error.value) == "discrete_steps must be at least 2, got 1"
