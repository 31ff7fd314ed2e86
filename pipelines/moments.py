"""Center-cropped images -> the posterior moments stored in a latents artifact.

For each image and its horizontal flip the VAE encoder gives a diagonal Gaussian posterior
q(z | x) = N(mean, std^2); storing (mean, std) rather than one sample lets training draw a fresh
latent z = mean + std * eps every epoch, as the SD VAE intends. Without a VAE (`--vae none`) the
"mean" is the pixels themselves in [-1, 1] and std is 0, so the same training code runs in pixel
space.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def pixels_to_tensor(crops: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(S, S, 3) uint8 crops -> (N, 3, S, S) float32 in [-1, 1], the range ADM/DiT feed the VAE."""
    batch = torch.from_numpy(np.stack(crops)).to(device)  # (N, S, S, 3) uint8
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, S, S)


def resolved_precision(device: torch.device, precision: str) -> str:
    """What the VAE runs in: 'auto' is bf16 on CUDA and fp32 elsewhere; the others as named."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the VAE (`resolved_precision`)."""
    precision = resolved_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def latent_moments(vae, pixels: torch.Tensor, precision: str = "auto") -> np.ndarray:
    """Moments of each image and of its flip: (N, 3, S, S) -> (N, 2, 2, C, h, w) float16.

    Axis 1 is [original, horizontally flipped]; axis 2 is [posterior mean, posterior std].
    Both views go through the encoder in one batch of 2N.
    """
    count = pixels.shape[0]
    views = torch.cat([pixels, pixels.flip(-1)])  # (2N, 3, S, S): originals then flips
    if vae is None:
        mean, std = views, torch.zeros_like(views)
    else:
        with autocast(pixels.device, precision):
            posterior = vae.encode(views).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()  # (2N, C, h, w) each
    moments = torch.stack([mean, std], dim=1)  # (2N, 2, C, h, w)
    moments = moments.unflatten(0, (2, count)).transpose(0, 1)  # (N, 2, 2, C, h, w)
    return moments.to(torch.float16).cpu().numpy()
