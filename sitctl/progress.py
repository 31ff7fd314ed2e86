"""What the stages share for reporting progress: a rich bar with rate and ETA, and peak memory.

The bar is drawn only on the main rank and only on an interactive terminal, so logs, CI and
the other ranks of a torchrun stay quiet.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second in `unit` (rich's own speed column formats bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        if not task.speed:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        digits = 1 if task.speed >= 10 else 2  # slow training steps still show a change
        return Text(f"{task.speed:.{digits}f} {self.unit}/s", style="progress.data.speed")


def progress(unit: str, *, main: bool = True, console: Console | None = None) -> Progress:
    """A rich Progress (description, bar, done/total, rate in `unit`/s, ETA); use it as a context.

    `console` (default: stderr, silent off the main rank) is also where callers print log lines.
    """
    if console is None:
        console = Console(stderr=True, quiet=not main)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               RateColumn(unit), TimeRemainingColumn())
    return Progress(*columns, console=console, disable=not (main and console.is_terminal))


@contextlib.contextmanager
def progress_bar(label: str, total: int | None, *, unit: str = "img", main: bool = True) -> Iterator[Callable[[int], None]]:
    """One task's bar; yields `advance(n)`."""
    with progress(unit, main=main) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def peak_memory_gib(device) -> float:
    """Peak allocated GPU memory on a CUDA `device`, else the process's peak resident set size (GiB)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
