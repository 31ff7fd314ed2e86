"""Latents -> uint8 images: the VAE decode and the reference's quantisation, shared by sampling and train previews."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sitctl.sample_store import quantize
from sitctl.vae import load_vae


@dataclass(frozen=True)
class Decoder:
    """Latents -> uint8 images through the VAE (or none, for pixel-space models)."""

    vae: Any  # diffusers AutoencoderKL, or None
    scale_factor: float  # training latents were (VAE mean + std z) * scale_factor
    record: dict[str, Any]  # {"name", "source"} as a latents manifest records the VAE

    def __call__(self, latents) -> np.ndarray:
        """(n, C, h, w) latents -> (n, H, W, 3) uint8, quantised as the reference: clamp(127.5 x + 128)."""
        with torch.no_grad():
            pixels = latents if self.vae is None else self.vae.decode(latents / self.scale_factor).sample  # [-1, 1]
        return quantize(pixels.float().permute(0, 2, 3, 1).cpu().numpy())


def load_decoder(source, device) -> Decoder:
    """Load the VAE of a sample_source.Source now, so a missing one fails before any sampling."""
    vae, info = load_vae(source.vae, device)
    scale = source.scale_factor if source.scale_factor is not None else info["scale_factor"]
    return Decoder(vae=vae, scale_factor=scale, record={"name": info["name"], "source": info["source"]})
