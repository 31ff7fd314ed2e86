"""`just gpu-check` where there is no GPU: refused in one line, and its CPU dry run goes through every
part (doctor, bench, two real training runs, two real sampling runs, the BENCHMARKS.md sections)
at tiny sizes, so the command a first GPU session runs is known to be wired right.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # a CPU dry run of the whole GPU check


def gpu_check(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sitctl.bench", "gpu-check", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_without_a_gpu_is_one_error_line(tmp_path):
    result = gpu_check("--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: gpu-check needs a CUDA GPU; here, run `sitctl doctor`, or `gpu-check --cpu-dry-run` to test the plumbing"]


def test_gpu_check_cpu_dry_run_compares_the_runs_and_writes_its_sections(tmp_path):
    result = gpu_check("--cpu-dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["seconds"]) == {"doctor", "bench", "training", "sampling"}
    training = results["training"]
    # On a CPU, --precision auto is fp32 and TF32 does not exist: the two runs are the same computation.
    assert training["runs"]["auto"]["losses"] == training["runs"]["tf32"]["losses"] and len(training["runs"]["auto"]["losses"]) == 3
    assert training["within"] and training["max_relative_difference"] == 0.0
    assert results["sampling"]["images"] == 8 and results["sampling"]["max_levels"] >= 0
    markdown = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    assert f"## {results['device']}\n" in markdown  # `just bench`'s table for this device
    assert f"## GPU check: {results['device']} (CPU dry run, figures meaningless)" in markdown
    assert "largest relative difference of the logged losses 0.00% (tolerance 5%): pass" in markdown
