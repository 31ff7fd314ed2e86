"""Every metric sitctl computes, as one small unit found by name: the eval stage, the CLI's
`sitctl eval <name>` commands, the sweep and the results table all read this table.

Adding a metric is one `Metric` entry plus its formula in sitctl/evaluate/metrics.py. This
module imports no torch (the CLI lists the metrics at start-up); `compute` imports the math when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class MetricInputs:
    """What a metric may read: Inception features of the samples and, lazily, of the reference."""

    config: Any  # the EvalConfig (subset sizes, seeds, neighbourhood)
    pool: Any  # (N, 2048) pool_3 features of the samples, or None
    logits: Any  # (N, 1008) unbiased logits of the samples, or None
    reference: Any  # the Reference (mu/sigma, stored features), or None
    real_pool: Callable[[], Any]  # (M, 2048) reference features, extracted on first call


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    """Help text of `sitctl eval NAME`."""
    needs_reference: bool
    layer: str
    """Inception output it reads: "pool" (2048-d pool_3) or "logits" (1008 classes)."""
    headline: str
    """The value a sweep plots and a table leads with (lower is better unless higher_is_better)."""
    compute: Callable[[MetricInputs], dict[str, float]]
    higher_is_better: bool = False


def _fid(inputs: MetricInputs) -> dict[str, float]:
    from sitctl.evaluate import metrics

    return {"fid": metrics.frechet_distance(metrics.feature_statistics(inputs.pool), inputs.reference.statistics)}


def _is(inputs: MetricInputs) -> dict[str, float]:
    from sitctl.evaluate import metrics

    mean, std = metrics.inception_score(inputs.logits, inputs.config.is_splits, inputs.config.seed)
    return {"is_mean": mean, "is_std": std}


def _kid(inputs: MetricInputs) -> dict[str, float]:
    from sitctl.evaluate import metrics

    config = inputs.config
    mean, std = metrics.kernel_inception_distance(inputs.pool, inputs.real_pool(), subsets=config.kid_subsets,
                                                  subset_size=config.kid_subset_size, seed=config.seed)
    return {"kid_mean": mean, "kid_std": std}


def _prc(inputs: MetricInputs) -> dict[str, float]:
    from sitctl.evaluate import metrics

    return metrics.precision_recall(inputs.pool, inputs.real_pool(), neighborhood=inputs.config.prc_neighborhood)


REGISTRY: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("fid", "Frechet Inception Distance of SAMPLES to --ref (TF Inception pool_3, torch-fidelity math).",
           needs_reference=True, layer="pool", headline="fid", compute=_fid),
    Metric("is", "Inception Score of SAMPLES (needs torch-fidelity's Inception weights with the class head).",
           needs_reference=False, layer="logits", headline="is_mean", compute=_is, higher_is_better=True),
    Metric("kid", "Kernel Inception Distance of SAMPLES to --ref (mean and std over subsets).",
           needs_reference=True, layer="pool", headline="kid_mean", compute=_kid),
    Metric("prc", "Precision and recall (k-NN manifolds, k=3) of SAMPLES against --ref.",
           needs_reference=True, layer="pool", headline="precision", compute=_prc, higher_is_better=True),
)}
METRICS = tuple(REGISTRY)
NEEDS_REFERENCE = tuple(name for name, metric in REGISTRY.items() if metric.needs_reference)
# `sitctl eval all`: every metric the offline FID network can give (IS needs the class head).
ALL_WITH_REFERENCE = NEEDS_REFERENCE
PLOTTED_VALUE = {name: metric.headline for name, metric in REGISTRY.items() if name != "prc"}
