"""Encode output does not depend on how it was run: killed and resumed, or 2 torchrun processes."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sitctl.artifacts import open_artifact, staging_dir
from sitctl.encode import CRASH_AFTER_SHARDS_ENV, EncodeConfig, encode
from sitctl.errors import ArtifactError
from tests.helpers import run_cli, run_cli_process
from tests.torchrun import torchrun

# 40 digits at 8x8 through the tiny VAE, in 4 shards of 10.
ARGS = ["--image-size", "8", "--limit", "40", "--shard-size", "10", "--batch-size", "4", "--workers", "0"]


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as in the processes run here (OMP_NUM_THREADS=1): the VAE's numbers, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shard_bytes(artifact_dir) -> dict[str, bytes]:
    files = open_artifact(artifact_dir).manifest["files"]
    return {name: (artifact_dir / name).read_bytes() for name in files}


@pytest.fixture(scope="module")
def uninterrupted(tiny_vae_dir, tmp_path_factory):
    """The reference: one process, never interrupted (in-process, one thread like the processes)."""
    out = tmp_path_factory.mktemp("ref") / "latents"
    with one_thread():
        encode(EncodeConfig(src="digits", out=str(out), image_size=8, vae=str(tiny_vae_dir), limit=40, shard_size=10, batch_size=4, workers=0))
    return out


def test_killed_run_resumes_to_identical_shards(uninterrupted, tiny_vae_dir, tmp_path):
    out = tmp_path / "latents"
    # A real process: the hook exits it after two shards, skipping every `finally` as a kill would.
    killed = run_cli_process("encode", "digits", "--out", out, "--vae", tiny_vae_dir, *ARGS, env={CRASH_AFTER_SHARDS_ENV: "2"})
    assert killed.returncode == 75, killed.stderr
    staging = staging_dir(out)
    assert not out.exists() and sorted(p.name for p in staging.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    kept_inode = (staging / "shard-000000.tar").stat().st_ino
    # Leftovers of a run killed mid-write: a half tar, a tmp file, and a complete shard corrupted later.
    (staging / "shard-000002.tar").write_bytes(b"half a tar")
    (staging / "shard-000003.tar.tmp").write_bytes(b"partial")
    with open(staging / "shard-000001.tar", "r+b") as handle:
        handle.seek(600)
        handle.write(b"XX")

    with pytest.raises(ArtifactError, match="cannot continue the partial encode .* made with"):
        encode(EncodeConfig(src="digits", out=str(out), image_size=16, vae="none", limit=40, shard_size=10, workers=0))

    with one_thread():
        resumed = run_cli("encode", "digits", "--out", out, "--vae", tiny_vae_dir, *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert "40 samples in 4 shards, 0 skipped" in resumed.stdout
    assert (out / "shard-000000.tar").stat().st_ino == kept_inode  # complete shard kept, not rewritten
    assert shard_bytes(out) == shard_bytes(uninterrupted)
    assert open_artifact(out).id == open_artifact(uninterrupted).id
    assert not list(out.glob("*.tmp")) and not (out / "_progress").exists()


@pytest.mark.slow
def test_two_torchrun_processes_write_the_same_shards(uninterrupted, tiny_vae_dir, tmp_path):
    out = tmp_path / "latents"
    torchrun(["-m", "sitctl.cli", "encode", "digits", "--out", str(out), "--vae", str(tiny_vae_dir), *ARGS], nproc=2)
    assert shard_bytes(out) == shard_bytes(uninterrupted)
    assert open_artifact(out).extra == open_artifact(uninterrupted).extra
