"""`eval sweep`: the sample stage and the eval stage over a grid of w, reusing finished points."""

import dataclasses
from dataclasses import asdict

import torch

from model.configs import model_config
from model.network import SiT
from sitctl import configs
from sitctl.artifacts import open_artifact
from sitctl.checkpoint import save_checkpoint
from sitctl.evaluate.reference import ReferenceConfig, build_reference
from sitctl.evaluate.results import read_results
from sitctl.evaluate.sweep import SweepConfig, sweep_stage


def tiny_run(run_dir, latents_dir):
    """One checkpoint of a random SiT-T/2 on the 8x8 RGB digits latents (vae none)."""
    config = model_config("SiT-T/2", num_classes=10, input_size=8, in_channels=3)
    torch.manual_seed(0)
    net = SiT(config)
    extra = {"model_config": asdict(config), "model": "SiT-T/2", "interp": "linear", "pred": "velocity"}
    save_checkpoint(run_dir, 1, model=net, ema=net, optimizer=torch.optim.AdamW(net.parameters()), state={},
                    config={}, latents=open_artifact(latents_dir), extra=extra)
    return run_dir


def test_sweep_scores_each_w_plots_and_reuses_finished_points(digits_latents_dir, tmp_path):
    run = tiny_run(tmp_path / "run", digits_latents_dir)
    reference = build_reference(ReferenceConfig(source="digits", out=str(tmp_path / "ref"), image_size=8, max_images=16, fetch_weights=False))
    # KID keeps this cheap: FID's 2048 x 2048 eigendecomposition costs seconds per point on 2 cores.
    config = SweepConfig(run=str(run), ref=str(reference.path), w_values=(0.0, 1.0), num=10, metric="kid",
                         out=str(tmp_path / "sweep"), fetch_weights=False)
    first = sweep_stage(config)
    assert [point["w"] for point in first["points"]] == [0.0, 1.0]
    for point in first["points"]:
        metrics = open_artifact(point["metrics"], "metrics")
        samples = open_artifact(metrics.inputs[0]["path"], "samples")
        assert samples.config["w"] == point["w"] and samples.config["mode"] == "sde"
        assert metrics.extra["values"]["kid_mean"] == point["value"]
    assert (tmp_path / "sweep" / "kid-vs-w.png").stat().st_size > 1000
    rows = len(read_results(tmp_path / "sweep"))

    again = sweep_stage(config)
    assert again["points"] == first["points"]
    assert len(read_results(tmp_path / "sweep")) == rows  # nothing sampled or scored twice


def test_a_sweep_with_another_mode_samples_anew_beside_the_first_and_the_same_sweep_again_reuses(
        digits_latents_dir, tmp_path, monkeypatch):
    # The sweep takes each mode's default solver and steps: a few Euler steps keep this cheap.
    monkeypatch.setitem(configs.DEFAULT_METHOD, "ode", "euler")
    monkeypatch.setitem(configs.DEFAULT_STEPS, "ode", 2)
    monkeypatch.setitem(configs.DEFAULT_STEPS, "sde", 2)
    run = tiny_run(tmp_path / "run", digits_latents_dir)
    reference = build_reference(ReferenceConfig(source="digits", out=str(tmp_path / "ref"), image_size=8, max_images=4, fetch_weights=False))
    out, said = tmp_path / "sweep", []
    guidance = SweepConfig(run=str(run), ref=str(reference.path), cfg_values=(1.0, 1.5), num=2, metric="kid",
                           out=str(out), fetch_weights=False)

    def samples_of(result):
        return [open_artifact(open_artifact(point["metrics"], "metrics").inputs[0]["path"], "samples") for point in result["points"]]

    sde = samples_of(sweep_stage(guidance, say=said.append))  # --mode defaults to sde
    assert [s.config["mode"] for s in sde] == ["sde", "sde"] and said == []
    manifests = {s.path: (s.path / "manifest.json").read_bytes() for s in sde}

    ode_sweep = dataclasses.replace(guidance, mode="ode")
    ode_result = sweep_stage(ode_sweep, say=said.append)
    ode = samples_of(ode_result)
    assert [s.config["mode"] for s in ode] == ["ode", "ode"] and not {s.path for s in ode} & set(manifests)
    assert {path: (path / "manifest.json").read_bytes() for path in manifests} == manifests  # the SDE samples untouched
    assert said == [f"samples-cfg{cfg}-wdefault not reused: it was made with --mode 'sde', now 'ode'; sampling into {s.path.name}"
                    for cfg, s in zip(("1", "1.5"), ode)]

    said.clear()
    folders = sorted(out.iterdir())
    assert sweep_stage(ode_sweep, say=said.append) == ode_result
    assert sorted(out.iterdir()) == folders and said == []  # no new samples or metrics artifact
