"""The convergence ablation: steps-to-FID arithmetic on constructed curves, and a tiny run end to end
(the study's own REPA encoder, loaded through the hub path DINOv2 takes)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sitctl.artifacts import open_artifact
from sitctl.configs import StudyConfig
from sitctl.errors import SitctlError
from sitctl.study.convergence import grid_table, steps_to_reach, summarise
from sitctl.study.encoder import read_quality
from sitctl.study.points import CONVERGENCE_RECIPES, convergence_points, convergence_spec, grid_points, sde
from sitctl.study.run import run_study

STEPS = (250, 500, 1000, 2000)


def test_steps_to_reach_interpolates_on_the_log_step_axis():
    # 80 at 500 and 60 at 1000: 70 is halfway in FID, so halfway in log-step, at sqrt(500 * 1000).
    assert steps_to_reach(STEPS, [100, 80, 60, 40], 70) == pytest.approx(math.sqrt(500 * 1000))
    assert steps_to_reach(STEPS, [100, 80, 60, 40], 60) == pytest.approx(1000)
    assert steps_to_reach(STEPS, [100, 80, 60, 40], 40) == pytest.approx(2000)
    assert steps_to_reach(STEPS, [100, 80, 60, 40], 39.9) is None  # not reached by the last step
    assert steps_to_reach(STEPS, [30, 80, 60, 40], 40) == 250  # reached at the first measurement: an upper bound
    # The first crossing counts, even if the curve rises again later.
    assert steps_to_reach(STEPS, [100, 50, 90, 40], 60) == pytest.approx(math.exp(math.log(250) + 0.8 * math.log(2)))


def _rows(config: StudyConfig, fid_of) -> list[dict]:
    """Convergence rows whose scores are fid_of(recipe index, run name, step), KID a thousandth of it."""
    rows = []
    labels = [label for label, _, _ in CONVERGENCE_RECIPES]
    for point in convergence_points(config):
        fid = fid_of(labels.index(point.label), point.model.name, point.step)
        scores = None if fid is None else {"fid": fid, "kid": fid / 1000, "fid_std": 0.1, "kid_std": 0.0}
        rows.append({"point": point, "scores": scores})
    return rows


def test_a_recipe_whose_curve_is_the_baseline_shifted_by_half_the_steps_is_twice_as_fast():
    config = StudyConfig(ablations=("convergence",), convergence_steps=STEPS, train_seeds=(1, 2))
    seed_offset = {"": 0.0, "-seed1": 2.0, "-seed2": -2.0}

    def fid_of(recipe, name, step):  # FID falls by 20 per doubling; REPA (recipe 1) is a doubling ahead
        offset = seed_offset["-seed" + name.rsplit("-seed", 1)[1] if "-seed" in name else ""]
        return 100 - 20 * math.log2(step / 250) - (20 if recipe == 1 else 0) + offset

    summary = summarise(_rows(config, fid_of), STEPS)
    baseline, repa = summary[0], summary[1]
    assert baseline["target"] == pytest.approx(40)  # the mean over the three seeds at step 2000
    assert (baseline["complete"], repa["complete"], summary[2]["complete"]) == (3, 3, 1)
    assert baseline["fid"][2000]["std"] == pytest.approx(2.0)  # sd of (0, +2, -2)
    assert baseline["speedup"] == pytest.approx(1.0) and repa["speedup"] == pytest.approx(2.0)
    assert repa["steps_to_target"] == pytest.approx(1000)
    # Per seed: REPA's seed 1 is 2 FID worse, so it needs 2 ** (2 / 20) more steps than 1000.
    assert repa["steps_to_target_per_run"] == pytest.approx([1000, 1000 * 2 ** 0.1, 1000 * 2 ** -0.1])
    assert baseline["steps_to_target_per_run"][1] is None  # the worse baseline seed never reaches the mean
    assert summary[2]["speedup"] == pytest.approx(1.0)  # the other recipes here equal the baseline's seed


def test_runs_not_fully_scored_are_left_out_of_the_means_and_the_target_waits_for_the_baseline():
    config = StudyConfig(ablations=("convergence",), convergence_steps=STEPS, train_seeds=(1, 2))
    summary = summarise(_rows(config, lambda recipe, name, step: None if step == 2000 and recipe == 0 and "seed" not in name
                              else 50.0), STEPS)
    assert summary[0]["complete"] == 2 and summary[0]["target"] == 50.0
    summary = summarise(_rows(config, lambda recipe, name, step: None if recipe == 0 else 50.0), STEPS)
    assert summary[0]["target"] is None and summary[1]["steps_to_target"] is None


def test_every_recipe_changes_one_thing_from_sit_and_the_seeded_ones_train_with_every_seed():
    config = StudyConfig(ablations=("convergence",), convergence_steps=STEPS, train_seeds=(1, 2))
    points = convergence_points(config)
    runs = {p.model.name: p.model for p in points}
    assert len(points) == len(runs) * len(STEPS) and len(runs) == 5 + 2 * 2
    base = convergence_spec(steps=2000)
    assert runs["conv-linear-velocity"] == base and base.steps == 2000
    assert runs["conv-linear-velocity-repa"] == dataclasses.replace(base, name="conv-linear-velocity-repa", repa=True)
    assert runs["conv-linear-velocity-logit-normal"] == dataclasses.replace(
        base, name="conv-linear-velocity-logit-normal", time_dist="logit-normal")
    assert runs["conv-linear-velocity-repa-seed2"].seed == 2
    assert {p.sampler for p in points} == {sde(config)}  # one fixed sampler: SDE, w = 1, NFE 100
    grid = grid_points(config)
    assert {p.model for p in grid} == {base} and {p.step for p in grid} == {2000}
    assert {(p.sampler.mode, p.sampler.nfe, p.sampler.shift) for p in grid} == {
        (mode, nfe, shift) for mode, nfes in (("ode", ("20", "50")), ("sde", ("20", "50", "100")))
        for nfe in nfes for shift in (1.0, 0.5, 2.0, 4.0)}


def test_the_grid_table_gives_the_nfe_each_shift_needs_to_reach_the_converged_fid():
    config = StudyConfig(ablations=("convergence",), grid_ode_steps=(10, 25, 50), grid_sde_steps=(20, 50, 100), shift_values=(1.0, 2.0))
    fids = {("sde", 1.0): [30, 20, 10], ("sde", 2.0): [20, 10, 9], ("ode", 1.0): [40, 30, 25], ("ode", 2.0): [35, 30, 28]}
    rows = []
    for point in grid_points(config):
        key, index = (point.sampler.mode, point.sampler.shift), ("20", "50", "100").index(point.sampler.nfe)
        rows.append({"point": point, "scores": {"fid": fids[key][index], "fid_std": 0.5}})
    table = grid_table(rows, target=10.0)
    assert "| SDE euler, w = 1 | 1 (off) | 30.00 ± 0.50 | 20.00 ± 0.50 | 10.00 ± 0.50 | 100 |" in table
    assert "| SDE euler, w = 1 | 2 | 20.00 ± 0.50 | 10.00 ± 0.50 | 9.00 ± 0.50 | 50 |" in table
    assert "| ODE heun | 2 | 35.00 ± 0.50 | 30.00 ± 0.50 | 28.00 ± 0.50 | not reached |" in table


@pytest.mark.slow
def test_a_tiny_convergence_run_scores_kept_checkpoints_aligns_to_its_own_encoder_and_reuses_everything(tiny_fashion, tmp_path):
    config = StudyConfig(
        out=str(tmp_path / "study"), train_source=f"fashion-mnist:train:{tiny_fashion}",
        reference_source=f"fashion-mnist:test:{tiny_fashion}", image_size=8, model="SiT-T/2", reference_images=16,
        global_batch=8, num_samples=8, sample_batch=8, sde_steps=3, bootstrap=4, ablations=("convergence",),
        convergence_steps=(2, 4), encoder_epochs=1, repa_projector_width=16, train_seeds=(1,),
        models=("conv-linear-velocity-repa",),  # one run: the REPA path (the grid's rows are the baseline's)
    )
    result = run_study(config)
    out = tmp_path / "study"
    assert (result["points_this_sitting"], result["points_left"]) == (2, 0)  # the kept step 2 and the last, step 4
    samples = open_artifact(out / "points" / "conv-linear-velocity-repa" / "step-0000002" / "sde-euler-3-sigma-w1-cfg1", "samples")
    trained = open_artifact(samples.config["checkpoint"], "checkpoint")
    assert trained.extra["step"] == 2
    assert trained.config["repa_encoder"] == "hf-hub:sitctl-study/fashion-vit" and trained.config["ema_decay"] == 0.99
    assert (out / "encoder" / "hub" / "models--sitctl-study--fashion-vit" / "refs" / "main").is_file()
    assert 0.0 <= read_quality(out)["test_accuracy"] <= 1.0
    report = (out / "REPORT.md").read_text()
    assert "| SiT (linear, velocity, uniform t) | 0 |" in report and "| + REPA | 1 |" in report
    assert "REPA's encoder (trained here, supervised)" in report
    assert all((out / name).stat().st_size > 0 for name in ("fid-vs-step.png", "fid-vs-nfe-shift.png", "convergence-training.png"))

    again = run_study(config)
    assert (again["points_this_sitting"], again["points_left"]) == (0, 0)
    with pytest.raises(SitctlError, match="made with --convergence-ema-decay 0.99, now 0.9"):
        run_study(dataclasses.replace(config, convergence_ema_decay=0.9))
