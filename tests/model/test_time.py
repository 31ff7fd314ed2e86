"""Training time distributions and shifted sampling grids, against their closed forms."""

import numpy as np
import pytest
import torch
from scipy import stats

from model.objectives import LogitNormalTime, UniformTime, times_from_uniform
from model.samplers import shift_time, time_grid, uniform_grid


def test_uniform_time_is_the_papers_map_bit_for_bit():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(times_from_uniform(u, train_eps=1e-3, distribution=UniformTime()), 1e-3 + (1 - 2e-3) * u)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 1.5), (-1.0, 0.7)])
def test_logit_normal_times_follow_their_distribution(mean, std):
    # In this project's time t = 1 - sigmoid(n), n ~ N(mean, std), so logit(t) ~ N(-mean, std).
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = times_from_uniform(u, train_eps=0.0, distribution=LogitNormalTime(mean=mean, std=std)).numpy()
    t = t[(t > 0) & (t < 1)]  # float64 keeps every draw inside the open interval
    assert stats.kstest(t, lambda x: stats.norm.cdf((np.log(x / (1 - x)) + mean) / std)).pvalue > 0.01
    assert abs(float(torch.logit(torch.from_numpy(t)).mean()) + mean) < 0.05  # the sign of SD3's mean, converted


def test_logit_normal_quantile_is_increasing_and_sends_phi_of_one_to_sigmoid_of_std_minus_mean():
    """A quantile function: monotone in u (the loader's per-sample uniforms keep their order) and Q(Phi(z)) =
    sigmoid(-mean + std z)."""
    time = LogitNormalTime(mean=0.5, std=1.5)
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert bool((time.quantile(u).diff() > 0).all())
    phi_one = torch.tensor([stats.norm.cdf(1.0)], dtype=torch.float64)
    torch.testing.assert_close(time.quantile(phi_one), torch.sigmoid(torch.tensor([-0.5 + 1.5], dtype=torch.float64)))


def test_a_positive_mean_favours_the_noisy_end_as_in_sd3():
    u = torch.rand(5000, generator=torch.Generator().manual_seed(2))
    t = times_from_uniform(u, train_eps=0.0, distribution=LogitNormalTime(mean=1.0, std=1.0))
    assert float((t < 0.5).float().mean()) > 0.8  # noise lives at t = 0 here


def test_shift_equals_sd3s_formula_in_sd3s_own_time():
    for s in (0.0, 0.1, 0.37, 0.8, 1.0):  # SD3's noise level: 1 is pure noise
        shift = 3.0
        assert 1.0 - shift_time(1.0 - s, shift) == pytest.approx(shift * s / (1 + (shift - 1) * s), abs=1e-15)


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1e-3, 0.96), (0.96, 1e-3)])
@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_shifted_grids_are_monotone_hit_both_ends_and_crowd_the_noise_end(t0, t1, shift):
    grid = time_grid(t0, t1, 10, shift)
    assert grid[0] == t0 and grid[-1] == t1 and len(grid) == 11
    steps = [b - a for a, b in zip(grid, grid[1:])]
    assert all(step > 0 for step in steps) or all(step < 0 for step in steps)
    ordered = sorted(grid)
    near_noise = ordered[1] - ordered[0]
    assert (near_noise < (ordered[-1] - ordered[0]) / 10) == (shift > 1)


def test_shift_one_is_the_uniform_grid_itself():
    assert time_grid(1e-3, 0.96, 7, 1.0) == uniform_grid(1e-3, 0.96, 7)


def test_shifted_grid_is_sd3s_shift_of_the_fraction_from_the_noise_end():
    """shift 2 on 4 steps: fractions 1/4, 1/2, 3/4 go to u / (u + 2 (1 - u)) = 1/7, 1/3, 3/5 of the way from the lower
    end, in either direction; both ends are kept exactly (0.3 + 0.6 * 1 is not 0.9 in floats)."""
    forward, backward = time_grid(0.3, 0.9, 4, 2.0), time_grid(0.9, 0.3, 4, 2.0)
    expected = [0.3 + 0.6 * f for f in (0.0, 1 / 7, 1 / 3, 3 / 5, 1.0)]
    assert forward == pytest.approx(expected, abs=1e-15) and backward == pytest.approx(expected[::-1], abs=1e-15)
    assert forward[0] == backward[-1] == 0.3 and forward[-1] == backward[0] == 0.9
