"""What a study point is: a trained model (ModelSpec) sampled one way (SamplerSpec), the lists of
points each ablation walks, and where a point's results live."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sitctl.artifacts import is_finished
from sitctl.configs import StudyConfig

FEATURES_FILE = "features.npy"


SCORES_FILE = "scores.json"


TIMINGS_FILE = "timings.jsonl"


BEST_FILE = "best-model.json"


SETTINGS_FILE = "study-settings.json"


@dataclass(frozen=True)
class ModelSpec:
    """One training objective; `name` is its run folder."""

    name: str
    interp: str
    pred: str
    loss_weight: str = "none"
    discrete_steps: int | None = None
    seed: int | None = None  # training seed; None: the study's --seed
    precision: str = "fp32"  # training precision (bf16: autocast, as CUDA's default)
    time_dist: str = "uniform"  # training time distribution (convergence: logit-normal)
    repa: bool = False  # align block --repa-depth with the study's own encoder (convergence)
    steps: int | None = None  # run length; None: --train-steps (convergence: its longest step)


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler setting; `name` is its samples folder."""

    name: str
    mode: str
    method: str
    steps: int
    w: float = 1.0
    diffusion: str = "sigma"
    cfg_scale: float = 1.0
    seed: int | None = None  # sample seed; None: the study's --seed
    shift: float = 1.0  # time shift of the fixed-step grid (1: evenly spaced)

    @property
    def base(self) -> str:
        """The name without its sample seed."""
        return self.name if self.seed is None else self.name.rsplit("-seed", 1)[0]

    @property
    def nfe(self) -> str:
        """Network evaluations per image (dopri5 adapts; guidance doubles the batch, not the count)."""
        return "adaptive" if self.method == "dopri5" else str(self.steps * (2 if self.method == "heun" else 1))


@dataclass(frozen=True, kw_only=True)
class ScoreSettings:
    """What a point's scores (and the floor's) are made with: the metrics artifact's config."""

    bootstrap: int
    """Bootstrap resamples of the generated features."""
    seed: int
    """Seed of the resampling."""
    reference: str
    """Content id of the reference scored against."""


@dataclass(frozen=True)
class Point:
    ablation: str
    label: str  # the row's name in its table
    model: ModelSpec
    sampler: SamplerSpec
    step: int | None = None  # the checkpoint sampled; None: the run's last


def model_spec(interp: str, pred: str, loss_weight: str = "none", discrete_steps: int | None = None,
               seed: int | None = None, precision: str = "fp32") -> ModelSpec:
    name = f"{interp}-{pred}" + ("" if loss_weight == "none" else f"-{loss_weight}") + (
        "" if discrete_steps is None else f"-discrete{discrete_steps}") + ("" if seed is None else f"-seed{seed}") + (
        "" if precision == "fp32" else f"-{precision}")
    return ModelSpec(name, interp, pred, loss_weight, discrete_steps, seed, precision)


def ode(config: StudyConfig, method: str = "heun", steps: int | None = None, shift: float = 1.0) -> SamplerSpec:
    steps = steps or config.ode_steps
    return SamplerSpec(f"ode-{method}-{steps}" + _shifted(shift), "ode", method, steps, shift=shift)


def sde(config: StudyConfig, *, w: float = 1.0, diffusion: str = "sigma", cfg: float = 1.0, steps: int | None = None,
        shift: float = 1.0) -> SamplerSpec:
    steps = steps or config.sde_steps
    return SamplerSpec(f"sde-euler-{steps}-{diffusion}-w{w:g}-cfg{cfg:g}" + _shifted(shift), "sde", "euler", steps, w,
                       diffusion, cfg, shift=shift)


def _shifted(shift: float) -> str:
    return "" if shift == 1.0 else f"-shift{shift:g}"


def path_points(config: StudyConfig) -> list[Point]:
    """The paper's Table 1 walk from DiT to SiT; each row changes one thing (1000 steps: DDPM's grid)."""
    rows = [
        ("DiT-style: vp, discrete t, noise (ODE)", model_spec("vp", "noise", discrete_steps=1000), ode(config)),
        ("+ continuous t", model_spec("vp", "noise"), ode(config)),
        ("+ velocity prediction", model_spec("vp", "velocity"), ode(config)),
        ("+ linear interpolant", model_spec("linear", "velocity"), ode(config)),
        ("+ SDE sampling (w = 1, sigma)", model_spec("linear", "velocity"), sde(config)),
    ]
    return [Point("path", label, model, sampler) for label, model, sampler in rows]


def objective_points(config: StudyConfig) -> list[Point]:
    """Interpolant x prediction with one ODE; score's likelihood weighting (paper Sec. 3.2) last."""
    grid = [model_spec(i, p) for i in ("linear", "gvp", "vp") for p in ("velocity", "score", "noise")]
    grid += [model_spec(i, "score", "likelihood") for i in ("linear", "gvp", "vp")]
    return [Point("objective", f"{m.interp}, {m.pred}" + (f" ({m.loss_weight} weight)" if m.loss_weight != "none" else ""), m, ode(config))
            for m in grid]


def sampler_points(config: StudyConfig, best: ModelSpec) -> list[Point]:
    """ODE vs SDE, w, diffusion forms, guidance and steps, all on one model."""
    samplers = [ode(config), ode(config, "dopri5")]
    samplers += [sde(config, w=w) for w in config.w_values]
    samplers += [sde(config, diffusion=form) for form in config.diffusions]
    samplers += [sde(config, cfg=cfg) for cfg in config.cfg_values]
    samplers += [sde(config, steps=steps) for steps in config.sde_step_values]
    samplers += [ode(config, steps=steps) for steps in config.ode_step_values]
    unique = list(dict.fromkeys(samplers))  # shared settings (w = 1, sigma, cfg 1, ...) run once
    return [Point("sampler", s.name, best, s) for s in unique]


SEED_MODELS = (("linear", "velocity"), ("gvp", "velocity"), ("vp", "velocity"))


def seed_points(config: StudyConfig) -> list[Point]:
    """The interpolant ordering (ODE) and the SDE's gain on linear, retrained with every training seed.

    The --seed model of each is ablation 2's own run (reused); each of --train-seeds trains it again.
    Last, linear velocity trained under bf16 autocast (the CUDA default), to hold against that spread.
    """
    points = []
    for seed in (config.seed, *config.train_seeds):
        for interp, pred in SEED_MODELS:
            spec = model_spec(interp, pred, seed=None if seed == config.seed else seed)
            points.append(Point("seeds", f"{interp}, {pred}, seed {seed}", spec, ode(config)))
            if interp == "linear":
                points.append(Point("seeds", f"{interp}, {pred}, seed {seed}", spec, sde(config)))
    bf16 = model_spec("linear", "velocity", precision="bf16")
    points += [Point("seeds", f"linear, velocity, seed {config.seed}, bf16", bf16, sampler) for sampler in (ode(config), sde(config))]
    linear = model_spec("linear", "velocity")
    for seed in config.sample_seeds:  # the same model, other noise and labels: the spread the bootstrap stands for
        for sampler in (ode(config), sde(config)):
            points.append(Point("seeds", f"linear, velocity, seed {config.seed}, sample seed {seed}", linear,
                                replace(sampler, name=f"{sampler.name}-seed{seed}", seed=seed)))
    return points


def convergence_spec(interp: str = "linear", pred: str = "velocity", *, time_dist: str = "uniform", repa: bool = False,
                     discrete_steps: int | None = None, seed: int | None = None, steps: int) -> ModelSpec:
    """A convergence run: its own folder (conv-...), trained to `steps` with the checkpoints kept."""
    base = model_spec(interp, pred, discrete_steps=discrete_steps)
    name = "conv-" + base.name + ("-logit-normal" if time_dist != "uniform" else "") + ("-repa" if repa else "") + (
        "" if seed is None else f"-seed{seed}")
    return replace(base, name=name, seed=seed, time_dist=time_dist, repa=repa, steps=steps)


# The convergence recipes, one change at a time from SiT; the flagged ones are trained with every training seed.
CONVERGENCE_RECIPES = (
    ("SiT (linear, velocity, uniform t)", dict(), True),
    ("+ REPA", dict(repa=True), True),
    ("+ logit-normal t", dict(time_dist="logit-normal"), False),
    ("+ REPA + logit-normal t", dict(repa=True, time_dist="logit-normal"), False),
    ("DiT-style (vp, discrete t, noise)", dict(interp="vp", pred="noise", discrete_steps=1000), False),
)


def convergence_runs(config: StudyConfig) -> list[tuple[str, ModelSpec]]:
    """(recipe, run) of every convergence run: each recipe with --seed first, then the seeded ones again
    with each of --train-seeds, so a sitting that ends early has one curve of every recipe."""
    steps = max(config.convergence_steps)
    runs = [(label, convergence_spec(**kwargs, steps=steps)) for label, kwargs, _ in CONVERGENCE_RECIPES]
    for seed in config.train_seeds:
        runs += [(label, convergence_spec(**kwargs, seed=seed, steps=steps)) for label, kwargs, seeded in CONVERGENCE_RECIPES if seeded]
    return runs


def convergence_points(config: StudyConfig) -> list[Point]:
    """FID against training step: every run's kept checkpoint at each of --convergence-steps, one SDE."""
    return [Point("convergence", label, spec, sde(config), step=step)
            for label, spec in convergence_runs(config) for step in sorted(config.convergence_steps)]


def grid_points(config: StudyConfig) -> list[Point]:
    """Sampling grids on the baseline's last checkpoint: ODE heun and SDE euler against NFE, for each time shift."""
    baseline = convergence_runs(config)[0][1]
    samplers = [sampler(config, steps=steps, shift=shift) for shift in config.shift_values
                for sampler, values in ((ode, config.grid_ode_steps), (sde, config.grid_sde_steps)) for steps in values]
    return [Point("grid", s.name, baseline, s, step=baseline.steps) for s in samplers]


def point_dir(out: Path, point: Point) -> Path:
    model = out / "points" / point.model.name
    return (model if point.step is None else model / f"step-{point.step:07d}") / point.sampler.name


def is_scored(out: Path, point: Point) -> bool:
    return is_finished(point_dir(out, point).with_name(point.sampler.name + "-scores"))


def collect(config: StudyConfig, out: Path, points: list[Point]) -> list[dict[str, Any]]:
    """Each point with its scores (None while not scored)."""
    rows = []
    for point in points:
        scores_file = point_dir(out, point).with_name(point.sampler.name + "-scores") / SCORES_FILE
        scores = json.loads(scores_file.read_text()) if scores_file.is_file() else None
        rows.append({"point": point, "scores": scores})
    return rows


def best_model(config: StudyConfig, out: Path) -> ModelSpec | None:
    """The objective grid's lowest-FID model, fixed in best-model.json once the grid is scored."""
    saved = out / BEST_FILE
    if saved.is_file():
        return ModelSpec(**json.loads(saved.read_text()))
    if "objective" not in config.ablations:
        return model_spec("linear", "velocity")  # the paper's choice
    rows = collect(config, out, objective_points(config))
    if any(row["scores"] is None for row in rows):
        return None
    best = min(rows, key=lambda row: row["scores"]["fid"])["point"].model
    saved.write_text(json.dumps(asdict(best)) + "\n")
    return best
