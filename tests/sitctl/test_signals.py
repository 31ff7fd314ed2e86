"""Preemption as clusters deliver it: SIGTERM to a stage's whole process group, worker processes included.

SLURM (at preemption and at the time limit), `timeout` and most job runners signal every process
of the job. Each test starts a stage as the leader of its own process group, waits until it has
made progress (a file it writes), signals the group, and checks the one line, the exit status
128 + 15, what was saved, and that continuing ends in the same bytes as a run never interrupted.
The torchrun delivery (the agent forwarding SIGTERM to its ranks) is in test_train_distributed.py.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sitctl.artifacts import staging_dir, verify_artifact
from sitctl.checkpoint import checkpoint_dir, list_checkpoints
from tests.helpers import cli, sample_bytes, tiny, tiny_flags

pytestmark = pytest.mark.slow


def signal_group_after(args: list, made_progress, tmp_path: Path, signum: int = signal.SIGTERM,
                       timeout: float = 300) -> tuple[int, str, str]:
    """Start `sitctl ARGS` as a process-group leader, signal the group once made_progress(); (status, stdout, stderr)."""
    out, err = open(tmp_path / "stdout.txt", "w+"), open(tmp_path / "stderr.txt", "w+")
    process = subprocess.Popen([sys.executable, "-m", "sitctl.cli", *map(str, args)], stdout=out, stderr=err,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + timeout
        while not made_progress():
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the stage made no progress"
            time.sleep(0.05)
        os.killpg(process.pid, signum)  # the whole group: the stage and its worker processes
        status = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        out.close(), err.close()
    return status, (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


def continue_line(args: list, extra: tuple[str, ...] = ()) -> str:
    return f"continue with: sitctl {shlex.join([*map(str, args), *extra])}"


TRAIN_ARGS = tiny_flags(loader_workers=2, eval_every=0)  # no FID during training (no reference in the working directory)


def test_group_sigterm_during_training_with_loader_workers_saves_says_so_and_the_resume_is_bitwise_equal(
        digits_latents_dir, tmp_path):
    from sitctl.train import train

    out = tmp_path / "run"
    args = ["train", digits_latents_dir, "--out", out, "--steps", "100000", "--ckpt-every", "100000", *TRAIN_ARGS]
    metrics = out / "metrics.jsonl"
    status, _, stderr = signal_group_after(args, lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, tmp_path)
    [(step, saved)] = list_checkpoints(out)
    assert status == 128 + signal.SIGTERM
    assert stderr.splitlines() == [f"stopped by SIGTERM at step {step} of 100000; saved {checkpoint_dir(out, step)}; "
                                   + continue_line(args, ("--resume",))]
    verify_artifact(saved)

    def config(run_dir, **more):
        return tiny(digits_latents_dir, run_dir, steps=step + 2, loader_workers=2, ckpt_every=100000, **more)

    resumed, straight = train(config(out, resume=True)), train(config(tmp_path / "straight"))
    assert resumed.id == straight.id  # weights, EMA, AdamW moments, RNG states and data position, byte for byte
    assert logged_losses(metrics) == logged_losses(tmp_path / "straight" / "metrics.jsonl")


def logged_losses(path: Path) -> list[tuple]:
    return [(row["step"], row["loss"], row["grad_norm"]) for row in map(json.loads, path.read_text().splitlines())]


def test_group_sigint_during_training_exits_130_after_saving(digits_latents_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", digits_latents_dir, "--out", out, "--steps", "100000", "--ckpt-every", "100000", *TRAIN_ARGS]
    metrics = out / "metrics.jsonl"
    status, _, stderr = signal_group_after(args, metrics.is_file, tmp_path, signum=signal.SIGINT)  # Ctrl-C at a terminal
    [(step, _)] = list_checkpoints(out)
    assert status == 128 + signal.SIGINT
    assert stderr.splitlines() == [f"stopped by SIGINT at step {step} of 100000; saved {checkpoint_dir(out, step)}; "
                                   + continue_line(args, ("--resume",))]


def test_group_sigterm_during_encode_with_workers_keeps_finished_shards_and_the_rerun_is_bitwise_equal(tmp_path):
    from sitctl.encode import EncodeConfig, encode

    # 24 shards: the signal, sent as soon as the first is done, arrives long before the last.
    settings = dict(src="digits", image_size=16, vae="none", limit=1536, shard_size=64, batch_size=8)
    out = tmp_path / "latents"
    args = ["encode", "digits", "--out", out, "--image-size", "16", "--vae", "none", "--limit", "1536",
            "--shard-size", "64", "--batch-size", "8", "--workers", "2"]
    markers = staging_dir(out) / "_progress"
    status, _, stderr = signal_group_after(args, lambda: any(markers.glob("shard-*")), tmp_path)
    finished = len(list(markers.glob("shard-*")))
    assert status == 128 + signal.SIGTERM and 1 <= finished < 24
    assert stderr.splitlines() == [f"stopped by SIGTERM with {finished} of 24 shards finished in {staging_dir(out)}; "
                                   + continue_line(args)]
    rerun = encode(EncodeConfig(out=str(out), workers=2, **settings))  # the same command
    straight = encode(EncodeConfig(out=str(tmp_path / "straight"), workers=0, **settings))
    assert rerun.id == straight.id


def test_group_sigterm_during_sampling_keeps_the_drawn_blocks_and_the_rerun_is_bitwise_equal(pixel_run, tmp_path, capsys):
    out = tmp_path / "samples"
    options = ["--num-samples", "64", "--batch-size", "4", "--mode", "ode", "--method", "euler", "--steps", "2",
               "--device", "cpu", "--preview", "8"]  # 16 blocks: the signal comes after the first
    args = ["sample", pixel_run, "--out", out, *options]
    status, _, stderr = signal_group_after(args, lambda: any(staging_dir(out).glob("images-rank*.h5")), tmp_path)
    assert status == 128 + signal.SIGTERM
    [line] = stderr.splitlines()
    drawn = int(re.fullmatch(r"stopped by SIGTERM with (\d+) of 64 images drawn into (.*); (continue with: .*)", line)[1])
    assert line == f"stopped by SIGTERM with {drawn} of 64 images drawn into {staging_dir(out)}; " + continue_line(args)
    assert 0 < drawn < 64 and drawn % 4 == 0  # whole blocks
    assert cli(*args, capsys=capsys)[0] == 0  # the same command
    assert cli("sample", pixel_run, "--out", tmp_path / "straight", *options, capsys=capsys)[0] == 0
    assert sample_bytes(out) == sample_bytes(tmp_path / "straight")


def test_a_signal_agreed_on_in_the_last_step_lets_the_run_finish_with_status_0(digits_latents_dir, tmp_path, monkeypatch):
    """The ranks agree on a stop a step after the signal; when that step is the last, the run simply ends."""
    import sitctl.train
    from sitctl.train import train

    real_step = sitctl.train.train_step

    def signal_in_step_2(run, batch):
        if run.step == 1:  # computing step 2 of 3: its vote is read in step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, batch)

    monkeypatch.setattr(sitctl.train, "train_step", signal_in_step_2)
    done = train(tiny(digits_latents_dir, tmp_path / "run", steps=3))
    assert done.extra["step"] == 3 and [step for step, _ in list_checkpoints(tmp_path / "run")] == [3]
