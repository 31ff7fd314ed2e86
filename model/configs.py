"""SiT model sizes: one frozen config dataclass and the named presets of the SiT/DiT papers.

Depth / width / heads follow DiT (Peebles & Xie 2023, Table 1), which SiT reuses unchanged:
S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16, each with patch size 2, 4 or 8.
"T" is our own tiny size (depth 2, width 64, 2 heads) for tests; "XS" (depth 4, width 128, 4 heads)
is the smallest that learns recognisable digits on a CPU in under two minutes (`sitctl demo`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.errors import SitctlError


class ModelConfigError(SitctlError):
    """An unknown model name or an impossible combination of model settings."""


@dataclass(frozen=True, kw_only=True)
class SiTConfig:
    """Shape of a SiT network. `SiTConfig(**asdict(cfg))` rebuilds it (it is stored in manifests)."""

    input_size: int = 32
    """Side of the square input in pixels or latent cells (32 = 256x256 images through an f8 VAE)."""
    patch_size: int = 2
    """Side of the square patch that becomes one token; tokens = (input_size / patch_size)^2."""
    in_channels: int = 4
    """Channels of the input, and of the predicted field (4 for SD-VAE latents, 1 or 3 for pixels)."""
    hidden_size: int = 1152
    """Token width D."""
    depth: int = 28
    """Number of adaLN-Zero transformer blocks."""
    num_heads: int = 16
    """Attention heads; D must be divisible by it."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of D."""
    num_classes: int = 1000
    """Real classes; label `num_classes` is the extra null class used for classifier-free guidance."""
    class_dropout_prob: float = 0.1
    """Probability the train loop replaces a label by the null class (the network never drops)."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention (stabilises large-scale training)."""

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ModelConfigError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        # The 2-D sin-cos position embedding gives D/2 dims to each axis, half sines half cosines.
        if self.hidden_size % 4:
            raise ModelConfigError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)")
        if self.mlp_ratio <= 0:
            raise ModelConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ModelConfigError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def grid_size(self) -> int:
        """Tokens per side."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


# (depth, hidden_size, num_heads) per size letter.
_SIZES = {
    "T": (2, 64, 2),
    "XS": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
_PATCHES = {"T": (2, 4), "XS": (2, 4), "S": (2, 4, 8), "B": (2, 4, 8), "L": (2, 4, 8), "XL": (2, 4, 8)}

# The block whose output REPA aligns, per size: 8 for L and XL, 4 for B (REPA, arXiv 2410.06940,
# Sec. 4 and its scripts), 4 for S as for B; our tiny T and XS take the block a third of the way in.
REPA_DEPTHS = {"T": 1, "XS": 2, "S": 4, "B": 4, "L": 8, "XL": 8}

MODEL_NAMES: tuple[str, ...] = tuple(f"SiT-{size}/{patch}" for size, patches in _PATCHES.items() for patch in patches)


def model_config(name: str, **overrides) -> SiTConfig:
    """The preset called `name` (e.g. "SiT-XL/2"), with any SiTConfig field overridden."""
    if name not in MODEL_NAMES:
        raise ModelConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    size, patch = name.removeprefix("SiT-").split("/")
    depth, hidden_size, num_heads = _SIZES[size]
    base = SiTConfig(patch_size=int(patch), depth=depth, hidden_size=hidden_size, num_heads=num_heads)
    unknown = set(overrides) - set(SiTConfig.__dataclass_fields__)
    if unknown:
        raise ModelConfigError(f"unknown model setting(s) {', '.join(sorted(unknown))}")
    return replace(base, **overrides)


def default_repa_depth(name: str) -> int:
    """The SiT block (counted from 1) whose output REPA aligns for the preset `name` by default."""
    if name not in MODEL_NAMES:
        raise ModelConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return REPA_DEPTHS[name.removeprefix("SiT-").split("/")[0]]
