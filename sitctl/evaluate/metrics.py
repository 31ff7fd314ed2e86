"""The metric math on Inception features, delegated to torch-fidelity so numbers match its CLI.

FID  (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of pool_3 Gaussians.
sFID (Nash et al. 2021, as ADM reports it): the same distance on the 2023 spatial features.
IS   (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits.
KID  (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, over random subsets.
PRC  (Kynkaanniemi et al. 2019): precision/recall of k-NN balls around generated and real features.

The ADM section reproduces guided-diffusion's evaluations/evaluator.py where it differs from
torch-fidelity: its Inception Score splits and its float16 distances for precision/recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from sitctl.errors import EvalError


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
    """Frechet distance between two Gaussians: FID on pool features, sFID on spatial ones.

    torch-fidelity's eigenvalue form, tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)), not scipy's sqrtm,
    which returns wrong square roots on some BLAS builds (a known trap of FID code).
    """
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


# ---------------------------------------------------------------------------------------------
# ADM's evaluator (guided-diffusion evaluations/evaluator.py), the SiT and DiT papers' numbers
# ---------------------------------------------------------------------------------------------

ADM_NEIGHBOURS = 3  # ManifoldEstimator's nhood_sizes=(3,)
ADM_BATCH = 10_000  # its row_batch_size and col_batch_size
ADM_IS_SPLIT = 5_000  # compute_inception_score's split_size


def adm_inception_score(logits: torch.Tensor, split_size: int = ADM_IS_SPLIT) -> float:
    """ADM's IS: consecutive, unshuffled splits of `split_size` images (the last may be shorter), mean only."""
    scores = [isc_features_to_metric(chunk, splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN] for chunk in logits.split(split_size)]
    return float(np.mean(scores))


def adm_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(u), len(v)) as ADM's DistanceBlock computes them.

    It casts the features to float16 and computes |u|^2 - 2 u.v + |v|^2 (clamped at 0) there, falling
    back to float32 only when a block overflows. Each op is done in float32 on float16 values and
    rounded to float16, which is float16 arithmetic (float32 holds every product exactly); the
    rounding (a step of 0.5 at 1000) is what makes a point on a ball's edge count as inside.
    """
    def half(t: torch.Tensor) -> torch.Tensor:
        return t.half().float()

    u16, v16 = half(u), half(v)
    norm_u = half(half(u16 * u16).sum(1))[:, None]  # (U, 1)
    norm_v = half(half(v16 * v16).sum(1))[None, :]  # (1, V)
    distances = half(half(norm_u - 2 * half(u16 @ v16.T)) + norm_v).clamp_min(0)  # (U, V)
    if torch.isfinite(distances).all():
        return distances
    return (u.square().sum(1)[:, None] - 2 * u @ v.T + v.square().sum(1)[None, :]).clamp_min(0)


def adm_radii(features: torch.Tensor, k: int = ADM_NEIGHBOURS, batch: int = ADM_BATCH) -> torch.Tensor:
    """Squared distance of each feature to its k-th nearest neighbour, the point itself counted as the 0th.

    ADM partitions each row of distances to all points (itself included, at distance ~0) and takes
    index k, so k=3 is the third nearest other point. Rows and columns go in blocks of `batch`.
    """
    radii = []
    for rows in features.split(batch):
        nearest = torch.cat([adm_distances(rows, cols).topk(min(k + 1, len(cols)), dim=1, largest=False).values
                             for cols in features.split(batch)], dim=1)  # (R, up to (k+1) x blocks)
        radii.append(nearest.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)  # (N,)


def adm_precision_recall(generated: torch.Tensor, real: torch.Tensor, *, k: int = ADM_NEIGHBOURS, batch: int = ADM_BATCH,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """ADM's precision (generated points inside some real point's k-NN ball) and recall (the converse).

    Balls are closed (distance <= radius) and distances are ADM's float16 squared distances.
    """
    if min(len(generated), len(real)) <= k:
        raise EvalError(f"precision/recall with k={k} needs more than {k} images on each side, "
                        f"got {len(generated)} generated and {len(real)} real")
    generated, real = generated.float().to(device), real.float().to(device)
    real_radii, generated_radii = adm_radii(real, k, batch), adm_radii(generated, k, batch)
    generated_in = torch.zeros(len(generated), dtype=torch.bool, device=device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    for start_real in range(0, len(real), batch):
        rows = slice(start_real, start_real + batch)
        for start_generated in range(0, len(generated), batch):
            cols = slice(start_generated, start_generated + batch)
            distances = adm_distances(real[rows], generated[cols])  # (R, G)
            generated_in[cols] |= (distances <= real_radii[rows, None]).any(0)
            real_in[rows] |= (distances <= generated_radii[None, cols]).any(1)
    return {"precision": generated_in.double().mean().item(), "recall": real_in.double().mean().item()}
