"""The bootstrap scores over cached features (sitctl/evaluate/bootstrap.py) against independent computations."""

import numpy as np
import pytest
import torch

from sitctl.evaluate.bootstrap import bootstrap_scores, frechet_distance_low_rank, kid_full_sets
from sitctl.evaluate.metrics import feature_statistics, frechet_distance, kernel_inception_distance


def test_low_rank_fid_equals_torch_fidelity_with_fewer_or_more_samples_than_dimensions():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(90, 40)) @ rng.normal(size=(40, 40))
    stats = feature_statistics(reference)
    for count in (12, 39, 70):  # n < d: rank-deficient covariance; n > d: full rank (the d x d form)
        generated = rng.normal(0.3, 1.5, size=(count, 40))
        expected = frechet_distance(feature_statistics(generated), stats)
        assert frechet_distance_low_rank(generated, stats.mu, stats.sigma) == pytest.approx(expected, rel=1e-6)


def test_kid_on_full_sets_equals_torch_fidelity_when_one_subset_covers_both():
    rng = np.random.default_rng(2)
    generated, real = rng.normal(size=(30, 16)), rng.normal(0.2, 1.0, size=(30, 16))
    stats = feature_statistics(real)
    scores = bootstrap_scores(generated, real, stats.mu, stats.sigma, resamples=3, seed=0)
    expected, _ = kernel_inception_distance(torch.from_numpy(generated), torch.from_numpy(real), subsets=1, subset_size=30)
    assert scores["kid"] == pytest.approx(expected, rel=1e-9)
    assert scores["fid_std"] > 0 and scores["kid_std"] > 0


def test_bootstrap_of_identical_features_has_no_spread():
    features = np.tile(np.linspace(0, 1, 8), (5, 1))  # five copies of one feature vector
    scores = bootstrap_scores(features, features + 1.0, np.ones(8), np.eye(8), resamples=6, seed=0)
    assert scores["fid_std"] == pytest.approx(0.0, abs=1e-9)


def test_kid_full_sets_is_the_bootstraps_point_estimate_and_differs_from_the_subset_mean():
    rng = np.random.default_rng(3)
    generated, real = rng.normal(size=(40, 8)), rng.normal(0.5, 1.0, size=(40, 8))
    stats = feature_statistics(real)
    assert bootstrap_scores(generated, real, stats.mu, stats.sigma, resamples=2, seed=0)["kid"] == kid_full_sets(generated, real)
    subsets, _ = kernel_inception_distance(torch.from_numpy(generated), torch.from_numpy(real), subsets=5, subset_size=10)
    assert kid_full_sets(generated, real) != pytest.approx(subsets, rel=1e-6)  # two estimators, two names
