"""A tiny SiT learns 8x8 digits through the trainer itself, under every interpolant x prediction target.

`sitctl.train.train` runs 60 AdamW steps of batch 16 on the 64 digits of the shared pixel-space
latents artifact and logs every step's mean loss to metrics.jsonl; the check is that the mean
loss of the last 15 steps is below 0.8 times that of the first 15 (measured: 0.26 to 0.67).
"""

from __future__ import annotations

import pytest

from model.interpolants import NAMES
from sitctl.plots import read_metrics
from sitctl.train import train
from tests.helpers import tiny

STEPS, WINDOW = 60, 15


@pytest.mark.slow
@pytest.mark.parametrize("pred", ("velocity", "noise", "score"))
@pytest.mark.parametrize("interp", NAMES)
def test_tiny_sit_loss_falls_through_the_trainer(digits_latents_dir, tmp_path, interp, pred):
    config = tiny(digits_latents_dir, tmp_path / "run", interp=interp, pred=pred, steps=STEPS, global_batch=16,
                  shuffle_buffer=64, lr=3e-3, flip=False, ckpt_every=STEPS)
    train(config)
    losses = [row["loss"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == STEPS
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    assert last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}"
