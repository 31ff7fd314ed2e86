"""`python -m sitctl.bench loader`: start-up and steady-state latents/s that one core reads.

The timing and the synthetic latents are sitctl.measure's (`sitctl doctor` runs the same
function); this module names them for the benchmark package.
"""

from sitctl.measure import bench_loader_rate, synthetic_latents  # noqa: F401
