"""`sitctl eval`: score a samples artifact against a reference; write a metrics artifact and a results row.

Samples are read straight from the samples artifact's HDF5 rank files in global index order
(no PNGs), batched through the FID Inception on the GPU when present. The metrics artifact's
inputs are the samples and the reference artifacts, so its lineage reaches the checkpoint and the
latents the model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from sitctl import sample_store
from sitctl.artifacts import Artifact, begin_artifact, finish_artifact, open_artifact, parents
from sitctl.configs import EvalConfig
from sitctl.errors import EvalError
from sitctl.evaluate.inception import (
    FEATURE_NAMES, INCEPTION_PRECISION, create_extractor, extract_features, missing_head, pick_device, resolve_weights
)
from sitctl.evaluate.metrics import feature_statistics
from sitctl.evaluate.reference import Reference, load_reference
from sitctl.evaluate.registry import REGISTRY, MetricInputs
from sitctl.evaluate.results import append_result, result_row, sampler_text
from sitctl.identity import REQUEST, same_settings
from sitctl.records import MetricsInfo
from sitctl.signals import stop_on_signals
from sitctl.trackers import add_eval_to_run

METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------------------------
# Checks on the inputs
# ---------------------------------------------------------------------------------------------


def check_samples(samples: Artifact, config: EvalConfig) -> tuple[int, int]:
    """(count, image size) of the stored samples, refusing wrong dtype/shape or too few samples."""
    files = sorted(samples.path.glob("images-rank*.h5"))
    if not files:
        raise EvalError(f"{samples.path} holds no images-rank*.h5 files")
    with h5py.File(files[0], "r") as handle:
        dtype, shape = handle["images"].dtype, tuple(handle["images"].shape[1:])
    if dtype != np.uint8 or len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
        raise EvalError(f"{samples.path}: images are {dtype} {shape}, expected uint8 (S, S, 3)")
    count = sample_store.num_samples(samples.path)
    if count < 2:
        raise EvalError(f"{samples.path} has {count} sample(s); the metrics need at least 2")
    if count < config.num_expected and not config.allow_fewer:
        raise EvalError(
            f"{samples.path} has {count} samples, fewer than --num-expected {config.num_expected}; "
            f"sample more, or pass --allow-fewer to score {count}"
        )
    return count, shape[0]


def check_reference(reference: Reference, image_size: int) -> None:
    if reference.image_size is not None and reference.image_size != image_size:  # None: an .npz of statistics only
        raise EvalError(
            f"reference {reference.path} is {reference.image_size}x{reference.image_size} but the samples are "
            f"{image_size}x{image_size}; make a reference with --image-size {image_size}"
        )


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def evaluate_stage(config: EvalConfig) -> Artifact:
    """Score the samples; write the metrics artifact and append one row to the results table.

    A stop signal ends it between batches of features (sitctl/signals.py); nothing is written then.
    """
    with stop_on_signals():  # from the start, so a signal while loading stops at the first batch
        return _evaluate(config)


def _evaluate(config: EvalConfig) -> Artifact:
    needing = [name for name in config.metrics if REGISTRY[name].needs_reference]
    if config.ref is None and needing:  # the CLI fills --ref from the workspace; a script must pass one
        raise EvalError(f"{'/'.join(needing)} needs a reference: ref= a reference artifact or an ADM .npz")
    samples = open_artifact(config.samples, "samples")
    count, image_size = check_samples(samples, config)
    reference = load_reference(config.ref) if config.ref is not None else None
    if reference is not None:
        check_reference(reference, image_size)
    config = _resolve_paths(config, samples, reference)
    finished = _finished(config)
    if finished is not None:
        return finished
    values, weights, unavailable = score(config, samples, count, reference)
    metrics = _write_metrics(config, samples, reference, values, weights, count, unavailable)
    row = result_row(metrics, samples)
    append_result(Path(config.results), row)
    add_eval_to_run(samples, values, count, sampler_text(row["sampler"]))  # on the run's charts, at its step
    return metrics


def score(config: EvalConfig, samples: Artifact, count: int,
          reference: Reference | None) -> tuple[dict[str, float], Any, dict[str, str]]:
    """Extract the samples' features in one pass and compute every requested metric.

    Returns the values, the Inception weights used, and {value: why} for optional values the
    network cannot give (the paper row's IS without a class head).
    """
    device = pick_device(config.device)
    required = {layer for name in config.metrics for layer in REGISTRY[name].layers}
    weights = resolve_weights(config.inception_weights, need_logits="logits" in required, fetch=config.fetch_weights)
    optional = {(layer, value) for name in config.metrics for layer, value in REGISTRY[name].optional}
    available = {"logits"} if weights.has_logits else set()
    wanted = required | {layer for layer, _ in optional if layer in available}
    unavailable = {value: missing_head(weights) for layer, value in sorted(optional) if layer not in wanted}
    extractor = create_extractor(weights, [name for layer, name in FEATURE_NAMES.items() if layer in wanted], device)
    batches = (images for images, _ in sample_store.iter_batches(samples.path, config.batch_size))
    features = extract_features(extractor, batches, device=device, total=count, label="samples")
    return compute_metrics(config, features, reference, extractor=extractor, device=device), weights, unavailable


def compute_metrics(
    config: EvalConfig, features: dict[str, torch.Tensor], reference: Reference | None, *, extractor=None, device=None
) -> dict[str, float]:
    """The metric values from the samples' features ({"2048": (N, 2048), "spatial": (N, 2023), "logits_unbiased": (N, 1008)})."""
    real = _RealFeatures(reference, extractor, device, config.batch_size)
    inputs = MetricInputs(config=config, pool=features.get(FEATURE_NAMES["pool"]), logits=features.get(FEATURE_NAMES["logits"]),
                          reference=reference, real_pool=real.pool, spatial=features.get(FEATURE_NAMES["spatial"]),
                          real_spatial=real.spatial_statistics, device=device or "cpu")
    values: dict[str, float] = {}
    for name in config.metrics:
        values.update(REGISTRY[name].compute(inputs))
    return values


class _RealFeatures:
    """The reference's pool features and spatial statistics, each read or extracted once, on first use.

    A reference artifact stores both (one made before sFID, pool features only); an ADM .npz has
    mu/sigma and usually mu_s/sigma_s. What is not stored is extracted from the reference's images,
    every layer the extractor gives in the same pass.
    """

    def __init__(self, reference: Reference | None, extractor, device, batch_size: int) -> None:
        self.reference, self.extractor, self.device, self.batch_size = reference, extractor, device, batch_size
        self.extracted: dict[str, torch.Tensor] | None = None
        self.stored_pool: torch.Tensor | None = None

    def pool(self) -> torch.Tensor:
        if self.stored_pool is None:
            stored = self.reference.features()  # (M, 2048), read once however many metrics ask
            self.stored_pool = torch.from_numpy(stored) if stored is not None else self._extract(FEATURE_NAMES["pool"])
        return self.stored_pool

    def spatial_statistics(self):
        stored = self.reference.spatial_statistics
        return stored if stored is not None else feature_statistics(self._extract(FEATURE_NAMES["spatial"]))

    def _extract(self, name: str) -> torch.Tensor:
        if self.extractor is None or name not in self.extractor.get_requested_features_list():
            raise ValueError(f"the reference's {name} features are not stored and the extractor does not give them")
        if self.extracted is None:
            self.extracted = extract_features(self.extractor, self.reference.images(self.batch_size), device=self.device,
                                              total=self.reference.num_images, label="reference")
        return self.extracted[name]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def default_out(config: EvalConfig, samples: Artifact, reference: Reference | None) -> Path:
    """<samples dir>-<metrics>-ref<id>, beside the samples, so a rerun finds its earlier result."""
    suffix = "-".join(config.metrics) + (f"-ref{reference.id[:8]}" if reference is not None else "")
    return samples.path.parent / f"{samples.path.name}-{suffix}"


def _resolve_paths(config: EvalConfig, samples: Artifact, reference: Reference | None) -> EvalConfig:
    out = Path(config.out) if config.out is not None else default_out(config, samples, reference)
    results = Path(config.results) if config.results is not None else out.parent / "results.jsonl"
    if results.is_dir():
        results = results / "results.jsonl"
    return dataclasses.replace(config, out=str(out), results=str(results))


def _finished(config: EvalConfig) -> Artifact | None:
    """An existing metrics artifact made with exactly this config is reused; anything else is refused."""
    if not Path(config.out).exists():
        return None
    existing = open_artifact(config.out, "metrics")
    if not same_settings(existing.config, config, REQUEST):
        raise EvalError(f"{config.out} already exists with other settings; artifacts are never overwritten, choose --out")
    return existing


def lineage(artifact: Artifact) -> list[dict[str, str]]:
    """Every ancestor (kind, id, path), nearest first, following recorded inputs."""
    found: list[dict[str, str]] = []
    for parent in parents(artifact):
        if isinstance(parent, Artifact):
            found.append(parent.ref())
            found.extend(lineage(parent))
        else:
            found.append(parent)
    return found


def _write_metrics(config, samples, reference, values, weights, count, unavailable) -> Artifact:
    staging = begin_artifact(config.out)
    (staging / METRICS_FILE).write_text(json.dumps(values, indent=2) + "\n")
    reference_record = None
    if reference is not None:
        reference_record = {"id": reference.id, "path": str(reference.path.resolve()),
                            "format": "artifact" if reference.artifact is not None else "adm-npz"}
    extra = MetricsInfo(
        values=values, num_samples=count, num_expected=config.num_expected, reference=reference_record,
        inception=weights.describe() | {"precision": INCEPTION_PRECISION}, lineage=[samples.ref(), *lineage(samples)],
        unavailable=unavailable,
    ).to_extra()
    inputs = [samples] + ([reference.artifact] if reference is not None and reference.artifact is not None else [])
    return finish_artifact(staging, config.out, kind="metrics", config=asdict(config), inputs=inputs, extra=extra)

