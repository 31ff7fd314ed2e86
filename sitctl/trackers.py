"""Experiment trackers: what a training run shows in TensorBoard or Weights & Biases while it trains.

A tracker is a small object with one method per kind of record (scalars, an image, the config,
a checkpoint, `sitctl eval`'s results), chosen from `TRACKERS` by `--tracker` where the run is
prepared; the training loop and `sitctl eval` call the same methods whichever it is and never
branch on the name. Rank 0 holds the real one, the other ranks a `NullTracker`.

Resume rule, the same as metrics.jsonl's: a run resumed from its checkpoint at step S redoes
steps S+1..., so whatever the killed run logged past S must not count twice. TensorBoard's event
files are append-only, so the resumed writer opens a new file with `purge_step=S+1`: its first
record tells every TensorBoard reader to drop the events at steps > S written before it. W&B
cannot delete points: the resumed run continues the same W&B run id, and its points past S
repeat the killed run's (training is deterministic); W&B's monotonic step keeps one of each.
The tracker is flushed at every log step, as metrics.jsonl is appended, so no step logged
before a kill is lost and the purge has something to hide.

Failure rule: a tracker that cannot open is one `error:` line before training starts; one that
fails later prints one warning and the run trains on without it (checkpoints never depend on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from sitctl.artifacts import ancestor, write_failure
from sitctl.distributed import all_agree
from sitctl.errors import OtherRankStopped, SitctlError, first_line
from sitctl.records import CheckpointInfo

LOGS = "logs"  # the tracker's folder inside the run directory, unless --log-dir says otherwise
WANDB_ID_FILE = "wandb-run-id"  # in the log dir: a resumed run continues the same W&B run
EVAL_SERIES = "sitctl-eval"  # sub-run of `sitctl eval` results beside the training curves


class TrackerError(SitctlError):
    """A tracker that cannot start (missing package, unwritable log directory)."""


class Tracker(Protocol):
    """What the training loop (and `sitctl eval`) hand a tracker."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, step: int, tag: str, image: Any) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None: ...

    def hyperparameters(self, settings: dict[str, Any]) -> None: ...

    def eval_series(self, step: int, values: dict[str, float]) -> None:
        """`sitctl eval`'s values for the checkpoint at `step`, as a series beside the training curves."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


# =============================================================================================
# The trackers
# =============================================================================================


class NullTracker:
    """--tracker none, and every rank but 0."""

    def scalars(self, step, values): pass
    def image(self, step, tag, image): pass
    def text(self, step, tag, text): pass
    def hyperparameters(self, settings): pass
    def eval_series(self, step, values): pass
    def flush(self): pass
    def close(self): pass


class TensorBoardTracker:
    """Event files in `log_dir`, written by torch's SummaryWriter and read by TensorBoard."""

    def __init__(self, log_dir: Path, *, start_step: int | None, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides every earlier event at steps >= it: what a resumed run redoes.
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=60)
        # The writer's thread re-raises a failed write (a full disk) in this one, where Guarded
        # turns it into one warning; its own traceback would only repeat it.
        self.previous_hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread

    def _quiet_writer_thread(self, args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            self.previous_hook(args)

    def scalars(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, step, tag, image):
        self.writer.add_image(tag, image, step, dataformats="HWC")  # (H, W, 3) uint8

    def text(self, step, tag, text):
        self.writer.add_text(tag, text, step)

    def hyperparameters(self, settings):
        from torch.utils.tensorboard.summary import hparams

        # Written into this run's own file (SummaryWriter.add_hparams would start another run folder).
        for summary in hparams(settings, {}):
            self.writer.file_writer.add_summary(summary)
        self.text(0, "config", "```\n" + json.dumps(settings, indent=2) + "\n```")

    def eval_series(self, step, values):
        self.scalars(step, {f"eval/{key}": value for key, value in values.items()})

    def flush(self):
        self.writer.flush()

    def close(self):
        try:
            self.writer.close()
        finally:
            threading.excepthook = self.previous_hook

    @staticmethod
    def eval_series_dir(log_dir, series):
        # A sub-run: the same tag (eval/fid) puts the series on the training FID's chart, as a line of its own.
        return log_dir / series


class WandbTracker:
    """A Weights & Biases run (WANDB_MODE=offline and the other WANDB_* variables are honoured)."""

    def __init__(self, log_dir: Path, *, start_step: int | None, run_name: str):
        try:
            import wandb
        except ImportError:
            raise TrackerError("--tracker wandb needs the wandb package (pip install wandb), "
                               "or choose --tracker tensorboard or none") from None
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            id=run_id, resume="allow", name=run_name, reinit="create_new",
            dir=None if "WANDB_DIR" in os.environ else str(log_dir),
            project=None if "WANDB_PROJECT" in os.environ else "sitctl",
        )

    def scalars(self, step, values):
        self.run.log(dict(values), step=step)

    def image(self, step, tag, image):
        import wandb

        self.run.log({tag: wandb.Image(image)}, step=step)

    def text(self, step, tag, text):
        self.run.summary[tag] = text

    def hyperparameters(self, settings):
        self.run.config.update(settings, allow_val_change=True)

    def eval_series(self, step, values):
        # W&B drops a point logged at a step below its run's latest, so eval points (at a past
        # checkpoint's step) get an x axis of their own, `sitctl_eval/step` (W&B's define_metric).
        self.run.define_metric("sitctl_eval/step")
        self.run.define_metric("sitctl_eval/*", step_metric="sitctl_eval/step")
        self.run.log({**{f"sitctl_eval/{key}": value for key, value in values.items()}, "sitctl_eval/step": step})

    def flush(self):
        pass  # the W&B service process writes as it receives

    def close(self):
        import wandb

        self.run.finish()
        wandb.teardown()  # stops W&B's service process, which writes the run file's last records

    @staticmethod
    def eval_series_dir(log_dir, series):
        return log_dir  # the run's own W&B run (its id is in the log dir), on an x axis of its own


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "none": None}


class Guarded:
    """A tracker whose failures after opening are one warning, after which it is dropped.

    Each method guards its own call, and only the call: a method that does not exist (here or on
    the tracker) is a bug and raises AttributeError with its traceback, as on any object."""

    def __init__(self, tracker, name: str):
        self.tracker, self.name = tracker, name

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._guard(self.tracker.scalars, step, values)

    def image(self, step: int, tag: str, image: Any) -> None:
        self._guard(self.tracker.image, step, tag, image)

    def text(self, step: int, tag: str, text: str) -> None:
        self._guard(self.tracker.text, step, tag, text)

    def hyperparameters(self, settings: dict[str, Any]) -> None:
        self._guard(self.tracker.hyperparameters, settings)

    def eval_series(self, step: int, values: dict[str, float]) -> None:
        self._guard(self.tracker.eval_series, step, values)

    def flush(self) -> None:
        self._guard(self.tracker.flush)

    def close(self) -> None:
        self._guard(self.tracker.close)

    def _guard(self, method, *args) -> None:
        try:
            method(*args)
        except Exception as error:  # a full disk, a dead W&B service: never stop training
            failed, self.tracker = self.tracker, NullTracker()  # every later call does nothing
            with contextlib.suppress(Exception):
                failed.close()
            print(f"warning: the {self.name} tracker failed ({first_line(error)}); training goes on without it",
                  file=sys.stderr, flush=True)


# =============================================================================================
# Opening one
# =============================================================================================


def log_dir_of(config: dict[str, Any], run_dir: Path) -> Path | None:
    """Where a run's tracker writes, from its recorded config; None for --tracker none (or older runs)."""
    if TRACKERS.get(config.get("tracker")) is None:
        return None
    return Path(config["log_dir"]) if config.get("log_dir") else Path(run_dir) / LOGS


def logs_of(checkpoint) -> str | None:
    """`tensorboard /abs/runs/v1/logs`: a checkpoint's run's tracker and folder, for `sitctl ls` and `show`."""
    log_dir = log_dir_of(checkpoint.config, checkpoint.path.parent)
    return None if log_dir is None else f"{checkpoint.config['tracker']} {log_dir.resolve()}"


def open_tracker(name: str, log_dir: Path, *, start_step: int | None, run_name: str) -> Guarded:
    """The named tracker, opened now; anything that stops it opening is a TrackerError."""
    kind = TRACKERS[name]
    if kind is None:
        return Guarded(NullTracker(), name)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / ".sitctl-write-test"  # SummaryWriter would only fail at its first flush
        probe.write_text("")
        probe.unlink()
        return Guarded(kind(log_dir, start_step=start_step, run_name=run_name), name)
    except TrackerError:
        raise
    except OSError as error:  # a full or read-only disk: name the disk, as every stage's write does
        raise TrackerError(f"{write_failure(f'start the {name} tracker in', log_dir, error)} "
                           "(pass --log-dir somewhere writable, or --tracker none)") from None
    except Exception as error:
        raise TrackerError(f"cannot start the {name} tracker in {log_dir}: {first_line(error)} "
                           "(pass --log-dir somewhere writable, or --tracker none)") from None


def open_run_tracker(config, d, start_step: int, latents_id: str) -> Guarded:
    """Rank 0's tracker for a training run (the other ranks get one that does nothing), with the
    config logged once. A tracker that cannot start stops every rank before the first step."""
    tracker, refusal = Guarded(NullTracker(), "none"), None
    run_dir = Path(config.out)
    if d.is_main:
        log_dir = log_dir_of(asdict(config), run_dir) or run_dir / LOGS
        try:
            tracker = open_tracker(config.tracker, log_dir, start_step=start_step,
                                   run_name="/".join(run_dir.resolve().parts[-2:]))
        except TrackerError as error:
            refusal = error
    if d.active and not all_agree(d, refusal is None) and refusal is None:
        raise OtherRankStopped(f"rank 0 could not start the {config.tracker} tracker")
    if refusal is not None:
        raise refusal
    tracker.hyperparameters(hyperparameters(asdict(config), run_dir, latents_id))
    return tracker


def flat_scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics.jsonl row as tracker scalars: loss_by_t becomes one scalar per bucket; None is left out."""
    values = {}
    for key, value in row.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, list):
            count = len(value)
            values.update({f"{prefix}{key}/{k / count:.1f}-{(k + 1) / count:.1f}": float(v)
                           for k, v in enumerate(value) if v is not None})
        elif isinstance(value, (int, float)):
            values[f"{prefix}{key}"] = float(value)
    return values


def hyperparameters(config: dict[str, Any], run_dir: Path, latents_id: str) -> dict[str, Any]:
    """The config as flat hyperparameters (numbers, text, bools), with what leads back to `sitctl show`."""
    settings = {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                for key, value in config.items()}
    return {**settings, "sitctl_run_dir": str(Path(run_dir).resolve()), "sitctl_latents_id": latents_id}


# =============================================================================================
# Eval results join their run
# =============================================================================================


def add_eval_to_run(samples, values: dict[str, float], num_samples: int, sampler: str) -> Path | None:
    """Log `sitctl eval`'s values into the tracker of the run the samples were drawn from, at the
    checkpoint's step, as a series of their own beside the training curves. Returns the log dir
    (None when the samples lead to no run with a tracker); a failure is one warning."""
    checkpoint = ancestor(samples, "checkpoint")
    if checkpoint is None:
        return None
    log_dir = log_dir_of(checkpoint.config, checkpoint.path.parent)
    if log_dir is None or not log_dir.is_dir():
        return None
    name = checkpoint.config["tracker"]
    step = CheckpointInfo.from_artifact(checkpoint).step
    series = f"{EVAL_SERIES}-{num_samples}-" + sampler.replace(" ", "_")
    try:
        tracker = open_tracker(name, TRACKERS[name].eval_series_dir(log_dir, series), start_step=None,
                               run_name=series)
    except TrackerError as error:
        print(f"warning: {error}; the result is not added to the run's {name} logs", file=sys.stderr)
        return None
    tracker.eval_series(step, {key: float(value) for key, value in values.items()})
    tracker.close()
    return log_dir
