"""Real 2-process torchrun (gloo on CPU) runs of `sitctl train`."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sitctl.artifacts import open_artifact, verify_artifact
from sitctl.checkpoint import checkpoint_dir, list_checkpoints
from sitctl.train import train
from tests.helpers import tiny, tiny_flags
from tests.torchrun import free_port, torchrun

TINY_FLAGS = tiny_flags(eval_every=0)  # no FID during training: it would build a reference in the working directory


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(digits_latents_dir, tmp_path):
    torchrun(["-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(tmp_path / "two"),
              "--steps", "3", "--ckpt-every", "3", *TINY_FLAGS])
    # One process, its batch of 8 in micro-batches of 2: accumulation must not change the step either.
    one = train(tiny(digits_latents_dir, tmp_path / "one", micro_batch=2, steps=3, ckpt_every=3))
    for name in ("model", "ema"):
        two_weights = load_file(tmp_path / "two" / "step-0000003" / f"{name}.safetensors")
        one_weights = load_file(one.path / f"{name}.safetensors")
        for key, value in one_weights.items():
            torch.testing.assert_close(two_weights[key], value, rtol=0, atol=2e-6, msg=f"{name} {key}")
    # The output layer starts at zero (adaLN-Zero), so these are trained weights being compared.
    assert load_file(one.path / "model.safetensors")["final_layer.linear.weight"].abs().max() > 1e-4
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == 3


@pytest.mark.slow
def test_sigterm_at_the_torchrun_agent_saves_one_checkpoint_for_both_ranks_and_the_resume_is_bitwise_equal(
        digits_latents_dir, tmp_path):
    run_dir = tmp_path / "run"
    flags = tiny_flags(loader_workers=1, eval_every=0)  # the default: one loader worker per rank
    args = ["train", str(digits_latents_dir), "--out", str(run_dir), "--steps", "100000", "--ckpt-every", "100000", *flags]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "sitctl.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "training never got going"
            time.sleep(0.05)
        # The agent's group: torchrun starts each rank in a session of its own, so the ranks (and
        # their loader workers) hear it from the agent, which forwards it to each rank's group.
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = (tmp_path / "output.txt").read_text()
    [(step, path)] = list_checkpoints(run_dir)  # one checkpoint: both ranks stopped at the same step
    stopped = [line for line in output.splitlines() if line.startswith("stopped by")]
    assert stopped == [f"stopped by SIGTERM at step {step} of 100000; saved {path}; continue with: "
                       f"torchrun ... -m sitctl.cli {shlex.join([*args, '--resume'])}"], output  # rank 0 speaks for both
    assert "killed by signal" not in output and "Error" not in output.replace("SignalException", ""), output
    verify_artifact(path)
    # torchrun itself ends in its own SignalException (status 1); the ranks' 143 is what it reports in its log.
    assert process.returncode != 0
    more = ["--steps", str(step + 2), "--ckpt-every", "100000", *flags]
    torchrun(["-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(run_dir), "--resume", *more])
    torchrun(["-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(tmp_path / "straight"), *more])
    resumed, straight = (open_artifact(checkpoint_dir(out, step + 2), "checkpoint") for out in (run_dir, tmp_path / "straight"))
    assert resumed.id == straight.id  # weights, EMA, AdamW moments, RNG states, byte for byte
