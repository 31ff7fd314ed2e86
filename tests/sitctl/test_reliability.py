"""Nothing lost, nothing silently wrong: full disks, bad inputs, untrusted files, kills and reruns.

Bad inputs go through the real CLI entry point in-process (`run_app`), so a test sees exactly
what a user sees: the exit status and stderr. Full disks are real tmpfs mounts, so those tests
run only as root (CI containers) and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from sitctl.artifacts import open_artifact, staging_dir
from tests.sitctl.test_sample import randomised_sit, write_checkpoint

# Enough images of 8x8 pixels to fill a 48 KiB disk part way through the run.
SAMPLE_ARGS = ["--num-samples", "400", "--batch-size", "32", "--steps", "2", "--mode", "ode", "--method", "euler",
               "--device", "cpu", "--preview", "0"]


def cli(*args: str, capsys) -> tuple[int, str]:
    """Run `sitctl ARGS` in this process as the console script does; return (exit status, stderr)."""
    from sitctl.cli import app, run_app

    capsys.readouterr()
    argv, sys.argv = sys.argv, ["sitctl", *map(str, args)]
    try:
        run_app(app)
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
    return status, capsys.readouterr().err


def assert_one_error_line(status: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def pixel_run(digits_latents_dir, tmp_path_factory) -> Path:
    """A run dir with one checkpoint of a random SiT-T/2 on the 8x8 RGB digits (vae none)."""
    net, config = randomised_sit(input_size=8, in_channels=3)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    write_checkpoint(run_dir, digits_latents_dir, net, config)
    return run_dir


# ---------------------------------------------------------------------------------------------
# Full disks (root only: a real tmpfs)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(directory: Path, size: str):
    """A tmpfs of `size` mounted at `directory`; `resize(size)` grows it in place (freeing space)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def resize(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(directory)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(directory)])


def test_full_disk_while_sampling_stops_in_one_line_and_the_rerun_redraws_what_was_lost(pixel_run, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert cli("sample", pixel_run, "--out", reference, *SAMPLE_ARGS, capsys=capsys)[0] == 0
    disk = tmp_path / "disk"
    with small_disk(disk, "48k") as resize:
        status, stderr = cli("sample", pixel_run, "--out", disk / "s", *SAMPLE_ARGS, capsys=capsys)
        assert_one_error_line(status, stderr, "No space left on device", f"disk mounted at {disk}")
        with h5py.File(next(staging_dir(disk / "s").glob("images-rank*.h5")), "r") as handle:
            committed = int(handle.attrs["committed"])
        assert 0 < committed < 400  # the disk filled part way, and only what was written counts
        resize("4m")
        assert cli("sample", pixel_run, "--out", disk / "s", *SAMPLE_ARGS, capsys=capsys)[0] == 0
        with h5py.File(open_artifact(disk / "s").file("samples.h5"), "r") as resumed, \
                h5py.File(open_artifact(reference).file("samples.h5"), "r") as straight:
            images = resumed["images"][:]
            assert np.array_equal(images, straight["images"][:])
        assert images.reshape(400, -1).max(axis=1).min() > 0  # no image left as zeros


# ---------------------------------------------------------------------------------------------
# Untrusted files: nothing a user or a cache supplies is unpickled
# ---------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that makes a directory when unpickled: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_as_inception_weights_is_refused_without_running(tmp_path, capsys, monkeypatch):
    import torch

    marker = tmp_path / "code-ran"
    weights = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1), "trap": _Payload(marker)}, weights)
    status, stderr = cli("eval", "ref", "digits", "--out", tmp_path / "ref", "--image-size", "16", "--max-images", "4",
                         "--device", "cpu", "--no-fetch", "--inception-weights", weights, capsys=capsys)
    assert_one_error_line(status, stderr, "not a state dict of plain tensors")
    # The same file planted where torch-fidelity caches its download.
    from sitctl.evaluate.inception import torch_fidelity_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch_fidelity_cache_path().parent.mkdir(parents=True)
    torch_fidelity_cache_path().write_bytes(weights.read_bytes())
    status, stderr = cli("eval", "ref", "digits", "--out", tmp_path / "ref", "--image-size", "16", "--max-images", "4",
                         "--device", "cpu", "--no-fetch", capsys=capsys)
    assert_one_error_line(status, stderr, "not a state dict of plain tensors")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"these are not weights\n", b"PK\x03\x04 truncated zip"])
def test_an_unreadable_inception_weights_file_is_one_line(tmp_path, capsys, content):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(content)
    status, stderr = cli("eval", "ref", "digits", "--out", tmp_path / "ref", "--image-size", "16", "--max-images", "4",
                         "--device", "cpu", "--no-fetch", "--inception-weights", weights, capsys=capsys)
    assert_one_error_line(status, stderr, str(weights))


def test_plain_tensor_inception_weights_still_load(tmp_path):
    """The safe route (weights_only read, in-memory copy) gives torch-fidelity's network its tensors."""
    from unittest import mock

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from sitctl.evaluate.inception import InceptionWeights, create_extractor

    torch.save({}, tmp_path / "empty.pth")
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):  # only to get the tensor names and shapes
        blank = FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=tmp_path / "empty.pth")
    generator = torch.Generator().manual_seed(0)
    state_dict = {key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
                  for key, value in blank.state_dict().items()}
    torch.save(state_dict, tmp_path / "weights.pth")
    extractor = create_extractor(InceptionWeights("torch-fidelity", tmp_path / "weights.pth"), ["2048"], torch.device("cpu"))
    assert torch.equal(extractor.fc.weight, state_dict["fc.weight"])
