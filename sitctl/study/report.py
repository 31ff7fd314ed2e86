"""The study's report: REPORT.md (one table per ablation, the floor beside each) and its plots.

KID in these tables is `kid_full_sets` (sitctl/evaluate/bootstrap.py): one unbiased estimate over
the full sets, not the subset mean `sitctl eval kid` reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import ScalarFormatter

from sitctl.artifacts import is_finished, open_artifact
from sitctl.configs import StudyConfig
from sitctl.errors import SitctlError
from sitctl.evaluate.bootstrap import bootstrap_scores, reference_arrays
from sitctl.identity import same_settings, settings_of
from sitctl.metrics_log import metrics_path
from sitctl.plots import read_metrics
from sitctl.study.convergence import convergence_section
from sitctl.study.encoder import read_quality
from sitctl.study.points import (
    ScoreSettings,
    best_model,
    collect,
    convergence_points,
    grid_points,
    model_spec,
    objective_points,
    path_points,
    sampler_points,
    seed_points,
)

TITLES = {
    "path": "Ablation 1: from DiT to SiT",
    "objective": "Ablation 2: interpolant x prediction (ODE heun)",
    "sampler": "Ablation 3: samplers on the best model",
    "seeds": "Seeds: the interpolant ordering and the SDE's gain, retrained and redrawn",
    "convergence": "Convergence: FID against training step, one change at a time from SiT",
}


def cached_floor(config: StudyConfig, out: Path) -> dict[str, float]:
    """The floor's scores, computed once per (score settings, floor): scored as a point is."""
    ref, floor = open_artifact(out / "reference", "reference"), open_artifact(out / "floor", "reference")
    settings = ScoreSettings(bootstrap=config.bootstrap, seed=config.seed, reference=ref.id)
    saved = out / "floor-scores.json"
    cached = json.loads(saved.read_text()) if saved.is_file() else None
    if cached is not None and same_settings(cached["key"], settings) and cached["key"].get("floor") == floor.id:
        return cached["scores"]
    # Real-vs-real: the floor's n real training images scored exactly as a point.
    features, _, _ = reference_arrays(floor)
    scores = bootstrap_scores(features, *reference_arrays(ref), resamples=config.bootstrap, seed=config.seed)
    saved.write_text(json.dumps({"key": {**settings_of(settings), "floor": floor.id}, "scores": scores}, indent=2) + "\n")
    return scores


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FID and KID of every scored seed (`fid_values`), their mean (`fid`, None before any) and sample
    std (`fid_std`, None below two seeds), per group of points that differ by one seed.

    Training-seed groups: one (model without its seed, sampler), over --seed and --train-seeds.
    Sample-seed groups: one (model, sampler without its seed), over --seed and --sample-seeds.
    The --seed point of a model belongs to both.
    """
    sample_bases = {(row["point"].model.name, row["point"].sampler.base) for row in rows if row["point"].sampler.seed is not None}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        model, sampler = row["point"].model, row["point"].sampler
        keys = []
        if sampler.seed is None:
            base = model_spec(model.interp, model.pred, model.loss_weight, model.discrete_steps, precision=model.precision)
            keys.append((base.name, sampler.name, "training"))
        if (model.name, sampler.base) in sample_bases:
            keys.append((model.name, sampler.base, "sample"))
        for key in keys:
            groups.setdefault(key, [])
            if row["scores"] is not None:
                groups[key].append(row["scores"])
    summary = []
    for (model, sampler, varied), scores in groups.items():
        entry: dict[str, Any] = {"model": model, "sampler": sampler, "varied": varied, "seeds": len(scores)}
        for name in ("fid", "kid"):
            values = np.array([s[name] for s in scores])
            entry[name + "_values"] = [float(v) for v in values]
            entry[name] = float(values.mean()) if len(values) else None
            entry[name + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        summary.append(entry)
    return summary


def _cell(scores: dict | None, name: str, scale: float = 1.0) -> str:
    """"value ± std", the value alone when there is no std, or "not run yet"."""
    if scores is None or scores[name] is None:
        return "not run yet"
    std = scores.get(name + "_std")
    return f"{scores[name] * scale:.2f}" + ("" if std is None else f" ± {std * scale:.2f}")


def floor_line(floor: dict[str, float]) -> str:
    return (f"Real-vs-real floor at n = {floor['num_generated']} (real training images vs the same "
            f"{floor['num_reference']} reference images): FID {_cell(floor, 'fid')}, KID (full sets) x 10^3 {_cell(floor, 'kid', 1e3)}.")


def markdown_table(rows: list[dict[str, Any]], floor: dict[str, float]) -> str:
    lines = [floor_line(floor), "", "| row | model (run) | sampler | NFE | FID | KID (full sets) x 10^3 |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        point, scores = row["point"], row["scores"]
        lines.append(f"| {point.label} | {point.model.name} | {point.sampler.name} | {point.sampler.nfe} "
                     f"| {_cell(scores, 'fid')} | {_cell(scores, 'kid', 1e3)} |")
    return "\n".join(lines)


def seed_table(summary: list[dict[str, Any]]) -> str:
    """Mean ± sample std over training seeds (the spread a retrained model shows) or sample seeds (a redrawn one)."""
    lines = ["Mean ± standard deviation over the seeds of each group (each point's own scores below).", "",
             "| model | sampler | seed varied | seeds scored | FID | KID (full sets) x 10^3 |", "| --- | --- | --- | --- | --- | --- |"]
    for entry in summary:
        lines.append(f"| {entry['model']} | {entry['sampler']} | {entry['varied']} | {entry['seeds']} "
                     f"| {_cell(entry, 'fid')} | {_cell(entry, 'kid', 1e3)} |")
    return "\n".join(lines)


def encoder_line(out: Path) -> str:
    """The REPA encoder's own quality (sitctl/study/encoder.py)."""
    quality = read_quality(out)
    if quality is None:
        return "REPA's encoder: not trained yet."
    arch = quality["architecture"]
    return (f"REPA's encoder (trained here, supervised): a ViT of width {arch['embed_dim']}, depth {arch['depth']}, "
            f"{arch['patch_size']}-px patches ({quality['parameters'] / 1e6:.2f}M parameters), {quality['epochs']} epochs on "
            f"{quality['train_images']} images: test accuracy {quality['test_accuracy']:.1%} on {quality['test_images']} "
            f"reference-split images (train {quality['train_accuracy']:.1%}), {quality['seconds']:.0f} s.")


def write_report(config: StudyConfig, out: Path) -> dict[str, Any]:
    """REPORT.md (one table per ablation, floor beside each) and the plots, from finished points."""
    if not is_finished(out / "reference") or not is_finished(out / "floor"):
        raise SitctlError(f"{out} has no finished reference and floor yet; run the study first")
    floor = cached_floor(config, out)
    sections = [f"# Study report ({config.model}, {config.image_size}px, {config.train_steps} steps, n = {config.num_samples})", ""]
    plots: list[Path] = []
    for ablation in config.ablations:
        if ablation == "sampler":
            best = best_model(config, out)
            if best is None:
                sections += [f"## {TITLES[ablation]}", "", "Waits for the objective grid to finish (it picks the model).", ""]
                continue
            rows = collect(config, out, sampler_points(config, best))
            plots += plot_sampler(rows, floor, out, config)
            sections += [f"## {TITLES[ablation]} (model: {best.name})", ""]
        elif ablation == "seeds":
            rows = collect(config, out, seed_points(config))
            sections += [f"## {TITLES[ablation]}", "", seed_table(seed_summary(rows)), ""]
        elif ablation == "convergence":
            lines, drawn = convergence_section(config, collect(config, out, convergence_points(config)),
                                               collect(config, out, grid_points(config)), floor, out, _pyplot())
            sections += [f"## {TITLES[ablation]}", "", encoder_line(out), "", floor_line(floor), "", *lines]
            plots += drawn
            continue
        else:
            rows = collect(config, out, path_points(config) if ablation == "path" else objective_points(config))
            sections += [f"## {TITLES[ablation]}", ""]
        sections += [markdown_table(rows, floor), ""]
    plots.append(plot_loss_curves(config, out))
    sections += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    (out / "REPORT.md").write_text("\n".join(sections))
    return {"report": str(out / "REPORT.md"), "plots": [str(p) for p in plots], "floor": floor}


def _pyplot():
    matplotlib.use("Agg")  # files only

    return plt


def _metric_axes(plt, title: str, xlabel: str):
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for axis, (name, unit) in zip(axes, (("FID", 1.0), ("KID (full sets) x 10^3", 1e3))):
        axis.set(xlabel=xlabel, ylabel=name, title=title)
        axis.grid(alpha=0.3)
    return figure, axes


def _draw(axes, points: list[tuple[float, dict]], label: str, marker: str = "o") -> None:
    """Errorbar lines of FID and KID (bootstrap std) on the two axes."""
    if not points:
        return
    for axis, name, scale in ((axes[0], "fid", 1.0), (axes[1], "kid", 1e3)):
        axis.errorbar([x for x, _ in points], [s[name] * scale for _, s in points],
                      yerr=[s[name + "_std"] * scale for _, s in points], marker=marker, capsize=3, label=label)


def _floor_band(axes, floor: dict[str, float]) -> None:
    for axis, name, scale in ((axes[0], "fid", 1.0), (axes[1], "kid", 1e3)):
        axis.axhline(floor[name] * scale, color="gray", linestyle="--", label="real vs real")
        axis.legend(fontsize=7)


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def sampler_series(rows: list[dict[str, Any]], config: StudyConfig) -> dict[str, list[tuple[float, dict]]]:
    """The sampler ablation's curves as (x, scores) pairs of scored points, sorted by x.

    "w": SDE euler at sde_steps, sigma form, no guidance, against w; "ode_at_equal_nfe": the ODE
    heun point whose NFE equals sde_steps (a horizontal line on the w plot); "cfg": SDE w = 1
    against the guidance scale; "sde_steps" and "ode_steps": SDE w = 1 and ODE heun against NFE.
    """
    scored = [(row["point"].sampler, row["scores"]) for row in rows if row["scores"] is not None]
    sde_sigma = [(s, scores) for s, scores in scored if s.mode == "sde" and s.diffusion == "sigma"]
    heun = [(s, scores) for s, scores in scored if s.mode == "ode" and s.method == "heun"]
    series = {
        "w": [(s.w, scores) for s, scores in sde_sigma if s.cfg_scale == 1.0 and s.steps == config.sde_steps],
        "ode_at_equal_nfe": [(0.0, scores) for s, scores in heun if s.nfe == str(config.sde_steps)],
        "cfg": [(s.cfg_scale, scores) for s, scores in sde_sigma if s.w == 1.0 and s.steps == config.sde_steps],
        "sde_steps": [(float(s.nfe), scores) for s, scores in sde_sigma if s.w == 1.0 and s.cfg_scale == 1.0],
        "ode_steps": [(float(s.nfe), scores) for s, scores in heun],
    }
    return {name: sorted(points, key=lambda pair: pair[0]) for name, points in series.items()}


def plot_sampler(rows: list[dict[str, Any]], floor: dict[str, float], out: Path, config: StudyConfig) -> list[Path]:
    """Metric vs w (SDE, sigma form), vs guidance scale, and vs NFE (SDE euler and ODE heun)."""
    plt = _pyplot()
    series = sampler_series(rows, config)
    paths = []
    figure, axes = _metric_axes(plt, "SDE euler, w_t = w sigma_t", "w")
    _draw(axes, series["w"], f"SDE euler, NFE {config.sde_steps}")
    for _, scores in series["ode_at_equal_nfe"]:
        for axis, name, scale in ((axes[0], "fid", 1.0), (axes[1], "kid", 1e3)):
            axis.axhline(scores[name] * scale, color="C1", label=f"ODE heun, NFE {config.sde_steps}")
    _floor_band(axes, floor)
    paths.append(_save(plt, figure, out / "metric-vs-w.png"))
    figure, axes = _metric_axes(plt, f"guidance (SDE euler, w = 1, NFE {config.sde_steps})", "guidance scale")
    _draw(axes, series["cfg"], "SDE euler")
    _floor_band(axes, floor)
    paths.append(_save(plt, figure, out / "metric-vs-cfg.png"))
    figure, axes = _metric_axes(plt, "sampling steps", "network evaluations per image (NFE)")
    _draw(axes, series["sde_steps"], "SDE euler, w = 1")
    _draw(axes, series["ode_steps"], "ODE heun")

    for axis in axes:
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ScalarFormatter())  # NFE as plain numbers, not 10^x
    _floor_band(axes, floor)
    paths.append(_save(plt, figure, out / "metric-vs-steps.png"))
    return paths


def plot_loss_curves(config: StudyConfig, out: Path) -> Path:
    """Training loss against step, one panel per interpolant, one line per objective run (and linear's bf16 run)."""
    plt = _pyplot()
    interps = ("linear", "gvp", "vp")
    figure, axes = plt.subplots(1, len(interps), figsize=(13, 3.6), dpi=110, sharex=True)
    specs = {p.model for p in path_points(config) + objective_points(config)} | {model_spec("linear", "velocity", precision="bf16")}
    for axis, interp in zip(axes, interps):
        for spec in sorted((s for s in specs if s.interp == interp), key=lambda s: s.name):
            log = metrics_path(out / "runs" / spec.name)
            rows = [r for r in read_metrics(log) if "loss" in r] if log.is_file() else []
            if rows:
                axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=spec.name)
        axis.set(title=f"{interp} interpolant", xlabel="step", ylabel="training loss (own objective)", yscale="log")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return _save(plt, figure, out / "loss-curves.png")
