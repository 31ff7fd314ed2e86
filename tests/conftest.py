"""Fixtures shared across the test suite."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKL (3 -> 4 channels, 2x downsampling), saved
    with save_pretrained so code under test loads it through from_pretrained like a hub VAE."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),  # two blocks: one 2x downsampling
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    directory = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def digits_latents_dir(tmp_path_factory):
    """A small finished latents artifact: 64 sklearn digits at 8x8 pixels, `--vae none`, 2 shards."""
    from sitctl.encode import EncodeConfig, encode

    out = tmp_path_factory.mktemp("latents") / "digits"
    encode(EncodeConfig(src="digits", out=str(out), image_size=8, vae="none", limit=64, shard_size=32, workers=0))
    return out
