"""The convergence ablation's answer: FID against training step per recipe, the steps each recipe
needs to reach the baseline's final FID, and the sampling grids (FID against NFE per time shift).

Steps-to-FID: the first measured step whose FID is at or below the target, interpolated linearly
in FID on the log-step axis between it and the step before (the curves are measured at
log-spaced steps). A curve that starts at or below the target gets its first step (an upper
bound); one that never reaches it gets None ("not reached by the last step").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.ticker import NullFormatter, ScalarFormatter

from sitctl.configs import StudyConfig
from sitctl.metrics_log import metrics_path
from sitctl.plots import read_metrics
from sitctl.study.points import CONVERGENCE_RECIPES, Point, convergence_runs

Curve = dict[int, dict[str, Any]]  # step -> scores


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """Where a curve measured at increasing `steps` first reaches `target` (log-linear interpolation)."""
    if values[0] <= target:
        return float(steps[0])
    for (s0, v0), (s1, v1) in zip(zip(steps, values), zip(steps[1:], values[1:])):
        if v1 <= target:
            fraction = (v0 - target) / (v0 - v1)  # v0 > target >= v1
            return float(math.exp(math.log(s0) + fraction * (math.log(s1) - math.log(s0))))
    return None


def _spread(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    return {"values": [float(v) for v in array], "mean": float(array.mean()) if len(array) else None,
            "std": float(array.std(ddof=1)) if len(array) > 1 else None}


def curves(rows: list[dict[str, Any]]) -> dict[str, dict[str, Curve]]:
    """recipe label -> run name -> {step: scores} of the scored convergence points, recipes in CONVERGENCE_RECIPES order."""
    found: dict[str, dict[str, Curve]] = {label: {} for label, _, _ in CONVERGENCE_RECIPES}
    for row in rows:
        point: Point = row["point"]
        runs = found.setdefault(point.label, {})
        runs.setdefault(point.model.name, {})
        if row["scores"] is not None:
            runs[point.model.name][point.step] = row["scores"]
    return found


def summarise(rows: list[dict[str, Any]], steps: Sequence[int]) -> list[dict[str, Any]]:
    """Per recipe: FID and KID mean ± sd over its complete runs at each step, and its steps to reach
    the baseline's final FID (on its mean curve, and per run) with the speed-up over the baseline.

    A run counts once every step is scored; the baseline is the first recipe.
    """
    steps = sorted(steps)
    summary = []
    for label, runs in curves(rows).items():
        complete = {name: curve for name, curve in runs.items() if all(step in curve for step in steps)}
        entry: dict[str, Any] = {"recipe": label, "runs": len(runs), "complete": len(complete)}
        for metric in ("fid", "kid"):
            entry[metric] = {step: _spread([curve[step][metric] for curve in complete.values()]) for step in steps}
        entry["curves"] = {name: [curve[step]["fid"] for step in steps] for name, curve in complete.items()}
        summary.append(entry)
    baseline = summary[0]
    target = baseline["fid"][steps[-1]]["mean"] if baseline["complete"] else None
    for entry in summary:
        entry["target"] = target
        mean_curve = [entry["fid"][step]["mean"] for step in steps]
        reached = None if target is None or not entry["complete"] else steps_to_reach(steps, mean_curve, target)
        entry["steps_to_target"] = reached
        entry["speedup"] = None if reached is None else steps[-1] / reached
        per_run = [] if target is None else [steps_to_reach(steps, fids, target) for fids in entry["curves"].values()]
        entry["steps_to_target_per_run"] = per_run
        entry["speedup_per_run"] = _spread([steps[-1] / s for s in per_run if s is not None])
    return summary


def _mean_std(spread: dict[str, Any], scale: float = 1.0) -> str:
    if spread["mean"] is None:
        return "not run yet"
    return f"{spread['mean'] * scale:.1f}" + ("" if spread["std"] is None else f" ± {spread['std'] * scale:.1f}")


def convergence_tables(summary: list[dict[str, Any]], steps: Sequence[int]) -> str:
    """FID and KID at every step (mean ± sd over runs), then steps to the baseline's final FID."""
    steps = sorted(steps)
    head = "| recipe | runs | " + " | ".join(f"step {step}" for step in steps) + " |"
    rule = "| --- | --- | " + " | ".join("---" for _ in steps) + " |"
    lines = ["FID (mean ± sd over training seeds where there are several):", "", head, rule]
    lines += [f"| {e['recipe']} | {e['complete']} | " + " | ".join(_mean_std(e["fid"][s]) for s in steps) + " |" for e in summary]
    lines += ["", "KID (full sets) x 10^3:", "", head, rule]
    lines += [f"| {e['recipe']} | {e['complete']} | " + " | ".join(_mean_std(e["kid"][s], 1e3) for s in steps) + " |"
              for e in summary]
    target = summary[0]["target"]
    lines += ["", f"Steps to reach the baseline's final FID ({'not measured yet' if target is None else f'{target:.2f}'} at step "
              f"{steps[-1]}), interpolated on the log-step axis; speed-up = {steps[-1]} / steps:", "",
              "| recipe | steps (mean curve) | speed-up (mean curve) | steps per run | speed-up per run (mean ± sd) |",
              "| --- | --- | --- | --- | --- |"]
    for e in summary:
        per_run = ", ".join("not reached" if s is None else f"{s:.0f}" for s in e["steps_to_target_per_run"]) or "-"
        reached = "not reached" if e["steps_to_target"] is None else f"{e['steps_to_target']:.0f}"
        speedup = "-" if e["speedup"] is None else f"{e['speedup']:.2f}x"
        spread = e["speedup_per_run"]
        per_run_speedup = "-" if spread["mean"] is None else (
            f"{spread['mean']:.2f}x" + ("" if spread["std"] is None else f" ± {spread['std']:.2f}")
            + ("" if len(spread["values"]) == len(e["steps_to_target_per_run"]) else
               f" ({len(e['steps_to_target_per_run']) - len(spread['values'])} not reached)"))
        lines.append(f"| {e['recipe']} | {reached if e['complete'] else 'not run yet'} | {speedup} | {per_run} | {per_run_speedup} |")
    return "\n".join(lines)


def grid_series(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[tuple[int, dict]]]:
    """(mode, shift) -> [(NFE, scores)] of the scored grid points, by NFE."""
    series: dict[tuple[str, float], list[tuple[int, dict]]] = {}
    for row in rows:
        sampler = row["point"].sampler
        if row["scores"] is not None:
            series.setdefault((sampler.mode, sampler.shift), []).append((int(sampler.nfe), row["scores"]))
    return {key: sorted(points, key=lambda pair: pair[0]) for key, points in sorted(series.items())}


def grid_table(rows: list[dict[str, Any]], target: float | None) -> str:
    """FID ± bootstrap sd per (sampler, shift) and NFE, and the NFE each needs to reach `target`."""
    series = grid_series(rows)
    nfes = sorted({nfe for points in series.values() for nfe, _ in points})
    lines = ["| sampler | time shift | " + " | ".join(f"NFE {n}" for n in nfes) + " | NFE to reach the converged FID |",
             "| --- | --- | " + " | ".join("---" for _ in nfes) + " | --- |"]
    for (mode, shift), points in series.items():
        by_nfe = dict(points)
        cells = [f"{by_nfe[n]['fid']:.2f} ± {by_nfe[n]['fid_std']:.2f}" if n in by_nfe else "-" for n in nfes]
        reached = None if target is None else steps_to_reach([n for n, _ in points], [s["fid"] for _, s in points], target)
        name = "ODE heun" if mode == "ode" else "SDE euler, w = 1"
        lines.append(f"| {name} | {shift:g}{' (off)' if shift == 1.0 else ''} | " + " | ".join(cells)
                     + f" | {'not reached' if reached is None else f'{reached:.0f}'} |")
    return "\n".join(lines)


def save_figure(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_convergence(summary: list[dict[str, Any]], steps: Sequence[int], floor: dict[str, float], out: Path, plt) -> Path:
    """FID and KID against training step (log axis): each recipe's mean, a band over its seeds, the floor."""
    steps = sorted(steps)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for axis, metric, scale, name in ((axes[0], "fid", 1.0, "FID"), (axes[1], "kid", 1e3, "KID (full sets) x 10^3")):
        for index, entry in enumerate(summary):
            if not entry["complete"]:
                continue
            mean = np.array([entry[metric][s]["mean"] for s in steps]) * scale
            axis.plot(steps, mean, marker="o", color=f"C{index}", label=f"{entry['recipe']} ({entry['complete']} run(s))")
            if entry["complete"] > 1:  # the band: lowest to highest seed
                values = np.array([entry[metric][s]["values"] for s in steps]) * scale  # (steps, runs)
                axis.fill_between(steps, values.min(1), values.max(1), color=f"C{index}", alpha=0.2)
        axis.axhline(floor[metric] * scale, color="gray", linestyle="--", label="real vs real")
        axis.set(xscale="log", xlabel="training step", ylabel=name, title=f"{name} against training step")
        if metric == "fid":  # FID spans several-fold; its late gaps show on a log axis (KID may be <= 0)
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.set_xticks(steps, [str(s) for s in steps])
        axis.xaxis.set_minor_formatter(NullFormatter())  # the measured steps only, no 3x10^2
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(plt, figure, out / "fid-vs-step.png")


def plot_grid(rows: list[dict[str, Any]], floor: dict[str, float], out: Path, plt) -> Path:
    """FID against NFE on the converged baseline, one line per sampler and time shift."""
    figure, axis = plt.subplots(figsize=(6, 4), dpi=110)
    for (mode, shift), points in grid_series(rows).items():
        axis.errorbar([n for n, _ in points], [s["fid"] for _, s in points], yerr=[s["fid_std"] for _, s in points],
                      marker="o" if mode == "sde" else "s", linestyle="-" if mode == "sde" else "--", capsize=3,
                      label=f"{'SDE euler' if mode == 'sde' else 'ODE heun'}, shift {shift:g}")
    axis.axhline(floor["fid"], color="gray", linestyle="--", label="real vs real")
    axis.set(xscale="log", xlabel="network evaluations per image (NFE)", ylabel="FID", title="sampling grids, converged baseline")
    nfes = sorted({n for points in grid_series(rows).values() for n, _ in points})
    axis.set_xticks(nfes, [str(n) for n in nfes])
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return save_figure(plt, figure, out / "fid-vs-nfe-shift.png")


def plot_training(config: StudyConfig, out: Path, plt) -> Path:
    """The convergence runs' training losses against step: the velocity loss of the uniform-t
    linear-velocity runs (one objective under one time distribution, so comparable; logit-normal t
    weights the same loss otherwise) and REPA's alignment, as the mean cosine it reaches."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    labels = [label for label, _, _ in CONVERGENCE_RECIPES]
    drawn: set[str] = set()
    for label, spec in convergence_runs(config):
        log = metrics_path(out / "runs" / spec.name)
        rows = [r for r in read_metrics(log) if "loss" in r] if log.is_file() else []
        if not rows:
            continue
        color, legend = f"C{labels.index(label)}", None if label in drawn else label
        drawn.add(label)
        if spec.interp == "linear" and spec.pred == "velocity" and spec.time_dist == "uniform":  # the same loss
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, alpha=0.7, label=legend)
        aligned = [r for r in rows if "align_loss" in r]
        if aligned:
            axes[1].plot([r["step"] for r in aligned], [-r["align_loss"] for r in aligned], color=color, alpha=0.7, label=legend)
    axes[0].set(xlabel="training step", ylabel="velocity loss", yscale="log", title="velocity loss (linear, uniform t)")
    axes[1].set(xlabel="training step", ylabel="mean cosine(projected block, encoder)", title="REPA alignment")
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return save_figure(plt, figure, out / "convergence-training.png")


def convergence_section(config: StudyConfig, rows: list[dict[str, Any]], grid_rows: list[dict[str, Any]],
                        floor: dict[str, float], out: Path, plt) -> tuple[list[str], list[Path]]:
    """REPORT.md's convergence lines and its two plots."""
    summary = summarise(rows, config.convergence_steps)
    plots = [plot_convergence(summary, config.convergence_steps, floor, out, plt), plot_grid(grid_rows, floor, out, plt),
             plot_training(config, out, plt)]
    baseline_final = next((row["scores"] for row in grid_rows if row["point"].sampler.shift == 1.0 and row["scores"]
                           and row["point"].sampler.mode == "sde" and row["point"].sampler.steps == config.sde_steps), None)
    lines = [convergence_tables(summary, config.convergence_steps), "",
             f"### Sampling grids on the baseline at step {max(config.convergence_steps)} (FID ± bootstrap sd)", "",
             grid_table(grid_rows, None if baseline_final is None else baseline_final["fid"]), ""]
    return lines, plots
