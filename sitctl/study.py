"""`just study`: the SiT paper's ablations at small scale on Fashion-MNIST, one choice at a time.

Three ablations, each a list of points; a point is a trained model (a run of the train stage)
sampled with one sampler setting (a samples artifact) and scored (a metrics artifact that keeps
the Inception features, so a bootstrap costs no extra forward pass):

    path       DiT -> SiT as the paper's Table 1 walks it: vp + discrete t + noise, then
               continuous t, velocity, the linear interpolant, and finally SDE sampling.
    objective  interpolant (linear, gvp, vp) x prediction (velocity, score, noise), all sampled
               with the same ODE; score is also trained with the likelihood weighting.
    sampler    on the best objective model: ODE heun / dopri5, SDE euler over w and over the
               diffusion forms, the guidance scale, and the number of steps.
    seeds      linear, gvp and vp with velocity (ODE), and linear with the SDE, trained again
               with other seeds: the spread of a score from one training run to the next;
               linear velocity sampled again with other sample seeds (the spread the bootstrap
               stands for); and linear velocity trained under bf16 autocast.

Every stage is the one the CLI runs (encode, train, eval ref, sample); only the scoring is done
here, because the eval stage does not keep features. A finished artifact is reused and an
unfinished training run resumes, so the study runs in as many sittings as it takes
(`--max-minutes` ends a sitting between points). The report (tables and plots) is rewritten
from whatever has finished after every point.

Every number has a spread: FID and KID are bootstrapped over the generated features (the
reference is fixed), the seeds table adds the spread over training seeds and over sample seeds,
and every table states the real-vs-real floor: the same scores for n real training images
against the same reference. All other points draw the same noise and labels (one sample seed),
so differences between them are not sampling noise of the seed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sitctl.configs import StudyConfig
from sitctl.artifacts import Artifact, begin_artifact, finish_artifact, open_artifact
from sitctl.errors import SitctlError
from sitctl.signals import Interrupted, StopRequest, stop_on_signals
from sitctl.evaluate.metrics import Gaussian, feature_statistics, frechet_distance

FEATURES_FILE = "features.npy"
SCORES_FILE = "scores.json"
TIMINGS_FILE = "timings.jsonl"
BEST_FILE = "best-model.json"
SETTINGS_FILE = "study-settings.json"
# Settings every artifact in OUT was made with; a rerun into the same OUT must keep them, or
# it would reuse points made under other settings (the lists of values swept may grow freely).
FIXED_SETTINGS = ("train_source", "reference_source", "image_size", "train_images", "reference_images", "model",
                  "train_steps", "global_batch", "lr", "ema_decay", "num_samples", "ode_steps", "sde_steps",
                  "bootstrap", "seed")


# =============================================================================================
# The points
# =============================================================================================


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

    @property
    def base(self) -> str:
        """The name without its sample seed."""
        return self.name if self.seed is None else self.name.rsplit("-seed", 1)[0]

    @property
    def nfe(self) -> str:
        """Network evaluations per image (dopri5 adapts; guidance doubles the batch, not the count)."""
        return "adaptive" if self.method == "dopri5" else str(self.steps * (2 if self.method == "heun" else 1))


@dataclass(frozen=True)
class Point:
    ablation: str
    label: str  # the row's name in its table
    model: ModelSpec
    sampler: SamplerSpec


def model_spec(interp: str, pred: str, loss_weight: str = "none", discrete_steps: int | None = None,
               seed: int | None = None, precision: str = "fp32") -> ModelSpec:
    name = f"{interp}-{pred}" + ("" if loss_weight == "none" else f"-{loss_weight}") + (
        "" if discrete_steps is None else f"-discrete{discrete_steps}") + ("" if seed is None else f"-seed{seed}") + (
        "" if precision == "fp32" else f"-{precision}")
    return ModelSpec(name, interp, pred, loss_weight, discrete_steps, seed, precision)


def ode(config: StudyConfig, method: str = "heun", steps: int | None = None) -> SamplerSpec:
    steps = steps or config.ode_steps
    return SamplerSpec(f"ode-{method}-{steps}", "ode", method, steps)


def sde(config: StudyConfig, *, w: float = 1.0, diffusion: str = "sigma", cfg: float = 1.0, steps: int | None = None) -> SamplerSpec:
    steps = steps or config.sde_steps
    return SamplerSpec(f"sde-euler-{steps}-{diffusion}-w{w:g}-cfg{cfg:g}", "sde", "euler", steps, w, diffusion, cfg)


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


# =============================================================================================
# Stages (each reuses its finished artifact)
# =============================================================================================


def _reuse(path: Path, kind: str) -> Artifact | None:
    return open_artifact(path, kind) if (path / "manifest.json").is_file() else None


def _timed(out: Path, what: str, make):
    """Run make(); append its wall time to timings.jsonl (the docs' per-part durations)."""
    start = time.perf_counter()
    result = make()
    record = {"what": what, "seconds": round(time.perf_counter() - start, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(out / TIMINGS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return result


def encode_train_images(config: StudyConfig, out: Path) -> Artifact:
    from sitctl.encode import EncodeConfig, encode

    path = out / "latents"
    return _reuse(path, "latents") or _timed(out, "encode", lambda: encode(EncodeConfig(
        src=config.train_source, out=str(path), image_size=config.image_size, vae="none", limit=config.train_images,
        shard_size=5000, batch_size=256, workers=0, device=config.device)))


def reference(config: StudyConfig, out: Path, name: str, source: str, count: int) -> Artifact:
    """A reference artifact (images + Inception features) of the first `count` images of `source`."""
    from sitctl.evaluate.reference import ReferenceConfig, build_reference

    path = out / name
    return _reuse(path, "reference") or _timed(out, name, lambda: build_reference(ReferenceConfig(
        source=source, out=str(path), image_size=config.image_size, max_images=count, device=config.device)))


def train_model(config: StudyConfig, out: Path, latents: Artifact, spec: ModelSpec) -> Artifact:
    """The run's checkpoint at train_steps; an interrupted run resumes from its last checkpoint."""
    from sitctl.checkpoint import list_checkpoints
    from sitctl.train import TrainConfig, train

    run = out / "runs" / spec.name
    found = list_checkpoints(run)
    if found and found[-1][0] >= config.train_steps:
        return open_artifact(found[-1][1], "checkpoint")
    settings = TrainConfig(
        latents=str(latents.path), out=str(run), model=config.model, interp=spec.interp, pred=spec.pred,
        loss_weight=spec.loss_weight, discrete_steps=spec.discrete_steps, steps=config.train_steps,
        global_batch=config.global_batch, lr=config.lr, ema_decay=config.ema_decay, flip=False, precision=spec.precision,
        seed=config.seed if spec.seed is None else spec.seed, data_lanes=4, shuffle_buffer=2000, loader_workers=0,
        ckpt_every=max(1, min(500, config.train_steps)), keep_last=1, log_every=max(1, min(50, config.train_steps)),
        preview_every=0, resume=bool(found), device=config.device,
    )
    try:
        return _timed(out, f"train {spec.name}", lambda: train(settings))
    except Interrupted as stopped:  # the sitting ends; rerun as it is, the study resumes the run itself
        raise Interrupted(stopped.signum, f"while training {spec.name} {stopped.done}", quiet=stopped.quiet) from None


def sample_point(config: StudyConfig, out: Path, checkpoint: Artifact, point: Point) -> Artifact:
    from sitctl.sample import SampleConfig, sample_stage

    path = out / "points" / point.model.name / point.sampler.name
    s = point.sampler
    return _reuse(path, "samples") or _timed(out, f"sample {point.model.name} {s.name}", lambda: sample_stage(SampleConfig(
        checkpoint=str(checkpoint.path), out=str(path), mode=s.mode, method=s.method, steps=s.steps, w=s.w,
        diffusion=s.diffusion, cfg_scale=s.cfg_scale, num=config.num_samples, batch_size=config.sample_batch,
        seed=config.seed if s.seed is None else s.seed, preview=64, device=config.device)))


# =============================================================================================
# Scores: FID and KID with a bootstrap over cached features
# =============================================================================================


def frechet_distance_low_rank(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of (n, d) features against N(mu, sigma), exact, in O(n^2 d + n d^2) instead of O(d^3).

    With A = (X - mean) / sqrt(n - 1) the sample covariance is A^T A, and the nonzero
    eigenvalues of A^T A sigma equal those of the symmetric PSD n x n matrix A sigma A^T,
    so tr sqrt(S sigma) is a sum over n eigenvalues: cheap enough to bootstrap when n << d = 2048.
    With n > d the d x d form (torch-fidelity's) is the cheaper one and is used instead.
    """
    features = np.asarray(features, np.float64)
    if len(features) > features.shape[1]:
        return float(frechet_distance(feature_statistics(features), Gaussian(mu=mu, sigma=sigma)))
    mean = features.mean(axis=0)
    centred = (features - mean) / np.sqrt(len(features) - 1)  # (n, d)
    eigenvalues = np.linalg.eigvalsh(centred @ sigma @ centred.T)  # (n,)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return float(np.sum((mean - mu) ** 2) + np.sum(centred**2) + np.trace(sigma) - 2.0 * trace_sqrt)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel (Binkowski et al. 2018): (x . y / d + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd_unbiased(k_xx: np.ndarray, k_yy_mean: float, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from the kernel blocks (diagonal of k_xx left out); k_yy_mean is already off-diagonal."""
    n = len(k_xx)
    return float((k_xx.sum() - np.trace(k_xx)) / (n * (n - 1)) + k_yy_mean - 2.0 * k_xy.mean())


def bootstrap_scores(generated: np.ndarray, real: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
                     *, resamples: int, seed: int) -> dict[str, float]:
    """FID and KID (full sets, unbiased MMD^2) of `generated` vs the reference, each with the
    standard deviation over `resamples` bootstrap resamples of the generated features."""
    generated, real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    k_xx, k_xy = polynomial_kernel(generated, generated), polynomial_kernel(generated, real)
    k_yy = polynomial_kernel(real, real)
    k_yy_mean = (k_yy.sum() - np.trace(k_yy)) / (len(real) * (len(real) - 1))
    rng = np.random.default_rng(seed)
    fids, kids = [], []
    for _ in range(resamples):
        rows = rng.integers(0, len(generated), len(generated))
        fids.append(frechet_distance_low_rank(generated[rows], mu, sigma))
        kids.append(_mmd_unbiased(k_xx[np.ix_(rows, rows)], k_yy_mean, k_xy[rows]))
    return {
        "fid": frechet_distance_low_rank(generated, mu, sigma), "fid_std": float(np.std(fids, ddof=1)) if resamples > 1 else 0.0,
        "kid": _mmd_unbiased(k_xx, k_yy_mean, k_xy), "kid_std": float(np.std(kids, ddof=1)) if resamples > 1 else 0.0,
        "num_generated": len(generated), "num_reference": len(real), "bootstrap": resamples,
    }


def reference_arrays(artifact: Artifact) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, 2048), mu, sigma) of a reference artifact; plain .npy/.npz, never unpickled."""
    from sitctl.evaluate.reference import FEATURES_FILE as REFERENCE_FEATURES, STATISTICS_FILE

    features = np.load(artifact.file(REFERENCE_FEATURES), allow_pickle=False)
    with np.load(artifact.file(STATISTICS_FILE), allow_pickle=False) as stats:
        return features, stats["mu"], stats["sigma"]


def sample_features(config: StudyConfig, samples: Artifact) -> np.ndarray:
    """Inception pool features (N, 2048) of a samples artifact, as the eval stage extracts them."""
    from sitctl import sample_store
    from sitctl.evaluate.inception import POOL_FEATURES, create_extractor, extract_features, pick_device, resolve_weights

    device = pick_device(config.device)
    extractor = create_extractor(resolve_weights(None), [POOL_FEATURES], device)
    batches = (images for images, _ in sample_store.iter_batches(samples.path, 64))
    count = sample_store.num_samples(samples.path)
    return extract_features(extractor, batches, device=device, total=count, label="samples")[POOL_FEATURES].numpy()


def score_point(config: StudyConfig, samples: Artifact, ref: Artifact) -> Artifact:
    """The metrics artifact beside the samples: features.npy (cached) and scores.json."""
    path = samples.path.with_name(samples.path.name + "-scores")
    found = _reuse(path, "metrics")
    if found is not None:
        return found
    staging = begin_artifact(path)
    features = sample_features(config, samples)
    np.save(staging / FEATURES_FILE, features)
    scores = bootstrap_scores(features, *reference_arrays(ref), resamples=config.bootstrap, seed=config.seed)
    (staging / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
    settings = {"bootstrap": config.bootstrap, "seed": config.seed, "reference": ref.id}
    return finish_artifact(staging, path, kind="metrics", config=settings, inputs=[samples, ref], extra={"values": scores})


def floor_scores(config: StudyConfig, floor: Artifact, ref: Artifact) -> dict[str, float]:
    """Real-vs-real: the floor artifact's n real training images scored exactly as a point."""
    features, _, _ = reference_arrays(floor)
    return bootstrap_scores(features, *reference_arrays(ref), resamples=config.bootstrap, seed=config.seed)


# =============================================================================================
# Running
# =============================================================================================


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


def planned_points(config: StudyConfig, out: Path) -> list[Point]:
    points: list[Point] = []
    for ablation in config.ablations:
        if ablation == "path":
            points += path_points(config)
        elif ablation == "objective":
            points += objective_points(config)
        elif ablation == "seeds":
            points += seed_points(config)
        elif (best := best_model(config, out)) is not None:
            points += sampler_points(config, best)
    return [p for p in points if not config.models or p.model.name in config.models]


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run (or continue) every planned point; rewrite the report after each. Returns the report's paths."""
    with stop_on_signals() as stop:  # every stage below shares it; between points the study itself checks
        return _run_study(config, stop)


def _run_study(config: StudyConfig, stop: StopRequest) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(config, out)
    started = time.monotonic()
    latents = encode_train_images(config, out)
    ref = reference(config, out, "reference", config.reference_source, config.reference_images)
    reference(config, out, "floor", config.train_source, config.num_samples)
    done = 0
    while True:  # the sampler ablation's points appear once the objective grid has chosen its model
        todo = [p for p in planned_points(config, out) if not _scored(out, p)]
        if not todo or _out_of_time(config, started):
            break
        if stop:
            raise stop.interrupted(f"after {done} point(s) this sitting; every finished point is kept in {out}")
        point = todo[0]
        checkpoint = train_model(config, out, latents, point.model)
        samples = sample_point(config, out, checkpoint, point)
        _timed(out, f"score {point.model.name} {point.sampler.name}", lambda: score_point(config, samples, ref))
        done += 1
        write_report(config, out)
    report = write_report(config, out)
    return {**report, "points_this_sitting": done, "points_left": len(todo)}


def check_settings(config: StudyConfig, out: Path) -> None:
    """Record FIXED_SETTINGS on the first sitting; refuse a later sitting that changes any of them."""
    current = {name: getattr(config, name) for name in FIXED_SETTINGS}
    saved = out / SETTINGS_FILE
    if not saved.is_file():
        saved.write_text(json.dumps(current, indent=2) + "\n")
        return
    recorded = json.loads(saved.read_text())
    changed = [name for name in FIXED_SETTINGS if recorded.get(name) != json.loads(json.dumps(current[name]))]
    if changed:
        were = ", ".join(f"--{name.replace('_', '-')} {recorded.get(name)}" for name in changed)
        raise SitctlError(f"{out} was made with {were}; rerun with those settings or choose another --out")


def _scored(out: Path, point: Point) -> bool:
    return (point_dir(out, point).with_name(point.sampler.name + "-scores") / "manifest.json").is_file()


def point_dir(out: Path, point: Point) -> Path:
    return out / "points" / point.model.name / point.sampler.name


def _out_of_time(config: StudyConfig, started: float) -> bool:
    return config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes


def collect(config: StudyConfig, out: Path, points: list[Point]) -> list[dict[str, Any]]:
    """Each point with its scores (None while not scored)."""
    rows = []
    for point in points:
        scores_file = point_dir(out, point).with_name(point.sampler.name + "-scores") / SCORES_FILE
        scores = json.loads(scores_file.read_text()) if scores_file.is_file() else None
        rows.append({"point": point, "scores": scores})
    return rows


# =============================================================================================
# Report: markdown tables and plots, rebuilt from whatever has finished
# =============================================================================================

TITLES = {
    "path": "Ablation 1: from DiT to SiT",
    "objective": "Ablation 2: interpolant x prediction (ODE heun)",
    "sampler": "Ablation 3: samplers on the best model",
    "seeds": "Seeds: the interpolant ordering and the SDE's gain, retrained and redrawn",
}


def cached_floor(config: StudyConfig, out: Path) -> dict[str, float]:
    """The floor's scores, computed once per (reference, floor, bootstrap, seed)."""
    ref, floor = open_artifact(out / "reference", "reference"), open_artifact(out / "floor", "reference")
    key = {"reference": ref.id, "floor": floor.id, "bootstrap": config.bootstrap, "seed": config.seed}
    saved = out / "floor-scores.json"
    if saved.is_file() and json.loads(saved.read_text())["key"] == key:
        return json.loads(saved.read_text())["scores"]
    scores = floor_scores(config, floor, ref)
    saved.write_text(json.dumps({"key": key, "scores": scores}, indent=2) + "\n")
    return scores


def _cell(scores: dict | None, name: str, scale: float = 1.0) -> str:
    """"value ± std", the value alone when there is no std, or "not run yet"."""
    if scores is None or scores[name] is None:
        return "not run yet"
    std = scores.get(name + "_std")
    return f"{scores[name] * scale:.2f}" + ("" if std is None else f" ± {std * scale:.2f}")


def floor_line(floor: dict[str, float]) -> str:
    return (f"Real-vs-real floor at n = {floor['num_generated']} (real training images vs the same "
            f"{floor['num_reference']} reference images): FID {_cell(floor, 'fid')}, KID x 10^3 {_cell(floor, 'kid', 1e3)}.")


def markdown_table(rows: list[dict[str, Any]], floor: dict[str, float]) -> str:
    lines = [floor_line(floor), "", "| row | model (run) | sampler | NFE | FID | KID x 10^3 |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        point, scores = row["point"], row["scores"]
        lines.append(f"| {point.label} | {point.model.name} | {point.sampler.name} | {point.sampler.nfe} "
                     f"| {_cell(scores, 'fid')} | {_cell(scores, 'kid', 1e3)} |")
    return "\n".join(lines)


def seed_table(summary: list[dict[str, Any]]) -> str:
    """Mean ± sample std over training seeds (the spread a retrained model shows) or sample seeds (a redrawn one)."""
    lines = ["Mean ± standard deviation over the seeds of each group (each point's own scores below).", "",
             "| model | sampler | seed varied | seeds scored | FID | KID x 10^3 |", "| --- | --- | --- | --- | --- | --- |"]
    for entry in summary:
        lines.append(f"| {entry['model']} | {entry['sampler']} | {entry['varied']} | {entry['seeds']} "
                     f"| {_cell(entry, 'fid')} | {_cell(entry, 'kid', 1e3)} |")
    return "\n".join(lines)


def write_report(config: StudyConfig, out: Path) -> dict[str, Any]:
    """REPORT.md (one table per ablation, floor beside each) and the plots, from finished points."""
    if not (out / "reference" / "manifest.json").is_file() or not (out / "floor" / "manifest.json").is_file():
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
        else:
            rows = collect(config, out, path_points(config) if ablation == "path" else objective_points(config))
            sections += [f"## {TITLES[ablation]}", ""]
        sections += [markdown_table(rows, floor), ""]
    plots.append(plot_loss_curves(config, out))
    sections += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    (out / "REPORT.md").write_text("\n".join(sections))
    return {"report": str(out / "REPORT.md"), "plots": [str(p) for p in plots], "floor": floor}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


def _metric_axes(plt, title: str, xlabel: str):
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for axis, (name, unit) in zip(axes, (("FID", 1.0), ("KID x 10^3", 1e3))):
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
    from matplotlib.ticker import ScalarFormatter

    for axis in axes:
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ScalarFormatter())  # NFE as plain numbers, not 10^x
    _floor_band(axes, floor)
    paths.append(_save(plt, figure, out / "metric-vs-steps.png"))
    return paths


def plot_loss_curves(config: StudyConfig, out: Path) -> Path:
    """Training loss against step, one panel per interpolant, one line per objective run (and linear's bf16 run)."""
    from sitctl.plots import read_metrics

    plt = _pyplot()
    interps = ("linear", "gvp", "vp")
    figure, axes = plt.subplots(1, len(interps), figsize=(13, 3.6), dpi=110, sharex=True)
    specs = {p.model for p in path_points(config) + objective_points(config)} | {model_spec("linear", "velocity", precision="bf16")}
    for axis, interp in zip(axes, interps):
        for spec in sorted((s for s in specs if s.interp == interp), key=lambda s: s.name):
            log = out / "runs" / spec.name / "metrics.jsonl"
            rows = [r for r in read_metrics(log) if "loss" in r] if log.is_file() else []
            if rows:
                axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=spec.name)
        axis.set(title=f"{interp} interpolant", xlabel="step", ylabel="training loss (own objective)", yscale="log")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return _save(plt, figure, out / "loss-curves.png")


# =============================================================================================
# Command line: `sitctl study` (options generated from StudyConfig in sitctl/configs.py)
# =============================================================================================


def study_command(config: StudyConfig) -> dict[str, Any]:
    """What `sitctl study` runs: the study, or only its report (--report-only)."""
    return write_report(config, Path(config.out)) if config.report_only else run_study(config)


def main() -> None:
    """`python -m sitctl.study ARGS` is `sitctl study ARGS` (and its usage line says so)."""
    from sitctl.cli import app, run_app

    run_app(app, args=["study", *sys.argv[1:]], prog_name="sitctl")


if __name__ == "__main__":
    main()
