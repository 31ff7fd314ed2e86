"""The shared progress bar and peak-memory reading."""

import io

import torch
from rich.console import Console

from sitctl.progress import peak_memory_gib, progress


def run_bar(console: Console, *, main: bool) -> str:
    with progress("steps", main=main, console=console) as bar:
        task = bar.add_task("train", total=4)
        for _ in range(4):
            bar.advance(task, 1)
        bar.console.print("log line")
    return console.file.getvalue()


def test_main_rank_on_a_terminal_draws_description_count_and_rate_in_the_unit():
    shown = run_bar(Console(file=io.StringIO(), force_terminal=True, width=120), main=True)
    assert "train" in shown and "4/4" in shown and "steps/s" in shown and "log line" in shown


def test_bar_is_quiet_off_a_terminal_but_log_lines_still_print():
    shown = run_bar(Console(file=io.StringIO(), force_terminal=False), main=True)
    assert shown == "log line\n"


def test_other_ranks_draw_no_bar_even_on_a_terminal():
    # A terminal console that is not quiet: only the rank gating can keep the bar off it.
    assert run_bar(Console(file=io.StringIO(), force_terminal=True, width=120), main=False) == "log line\n"


def test_other_ranks_default_console_is_silent():
    assert progress("steps", main=False).console.quiet and not progress("steps", main=True).console.quiet


def test_peak_memory_on_cpu_is_the_peak_resident_set_in_gib():
    block = torch.ones(2**26)  # 256 MiB touched, so the peak is well above zero
    measured = peak_memory_gib("cpu")
    # Linux's own record of the peak resident set ("VmHWM: N kB"), read right after.
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    assert abs(measured - int(line.split()[1]) / 2**20) < 0.01 and measured > 0.25 and float(block[-1]) == 1.0
