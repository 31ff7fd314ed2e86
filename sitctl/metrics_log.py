"""A run's metrics file and the log window that fills it: one JSON row every --log-every steps.

`metrics.jsonl` in the run directory is the run's record of what happened (loss, loss by t,
throughput, FID rows added by sitctl/watch.py); the loss curve, `sitctl show`, the study and the
GPU check read it. The window adds up the steps since the last row on the device; a checkpoint
keeps it (without its wall time, so identical runs write identical checkpoints) and a resume
completes that row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sitctl.plots import read_metrics
from sitctl.step_stats import StepStats

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE


@dataclass
class LogWindow:
    """The steps since the last metrics row: their statistics (on the device), count and time."""

    stats: StepStats | None = None
    steps: int = 0
    seconds: float = 0.0  # the steps' own time (data, forward, backward, update), not checkpoints or previews

    def add(self, stats: StepStats, seconds: float) -> None:
        if self.stats is None:
            self.stats = StepStats.unpack(torch.zeros_like(stats.pack()))
        self.stats = self.stats + stats
        self.steps += 1
        self.seconds += seconds

    def record(self) -> dict[str, Any] | None:
        """As a checkpoint keeps it; None when the window is empty."""
        if not self.steps:
            return None
        return {"stats": self.stats.record(), "steps": self.steps}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None, run_dir: str | Path, global_batch: int, device) -> LogWindow:
        """The saved window; its steps' time is taken at the last logged throughput (0 s if none)."""
        if not record:
            return cls()
        path = metrics_path(run_dir)
        rows = [row for row in read_metrics(path) if "loss" in row] if path.is_file() else []
        speed = rows[-1].get("images_per_sec") if rows else None
        seconds = record["steps"] * global_batch / speed if speed else 0.0
        return cls(StepStats.from_record(record["stats"], device), int(record["steps"]), seconds)


def append_row(run_dir: str | Path, row: dict[str, Any]) -> None:
    with open(metrics_path(run_dir), "a") as handle:
        handle.write(json.dumps(row) + "\n")


def trim_metrics(run_dir: str | Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we continue from (they will be redone)."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return
    rows = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
