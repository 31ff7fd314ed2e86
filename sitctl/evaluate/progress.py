"""A rich progress bar with rate and ETA, drawn only on an interactive terminal."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column formats bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text("?" if task.speed is None else f"{task.speed:.1f} {self.unit}/s")


@contextlib.contextmanager
def progress_bar(label: str, total: int | None, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; quiet when stderr is not a TTY (logs, CI, tests)."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
