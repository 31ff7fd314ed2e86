"""`just study` at a tiny size (two points, a few steps, tiny idx files), and its score math."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sitctl.artifacts import ancestor, open_artifact
from sitctl.errors import SitctlError
from sitctl.configs import StudyConfig
from sitctl.study.points import FEATURES_FILE, model_spec, path_points, sampler_points
from sitctl.study.report import sampler_series
from sitctl.study.run import encode_train_images, run_study
from sitctl.signals import Interrupted


def tiny_config(data, out) -> StudyConfig:
    return StudyConfig(
        out=str(out), train_source=f"fashion-mnist:train:{data}", reference_source=f"fashion-mnist:test:{data}",
        image_size=8, model="SiT-T/2", reference_images=16, train_steps=3, global_batch=8, num_samples=8,
        sample_batch=8, ode_steps=2, sde_steps=3, bootstrap=4, ablations=("path",), models=("linear-velocity",),
    )


@pytest.mark.slow
def test_two_points_run_end_to_end_report_the_floor_and_a_rerun_reuses_them(tiny_fashion, tmp_path):
    config = tiny_config(tiny_fashion, tmp_path / "study")
    result = run_study(config)
    assert (result["points_this_sitting"], result["points_left"]) == (2, 0)

    # The two linear-velocity rows of ablation 1 (ODE, then SDE) are scored; the others are listed, not run.
    out = tmp_path / "study"
    scored = sorted(out.glob("points/*/*-scores"))
    assert [p.name for p in scored] == ["ode-heun-2-scores", "sde-euler-3-sigma-w1-cfg1-scores"]
    metrics = open_artifact(scored[1], "metrics")
    assert np.load(metrics.file(FEATURES_FILE)).shape == (8, 2048)
    assert ancestor(metrics, "latents").config["src"] == f"fashion-mnist:train:{tiny_fashion}"
    assert ancestor(metrics, "checkpoint").extra["step"] == 3
    assert open_artifact(out / "reference", "reference").extra["num_images"] == 16  # the t10k split

    report = (out / "REPORT.md").read_text()
    assert f"Real-vs-real floor at n = 8 (real training images vs the same 16 reference images): FID {result['floor']['fid']:.2f}" in report
    assert report.count("not run yet") == 2 * 3  # FID and KID cells of the three unrun rows
    assert all((out / name).stat().st_size > 0 for name in ("loss-curves.png", "timings.jsonl"))

    again = run_study(config)
    assert (again["points_this_sitting"], again["points_left"]) == (0, 0)
    assert open_artifact(scored[1], "metrics").id == metrics.id
    with pytest.raises(SitctlError, match="made with --train-steps 3, now 5; rerun with those settings"):
        run_study(dataclasses.replace(config, train_steps=5))  # would reuse 3-step points as 5-step ones


def test_ablation_rows_change_one_thing_at_a_time():
    config = StudyConfig()
    path = [p.model for p in path_points(config)]
    assert [m.discrete_steps for m in path[:2]] == [1000, None]  # discrete -> continuous t
    assert [m.pred for m in path[1:3]] == ["noise", "velocity"] and [m.interp for m in path[2:4]] == ["vp", "linear"]
    last_two = path_points(config)[3:]
    assert last_two[0].model == last_two[1].model and [p.sampler.mode for p in last_two] == ["ode", "sde"]
    samplers = [p.sampler for p in sampler_points(config, model_spec("linear", "velocity"))]
    assert len({s.name for s in samplers}) == len(samplers)  # shared settings are one point
    assert sorted(s.w for s in samplers if s.mode == "sde" and s.diffusion == "sigma" and s.cfg_scale == 1 and s.steps == 100) == [0, 0.5, 1, 1.5, 2]


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sitctl", "study", "--out", str(tmp_path), "--ablations", "paths"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: unknown ablation(s) ['paths']; choose from path, objective, sampler, seeds, convergence"
    ]
    done = subprocess.run([sys.executable, "-m", "sitctl", "study", "--out", str(tmp_path), "--report-only"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "run the study first" in done.stderr


@pytest.mark.slow
def test_a_training_run_stopped_by_a_signal_ends_the_sitting_instead_of_sampling_it(tiny_fashion, tmp_path, monkeypatch):
    import signal

    import sitctl.train

    config = tiny_config(tiny_fashion, tmp_path / "study")
    real_step = sitctl.train.train_step

    def signalled_in_step_1(run, batch):  # a real SIGTERM to this process, as a scheduler sends it
        if run.step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, batch)

    monkeypatch.setattr(sitctl.train, "train_step", signalled_in_step_1)
    with pytest.raises(Interrupted, match="stopped by SIGTERM while training linear-velocity at step 2 of 3; saved ") as stopped:
        run_study(config)
    assert stopped.value.exit_code == 143 and stopped.value.resume_option is None  # rerun the study as it is
    assert not list((tmp_path / "study").glob("points/*/*"))  # nothing sampled from the short run


def test_sampler_plots_draw_every_scored_point_of_their_curve():
    config = StudyConfig()
    points = sampler_points(config, model_spec("linear", "velocity"))
    rows = [{"point": p, "scores": {"fid": float(i), "fid_std": 0.1, "kid": 0.0, "kid_std": 0.0}} for i, p in enumerate(points)]
    series = sampler_series(rows, config)
    assert [x for x, _ in series["w"]] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [x for x, _ in series["cfg"]] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert [x for x, _ in series["sde_steps"]] == [10, 25, 50, 100, 200]
    assert [x for x, _ in series["ode_steps"]] == [10, 24, 50, 100, 200]  # heun: 2 evaluations per step
    assert len(series["ode_at_equal_nfe"]) == 1  # ode-heun-50, NFE 100 as the w curve's SDE
    rows[0]["scores"] = None  # ode-heun-50 not scored yet: left out, the rest still drawn
    assert sampler_series(rows, config)["ode_at_equal_nfe"] == [] and len(sampler_series(rows, config)["w"]) == 5


@pytest.mark.slow
def test_the_seeds_ablation_retrains_with_each_seed_and_reports_their_spread(tiny_fashion, tmp_path):
    config = dataclasses.replace(tiny_config(tiny_fashion, tmp_path / "study"), ablations=("seeds",),
                                 models=("linear-velocity", "linear-velocity-seed7", "linear-velocity-bf16"), train_seeds=(7,),
                                 sample_seeds=(5,))
    assert config.ema_decay == 0.0  # derived from the 3-step run: 1 - 10/3 clipped at 0
    result = run_study(config)
    # ODE and SDE each: training seeds 0 and 7, bf16, and sample seed 5 on the seed-0 model.
    assert (result["points_this_sitting"], result["points_left"]) == (8, 0)
    out = tmp_path / "study"
    first, second, bf16 = (open_artifact(out / "runs" / name / "step-0000003", "checkpoint")
                           for name in ("linear-velocity", "linear-velocity-seed7", "linear-velocity-bf16"))
    assert (first.config["seed"], second.config["seed"], bf16.config["seed"]) == (0, 7, 0)
    assert (first.config["precision"], bf16.config["precision"]) == ("fp32", "bf16")
    assert open_artifact(out / "points/linear-velocity-seed7/ode-heun-2-scores", "metrics").id != \
        open_artifact(out / "points/linear-velocity/ode-heun-2-scores", "metrics").id

    assert open_artifact(out / "points/linear-velocity/ode-heun-2-seed5", "samples").config["seed"] == 5

    def fid(point):
        return json.loads((out / "points" / point / "scores.json").read_text())["fid"]

    report = (out / "REPORT.md").read_text()
    for varied, points in (("training", ("linear-velocity/ode-heun-2-scores", "linear-velocity-seed7/ode-heun-2-scores")),
                           ("sample", ("linear-velocity/ode-heun-2-scores", "linear-velocity/ode-heun-2-seed5-scores"))):
        fids = [fid(point) for point in points]
        assert f"| linear-velocity | ode-heun-2 | {varied} | 2 | {np.mean(fids):.2f} ± {np.std(fids, ddof=1):.2f} |" in report
    assert "| gvp-velocity | ode-heun-2 | training | 0 | not run yet | not run yet |" in report
    assert "| linear-velocity-bf16 | sde-euler-3-sigma-w1-cfg1 | training | 1 |" in report


def test_a_finished_artifact_made_otherwise_at_a_study_path_is_refused_not_reused(digits_latents_dir, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(digits_latents_dir, out / "latents")  # the digits where the study keeps its Fashion-MNIST
    with pytest.raises(SitctlError, match=r"latents is not what this study makes there: it was made with "
                                          r"--src 'digits', now 'fashion-mnist:train:.*'; delete it to remake it"):
        encode_train_images(tiny_config(tmp_path / "fashion", out), out)
