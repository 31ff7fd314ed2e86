"""Loading the VAE by name or directory, shared by encode (images -> latents) and sample (back).

`load_vae(name_or_dir, device)` accepts `ema` / `mse` (the Stable Diffusion VAEs on the hub),
their hub ids, a local directory saved with diffusers' `save_pretrained`, or `none` for pixel
space. Hub ids and directories go through the same `AutoencoderKL.from_pretrained` call. The
returned info dict is what a latents manifest records under `vae`, plus `scale_factor`,
`latent_channels` and `downsample` (image side / latent side).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from sitctl.errors import SitctlError, first_line

VAE_HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
SD_SCALE_FACTOR = 0.18215  # Stable Diffusion's latent scaling, used when a config lacks one


class VaeError(SitctlError):
    """The VAE name is unknown or the VAE cannot be loaded."""


def load_vae(name_or_dir: str, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """(AutoencoderKL in eval mode on `device`, or None for `none`; info dict)."""
    if name_or_dir == "none":
        info = {"name": "none", "source": None, "scale_factor": 1.0, "latent_channels": 3, "downsample": 1}
        return None, info
    name = next((n for n, hub_id in VAE_HUB_IDS.items() if name_or_dir in (n, hub_id)), None)
    if name is not None:
        source = VAE_HUB_IDS[name]
    elif Path(name_or_dir).is_dir():
        name, source = "local", str(Path(name_or_dir).resolve())
    else:
        raise VaeError(
            f"unknown VAE {name_or_dir!r}: use ema, mse, none, or a directory holding a diffusers AutoencoderKL"
        )
    vae = _from_pretrained(name, source).to(device).eval().requires_grad_(False)
    config = vae.config
    info = {
        "name": name,
        "source": source,
        "scale_factor": float(getattr(config, "scaling_factor", None) or SD_SCALE_FACTOR),
        "latent_channels": int(config.latent_channels),
        "downsample": 2 ** (len(config.block_out_channels) - 1),  # one 2x downsampling per extra block
    }
    return vae, info


def _from_pretrained(name: str, source: str):
    from diffusers import AutoencoderKL

    try:
        with warnings.catch_warnings():  # hub deprecation chatter would bury the one-line error
            warnings.simplefilter("ignore")
            return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
    except Exception as error:  # diffusers/hub raise OSError, ValueError, JSON and HTTP errors alike
        reason = first_line(error)
        if name == "local":
            raise VaeError(f"cannot load a diffusers AutoencoderKL from {source}: {reason}") from None
        raise VaeError(
            f"cannot fetch VAE {name!r} ({source}) from the Hugging Face hub; download it where there is "
            f"internet (huggingface-cli download {source} --local-dir DIR) and pass --vae DIR"
        ) from None
