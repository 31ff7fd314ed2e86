"""The metric math on Inception features, delegated to torch-fidelity so numbers match its CLI.

FID  (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of pool_3 Gaussians.
IS   (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits.
KID  (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, over random subsets.
PRC  (Kynkaanniemi et al. 2019): precision/recall of k-NN balls around generated and real features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric, KEY_METRIC_FID
from torch_fidelity.metric_isc import isc_features_to_metric, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD
from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.metric_prc import prc_features_to_metric


@dataclass(frozen=True)
class Gaussian:
    """Mean (D,) and covariance (D, D) of features, in float64 as the ADM reference stores them."""

    mu: np.ndarray
    sigma: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"mu": np.asarray(self.mu, np.float64), "sigma": np.asarray(self.sigma, np.float64)}


def feature_statistics(features: torch.Tensor | np.ndarray) -> Gaussian:
    """Sample mean and unbiased covariance of (N, D) features (N >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    return Gaussian(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False))


def frechet_distance(first: Gaussian, second: Gaussian) -> float:
    """FID between two Gaussians (torch-fidelity's eigenvalue form of tr sqrt(S1 S2))."""
    return fid_statistics_to_metric(first.as_dict(), second.as_dict(), verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` shuffled splits of (N, classes) logits."""
    result = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


def kernel_inception_distance(
    generated: torch.Tensor, real: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """(mean, std) of KID over `subsets` random subsets; subset_size is capped by the smaller set."""
    subset_size = min(subset_size, len(generated), len(real))
    result = kid_features_to_metric(
        generated, real, kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed, verbose=False
    )
    return result[KEY_METRIC_KID_MEAN], result[KEY_METRIC_KID_STD]


def precision_recall(generated: torch.Tensor, real: torch.Tensor, *, neighborhood: int = 3) -> dict[str, float]:
    """Precision, recall and their F-score; pairwise distances in blocks beyond 20K samples."""
    save_memory = max(len(generated), len(real)) > 20_000  # the full N x N distance matrix would not fit
    return prc_features_to_metric(
        generated, real, prc_neighborhood=neighborhood, prc_batch_size=10_000, save_cpu_ram=save_memory, verbose=False
    )
