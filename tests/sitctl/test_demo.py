"""`sitctl demo` at a tiny size: the same stage code as the full demo, a few steps of each."""

import pytest
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sitctl import workspace
from sitctl.artifacts import ancestor, verify_artifact
from sitctl.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_chains_the_four_stages_shows_lineage_and_a_rerun_reuses_them(tmp_path):
    config = DemoConfig(out=str(tmp_path / "demo"), steps=4, num_samples=12, sample_steps=3, reference_images=12)
    result = run_demo(config)

    metrics = verify_artifact(result["metrics"])
    latents = ancestor(metrics, "latents")
    assert latents is not None and latents.extra["vae"]["name"] == "none"
    assert latents.config["src"] == "digits:train"
    assert ancestor(metrics, "checkpoint").extra["step"] == 4
    assert result["fid"] > 0 and result["fid"] == json.loads((metrics.path / "metrics.json").read_text())["fid"]
    references = {v.artifact.config["source"]: v.artifact for v in workspace.finished_versions(tmp_path / "demo", "reference")}
    assert result["floor_fid"] > 0 and references["digits:train"].extra["num_images"] == 12
    assert Path(result["grid"]).stat().st_size > 0
    assert Path(result["metrics"]) == (tmp_path / "demo" / "metrics" / "v1").resolve()  # a workspace version

    shown = subprocess.run([sys.executable, "-m", "sitctl.cli", "show", result["metrics"]],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for kind in ("metrics", "samples", "checkpoint", "latents", "reference", "digits:train"):
        assert kind in shown.stdout

    again = run_demo(config)
    assert again == result
    # Other sampler settings reuse the latents and the run, and make new samples and metrics versions.
    other = run_demo(DemoConfig(out=config.out, steps=4, num_samples=12, sample_steps=4, reference_images=12))
    assert Path(other["metrics"]).name == "v2" and Path(other["grid"]).parent.name == "v2"
    assert ancestor(verify_artifact(other["metrics"]), "checkpoint").path == ancestor(metrics, "checkpoint").path
    assert [v.name for v in workspace.finished_versions(tmp_path / "demo", "latents")] == ["latents/v1"]


@pytest.mark.slow
def test_a_group_sigterm_during_training_stops_the_demo_after_its_checkpoint_with_status_143(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "5000", "--num-samples", "12", "--sample-steps", "3"]
    demo = subprocess.Popen([sys.executable, "-m", "sitctl.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"COLUMNS": "200"}, start_new_session=True)
    run = out / "runs" / "v1"  # made as training starts; a signal before its first step stops it after two
    deadline = time.monotonic() + 300
    while not run.is_dir() and time.monotonic() < deadline and demo.poll() is None:
        time.sleep(0.05)
    os.killpg(demo.pid, signal.SIGTERM)  # as SLURM or `timeout` sends it: to the whole group
    _, stderr = demo.communicate(timeout=300)
    assert demo.returncode == 128 + signal.SIGTERM, stderr
    [(step, saved)] = [(int(p.name.split("-")[1]), p) for p in (out / "runs" / "v1").glob("step-*")]  # the checkpoint the signal saved
    assert stderr.splitlines() == [f"stopped by SIGTERM while training at step {step} of 5000; saved {saved}; "
                                   f"continue with: sitctl {' '.join(args)}"]  # no --resume: the demo resumes by itself
    assert not (out / "samples").exists()  # nothing sampled from the half-trained model
