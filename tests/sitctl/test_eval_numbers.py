"""The eval stage's metric values on features with a known answer, through `compute_metrics`.

No Inception network: the features are given, and the references are real reference artifacts
(features.npy and statistics.npz, as `sitctl eval ref` writes them) made from those features.
"""

import numpy as np
import pytest
import torch

from sitctl.artifacts import begin_artifact, finish_artifact
from sitctl.evaluate.reference import FEATURES_FILE, STATISTICS_FILE, load_reference
from sitctl.evaluate.stage import EvalConfig, compute_metrics


def make_reference(path, features: np.ndarray):
    """A reference artifact holding these features and their mean and unbiased covariance (numpy's own)."""
    staging = begin_artifact(path)
    np.save(staging / FEATURES_FILE, features.astype(np.float32))
    np.savez(staging / STATISTICS_FILE, mu=features.mean(0).astype(np.float64), sigma=np.cov(features.astype(np.float64), rowvar=False))
    finish_artifact(staging, path, kind="reference", config={}, extra={"image_size": 8, "num_images": len(features)})
    return load_reference(path)


def scores(metrics, features, reference=None, **settings):
    config = EvalConfig(samples="-", ref=None if reference is None else "-", metrics=metrics, **settings)
    return compute_metrics(config, features, reference)


def test_fid_of_features_shifted_by_a_constant_is_the_squared_shift(tmp_path):
    # Equal covariances: the trace term tr(S + S - 2 (S S)^(1/2)) vanishes, leaving |shift|^2 = 3^2 + 4^2.
    real = np.random.default_rng(0).normal(size=(200, 16))
    shift = np.zeros(16)
    shift[[2, 9]] = 3.0, 4.0
    reference = make_reference(tmp_path / "ref", real)
    values = scores(("fid",), {"2048": torch.from_numpy(real + shift).float()}, reference)
    assert values["fid"] == pytest.approx(25.0, abs=1e-3)
    assert scores(("fid",), {"2048": torch.from_numpy(real).float()}, reference)["fid"] == pytest.approx(0.0, abs=1e-3)


def test_precision_and_recall_are_the_constructed_fractions(tmp_path):
    # Real: 10 clusters of 4 points, 100 apart, so each point's 3-NN ball holds its own cluster only.
    # Generated: exact copies of clusters 0-2 (12 points, inside real balls) and 4 points far away.
    # Precision = 12 / 16 generated points in a real ball; recall = 12 / 40 real points in a generated ball.
    rng = np.random.default_rng(1)
    centres = 100.0 * np.eye(12)[:10, :]
    real = np.concatenate([centre + rng.normal(scale=0.5, size=(4, 12)) for centre in centres])
    far = 1e4 + rng.normal(scale=0.5, size=(4, 12))
    generated = np.concatenate([real[:12], far])
    reference = make_reference(tmp_path / "ref", real)
    values = scores(("prc",), {"2048": torch.from_numpy(generated).float()}, reference)
    assert values["precision"] == pytest.approx(0.75, abs=1e-6)
    assert values["recall"] == pytest.approx(0.3, abs=1e-6)
    assert values["f_score"] == pytest.approx(2 * 0.75 * 0.3 / (0.75 + 0.3), abs=1e-6)


def test_inception_score_of_confident_balanced_classes_is_the_class_count():
    # Each image certain of its class, 8 classes equally often: KL(p(y|x) || p(y)) = log 8, so IS = 8.
    labels = torch.arange(8).repeat(40)  # (320,)
    logits = torch.nn.functional.one_hot(labels, 8).double() * 200.0
    values = scores(("is",), {"logits_unbiased": logits}, is_splits=1)
    assert values["is_mean"] == pytest.approx(8.0, rel=1e-9) and values["is_std"] == 0.0


def test_inception_score_is_one_when_every_image_predicts_the_same_classes():
    # p(y|x) = p(y) for every x: every KL term is 0, in every split, so IS = exp(0) = 1 with spread 0.
    logits = torch.from_numpy(np.random.default_rng(2).normal(scale=3.0, size=(1, 20))).repeat(100, 1)
    values = scores(("is",), {"logits_unbiased": logits}, is_splits=5)
    assert values["is_mean"] == pytest.approx(1.0, abs=1e-12) and values["is_std"] == pytest.approx(0.0, abs=1e-12)
