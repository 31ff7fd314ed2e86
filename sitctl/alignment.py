"""Representation alignment (REPA) in a training run: what `train --repa-encoder` adds to plain SiT.

The math (projector, loss) is model/repa.py and the frozen encoder sitctl/encoders.py; this
module checks a run's settings against its latents and model, builds the projector, and gives
the train step its loss. The projector is part of the run: it is trained with the network by the
same optimizer, saved as `projector.safetensors` in every checkpoint and restored on resume, and
never read by sampling, which loads only the SiT weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model.configs import default_repa_depth
from model.objectives import training_loss
from model.repa import AlignedSiT, Projector, alignment_loss
from sitctl.configs import TrainConfig
from sitctl.encoders import Encoder, load_encoder
from sitctl.errors import SitctlError
from sitctl.options import flag_named

PROJECTOR_FILE = "projector"  # projector.safetensors in a checkpoint


@dataclass
class Alignment:
    """A run's REPA parts: the frozen encoder, the trained projector, which block, how much."""

    encoder: Encoder
    projector: Projector
    depth: int
    coeff: float

    def module(self, net: nn.Module) -> AlignedSiT:
        """The network and the projector as the one module the loss calls (and DDP wraps)."""
        return AlignedSiT(net, self.projector, self.depth)

    def targets(self, images: Tensor) -> Tensor:
        """Encoder patch tokens (n, T, E) of uint8 crops (n, S, S, 3): bf16 autocast on CUDA (REPA's
        mixed precision), fp32 elsewhere; the loss normalises them in fp32."""
        device = images.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return self.encoder(images)


def resolve_depth(config: TrainConfig) -> int | None:
    """--repa-depth, else its default for the model (REPA's: 8 for L/XL, 4 for B/S); None without REPA."""
    if config.repa_encoder is None or config.repa_depth is not None:
        return config.repa_depth
    return default_repa_depth(config.model)


def prepare_alignment(config: TrainConfig, model_config: Any, latents: Any, device: torch.device) -> Alignment | None:
    """Check REPA's settings against the latents and the model, load the encoder, build the projector.

    Everything here runs before a run writes anything, so each mistake is one line and no file.
    """
    if config.repa_encoder is None:
        given = [name for name in ("repa_depth", "repa_image_size") if getattr(config, name) is not None]
        if given:
            raise SitctlError(f"{flag_named(config, given[0])} needs --repa-encoder")
        return None
    if latents.encoder_targets == "none":
        raise SitctlError(f"--repa-encoder needs the images the latents were encoded from, and {latents.artifact.path} "
                          "holds none; encode again with --encoder-targets images (or png)")
    depth = config.repa_depth or default_repa_depth(config.model)
    if depth > model_config.depth:
        raise SitctlError(f"--repa-depth {depth} is past the last block of {config.model} ({model_config.depth} blocks)")
    encoder = load_encoder(config.repa_encoder, model_config.grid_size, device, side=config.repa_image_size)
    # Seeded apart from the global generator, so the network's initial weights are those of the plain run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        projector = Projector(model_config.hidden_size, encoder.width, config.repa_projector_width).to(device)
    return Alignment(encoder=encoder, projector=projector, depth=depth, coeff=config.repa_coeff)


class _Captured:
    """Calls the aligned module like a plain network (prediction out) and keeps its projected tokens."""

    def __init__(self, aligned: nn.Module):
        self.aligned, self.projected = aligned, None

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        output, self.projected = self.aligned(x, t, y)
        return output


def aligned_loss(alignment: Alignment, forward: nn.Module, images: Tensor, x1: Tensor, y: Tensor,
                 **objective: Any) -> tuple[Tensor, Tensor]:
    """(interpolant loss, alignment loss), each per sample (n,), of one micro-batch.

    `forward` is the wrapped AlignedSiT; `images` (n, S, S, 3) uint8 on the device are the crops
    of x1's samples in the same views.
    """
    targets = alignment.targets(images)  # (n, T, E), no gradient
    captured = _Captured(forward)
    loss = training_loss(captured, x1, y, **objective)  # (n,)
    return loss, alignment_loss(captured.projected, targets)
