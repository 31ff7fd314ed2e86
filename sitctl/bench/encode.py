"""Throughput of the encode stage's two halves: decode-and-crop on one CPU core, and the VAE.

`bench_encode(...)` decodes and crops images in this process (one core, as each DataLoader
worker does), then times `latent_moments` (each image and its flip) on the compute device with
random pixels. `src="synthetic"` writes smooth ImageNet-sized JPEGs (500x375, the most common
ImageNet shape) to a temporary folder, so the recipe runs without the dataset. Wired up as
`python -m sitctl.bench encode`; `--vae sd-random` times the SD VAE architecture offline.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.moments import latent_moments
from pipelines.sources import CroppedImages, open_source
from sitctl.vae import load_vae


def write_synthetic_jpegs(directory: Path, count: int, size: tuple[int, int] = (500, 375)) -> None:
    """Smooth random JPEGs (bicubic-upsampled 16x12 noise, quality 90), one class folder."""
    rng = np.random.default_rng(0)
    (directory / "synthetic").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        small.resize(size, Image.BICUBIC).save(directory / "synthetic" / f"{index:05d}.jpg", quality=90)


# Stable Diffusion's VAE encoder shape (sd-vae-ft-ema/mse config.json): speed does not depend on
# the weights, so a randomly initialised copy measures the real VAE's cost without downloading it.
SD_VAE_ARCHITECTURE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
)


def load_bench_vae(vae: str, device: torch.device):
    """load_vae, plus `sd-random`: the SD VAE architecture with random weights."""
    if vae != "sd-random":
        return load_vae(vae, device)[0], vae
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD_VAE_ARCHITECTURE).to(device).eval().requires_grad_(False), vae


def decode_rate(src: str, image_size: int, images: int) -> float:
    """Images/s of decode + center_crop_arr in this process (one core)."""
    source = open_source(src)
    dataset = CroppedImages(source, image_size)
    count = min(images, len(source))
    start = time.perf_counter()
    for index in range(count):
        dataset[index]
    return count / (time.perf_counter() - start)


def vae_rate(vae, image_size: int, batch: int, steps: int, precision: str, device: torch.device) -> float:
    """Images/s through latent_moments (each image encoded with its flip), after one warm-up batch."""
    pixels = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1  # (B, 3, S, S)
    latent_moments(vae, pixels, precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        latent_moments(vae, pixels, precision)  # copies to host, which synchronises
    return batch * steps / (time.perf_counter() - start)


def bench_encode(src: str = "synthetic", *, image_size: int = 256, vae: str = "none", images: int = 64,
                 batch: int = 32, steps: int = 3, precision: str = "auto", device: str | None = None) -> dict[str, object]:
    """Decode-and-crop images/s per core on `src`, and VAE images/s on the device."""
    with tempfile.TemporaryDirectory() as scratch:
        if src == "synthetic":
            write_synthetic_jpegs(Path(scratch), images)
            decode = decode_rate(scratch, image_size, images)
        else:
            decode = decode_rate(src, image_size, images)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_bench_vae(vae, torch_device)
    return {
        "src": src, "image_size": image_size, "cpu_cores": os.cpu_count(),
        "decode_crop_images_per_s_per_core": decode,
        "vae": vae, "device": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
        "precision": precision, "batch": batch,
        "vae_images_per_s": vae_rate(model, image_size, batch, steps, precision, torch_device),
    }
