"""Stopping a long stage on SIGTERM or SIGINT without losing its work; one home for every stage.

Clusters stop jobs with SIGTERM, usually sent to every process of the job: SLURM at preemption and
at the time limit, `timeout`, torchrun's agent passing its own on to the ranks' process groups.
People stop them with Ctrl-C (SIGINT to the terminal's process group). Inside `stop_on_signals()`
either signal only records itself; the stage finishes its unit of work (a training step, a batch of
images), keeps what the rerun needs, and raises `Interrupted`. The CLI prints that as one line,
what was saved and the command that continues, and exits with 128 + the signal number (143 for
SIGTERM, 130 for SIGINT): the status a shell reports for a process killed by that signal, so
`sitctl train ... && sitctl sample ...` stops there and a scheduler sees a job that did not finish.

Worker processes (DataLoader workers) ignore both signals: the group's signal reaches them too,
and a worker that died first would take the stage down before it could save. Their parent closes
them as it stops.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from typing import Iterator

from sitctl.errors import SitctlError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# One Ctrl-C reaches a process twice under torchrun (from the terminal, and forwarded by the
# agent) within milliseconds; a SIGINT this long after the first is a person asking again.
REPEAT_AFTER_S = 1.0


class Interrupted(SitctlError):
    """A stage stopped on a signal after saving what a rerun needs; the CLI exits 128 + signum."""

    def __init__(self, signum: int, done: str, *, resume_option: str | None = None, quiet: bool = False):
        self.signum, self.done, self.resume_option, self.quiet = signum, done, resume_option, quiet
        super().__init__(f"stopped by {signal.Signals(signum).name} {done}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self, args: list[str]) -> str:
        """The one line the CLI prints: what stopped, what was saved, and `args` (the command) to continue."""
        if self.resume_option and self.resume_option not in args:
            args = [*args, self.resume_option]
        launcher = "torchrun ... -m sitctl.cli" if "TORCHELASTIC_RUN_ID" in os.environ else "sitctl"  # ...: its own options
        return f"{self}; continue with: {launcher} {shlex.join(args)}"


class StopRequest:
    """The first stop signal received (its number), or None; a stage reads it at its unit boundaries."""

    def __init__(self):
        self.signum: int | None = None
        self.received_at = 0.0

    def __bool__(self) -> bool:
        return self.signum is not None

    def interrupted(self, done: str, *, resume_option: str | None = None, quiet: bool = False) -> Interrupted:
        return Interrupted(self.signum, done, resume_option=resume_option, quiet=quiet)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - self.received_at > REPEAT_AFTER_S:
                raise KeyboardInterrupt  # Ctrl-C pressed again: stop at once, without saving
            return
        self.signum, self.received_at = signum, time.monotonic()


_active: StopRequest | None = None  # the request of the outermost stage (demo, study) or the stage itself


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While inside, SIGTERM and SIGINT set the yielded request instead of ending the process.

    Nested uses (train inside the demo) share the outer request, so a signal that arrives between
    two stages stops the next one at its first boundary. Outside the main thread, where Python
    cannot install handlers, the request never fires and the signals keep their usual effect.
    """
    global _active
    if _active is not None:
        yield _active
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.signal(number, request._handle) for number in STOP_SIGNALS}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: the worker leaves SIGTERM and SIGINT to its parent.

    The parent stops its workers through the loader (a sentinel on their queues). The loader's
    last resort, terminate(), no longer works on such a worker, but its watchdog still ends it
    once the parent has gone.
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Ranks agreeing on a stop: one vote per signal, summed in a step's all-reduce, read a step late
# ---------------------------------------------------------------------------------------------


def stop_votes(signum: int | None, device):
    """This rank's votes, one per stop signal in STOP_SIGNALS' order (1.0 for the one it received), on `device`.

    Made on the device by kernels alone: a tensor built from a Python list would be a blocking
    host-to-device copy at every step.
    """
    import torch  # start-up cost: the CLI imports this module, and `sitctl --help` must not load torch

    votes = torch.zeros(len(STOP_SIGNALS), device=device)
    if signum in STOP_SIGNALS:
        votes[STOP_SIGNALS.index(signum)] = 1.0
    return votes


class AgreedStop:
    """The signal the ranks' summed votes of the previous step stop on (SIGTERM first), or 0.

    Each step's summed votes start their copy to the host when given, and are read at the next
    step, when the device has long finished them: the host never waits, and every rank still
    stops at the same step.
    """

    def __init__(self):
        self.pending = None  # (host tensor, CUDA event or None) of the last step's votes

    def __call__(self, votes) -> int:
        import torch  # start-up cost, as above

        if votes.device.type == "cuda":
            host = torch.empty(len(votes), pin_memory=True).copy_(votes, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = votes.clone(), None
        previous, self.pending = self.pending, (host, done)
        if previous is None:
            return 0
        if previous[1] is not None:
            previous[1].synchronize()
        return next((int(number) for number, count in zip(STOP_SIGNALS, previous[0].tolist()) if count > 0), 0)
