"""Nothing lost, nothing silently wrong: full disks, bad inputs, untrusted files, kills and reruns.

Bad inputs go through the real CLI entry point in-process (`run_app`), so a test sees exactly
what a user sees: the exit status and stderr. Full disks are real tmpfs mounts, so those tests
run only as root (CI containers) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from sitctl.artifacts import open_artifact, staging_dir
# test_trackers.py, test_identity.py and test_checkpoint.py import cli, assert_one_error_line and small_disk from here.
from tests.helpers import assert_one_error_line, cli, run_cli_process, sample_bytes, small_disk, tiny, tiny_flags

# Enough images of 8x8 pixels to fill a 48 KiB disk part way through the run.
SAMPLE_ARGS = ["--num-samples", "400", "--batch-size", "32", "--steps", "2", "--mode", "ode", "--method", "euler",
               "--device", "cpu", "--preview", "0"]


# ---------------------------------------------------------------------------------------------
# Full disks (root only: a real tmpfs)
# ---------------------------------------------------------------------------------------------


def test_full_disk_while_sampling_stops_in_one_line_and_the_rerun_redraws_what_was_lost(pixel_run, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert cli("sample", pixel_run, "--out", reference, *SAMPLE_ARGS, capsys=capsys)[0] == 0
    disk = tmp_path / "disk"
    with small_disk(disk, "56k") as resize:  # the lock, two settings notes and part of the images fit
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


# ---------------------------------------------------------------------------------------------
# Bad inputs: each is exit 2, one `error:` line, no traceback, and nothing a later stage accepts
# ---------------------------------------------------------------------------------------------

TRAIN_ARGS = tiny_flags(steps=2, ckpt_every=2)
SMALL_SAMPLE = ["--num-samples", "4", "--batch-size", "4", "--steps", "2", "--mode", "ode", "--method", "euler",
                "--device", "cpu", "--preview", "0"]


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target, symlinks=True)
    return target


def flip_one_bit(path: Path, offset_from_end: int = 9) -> None:
    """Flip a bit near the end of the file (in the tensor data): the size stays the same."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def forge(path: Path, edit) -> None:
    """Edit a manifest and re-sign it (content id and digest), as only a deliberate forger would."""
    from sitctl.artifacts import content_id, manifest_digest

    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    manifest["id"] = content_id(manifest["files"])
    manifest["digest"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def hand_edit(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained_run(digits_latents_dir, tmp_path_factory) -> Path:
    """A real two-step training run (one checkpoint) on the 8x8 digits."""
    from sitctl.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny(digits_latents_dir, out, steps=2, ckpt_every=2))
    return out


def _bad_inputs(root: Path, latents: Path, run: Path, samples_run: Path) -> dict[str, list]:
    """name -> CLI arguments of one bad input, with the files it needs made under `root`."""
    checkpoint = run / "step-0000002"
    cases: dict[str, list] = {}

    def variant(name: str, source: Path, change) -> Path:
        copied = copy_tree(source, root / name)
        change(copied)
        return copied

    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("not a state dict\n")
    cases["sample: empty file"] = ["sample", root / "empty.pt", "--model", "SiT-T/2", "--vae", "none", *SMALL_SAMPLE]
    cases["sample: text file"] = ["sample", root / "text.pt", "--model", "SiT-T/2", "--vae", "none", *SMALL_SAMPLE]
    cases["sample: a checkpoint's ema.safetensors (no image size)"] = [
        "sample", checkpoint / "ema.safetensors", "--model", "SiT-T/2", "--vae", "none", *SMALL_SAMPLE]
    cases["sample: missing checkpoint"] = ["sample", root / "nowhere", *SMALL_SAMPLE]
    cases["sample: latents instead of a checkpoint"] = ["sample", latents, *SMALL_SAMPLE]
    cases["sample: truncated ema.safetensors"] = ["sample", variant(
        "truncated", checkpoint, lambda p: (p / "ema.safetensors").write_bytes((p / "ema.safetensors").read_bytes()[:-100])),
        *SMALL_SAMPLE]
    cases["sample: same-size bit flip in ema.safetensors"] = ["sample", variant(
        "flipped-ema", checkpoint, lambda p: flip_one_bit(p / "ema.safetensors")), *SMALL_SAMPLE]
    cases["sample: same-size bit flip in model.safetensors (--no-ema)"] = ["sample", variant(
        "flipped-model", checkpoint, lambda p: flip_one_bit(p / "model.safetensors")), "--no-ema", *SMALL_SAMPLE]
    cases["sample: manifest without files"] = ["sample", variant(
        "no-files", checkpoint, lambda p: hand_edit(p, lambda m: m.pop("files"))), *SMALL_SAMPLE]
    cases["sample: forged unknown interpolant"] = ["sample", variant(
        "bad-interp", checkpoint, lambda p: forge(p, lambda m: m["extra"].update(interp="cosine"))), *SMALL_SAMPLE]
    cases["sample: forged class count"] = ["sample", variant(
        "bad-classes", checkpoint, lambda p: forge(p, lambda m: m["extra"]["model_config"].update(num_classes=3))),
        *SMALL_SAMPLE]
    cases["sample: forged unknown model field"] = ["sample", variant(
        "bad-field", checkpoint, lambda p: forge(p, lambda m: m["extra"]["model_config"].update(depth_x=3))),
        *SMALL_SAMPLE]
    cases["sample: hand-edited extra"] = ["sample", variant(
        "edited", checkpoint, lambda p: hand_edit(p, lambda m: m["extra"].update(pred="score"))), *SMALL_SAMPLE]
    cases["sample: schema 99"] = ["sample", variant(
        "schema", checkpoint, lambda p: hand_edit(p, lambda m: m.update(schema=99))), *SMALL_SAMPLE]
    cases["sample: manifest not JSON"] = ["sample", variant(
        "not-json", checkpoint, lambda p: (p / "manifest.json").write_text("{not json")), *SMALL_SAMPLE]
    cases["sample: --out an existing artifact"] = ["sample", run, *SMALL_SAMPLE, "--out", latents]
    cases["train --resume: bit flip in model.safetensors"] = ["train", latents, *TRAIN_ARGS, "--steps", "4", "--resume",
                                                              "--out", variant("flipped-run", run, lambda p: flip_one_bit(
                                                                  p / "step-0000002" / "model.safetensors"))]
    cases["train --resume: bit flip in optimizer.safetensors"] = [
        "train", latents, *TRAIN_ARGS, "--steps", "4", "--resume",
        "--out", variant("flipped-optimizer", run, lambda p: flip_one_bit(p / "step-0000002" / "optimizer.safetensors"))]
    cases["train: --out a latents artifact"] = ["train", latents, *TRAIN_ARGS, "--out", latents]
    cases["train: --out a checkpoint artifact"] = ["train", latents, *TRAIN_ARGS, "--out", checkpoint]
    cases["train: --out a samples artifact"] = ["train", latents, *TRAIN_ARGS, "--out", samples_run]
    cases["train: hand-edited scale_factor"] = ["train", variant(
        "scaled", latents, lambda p: hand_edit(p, lambda m: m["extra"].update(scale_factor=1000))), *TRAIN_ARGS]
    cases["train: shard named outside the artifact"] = ["train", variant(
        "escaping", latents, lambda p: forge(p, lambda m: m["extra"]["shards"][0].update(name="../x/shard-000000.tar"))),
        *TRAIN_ARGS]
    cases["train: latents file entry /etc/hostname"] = ["train", variant(
        "absolute", latents, lambda p: forge(p, lambda m: m["files"].update({"/etc/hostname": {"size": 1, "sha256": "0"}}))),
        *TRAIN_ARGS]
    cases["verify: ../ entry"] = ["verify", variant(
        "dotdot", latents, lambda p: forge(p, lambda m: m["files"].update({"../secret.txt": {"size": 1, "sha256": "0"}})))]
    cases["show: manifest not JSON"] = ["show", root / "not-json"]
    cases["encode: missing source"] = ["encode", root / "no-such-folder", "--vae", "none", "--image-size", "8"]
    (root / "empty-folder").mkdir()
    cases["encode: empty folder"] = ["encode", root / "empty-folder", "--vae", "none", "--image-size", "8"]
    cases["eval ref: text inception weights"] = ["eval", "ref", "digits", "--image-size", "16", "--max-images", "4",
                                                 "--device", "cpu", "--no-fetch", "--inception-weights", root / "text.pt"]
    (root / "empty.npz").write_bytes(b"")
    cases["eval fid: empty --ref"] = ["eval", "fid", samples_run, "--ref", root / "empty.npz", "--allow-fewer",
                                      "--device", "cpu", "--no-fetch"]
    return cases


def test_bad_inputs_end_in_one_error_line(digits_latents_dir, trained_run, pixel_run, tmp_path, capsys):
    samples = tmp_path / "some-samples"
    assert cli("sample", pixel_run, *SMALL_SAMPLE, "--out", samples, capsys=capsys)[0] == 0
    cases = _bad_inputs(tmp_path, digits_latents_dir, trained_run, samples)
    clean, messages = [], {}
    for number, (name, args) in enumerate(cases.items()):
        out = tmp_path / f"out-{number}"
        has_out = "--out" in args or args[0] in ("verify", "show")
        status, stderr = cli(*args, *([] if has_out else ["--out", out]), capsys=capsys)
        lines = [line for line in stderr.splitlines() if line.strip()]
        messages[name] = stderr
        half_made = out.exists() or staging_dir(out).exists()
        if status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not half_made:
            clean.append(name)
    print(f"bad inputs tried {len(cases)}, clean {len(clean)}")
    for name in cases:
        print(f"  {name}: {messages[name].strip()}")
    assert sorted(clean) == sorted(cases), {name: messages[name] for name in cases if name not in clean}


# ---------------------------------------------------------------------------------------------
# Kills, then reruns: the same bytes as an uninterrupted run, and no mixing of settings
# ---------------------------------------------------------------------------------------------

SAMPLE_SETTINGS = dict(mode="ode", method="euler", steps=2, num=10, batch_size=4, device="cpu", preview=4)
SAMPLE_CLI = ["--mode", "ode", "--method", "euler", "--steps", "2", "--num-samples", "10", "--batch-size", "4",
              "--device", "cpu", "--preview", "4"]


class _Killed(BaseException):
    """Stands for SIGKILL at one exact point: nothing after it runs (no except Exception catches it)."""


def kill_at_publish(monkeypatch) -> None:
    """Make the rename of a staging dir into place 'kill' the process just before it happens."""
    import sitctl.artifacts

    real_replace = os.replace

    def replace(source, target):
        if str(source).endswith(".partial"):
            raise _Killed
        real_replace(source, target)

    monkeypatch.setattr(sitctl.artifacts.os, "replace", replace)


def test_sampling_killed_then_rerun_gives_identical_bytes_and_never_mixes_settings(pixel_run, tmp_path, monkeypatch, capsys):
    from sitctl.sample import CRASH_HOOK, SampleConfig, sample_stage

    straight = tmp_path / "straight"
    sample_stage(SampleConfig(checkpoint=str(pixel_run), out=str(straight), **SAMPLE_SETTINGS))
    tried = identical = 0
    for batches in (1, 3):  # mid-run, and after the last batch (before finishing)
        out = tmp_path / f"killed-after-{batches}"
        assert run_cli_process("sample", pixel_run, "--out", out, *SAMPLE_CLI, env={CRASH_HOOK: str(batches)}).returncode == 17
        assert_one_error_line(*cli("sample", pixel_run, "--out", out, *SAMPLE_CLI, "--seed", "1", capsys=capsys), "--seed 0, now 1")
        assert cli("sample", pixel_run, "--out", out, *SAMPLE_CLI, capsys=capsys)[0] == 0
        tried, identical = tried + 1, identical + (sample_bytes(out) == sample_bytes(straight))
    # Killed in the finishing window, as the staging dir is renamed into place.
    out = tmp_path / "killed-publishing"
    with monkeypatch.context() as patch:
        kill_at_publish(patch)
        with pytest.raises(_Killed):
            sample_stage(SampleConfig(checkpoint=str(pixel_run), out=str(out), **SAMPLE_SETTINGS))
    assert_one_error_line(*cli("sample", pixel_run, "--out", out, *SAMPLE_CLI, "--seed", "1", capsys=capsys), "--seed 0, now 1")
    assert cli("sample", pixel_run, "--out", out, *SAMPLE_CLI, capsys=capsys)[0] == 0
    tried, identical = tried + 1, identical + (sample_bytes(out) == sample_bytes(straight))
    print(f"sample: interruptions tried {tried}, identical {identical}")
    assert identical == tried
    assert not (out / "sampling-settings.json").exists()  # the resume record is not part of the artifact


def test_encoding_killed_then_rerun_gives_identical_bytes_and_never_mixes_sources(tmp_path, monkeypatch, capsys):
    from sitctl.encode import CRASH_AFTER_SHARDS_ENV

    args = ["--vae", "none", "--image-size", "8", "--limit", "48", "--shard-size", "16", "--workers", "0"]
    straight = tmp_path / "straight"
    assert cli("encode", "digits", "--out", straight, *args, capsys=capsys)[0] == 0
    killed = tmp_path / "killed"
    assert run_cli_process("encode", "digits", "--out", killed, *args, env={CRASH_AFTER_SHARDS_ENV: "1"}).returncode == 75
    assert_one_error_line(*cli("encode", "digits:holdout", "--out", killed, *args, capsys=capsys), "cannot continue the partial encode")
    assert cli("encode", "digits", "--out", killed, *args, capsys=capsys)[0] == 0
    publishing = tmp_path / "publishing"
    with monkeypatch.context() as patch:
        kill_at_publish(patch)
        with pytest.raises(_Killed):
            cli("encode", "digits", "--out", publishing, *args, capsys=capsys)
    assert_one_error_line(*cli("encode", "digits:holdout", "--out", publishing, *args, capsys=capsys), "cannot continue the partial encode")
    # The same run spelled with a relative --out resumes it.
    monkeypatch.chdir(tmp_path)
    assert cli("encode", "digits", "--out", "publishing", *args, capsys=capsys)[0] == 0
    identical = sum(open_artifact(path).id == open_artifact(straight).id for path in (killed, publishing))
    print(f"encode: interruptions tried 2, identical {identical}")
    assert identical == 2
    assert sorted(p.name for p in publishing.iterdir()) == sorted(p.name for p in straight.iterdir())


def test_training_is_reproducible_and_a_killed_checkpoint_write_resumes_to_the_same_bytes(digits_latents_dir, tmp_path):
    from sitctl.checkpoint import checkpoint_dir
    from sitctl.train import train

    def config(out, steps, **overrides):
        return tiny(digits_latents_dir, out, steps=steps, log_every=3, ckpt_every=2, **overrides)

    one, two = train(config(tmp_path / "one", 4)), train(config(tmp_path / "two", 4))
    assert one.id == two.id  # weights, optimizer, rng.safetensors and state.json all identical
    # Killed while step 4's checkpoint was being written: its rows are logged, its directory half made.
    killed = copy_tree(tmp_path / "one", tmp_path / "killed")
    import shutil

    shutil.rmtree(checkpoint_dir(killed, 4))
    staging_dir(checkpoint_dir(killed, 4)).mkdir()
    (staging_dir(checkpoint_dir(killed, 4)) / "model.safetensors").write_bytes(b"half written")
    resumed = train(config(killed, 4, resume=True))
    assert resumed.id == one.id
    rows = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    straight_rows = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()

    def losses(lines):
        return [(row["step"], row["loss"], row["grad_norm"]) for row in map(json.loads, lines)]

    # log_every 3, resumed at 2: the step-3 row still averages steps 1..3, as without the kill, and is not doubled.
    assert losses(rows) == losses(straight_rows)


# ---------------------------------------------------------------------------------------------
# Full and read-only disks in every writing stage; the rerun after freeing space finishes
# ---------------------------------------------------------------------------------------------

ENCODE_ARGS = ["--vae", "none", "--image-size", "16", "--limit", "64", "--shard-size", "32", "--workers", "0"]


def test_full_or_read_only_disk_in_encode_train_and_eval_ref_is_one_line(digits_latents_dir, tmp_path, capsys):
    disk = tmp_path / "disk"
    stages = {
        "encode": ["encode", "digits", *ENCODE_ARGS],
        "train": ["train", digits_latents_dir, *TRAIN_ARGS],
        "eval ref": ["eval", "ref", "digits", "--image-size", "16", "--max-images", "8", "--device", "cpu", "--no-fetch"],
    }
    with small_disk(disk, "16k") as resize:
        for name, args in stages.items():
            status, stderr = cli(*args, "--out", disk / name.replace(" ", "-"), capsys=capsys)
            assert_one_error_line(status, stderr, "No space left on device", f"disk mounted at {disk}")
        resize("16m")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for name, args in stages.items():
            status, stderr = cli(*args, "--out", disk / f"{name.replace(' ', '-')}-ro", capsys=capsys)
            assert_one_error_line(status, stderr, "Read-only file system")
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        # With space again, each stage resumes what it left (train: from scratch, it saved nothing).
        encode_out = disk / "encode"
        assert cli(*stages["encode"], "--out", encode_out, capsys=capsys)[0] == 0
        assert cli(*stages["train"], "--out", disk / "train", capsys=capsys)[0] == 0
        straight = tmp_path / "straight"
        assert cli(*stages["encode"], "--out", straight, capsys=capsys)[0] == 0
        assert open_artifact(encode_out).id == open_artifact(straight).id


# ---------------------------------------------------------------------------------------------
# Two runs on one output: one wins, the other says who holds it
# ---------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_out_names_the_process_holding_it(pixel_run, digits_latents_dir, tmp_path, capsys):
    from sitctl.artifacts import lock_path

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sitctl.artifacts import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(tmp_path / "out")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["sample", pixel_run, *SMALL_SAMPLE], ["encode", "digits", *ENCODE_ARGS],
                     ["train", digits_latents_dir, *TRAIN_ARGS]):
            status, stderr = cli(*args, "--out", tmp_path / "out", capsys=capsys)
            assert_one_error_line(status, stderr, f"sitctl process {holder.pid}")
        # Spelled relative, it is the same output.
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert_one_error_line(*cli("sample", pixel_run, *SMALL_SAMPLE, "--out", "out", capsys=capsys), str(holder.pid))
        finally:
            os.chdir(cwd)
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    assert lock_path(tmp_path / "out").exists()  # left behind by the kill, and harmless:
    assert cli("sample", pixel_run, *SMALL_SAMPLE, "--out", tmp_path / "out", capsys=capsys)[0] == 0
    assert not lock_path(tmp_path / "out").exists()


@pytest.mark.slow
def test_under_torchrun_a_refused_lock_is_one_line_and_no_rank_writes(pixel_run, digits_latents_dir, tmp_path):
    from tests.torchrun import torchrun

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sitctl.artifacts import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["sample", str(pixel_run), *SMALL_SAMPLE], ["train", str(digits_latents_dir), *TRAIN_ARGS]):
            done = torchrun(["-m", "sitctl.cli", *args, "--out", str(out)], check=False)
            assert done.returncode != 0
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            assert errors == [f"error: {out} is being written by sitctl process {holder.pid} on {os.uname().nodename}; "
                              "wait for it to end or stop it, then rerun"], done.stderr
            assert "[rank1]" not in done.stderr, done.stderr  # rank 1 stopped quietly, not in a broken collective
            assert not staging_dir(out).exists() and not out.exists()  # and nothing was written
    finally:
        holder.kill()
        holder.wait()
