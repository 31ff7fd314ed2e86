"""`python -m sitctl.bench model`: forward and AdamW train-step time, images/s, FLOP/s, peak memory and MFU.

The timing is sitctl.measure's (`sitctl doctor` runs the same function) and the peaks and
precisions sitctl.hardware's; this module names the function for the benchmark package.
"""

from sitctl.measure import bench_model  # noqa: F401
