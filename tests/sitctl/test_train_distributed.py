"""Real 2-process torchrun (gloo on CPU) runs of `sitctl train`."""

import pytest
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from sitctl.artifacts import verify_artifact
from sitctl.checkpoint import list_checkpoints, load_network
from sitctl.train import TrainConfig, train
from tests.torchrun import free_port, torchrun

TINY_FLAGS = ["--model", "SiT-T/2", "--global-batch", "8", "--data-lanes", "2", "--shuffle-buffer", "16",
              "--loader-workers", "0", "--log-every", "1", "--preview-every", "0", "--lr", "1e-3", "--device", "cpu"]


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(digits_latents_dir, tmp_path):
    torchrun(["-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(tmp_path / "two"),
              "--steps", "3", "--ckpt-every", "3", *TINY_FLAGS])
    # One process, its batch of 8 in micro-batches of 2: accumulation must not change the step either.
    one = train(TrainConfig(latents=str(digits_latents_dir), out=str(tmp_path / "one"), model="SiT-T/2", global_batch=8,
                            micro_batch=2, data_lanes=2, shuffle_buffer=16, loader_workers=0, steps=3, ckpt_every=3,
                            preview_every=0, lr=1e-3))
    for name in ("model", "ema"):
        two_weights = load_file(tmp_path / "two" / "step-0000003" / f"{name}.safetensors")
        one_weights = load_file(one.path / f"{name}.safetensors")
        for key, value in one_weights.items():
            torch.testing.assert_close(two_weights[key], value, rtol=0, atol=2e-6, msg=f"{name} {key}")
    # The output layer starts at zero (adaLN-Zero), so these are trained weights being compared.
    assert load_file(one.path / "model.safetensors")["final_layer.linear.weight"].abs().max() > 1e-4
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == 3


def test_sigterm_saves_a_loadable_checkpoint_and_exits(digits_latents_dir, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(run_dir),
               "--steps", "100000", "--ckpt-every", "100000", *TINY_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "training never got going"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    [(step, path)] = list_checkpoints(run_dir)
    assert f"stopped by signal {int(signal.SIGTERM)} at step {step}" in output
    verify_artifact(path)
    net, config = load_network(path)
    assert config.input_size == 8 and not net.training
    assert 2 <= step < 100000
