"""latent_moments: layout (N, 2 views, 2 moments, C, h, w) and the mixed-precision path."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from pipelines.moments import latent_moments


def test_moments_layout_and_bf16_autocast_close_to_fp32(tiny_vae_dir):
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (N, 3, S, S)
    exact = latent_moments(vae, pixels, "fp32")
    assert exact.shape == (3, 2, 2, 4, 4, 4) and exact.dtype == np.float16
    with torch.no_grad():
        flipped = vae.encode(pixels[1:2].flip(-1)).latent_dist
    np.testing.assert_allclose(exact[1, 1, 0], flipped.mean[0].numpy(), atol=1e-3)  # view 1 = the flip
    np.testing.assert_allclose(exact[1, 1, 1], flipped.std[0].numpy(), atol=1e-3)
    half = latent_moments(vae, pixels, "bf16").astype(np.float32)
    np.testing.assert_allclose(half, exact.astype(np.float32), atol=0.05)  # bf16 keeps ~3 significant digits
    assert not np.array_equal(half, exact.astype(np.float32))  # autocast really ran in bf16


def test_pixel_space_moments_are_the_pixels_and_their_flip():
    pixels = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    moments = latent_moments(None, pixels)
    np.testing.assert_array_equal(moments[:, 0, 0], pixels.half().numpy())
    np.testing.assert_array_equal(moments[:, 1, 0], pixels.flip(-1).half().numpy())
    assert not moments[:, :, 1].any()
