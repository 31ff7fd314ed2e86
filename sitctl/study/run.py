"""Running the study: every stage is the one the CLI runs, reused when finished, resumed when not.

A finished artifact at a point's path is reused only when it was made with the settings the study
would make it with now, from the same inputs by content id (`identity.made_otherwise`). The paths
are fixed (the report reads them), so one made otherwise is refused, never replaced.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sitctl.artifacts import Artifact, begin_artifact, finish_artifact, is_finished, open_artifact
from sitctl.checkpoint import list_checkpoints
from sitctl.configs import StudyConfig, resolve_sample
from sitctl.encode import EncodeConfig, encode
from sitctl.errors import SitctlError
from sitctl.evaluate.bootstrap import bootstrap_scores, reference_arrays, sample_features
from sitctl.evaluate.reference import ReferenceConfig, build_reference
from sitctl.identity import IDENTITY, SHAPES, check_continues, made_otherwise, settings_of
from sitctl.sample import SampleConfig, sample_stage
from sitctl.signals import Interrupted, StopRequest, stop_on_signals
from sitctl.study.encoder import ENCODER_NAME, encoder_hub, ensure_encoder, read_quality
from sitctl.study.points import (
    FEATURES_FILE, SCORES_FILE, SETTINGS_FILE, TIMINGS_FILE, ModelSpec, Point, ScoreSettings, best_model,
    convergence_points, grid_points, is_scored, objective_points, path_points, point_dir, sampler_points, seed_points
)
from sitctl.study.report import write_report
from sitctl.train import TrainConfig, resolve, train


def _reuse(path: Path, kind: str, settings: Any, inputs: list[Artifact], roles: tuple[str, ...] = IDENTITY) -> Artifact | None:
    """The finished artifact at `path` made with `settings` from `inputs`; None while there is none."""
    if not is_finished(path):
        return None
    found = open_artifact(path, kind)
    why = made_otherwise(found, settings, [artifact.id for artifact in inputs], roles)
    if why is not None:
        raise SitctlError(f"{path} is not what this study makes there: {why}; delete it to remake it, or choose another --out")
    return found


def _timed(out: Path, what: str, make):
    """Run make(); append its wall time to timings.jsonl (the docs' per-part durations)."""
    start = time.perf_counter()
    result = make()
    record = {"what": what, "seconds": round(time.perf_counter() - start, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(out / TIMINGS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return result


def encode_train_images(config: StudyConfig, out: Path, images: bool = False) -> Artifact:
    """The training set in pixel space; `images` keeps the crops too (the convergence runs, for REPA's encoder)."""
    path = out / ("latents-images" if images else "latents")
    settings = EncodeConfig(
        src=config.train_source, out=str(path), image_size=config.image_size, vae="none", limit=config.train_images,
        shard_size=5000, batch_size=256, workers=0, device=config.device, encoder_targets="images" if images else "none")
    return _reuse(path, "latents", settings, []) or _timed(out, f"encode {path.name}", lambda: encode(settings))


def reference(config: StudyConfig, out: Path, name: str, source: str, count: int) -> Artifact:
    """A reference artifact (images + Inception features) of the first `count` images of `source`."""
    path = out / name
    settings = ReferenceConfig(source=source, out=str(path), image_size=config.image_size, max_images=count, device=config.device)
    return _reuse(path, "reference", settings, []) or _timed(out, name, lambda: build_reference(settings))


def train_model(config: StudyConfig, out: Path, spec: ModelSpec) -> Artifact:
    """The run's last checkpoint; an interrupted run resumes from its last checkpoint, and a finished
    one is reused when it was trained with these settings (as the run records them, resolved) on
    these latents; it may have gone further (a convergence run of an earlier, longer step list).

    A convergence run (spec.steps set) keeps a checkpoint at every multiple of the step list's
    greatest common divisor, has a fixed EMA decay whatever its length, and reads the latents
    that keep the crops; with spec.repa it aligns to the study's own encoder.
    """
    steps = spec.steps or config.train_steps
    run = out / "runs" / spec.name
    found = list_checkpoints(run)
    latents = encode_train_images(config, out, images=spec.steps is not None)
    every = math.gcd(*config.convergence_steps) if spec.steps else max(1, min(500, steps))
    settings = TrainConfig(
        latents=str(latents.path), out=str(run), model=config.model, interp=spec.interp, pred=spec.pred,
        loss_weight=spec.loss_weight, discrete_steps=spec.discrete_steps, time_dist=spec.time_dist, steps=steps,
        global_batch=config.global_batch, lr=config.lr, flip=False, precision=spec.precision,
        ema_decay=config.convergence_ema_decay if spec.steps else config.ema_decay,
        seed=config.seed if spec.seed is None else spec.seed, data_lanes=4, shuffle_buffer=2000, loader_workers=0,
        ckpt_every=every, keep_last=1, keep_every=every if spec.steps else 0, log_every=max(1, min(50, steps)),
        preview_every=0, tracker="none", eval_every=0, resume=bool(found), device=config.device,
        **(dict(repa_encoder=ENCODER_NAME, repa_projector_width=config.repa_projector_width) if spec.repa else {}),
    )
    if found and found[-1][0] >= steps:
        return _reuse(found[-1][1], "checkpoint", resolve(settings, torch.device(config.device)), [latents], (SHAPES,))
    if spec.repa and read_quality(out) is None:  # trained once, before the first REPA run
        _timed(out, "encoder", lambda: ensure_encoder(config, out))
    try:
        with encoder_hub(out) if spec.repa else nullcontext():
            return _timed(out, f"train {spec.name}", lambda: train(settings))
    except Interrupted as stopped:  # the sitting ends; rerun as it is, the study resumes the run itself
        raise Interrupted(stopped.signum, f"while training {spec.name} {stopped.done}", quiet=stopped.quiet) from None


def checkpoint_of(out: Path, point: Point, last: Artifact) -> Artifact:
    """The checkpoint a point samples: the run's last, or the kept one at point.step."""
    if point.step is None or point.step == last.extra["step"]:
        return last
    kept = dict(list_checkpoints(out / "runs" / point.model.name))
    if point.step not in kept:
        raise SitctlError(f"run {point.model.name} kept no checkpoint at step {point.step}; its steps are {sorted(kept)}")
    return open_artifact(kept[point.step], "checkpoint")


def sample_point(config: StudyConfig, out: Path, checkpoint: Artifact, point: Point) -> Artifact:
    path = point_dir(out, point)
    s = point.sampler
    settings = resolve_sample(SampleConfig(  # as the samples manifest records it
        checkpoint=str(checkpoint.path), out=str(path), mode=s.mode, method=s.method, steps=s.steps, w=s.w,
        diffusion=s.diffusion, cfg_scale=s.cfg_scale, time_shift=s.shift, num=config.num_samples, batch_size=config.sample_batch,
        seed=config.seed if s.seed is None else s.seed, preview=64, device=config.device))
    return _reuse(path, "samples", settings, [checkpoint]) or _timed(
        out, f"sample {path.relative_to(out / 'points')}", lambda: sample_stage(settings))


def score_point(config: StudyConfig, samples: Artifact, ref: Artifact) -> Artifact:
    """The metrics artifact beside the samples: features.npy (cached) and scores.json."""
    path = samples.path.with_name(samples.path.name + "-scores")
    settings = ScoreSettings(bootstrap=config.bootstrap, seed=config.seed, reference=ref.id)
    found = _reuse(path, "metrics", settings, [samples, ref])
    if found is not None:
        return found
    staging = begin_artifact(path)
    features = sample_features(samples, config.device)
    np.save(staging / FEATURES_FILE, features)
    scores = bootstrap_scores(features, *reference_arrays(ref), resamples=config.bootstrap, seed=config.seed)
    (staging / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
    return finish_artifact(staging, path, kind="metrics", config=asdict(settings), inputs=[samples, ref], extra={"values": scores})


def planned_points(config: StudyConfig, out: Path) -> list[Point]:
    points: list[Point] = []
    for ablation in config.ablations:
        if ablation == "path":
            points += path_points(config)
        elif ablation == "objective":
            points += objective_points(config)
        elif ablation == "seeds":
            points += seed_points(config)
        elif ablation == "convergence":
            points += convergence_points(config) + grid_points(config)
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
    ref = reference(config, out, "reference", config.reference_source, config.reference_images)
    reference(config, out, "floor", config.train_source, config.num_samples)
    done = 0
    while True:  # the sampler ablation's points appear once the objective grid has chosen its model
        todo = [p for p in planned_points(config, out) if not is_scored(out, p)]
        if not todo or _out_of_time(config, started):
            break
        if stop:
            raise stop.interrupted(f"after {done} point(s) this sitting; every finished point is kept in {out}")
        point = todo[0]
        checkpoint = checkpoint_of(out, point, train_model(config, out, point.model))
        samples = sample_point(config, out, checkpoint, point)
        _timed(out, f"score {samples.path.relative_to(out / 'points')}", lambda: score_point(config, samples, ref))
        done += 1
        write_report(config, out)
    report = write_report(config, out)
    return {**report, "points_this_sitting": done, "points_left": len(todo)}


def check_settings(config: StudyConfig, out: Path) -> None:
    """Record the shaping settings on the first sitting; refuse a later sitting that changes any of them.

    Every artifact in OUT was made with them; the lists of values swept may grow freely (role free).
    """
    saved = out / SETTINGS_FILE
    if not saved.is_file():
        saved.write_text(json.dumps(settings_of(config), indent=2) + "\n")
        return
    check_continues(json.loads(saved.read_text()), config, f"the study in {out}",
                    "rerun with those settings or choose another --out")


def _out_of_time(config: StudyConfig, started: float) -> bool:
    return config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes


def study_command(config: StudyConfig) -> dict[str, Any]:
    """What `sitctl study` runs: the study, or only its report (--report-only)."""
    return write_report(config, Path(config.out)) if config.report_only else run_study(config)
