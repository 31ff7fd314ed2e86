"""`python -m sitctl.bench sampling`: images/s, network evaluations and FLOP/s per sampler, step count and guidance.

The timing is sitctl.measure's (`sitctl doctor` runs the same function); this module adds the
--sampler parsing of the benchmark command.
"""

from __future__ import annotations

from sitctl.errors import BenchError
from sitctl.measure import BENCH_SAMPLERS, bench_sampling  # noqa: F401


def parse_samplers(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """'ode:heun' -> ('ode', 'heun'), for each spec."""
    parsed = tuple(tuple(spec.split(":")) for spec in specs)
    for spec, pair in zip(specs, parsed):
        if len(pair) != 2:
            raise BenchError(f"--sampler takes MODE:METHOD such as ode:heun or sde:euler, got {spec!r}")
    return parsed
