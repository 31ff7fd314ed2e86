"""`sitctl demo` at a tiny size: the same stage code as the full demo, a few steps of each."""

import json
import subprocess
import sys

from sitctl.artifacts import ancestor, open_artifact, verify_artifact
from sitctl.demo import DemoConfig, run_demo


def test_demo_chains_the_four_stages_shows_lineage_and_a_rerun_reuses_them(tmp_path):
    config = DemoConfig(out=str(tmp_path / "demo"), steps=4, num_samples=12, sample_steps=3, reference_images=12)
    result = run_demo(config)

    metrics = verify_artifact(result["metrics"])
    latents = ancestor(metrics, "latents")
    assert latents is not None and latents.extra["vae"]["name"] == "none"
    assert latents.config["src"] == "digits:train"
    assert ancestor(metrics, "checkpoint").extra["step"] == 4
    assert result["fid"] > 0 and result["fid"] == json.loads((metrics.path / "metrics.json").read_text())["fid"]
    assert result["floor_fid"] > 0 and open_artifact(tmp_path / "demo" / "floor").extra["num_images"] == 12
    assert (tmp_path / "demo" / "samples" / "preview.png").stat().st_size > 0

    shown = subprocess.run([sys.executable, "-m", "sitctl.cli", "show", result["metrics"]],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    for kind in ("metrics", "samples", "checkpoint", "latents", "reference", "digits:train"):
        assert kind in shown.stdout

    again = run_demo(config)
    assert again == result
    assert open_artifact(again["metrics"]).id == metrics.id
