"""The frozen encoder of representation alignment (REPA): loaded through timm from the Hugging
Face cache as safetensors, fed images prepared as REPA prepares them, giving patch tokens.

The encoder is never fetched by torch.hub (that runs downloaded code, which REPA's own loader
does) and never unpickled: timm is told to read `model.safetensors` from the hub repository
(with HF_HUB_OFFLINE=1, from the cache alone). A name is a row of ENCODERS or `hf-hub:ORG/NAME`
of any timm ViT.

Geometry: REPA gives DINOv2 the 256-px image at 224 px and the 512-px one at 448 px, so that its
14-px patches make a 16x16 (32x32) grid, one patch per SiT-XL/2 token; its position embedding
is resampled to that grid (REPA's utils.load_encoders, with timm's resample_abs_pos_embed). The
same rule here: the encoder sees the image at (its patch size) x (the SiT token grid) pixels
unless --repa-image-size says otherwise, and its patch grid must then equal the SiT's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sitctl.errors import SitctlError, first_line

# Short names of the encoders REPA used (its --enc-type dinov2-vit-b is the default), as timm's hub repos.
REPAS_ENCODER = "dinov2-vitb14"
ENCODERS = {
    "dinov2-vits14": "timm/vit_small_patch14_dinov2.lvd142m",
    "dinov2-vitb14": "timm/vit_base_patch14_dinov2.lvd142m",
    "dinov2-vitl14": "timm/vit_large_patch14_dinov2.lvd142m",
    "dinov2-vitg14": "timm/vit_giant_patch14_dinov2.lvd142m",
}
HUB_PREFIX = "hf-hub:"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*


class EncoderError(SitctlError):
    """The alignment encoder is unknown, cannot be loaded, or does not fit the model's tokens."""


def check_encoder_name(name: str) -> None:
    if name not in ENCODERS and not (name.startswith(HUB_PREFIX) and "/" in name):
        raise EncoderError(f"unknown --repa-encoder {name!r}; choose one of {', '.join(ENCODERS)} "
                           f"or give a timm ViT on the Hugging Face hub as hf-hub:ORG/NAME")


def hub_repo(name: str) -> str:
    check_encoder_name(name)
    return ENCODERS.get(name) or name.removeprefix(HUB_PREFIX)


@dataclass
class Encoder:
    """A frozen ViT and its input side: images (N, S, S, 3) uint8 -> patch tokens (N, T, E)."""

    network: nn.Module
    side: int  # pixels per side of the encoder's input
    mean: Tensor  # (1, 3, 1, 1)
    std: Tensor  # (1, 3, 1, 1)

    @property
    def width(self) -> int:
        return int(self.network.num_features)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return patch_tokens(self.network, prepare_images(images, self.side, self.mean, self.std))


def prepare_images(images: Tensor, side: int, mean: Tensor, std: Tensor) -> Tensor:
    """REPA's preprocess_raw_image for DINOv2: [0, 255] -> [0, 1] -> mean/std -> bicubic resize.

    images (N, S, S, 3) uint8 -> (N, 3, side, side) float32. REPA normalises before it resizes, and
    resizes without antialiasing (torch's interpolate default); both kept.
    """
    x = images.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S)
    x = (x - mean) / std
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="bicubic")  # (N, 3, side, side)
    return x


def patch_tokens(network: nn.Module, x: Tensor) -> Tensor:
    """The final-normed patch tokens (N, T, E), without class or register tokens: DINOv2's
    `x_norm_patchtokens`, which REPA aligns to (timm's forward_features ends with that norm)."""
    return network.forward_features(x)[:, network.num_prefix_tokens :]


def load_encoder(name: str, grid: int, device: torch.device, side: int | None = None) -> Encoder:
    """Load the encoder `name` frozen and in eval mode, its input set to give a grid x grid patch grid."""
    network = _from_hub(name, hub_repo(name))
    if not hasattr(network, "set_input_size") or not hasattr(network, "patch_embed"):
        raise EncoderError(f"encoder {name} is not a timm vision transformer with patch tokens")
    patch = int(network.patch_embed.patch_size[0])
    side = side or patch * grid
    if side % patch or side // patch != grid:
        raise EncoderError(f"encoder {name} gives a {side // patch}x{side // patch} grid of {patch}-px patches at "
                           f"{side} px, but the model has {grid}x{grid} tokens; REPA aligns one patch per token "
                           f"(drop --repa-image-size, or set it to {patch * grid})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network.set_input_size(img_size=(side, side))  # resamples the position embedding, as REPA does
    mean, std = normalisation(network)
    network = network.to(device).eval().requires_grad_(False)
    return Encoder(network=network, side=side, mean=mean.to(device), std=std.to(device))


def normalisation(network: nn.Module) -> tuple[Tensor, Tensor]:
    """The input mean and std (1, 3, 1, 1) a timm network's config records (ImageNet's if none)."""
    config = getattr(network, "pretrained_cfg", {}) or {}
    mean = torch.tensor(config.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.get("std", IMAGENET_STD), dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def _from_hub(name: str, repo: str) -> nn.Module:
    """timm.create_model on hf-hub:REPO with its weights read from model.safetensors only."""
    import timm

    try:
        with warnings.catch_warnings():  # hub chatter would bury the one-line error
            warnings.simplefilter("ignore")
            return timm.create_model(f"{HUB_PREFIX}{repo}", pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay={"hf_hub_filename": "model.safetensors"})
    except Exception as error:  # hub, JSON, timm and state-dict errors alike
        from huggingface_hub.errors import LocalEntryNotFoundError

        reason = first_line(error)
        if isinstance(error, LocalEntryNotFoundError):
            reason = "it is not in the cache and the hub cannot be reached"
        raise EncoderError(f"cannot load encoder {name} ({repo}) from the Hugging Face cache or hub: {reason[:200]}; "
                           f"where there is internet run `hf download {repo} config.json model.safetensors`") from None
