"""Watching a run: TensorBoard and W&B trackers, FID during training, eval results joining their run.

Every tracker file is read back with the tracker's own reader (TensorBoard's EventAccumulator;
W&B's record protobufs from its offline run file), kills are real SIGKILLs to a real process, and
the FID during training is checked against the real `sample` + `eval fid` stages.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sitctl.artifacts import open_artifact, verify_artifact
from sitctl.checkpoint import list_checkpoints
from sitctl.cli import app, run_app
from sitctl.plots import read_metrics
from sitctl.trackers import TRACKERS, Guarded, NullTracker, TensorBoardTracker, open_tracker
from sitctl.train import TrainConfig, train
from tests.sitctl.test_data import make_latents
from tests.sitctl.test_reliability import assert_one_error_line, cli, small_disk
from tests.torchrun import torchrun

TINY = dict(model="SiT-T/2", global_batch=8, data_lanes=2, shuffle_buffer=16, loader_workers=0, log_every=1,
            preview_every=0, lr=1e-3, eval_every=0, device="cpu")
TINY_FLAGS = ["--model", "SiT-T/2", "--global-batch", "8", "--data-lanes", "2", "--shuffle-buffer", "16",
              "--loader-workers", "0", "--log-every", "1", "--lr", "1e-3", "--device", "cpu", "--eval-every", "0"]
# FID during training at test size: 16 images in blocks of 8 (two ranks get one block each), 2 SDE steps.
EVAL = dict(eval_num=16, eval_batch=8, eval_steps=2)
EVAL_FLAGS = ["--eval-num", "16", "--eval-batch", "8", "--eval-steps", "2"]


def tiny(latents, out, **overrides):
    return TrainConfig(latents=str(latents), out=str(out), **{**TINY, **overrides})


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard itself reads the folder (restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_images(log_dir: Path, tag: str) -> list[tuple[int, int, int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    return [(event.step, event.width, event.height) for event in events.Images(tag)]


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory):
    """16 held-out 8x8 digits through the FID Inception network: a small reference artifact."""
    from sitctl.configs import ReferenceConfig
    from sitctl.evaluate.reference import build_reference

    out = tmp_path_factory.mktemp("reference") / "digits"
    return build_reference(ReferenceConfig(source="digits:holdout", out=str(out), image_size=8, max_images=16, device="cpu"))


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------


def test_tensorboard_reads_back_every_logged_scalar_and_the_preview_image(digits_latents_dir, tmp_path):
    train(tiny(digits_latents_dir, tmp_path / "run", steps=3, ckpt_every=3, preview_every=3, preview_images=4,
               preview_steps=1))
    scalars = event_scalars(tmp_path / "run" / "logs")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for key in ("loss", "images_per_sec", "lr", "grad_norm", "memory_gib"):
        assert scalars[f"train/{key}"] == [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows], key
    for bucket, low in enumerate(f"{k / 10:.1f}-{(k + 1) / 10:.1f}" for k in range(10)):
        logged = [(row["step"], row["loss_by_t"][bucket]) for row in rows if row["loss_by_t"][bucket] is not None]
        assert scalars.get(f"train/loss_by_t/{low}", []) == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged]
    assert "train/mfu" not in scalars  # no MFU without a known peak (a CPU)
    # 2x2 grid of 8x8 images, 2-pixel gaps, upscaled 8x: (2 * (8 + 2) + 2) * 8 pixels a side.
    assert event_images(tmp_path / "run" / "logs", "preview") == [(3, 176, 176)]


@pytest.mark.slow
def test_a_sigkill_then_resume_leaves_exactly_one_value_per_step_for_each_scalar(digits_latents_dir, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "run" / "logs"
    base = [sys.executable, "-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(run), *TINY_FLAGS,
            "--preview-every", "0"]
    subprocess.run([*base, "--steps", "4", "--ckpt-every", "4"], check=True, capture_output=True, timeout=300)
    # Resumed with no checkpoint before its end, and killed without warning past step 8.
    process = subprocess.Popen([*base, "--steps", "100000", "--ckpt-every", "100000", "--resume"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() or len(read_metrics(run / "metrics.jsonl")) < 8:
            assert process.poll() is None and time.monotonic() < deadline, "training never got going"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert [step for step, _ in list_checkpoints(run)] == [4]
    killed = [step for step, _ in event_scalars(logs)["train/loss"]]
    assert killed[:8] == list(range(1, 9))  # steps past the checkpoint were on disk when it died
    subprocess.run([*base, "--steps", "10", "--ckpt-every", "100000", "--resume"], check=True, capture_output=True,
                   timeout=300)
    scalars = event_scalars(logs)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec"):
        assert [step for step, _ in scalars[tag]] == list(range(1, 11)), tag
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 11))
    assert [value for _, value in scalars["train/loss"]] == [pytest.approx(row["loss"], rel=1e-6) for row in rows]


# ---------------------------------------------------------------------------------------------
# W&B (offline)
# ---------------------------------------------------------------------------------------------


def wandb_summary(log_dir: Path) -> dict:
    """The run summary an offline W&B run recorded, replayed from its run file's summary records.

    The file is a LevelDB-style log (32 KiB blocks, 7-byte record headers) of W&B's Record
    protobufs after a 7-byte W&B header; `wandb sync` reads the same records.
    """
    from wandb.proto import wandb_internal_pb2

    [path] = (log_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, position, pieces, summary = path.read_bytes(), 7, [], {}
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            break
        pieces.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return summary


def test_wandb_offline_leaves_a_run_whose_summary_holds_the_final_loss(digits_latents_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    checkpoint = train(tiny(digits_latents_dir, tmp_path / "run", steps=3, ckpt_every=3, tracker="wandb"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    summary = wandb_summary(tmp_path / "run" / "logs")
    assert summary["train/loss"] == pytest.approx(rows[-1]["loss"], rel=1e-9)
    assert summary["_step"] == 3
    assert checkpoint.id in summary["checkpoint"]  # a dashboard line leads back to `sitctl show`


def test_a_wandb_eval_series_at_a_past_step_is_kept_on_its_own_x_axis(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    tracker = open_tracker("wandb", tmp_path / "logs", start_step=None, run_name="run")
    tracker.scalars(5, {"train/loss": 0.5})
    tracker.eval_series(2, {"fid": 12.5})  # W&B would drop a point at step 2 < 5 on its own step axis
    tracker.close()
    summary = wandb_summary(tmp_path / "logs")
    assert summary["sitctl_eval/fid"] == 12.5 and summary["sitctl_eval/step"] == 2 and summary["train/loss"] == 0.5


# ---------------------------------------------------------------------------------------------
# The tracker interface and its guard
# ---------------------------------------------------------------------------------------------

# Every method of the interface, with arguments of the right kinds.
CALLS = {"scalars": (1, {"train/loss": 0.5}), "image": (1, "preview", b""), "text": (1, "checkpoint", "x"),
         "hyperparameters": ({"lr": 1e-3},), "eval_series": (1, {"fid": 3.0}), "flush": (), "close": ()}
WARNING = "warning: the tensorboard tracker failed ([Errno 28] No space left on device); training goes on without it"


class FailingTracker:
    """Every method records its call, then fails as a full disk does."""

    def __init__(self):
        self.calls = []

    def fail(self, method):
        self.calls.append(method)
        raise OSError(28, "No space left on device")

    def scalars(self, step, values): self.fail("scalars")
    def image(self, step, tag, image): self.fail("image")
    def text(self, step, tag, text): self.fail("text")
    def hyperparameters(self, settings): self.fail("hyperparameters")
    def eval_series(self, step, values): self.fail("eval_series")
    def flush(self): self.fail("flush")
    def close(self): self.fail("close")


def test_the_guard_has_every_method_of_the_interface_and_each_tracker_implements_them():
    for kind in (NullTracker, *(kind for kind in TRACKERS.values() if kind is not None)):
        for method in CALLS:
            assert callable(getattr(kind, method)), (kind, method)
    assert {name for name in vars(Guarded) if not name.startswith("_")} == set(CALLS)


def test_a_misspelt_method_on_a_guarded_tracker_raises_attribute_error_and_warns_nothing(capsys):
    guarded = Guarded(NullTracker(), "tensorboard")
    with pytest.raises(AttributeError, match="scalar"):
        guarded.scalar(1, {"train/loss": 0.5})
    # A tracker class missing a method of the interface is a bug too, not a tracker that failed.
    with pytest.raises(AttributeError, match="eval_series"):
        Guarded(object(), "tensorboard").eval_series(1, {"fid": 3.0})
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", CALLS)
def test_each_method_failing_is_one_warning_and_every_later_call_does_nothing(method, capsys):
    failing = FailingTracker()
    guarded = Guarded(failing, "tensorboard")
    getattr(guarded, method)(*CALLS[method])
    assert capsys.readouterr().err.splitlines() == [WARNING]
    # The failed tracker was closed (once more when close itself failed), then dropped.
    assert failing.calls == [method, "close"]
    for again, args in CALLS.items():
        getattr(guarded, again)(*args)
    assert failing.calls == [method, "close"] and capsys.readouterr().err == ""


def test_the_tensorboard_eval_series_is_a_sub_run_with_the_training_fids_tag(tmp_path):
    logs = tmp_path / "logs"
    folder = TensorBoardTracker.eval_series_dir(logs, "sitctl-eval-16-sde_euler")
    tracker = open_tracker("tensorboard", folder, start_step=None, run_name="sitctl-eval-16-sde_euler")
    tracker.eval_series(2, {"fid": 12.5, "precision": 0.25})
    tracker.close()
    assert folder.parent == logs  # its own line on the chart of the run's eval/fid
    assert event_scalars(folder) == {"eval/fid": [(2, 12.5)], "eval/precision": [(2, 0.25)]}


def tracker_name_comparisons(path: Path) -> list[str]:
    """`x.tracker == "wandb"`, `name in ("tensorboard", ...)`: comparisons of a tracker with a tracker name."""
    def names(node):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {name for item in node.elts for name in names(item)}
        return {node.value} if isinstance(node, ast.Constant) and node.value in TRACKERS else set()

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            compared = set().union(*map(names, [node.left, *node.comparators]))
            # "none" is also other settings' word; compared with a tracker it is the tracker's name.
            if compared - {"none"} or (compared and "tracker" in ast.unparse(node).lower()):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_but_trackers_compares_a_tracker_name(tmp_path):
    import sitctl

    example = tmp_path / "example.py"
    example.write_text('a = config.tracker == "none"\nb = name in ("tensorboard", "x")\nc = config.cfg == "none"\n')
    assert len(tracker_name_comparisons(example)) == 2  # the check sees what it forbids
    package = Path(sitctl.__file__).parent
    assert [line for path in sorted(package.rglob("*.py")) if path.name != "trackers.py"
            for line in tracker_name_comparisons(path)] == []


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------


def test_an_unwritable_log_dir_is_one_error_line_before_training(digits_latents_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    status, stderr = cli("train", digits_latents_dir, "--out", tmp_path / "run", *TINY_FLAGS, "--steps", "2",
                         "--log-dir", tmp_path / "a-file" / "logs", capsys=capsys)
    assert_one_error_line(status, stderr, "cannot start the tensorboard tracker", "--tracker none")
    assert list_checkpoints(tmp_path / "run") == [] and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_asked_for_but_not_installed_is_one_error_line(digits_latents_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    status, stderr = cli("train", digits_latents_dir, "--out", tmp_path / "run", *TINY_FLAGS, "--steps", "2",
                         "--tracker", "wandb", capsys=capsys)
    assert_one_error_line(status, stderr, "--tracker wandb needs the wandb package")
    assert list_checkpoints(tmp_path / "run") == []


def test_a_tracker_failing_mid_run_is_one_warning_and_every_checkpoint_is_saved(digits_latents_dir, tmp_path, capsys):
    # The event file's disk fills up with preview images part way through the run.
    with small_disk(tmp_path / "disk", "48k"):
        checkpoint = train(tiny(digits_latents_dir, tmp_path / "run", steps=12, ckpt_every=4, preview_every=1,
                                preview_images=40, preview_steps=1, log_dir=str(tmp_path / "disk" / "logs")))
    stderr = capsys.readouterr().err
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "the tensorboard tracker failed" in warnings[0] and "Traceback" not in stderr
    assert checkpoint.extra["step"] == 12 and [step for step, _ in list_checkpoints(tmp_path / "run")] == [8, 12]
    verify_artifact(checkpoint.path)


def test_a_run_without_a_reference_says_so_once_and_trains_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sitctl.train_setup.DEFAULT_EVAL_EVERY", 1)  # the default period (25,000 steps) due in a 2-step run
    latents = make_latents(tmp_path / "latents", shape=(3, 8, 8))  # no source images recorded
    checkpoint = train(tiny(latents.path, tmp_path / "run", steps=2, ckpt_every=2, eval_every=None))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: no FID during training: {tmp_path / 'run'} is in no workspace; training goes on without it"]
    assert checkpoint.extra["step"] == 2 and checkpoint.config["eval_every"] == 1
    assert not [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "fid" in row]


def test_a_typed_eval_period_without_a_reference_is_one_error_line_before_the_first_step(tmp_path, capsys):
    latents = make_latents(tmp_path / "latents", shape=(3, 8, 8))
    args = ["train", str(latents.path), "--out", str(tmp_path / "run"), "--model", "SiT-T/2", "--global-batch", "8",
            "--data-lanes", "2", "--shuffle-buffer", "16", "--loader-workers", "0", "--preview-every", "0",
            "--steps", "2", "--device", "cpu", "--eval-every", "1"]
    with pytest.raises(SystemExit) as exit_status:
        run_app(app, args)
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --eval-every 1 needs a reference: {tmp_path / 'run'} is in no workspace; pass --eval-ref "
        "(a reference artifact or an ADM .npz), or --eval-every 0"]
    assert not list((tmp_path / "run").glob("step-*")) and not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# FID during training, and eval results joining their run
# ---------------------------------------------------------------------------------------------


def sample_then_eval_fid(checkpoint: Path, reference, out: Path) -> float:
    """`sitctl sample` + `sitctl eval fid` with the settings the run's FID during training used."""
    from sitctl.configs import EvalConfig, SampleConfig
    from sitctl.evaluate.stage import evaluate_stage
    from sitctl.sample import sample_stage

    samples = sample_stage(SampleConfig(checkpoint=str(checkpoint), out=str(out / "samples"), mode="sde", method="euler",
                                        steps=2, num=16, batch_size=8, seed=0, preview=0, device="cpu"))
    metrics = evaluate_stage(EvalConfig(samples=str(samples.path), ref=str(reference.path), num_expected=16,
                                        out=str(out / "metrics"), device="cpu"))
    return metrics.extra["values"]["fid"]


@pytest.mark.slow
def test_fid_during_training_equals_sample_then_eval_fid_and_the_eval_joins_the_run(digits_latents_dir,
                                                                                     digits_reference, tmp_path):
    run = tmp_path / "run"
    train(tiny(digits_latents_dir, run, steps=2, ckpt_every=2, eval_every=2, eval_ref=str(digits_reference.path), **EVAL))
    [row] = [row for row in read_metrics(run / "metrics.jsonl") if "fid" in row]
    assert row["step"] == 2 and row["fid_num"] == 16 and (run / "fid.png").is_file()
    assert event_scalars(run / "logs")["eval/fid"] == [(2, pytest.approx(row["fid"], rel=1e-6))]
    fid = sample_then_eval_fid(run / "step-0000002", digits_reference, tmp_path)
    assert fid == pytest.approx(row["fid"], abs=1e-6)
    # The eval result is on the same chart (tag eval/fid), as a series of its own, at the checkpoint's step.
    [series] = (run / "logs").glob("sitctl-eval-16-*")
    assert event_scalars(series)["eval/fid"] == [(2, pytest.approx(fid, rel=1e-6))]


@pytest.mark.slow
def test_two_processes_measure_the_same_fid_during_training_as_one(digits_latents_dir, digits_reference, tmp_path):
    torchrun(["-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(tmp_path / "two"), *TINY_FLAGS,
              "--preview-every", "0", "--steps", "2", "--ckpt-every", "2", "--eval-every", "2", *EVAL_FLAGS,
              "--eval-ref", str(digits_reference.path)])
    [two] = [row["fid"] for row in read_metrics(tmp_path / "two" / "metrics.jsonl") if "fid" in row]
    # One process sampling and scoring the same weights gives the same number: the split over
    # ranks changes no image and loses or repeats no sample. (One thread, as torchrun's ranks
    # have: the thread count moves Inception features by rounding, about 1e-8 of the FID.)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    samples, metrics = tmp_path / "samples", tmp_path / "metrics"
    for command in (["sample", tmp_path / "two" / "step-0000002", "--out", samples, "--mode", "sde", "--method", "euler",
                     "--steps", "2", "--num", "16", "--batch-size", "8", "--seed", "0", "--preview", "0", "--device", "cpu"],
                    ["eval", "fid", samples, "--ref", digits_reference.path, "--num-expected", "16", "--out", metrics,
                     "--device", "cpu"]):
        subprocess.run([sys.executable, "-m", "sitctl.cli", *map(str, command)], check=True, capture_output=True,
                       env=env, timeout=300)
    one = open_artifact(metrics, "metrics").extra["values"]["fid"]
    assert one == pytest.approx(two, abs=1e-6)
