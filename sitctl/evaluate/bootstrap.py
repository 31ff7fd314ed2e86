"""Scores with a spread: FID and KID over cached Inception features, bootstrapped over the samples.

The study keeps every point's features, so a bootstrap over the generated features costs no
extra forward pass. Two estimators of the same KID (the unbiased MMD^2 with the cubic polynomial
kernel, Binkowski et al. 2018) live in this project, and their names say which is which:

    kid (sitctl eval kid, metrics.kernel_inception_distance)  torch-fidelity's: the mean over
        100 random subsets of 1000 samples each, as the papers report it;
    kid_full_sets (here, the study's tables)  one unbiased estimate over the full sets: the same
        expectation, a lower variance, and cheap to bootstrap from cached kernel blocks.

They agree exactly when one subset covers both sets (tests/sitctl/test_eval_bootstrap.py).
"""

from __future__ import annotations

import numpy as np

from sitctl import sample_store
from sitctl.artifacts import Artifact
from sitctl.evaluate.inception import POOL_FEATURES, create_extractor, extract_features, pick_device, resolve_weights
from sitctl.evaluate.metrics import Gaussian, feature_statistics, frechet_distance
from sitctl.evaluate.reference import FEATURES_FILE as REFERENCE_FEATURES
from sitctl.evaluate.reference import STATISTICS_FILE


def frechet_distance_low_rank(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of (n, d) features against N(mu, sigma), exact, in O(n^2 d + n d^2) instead of O(d^3).

    With A = (X - mean) / sqrt(n - 1) the sample covariance is A^T A, and the nonzero
    eigenvalues of A^T A sigma equal those of the symmetric PSD n x n matrix A sigma A^T,
    so tr sqrt(S sigma) is a sum over n eigenvalues: cheap enough to bootstrap when n << d = 2048.
    With n > d the d x d form (torch-fidelity's) is the cheaper one and is used instead.
    """
    features = np.asarray(features, np.float64)
    if len(features) > features.shape[1]:
        return float(frechet_distance(feature_statistics(features), Gaussian(mu=mu, sigma=sigma)))
    mean = features.mean(axis=0)
    centred = (features - mean) / np.sqrt(len(features) - 1)  # (n, d)
    eigenvalues = np.linalg.eigvalsh(centred @ sigma @ centred.T)  # (n,)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return float(np.sum((mean - mu) ** 2) + np.sum(centred**2) + np.trace(sigma) - 2.0 * trace_sqrt)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel (Binkowski et al. 2018): (x . y / d + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd_unbiased(k_xx: np.ndarray, k_yy_mean: float, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from the kernel blocks (diagonal of k_xx left out); k_yy_mean is already off-diagonal."""
    n = len(k_xx)
    return float((k_xx.sum() - np.trace(k_xx)) / (n * (n - 1)) + k_yy_mean - 2.0 * k_xy.mean())


def bootstrap_scores(generated: np.ndarray, real: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
                     *, resamples: int, seed: int) -> dict[str, float]:
    """FID and KID over the full sets (`kid_full_sets`) of `generated` vs the reference, each with the
    standard deviation over `resamples` bootstrap resamples of the generated features."""
    generated, real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    k_xx, k_xy = polynomial_kernel(generated, generated), polynomial_kernel(generated, real)
    k_yy = polynomial_kernel(real, real)
    k_yy_mean = (k_yy.sum() - np.trace(k_yy)) / (len(real) * (len(real) - 1))
    rng = np.random.default_rng(seed)
    fids, kids = [], []
    for _ in range(resamples):
        rows = rng.integers(0, len(generated), len(generated))
        fids.append(frechet_distance_low_rank(generated[rows], mu, sigma))
        kids.append(_mmd_unbiased(k_xx[np.ix_(rows, rows)], k_yy_mean, k_xy[rows]))
    return {
        "fid": frechet_distance_low_rank(generated, mu, sigma), "fid_std": float(np.std(fids, ddof=1)) if resamples > 1 else 0.0,
        "kid": _mmd_unbiased(k_xx, k_yy_mean, k_xy), "kid_std": float(np.std(kids, ddof=1)) if resamples > 1 else 0.0,
        "num_generated": len(generated), "num_reference": len(real), "bootstrap": resamples,
    }


def kid_full_sets(generated: np.ndarray, real: np.ndarray) -> float:
    """KID as one unbiased MMD^2 over the full sets (not torch-fidelity's mean over subsets)."""
    generated, real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    k_yy = polynomial_kernel(real, real)
    k_yy_mean = (k_yy.sum() - np.trace(k_yy)) / (len(real) * (len(real) - 1))
    return _mmd_unbiased(polynomial_kernel(generated, generated), k_yy_mean, polynomial_kernel(generated, real))


# ---------------------------------------------------------------------------------------------
# Features of artifacts, as plain arrays
# ---------------------------------------------------------------------------------------------


def reference_arrays(artifact: Artifact) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, 2048), mu, sigma) of a reference artifact; plain .npy/.npz, never unpickled."""
    features = np.load(artifact.file(REFERENCE_FEATURES), allow_pickle=False)
    with np.load(artifact.file(STATISTICS_FILE), allow_pickle=False) as stats:
        return features, stats["mu"], stats["sigma"]


def sample_features(samples: Artifact, device_name: str | None) -> np.ndarray:
    """Inception pool features (N, 2048) of a samples artifact, as the eval stage extracts them."""
    device = pick_device(device_name)
    extractor = create_extractor(resolve_weights(None), [POOL_FEATURES], device)
    batches = (images for images, _ in sample_store.iter_batches(samples.path, 64))
    count = sample_store.num_samples(samples.path)
    return extract_features(extractor, batches, device=device, total=count, label="samples")[POOL_FEATURES].numpy()
