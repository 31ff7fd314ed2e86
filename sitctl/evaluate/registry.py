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
    logits: Any  # (N, 1008) unbiased logits of the samples, or None (not asked for, or no class head)
    reference: Any  # the Reference (mu/sigma, stored features), or None
    real_pool: Callable[[], Any]  # (M, 2048) reference features, extracted on first call
    spatial: Any = None  # (N, 2023) ADM spatial features of the samples, or None
    real_spatial: Callable[[], Any] = lambda: None  # the reference's spatial Gaussian (mu_s, sigma_s), made on first call
    device: Any = "cpu"  # where pairwise distances run


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    """Help text of `sitctl eval NAME`."""
    needs_reference: bool
    layers: tuple[str, ...]
    """Inception outputs it reads: "pool" (2048-d pool_3), "spatial" (ADM's 2023-d mixed_6/conv), "logits" (1008 classes)."""
    headline: str
    """The value a sweep plots and a table leads with (lower is better unless higher_is_better)."""
    compute: Callable[[MetricInputs], dict[str, float]]
    higher_is_better: bool = False
    optional: tuple[tuple[str, str], ...] = ()
    """(layer, value) pairs: the layer is read when the network has it; else the value is recorded as unavailable, with why."""


def _math():
    """sitctl/evaluate/metrics.py, imported when a metric is computed: it loads torch and scipy, and
    this table is read at start-up (`sitctl --help` lists the metrics)."""
    from sitctl.evaluate import metrics  # start-up cost

    return metrics


def _fid(inputs: MetricInputs) -> dict[str, float]:
    metrics = _math()
    return {"fid": metrics.frechet_distance(metrics.feature_statistics(inputs.pool), inputs.reference.statistics)}


def _sfid(inputs: MetricInputs) -> dict[str, float]:
    metrics = _math()
    return {"sfid": metrics.frechet_distance(metrics.feature_statistics(inputs.spatial), inputs.real_spatial())}


def _is(inputs: MetricInputs) -> dict[str, float]:
    metrics = _math()
    mean, std = metrics.inception_score(inputs.logits, inputs.config.is_splits, inputs.config.seed)
    return {"is_mean": mean, "is_std": std}


def _kid(inputs: MetricInputs) -> dict[str, float]:
    metrics = _math()
    config = inputs.config
    mean, std = metrics.kernel_inception_distance(inputs.pool, inputs.real_pool(), subsets=config.kid_subsets,
                                                  subset_size=config.kid_subset_size, seed=config.seed)
    return {"kid_mean": mean, "kid_std": std}


def _prc(inputs: MetricInputs) -> dict[str, float]:
    metrics = _math()
    return metrics.precision_recall(inputs.pool, inputs.real_pool(), neighborhood=inputs.config.prc_neighborhood)


def _paper(inputs: MetricInputs) -> dict[str, float]:
    """The SiT/DiT papers' row, as guided-diffusion's evaluator computes it: FID, sFID, IS, precision, recall."""
    metrics = _math()
    values = _fid(inputs) | _sfid(inputs)
    if inputs.logits is not None:
        values["adm_is"] = metrics.adm_inception_score(inputs.logits)
    found = metrics.adm_precision_recall(inputs.pool, inputs.real_pool(), device=inputs.device)
    return values | {"adm_precision": found["precision"], "adm_recall": found["recall"]}


REGISTRY: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("fid", "Frechet Inception Distance of SAMPLES to --ref (TF Inception pool_3, torch-fidelity math).",
           needs_reference=True, layers=("pool",), headline="fid", compute=_fid),
    Metric("sfid", "Spatial FID of SAMPLES to --ref, as ADM computes it (mixed_6/conv, 7 x 17 x 17 features).",
           needs_reference=True, layers=("spatial",), headline="sfid", compute=_sfid),
    Metric("is", "Inception Score of SAMPLES (needs torch-fidelity's Inception weights with the class head).",
           needs_reference=False, layers=("logits",), headline="is_mean", compute=_is, higher_is_better=True),
    Metric("kid", "Kernel Inception Distance of SAMPLES to --ref (mean and std over subsets).",
           needs_reference=True, layers=("pool",), headline="kid_mean", compute=_kid),
    Metric("prc", "Precision and recall (k-NN manifolds, k=3, torch-fidelity) of SAMPLES against --ref.",
           needs_reference=True, layers=("pool",), headline="precision", compute=_prc, higher_is_better=True),
    Metric("paper", "The papers' row as ADM's evaluator computes it: FID, sFID, IS (when the class head is at hand), "
           "precision, recall (k=3), and n; one Inception pass.",
           needs_reference=True, layers=("pool", "spatial"), headline="fid", compute=_paper,
           optional=(("logits", "adm_is"),)),
)}
METRICS = tuple(REGISTRY)
NEEDS_REFERENCE = tuple(name for name, metric in REGISTRY.items() if metric.needs_reference)
# `sitctl eval all`: FID, KID and torch-fidelity's precision/recall (sFID and ADM's numbers: `eval paper`).
ALL_WITH_REFERENCE = ("fid", "kid", "prc")
PLOTTED_VALUE = {name: metric.headline for name, metric in REGISTRY.items() if name not in ("prc", "paper")}
# The paper row's columns, in the papers' order, and the title each goes by.
PAPER_COLUMNS = (("fid", "FID"), ("sfid", "sFID"), ("adm_is", "IS"), ("adm_precision", "precision"), ("adm_recall", "recall"))
