"""`sitctl eval sweep`: sample and score a checkpoint over the SDE diffusion coefficient w and/or the
guidance scale, then plot the metric against it (the SiT paper's study for choosing w_t, Sec. 3.4).

Each grid point is a samples artifact `<out>/samples-cfg{c}-w{w}` made by the sample stage and a
metrics artifact beside it; a point whose artifacts already exist is reused, so an interrupted sweep
resumes where it stopped and a widened grid only samples the new values.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from sitctl.artifacts import open_artifact
from sitctl.configs import SweepConfig
from sitctl.evaluate.registry import PLOTTED_VALUE
from sitctl.evaluate.stage import EvalConfig, evaluate_stage
from sitctl.records import MetricsInfo
from sitctl.sample import SampleConfig, sample_stage


def _label(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


def sample_point(config: SweepConfig, out: Path, w: float | None, cfg: float | None) -> Path:
    """The samples artifact of one grid point, made by the sample stage unless it already exists."""
    target = out / f"samples-cfg{_label(cfg)}-w{_label(w)}"
    if target.exists():
        open_artifact(target, "samples")  # refuses a non-artifact squatting on the name
        return target
    settings: dict[str, Any] = {"checkpoint": config.run, "out": str(target), "num": config.num}
    mode = config.mode or ("sde" if w is not None else None)
    settings.update({k: v for k, v in (("mode", mode), ("w", w), ("cfg_scale", cfg)) if v is not None})
    sample_stage(SampleConfig(**settings))
    return target


def sweep_stage(config: SweepConfig) -> dict[str, Any]:
    """Sample and score every (cfg, w) point; return the points and the plot's path."""
    out = Path(config.out) if config.out is not None else Path(config.run) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for cfg, w in itertools.product(config.cfg_values or (None,), config.w_values or (None,)):
        samples = sample_point(config, out, w, cfg)
        metrics = evaluate_stage(EvalConfig(
            samples=str(samples), ref=config.ref, metrics=(config.metric,), results=str(out / "results.jsonl"),
            num_expected=config.num, batch_size=config.batch_size, device=config.device,
            inception_weights=config.inception_weights, fetch_weights=config.fetch_weights,
        ))
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
