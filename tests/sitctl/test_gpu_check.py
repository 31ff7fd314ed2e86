"""`just gpu-check` where there is no GPU: refused in one line, and its CPU dry runs go through every
step (real training, sampling, evaluation and 2-process torchrun commands on gloo, at tiny sizes)
and compute every verdict, so the command a first GPU session runs is known to be wired right.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from sitctl.bench.gpu_check import GPU_ONLY, judge, percent


def gpu_check(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sitctl.bench", "gpu-check", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_a_figure_past_its_threshold_fails_and_a_missing_one_is_gpu_only():
    ceiling = judge("loss", 0.06, 0.05, percent)
    assert (ceiling.status, ceiling.threshold, ceiling.measured) == ("FAIL", "at most 5%", "6%")
    assert judge("loss", 0.05, 0.05, percent).status == "pass"  # the threshold itself passes
    floor = judge("mfu", 0.2, 0.3, percent, floor=True)
    assert (floor.status, floor.threshold, floor.measured) == ("FAIL", "at least 30%", "20%")
    assert judge("mfu", None, 0.3, percent, floor=True).status == GPU_ONLY


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_without_a_gpu_is_one_error_line(tmp_path):
    result = gpu_check("--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: gpu-check needs 1 CUDA GPU(s), found 0; here, run `sitctl doctor`, or `gpu-check --cpu-dry-run` to test the plumbing"]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_judges_every_step_and_writes_its_section(tmp_path):
    result = gpu_check("--cpu-dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["seconds"]) == {"inputs", "doctor", "precision", "sampling", "fid", "resume"}
    # doctor (problems, MFU), precision (losses, MFU), sampling (count, pixels), fid (value, precision), resume:
    # MFU needs a GPU's peak; everything else is judged on the CPU too.
    assert [verdict["status"] for verdict in results["verdicts"]] == ["pass", GPU_ONLY, "pass", GPU_ONLY] + ["pass"] * 5
    steps = results["steps"]
    # On a CPU, --precision auto is fp32 and TF32 does not exist: the two runs are the same computation.
    assert steps["precision"]["max_relative_difference"] == 0.0
    assert steps["sampling"]["images"] == 7  # --num 7 in blocks of 4: the short last block ran
    assert steps["fid"]["relative_difference"] == 0.0  # both Inceptions ran on the CPU
    assert {score["inception_precision"] for score in steps["fid"]["scores"].values()} == {"fp32"}
    markdown = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    assert f"## GPU check: {results['device']} (CPU dry run, figures meaningless)" in markdown
    assert "| precision: MFU of `sitctl train --precision auto` (SiT-T/4, 6 steps, batch 8, eager; training_mfu) " \
           "| at least 15% | - | GPU only |" in markdown


@pytest.mark.slow
def test_gpu_check_2_cpu_dry_run_compares_two_gloo_processes_with_one(tmp_path):
    result = gpu_check("--cpu-dry-run", "--gpus", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "out" / "results-2-gpus.json").read_text())
    assert [verdict["status"] for verdict in results["verdicts"]] == ["pass"] * 4
    steps = results["steps"]
    # gloo on one CPU: the same batches give the same losses, and the gathered FID is the one process's.
    assert steps["ddp"]["max_relative_difference"] == 0.0
    assert steps["fid gather"]["training_fid"] == pytest.approx(steps["fid gather"]["eval_fid"], rel=1e-9)
    assert steps["merge"]["images"] == 9 and steps["merge"]["max_levels"] == 0
    assert f"## GPU check, 2 GPUs: {results['device']} (CPU dry run" in (tmp_path / "out" / "BENCHMARKS.md").read_text()
