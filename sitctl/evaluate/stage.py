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
from sitctl.errors import EvalError
from sitctl.records import MetricsInfo
from sitctl.evaluate.registry import REGISTRY, MetricInputs
from sitctl.configs import EvalConfig
from sitctl.evaluate.reference import Reference, load_reference
from sitctl.signals import stop_on_signals

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
    if reference.image_size != image_size:
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
    from sitctl.evaluate.results import append_result, result_row

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
    values, weights = score(config, samples, count, reference)
    metrics = _write_metrics(config, samples, reference, values, weights, count)
    append_result(Path(config.results), result_row(metrics, samples))
    return metrics


def score(config: EvalConfig, samples: Artifact, count: int, reference: Reference | None) -> tuple[dict[str, float], Any]:
    """Extract the samples' features and compute every requested metric."""
    from sitctl.evaluate.inception import LOGITS, POOL_FEATURES, create_extractor, extract_features, pick_device, resolve_weights

    device = pick_device(config.device)
    weights = resolve_weights(config.inception_weights, need_logits="is" in config.metrics, fetch=config.fetch_weights)
    wanted = {REGISTRY[name].layer for name in config.metrics}
    layers = [layer for kind, layer in (("pool", POOL_FEATURES), ("logits", LOGITS)) if kind in wanted]
    extractor = create_extractor(weights, layers, device)
    batches = (images for images, _ in sample_store.iter_batches(samples.path, config.batch_size))
    features = extract_features(extractor, batches, device=device, total=count, label="samples")
    return compute_metrics(config, features, reference, extractor=extractor, device=device), weights


def compute_metrics(
    config: EvalConfig, features: dict[str, torch.Tensor], reference: Reference | None, *, extractor=None, device=None
) -> dict[str, float]:
    """The metric values from the samples' features ({"2048": (N, 2048), "logits_unbiased": (N, 1008)})."""
    real: list[torch.Tensor] = []  # the reference's features, extracted once whichever metric asks first

    def real_pool() -> torch.Tensor:
        if not real:
            real.append(_reference_features(reference, extractor, device, config.batch_size))
        return real[0]

    inputs = MetricInputs(config=config, pool=features.get("2048"), logits=features.get("logits_unbiased"),
                          reference=reference, real_pool=real_pool)
    values: dict[str, float] = {}
    for name in config.metrics:
        values.update(REGISTRY[name].compute(inputs))
    return values


def _reference_features(reference: Reference, extractor, device, batch_size: int) -> torch.Tensor:
    """Stored features of a reference artifact; an ADM .npz has only mu/sigma, so run its arr_0."""
    from sitctl.evaluate.inception import POOL_FEATURES, extract_features

    stored = reference.features()
    if stored is not None:
        return torch.from_numpy(stored)
    if extractor is None or POOL_FEATURES not in extractor.get_requested_features_list():
        raise ValueError("KID/PRC against an .npz reference need a pool-feature extractor")
    found = extract_features(extractor, reference.images(batch_size), device=device, total=reference.num_images, label="reference")
    return found[POOL_FEATURES]


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
    if existing.config != json.loads(json.dumps(asdict(config))):
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


def _write_metrics(config, samples, reference, values, weights, count) -> Artifact:
    staging = begin_artifact(config.out)
    (staging / METRICS_FILE).write_text(json.dumps(values, indent=2) + "\n")
    reference_record = None
    if reference is not None:
        reference_record = {"id": reference.id, "path": str(reference.path.resolve()),
                            "format": "artifact" if reference.artifact is not None else "adm-npz"}
    extra = MetricsInfo(
        values=values, num_samples=count, num_expected=config.num_expected, reference=reference_record,
        inception=weights.describe(), lineage=[samples.ref(), *lineage(samples)],
    ).to_extra()
    inputs = [samples] + ([reference.artifact] if reference is not None and reference.artifact is not None else [])
    return finish_artifact(staging, config.out, kind="metrics", config=asdict(config), inputs=inputs, extra=extra)

