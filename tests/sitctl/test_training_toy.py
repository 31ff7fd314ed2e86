"""A tiny SiT learns 8x8 digits under every interpolant x prediction target.

60 AdamW steps of batch 16 on the 0s and 1s of scikit-learn's digits (360 images, in [-1, 1]).
The times of a batch are stratified over [eps, 1 - eps] so that the loss curve is not drowned
by which t the batch happened to draw; the check is that the mean loss of the last 15 steps is
below 0.8 times that of the first 15 (measured: 0.27 to 0.65).
"""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from model.configs import model_config
from model.interpolants import NAMES
from model.network import SiT, drop_labels
from model.objectives import default_eps, training_loss

STEPS, BATCH, WINDOW = 60, 16, 15


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits(n_class=2)
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1  # (360, 1, 8, 8), 0..16 -> [-1, 1]
    return images, torch.tensor(data.target)


@pytest.mark.parametrize("pred", ("velocity", "noise", "score"))
@pytest.mark.parametrize("interp", NAMES)
def test_tiny_sit_loss_falls(digits, interp, pred):
    images, labels = digits
    torch.manual_seed(0)
    config = model_config("SiT-T/2", input_size=8, in_channels=1, num_classes=2)
    net = SiT(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    eps = default_eps(interp, pred)[0]
    losses = []
    for _ in range(STEPS):
        index = torch.randint(0, len(images), (BATCH,), generator=generator)
        y = drop_labels(labels[index], config.class_dropout_prob, config.num_classes, generator=generator)
        t = eps + (1 - 2 * eps) * (torch.arange(BATCH) + torch.rand(BATCH, generator=generator)) / BATCH
        loss = training_loss(net, images[index], y, interp=interp, pred=pred, t=t, generator=generator)
        assert loss.shape == (BATCH,)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.mean().item())
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    assert last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}"
