"""`sitctl eval sweep`: sample and score a checkpoint over the SDE diffusion coefficient w and/or the
guidance scale, then plot the metric against it (the SiT paper's study for choosing w_t, Sec. 3.4).

Each grid point is a samples artifact made by the sample stage from one checkpoint (the run's
newest when the sweep starts) and a metrics artifact beside it. A point reuses a finished artifact
only when it was made with the same settings from the same inputs by content id
(`identity.made_otherwise`): an interrupted sweep resumes where it stopped and a widened grid
only samples the new values, while the same grid with another sampler (`--mode ode` after an SDE
sweep) or from another checkpoint samples anew, saying why. A point's first samples go to
`<out>/samples-cfg{c}-w{w}`; samples made otherwise go to that name suffixed with a short hash of
their settings and inputs, so nothing finished is overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import matplotlib
import matplotlib.pyplot as plt

from sitctl.artifacts import Artifact, open_artifact, staging_dir
from sitctl.checkpoint import latest_checkpoint
from sitctl.configs import SweepConfig, resolve_sample
from sitctl.evaluate.reference import Reference, load_reference
from sitctl.evaluate.registry import PLOTTED_VALUE
from sitctl.evaluate.stage import EvalConfig, default_out, evaluate_stage
from sitctl.identity import made_for, made_otherwise, read_request, settings_of
from sitctl.records import MetricsInfo
from sitctl.sample import SampleConfig, sample_stage


def _label(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


def point_settings(config: SweepConfig, checkpoint: Artifact, w: float | None, cfg: float | None) -> SampleConfig:
    """The sample stage's settings of one grid point as its manifest records them (the mode's solver
    and steps filled in); where they go is chosen apart (`out` is free)."""
    settings: dict[str, Any] = {"checkpoint": str(checkpoint.path), "num": config.num}
    mode = config.mode or ("sde" if w is not None else None)
    settings.update({k: v for k, v in (("mode", mode), ("w", w), ("cfg_scale", cfg)) if v is not None})
    return resolve_sample(SampleConfig(**settings))


def own_name(path: Path, settings: Any, inputs: list[str]) -> Path:
    """`path` suffixed with a short hash of the identity settings and the inputs' ids: no other result's name."""
    key = json.dumps({"settings": settings_of(settings), "inputs": sorted(inputs)}, sort_keys=True)
    return path.with_name(f"{path.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}")


def find_or_place(first: Path, own: Path, kind: str, difference: Callable[[Artifact], str | None],
                  first_free: bool) -> tuple[Artifact | None, Path, str | None]:
    """(the finished result at `first` or `own` in which `difference` finds none, its path, None), or else
    (None, where to make it: `first` while it is free, else `own`; why what was there is not reused)."""
    why = None
    for candidate in (first, own):
        if not candidate.exists():
            continue
        found = open_artifact(candidate, kind)  # refuses a non-artifact squatting on the name
        differs = difference(found)
        if differs is None:
            return found, candidate, None
        why = why or f"{candidate.name} not reused: {differs}"
    return None, first if first_free else own, why


def sample_point(config: SweepConfig, out: Path, checkpoint: Artifact, w: float | None, cfg: float | None,
                 say: Callable[[str], None]) -> Artifact:
    """The samples of one grid point: the finished ones made just so from `checkpoint`, else new ones."""
    settings, inputs = point_settings(config, checkpoint, w, cfg), [checkpoint.id]
    first = out / f"samples-cfg{_label(cfg)}-w{_label(w)}"
    staging = staging_dir(first)  # an interrupted run there is resumed only if begun by this same request
    first_free = not first.exists() and (read_request(staging) is None or made_for(staging, settings))
    found, target, why = find_or_place(first, own_name(first, settings, inputs), "samples",
                                       lambda found: made_otherwise(found, settings, inputs), first_free)
    if found is not None:
        return found
    if why is not None:
        say(f"{why}; sampling into {target.name}")
    return sample_stage(dataclasses.replace(settings, out=str(target)))


def score_point(config: SweepConfig, out: Path, samples: Artifact, reference: Reference | None,
                say: Callable[[str], None]) -> Artifact:
    """The metrics of one point beside its samples: the finished ones scored just so, else new ones."""
    settings = EvalConfig(
        samples=str(samples.path), ref=config.ref, metrics=(config.metric,), results=str(out / "results.jsonl"),
        num_expected=config.num, batch_size=config.batch_size, device=config.device,
        inception_weights=config.inception_weights, fetch_weights=config.fetch_weights,
    )
    inputs = [samples.id] + ([reference.artifact.id] if reference is not None and reference.artifact is not None else [])

    def difference(found: Artifact) -> str | None:
        return made_otherwise(found, settings, inputs) or other_reference(found, reference)

    first = default_out(settings, samples, reference)
    found, target, why = find_or_place(first, own_name(first, settings, inputs), "metrics", difference, not first.exists())
    if found is not None:
        return found
    if why is not None:
        say(f"{why}; scoring into {target.name}")
    return evaluate_stage(dataclasses.replace(settings, out=str(target)))


def other_reference(metrics: Artifact, reference: Reference | None) -> str | None:
    """Why `metrics` was not scored against `reference`; an ADM .npz is no input artifact, so its id is in the record."""
    recorded = (MetricsInfo.from_artifact(metrics).reference or {}).get("id")
    wanted = reference.id if reference is not None else None
    return None if recorded == wanted else f"it was scored against reference {recorded}, now {wanted}"


def sweep_stage(config: SweepConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample and score every (cfg, w) point; return the points and the plot's path."""
    out = Path(config.out) if config.out is not None else Path(config.run) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(config.run)  # every point from this one, even while the run goes on
    reference = load_reference(config.ref) if config.ref is not None else None
    points = []
    for cfg, w in itertools.product(config.cfg_values or (None,), config.w_values or (None,)):
        samples = sample_point(config, out, checkpoint, w, cfg, say)
        metrics = score_point(config, out, samples, reference, say)
        value = MetricsInfo.from_artifact(metrics).values[PLOTTED_VALUE[config.metric]]
        points.append({"w": w, "cfg_scale": cfg, "value": value, "metrics": str(metrics.path)})
    plot = plot_sweep(points, config, out)
    return {"points": points, "plot": str(plot)}


def plot_sweep(points: list[dict[str, Any]], config: SweepConfig, out: Path) -> Path:
    """Metric against w (one line per guidance scale), or against the guidance scale alone."""
    matplotlib.use("Agg")

    x_key, line_key = ("w", "cfg_scale") if config.w_values else ("cfg_scale", "w")
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for line_value, group in itertools.groupby(points, key=lambda p: p[line_key]):
        group = list(group)
        name = None if line_value is None else f"{line_key} = {line_value:g}"
        axes.plot([p[x_key] for p in group], [p["value"] for p in group], marker="o", label=name)
    axes.set_xlabel("diffusion coefficient w" if x_key == "w" else "guidance scale")
    axes.set_ylabel(f"{config.metric.upper()} ({config.num} samples)")
    axes.grid(alpha=0.3)
    if len(config.cfg_values) > 1 and config.w_values:
        axes.legend()
    figure.tight_layout()
    path = out / f"{config.metric}-vs-{'w' if x_key == 'w' else 'cfg'}.png"
    figure.savefig(path)
    plt.close(figure)
    return path
