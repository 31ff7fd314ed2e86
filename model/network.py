"""The SiT network: the DiT transformer with adaLN-Zero blocks, fed t in [0, 1].

SiT (Ma et al. 2024, arXiv 2401.08740) keeps DiT's architecture (Peebles & Xie 2023) and only
changes what it is trained to predict; the time input is the interpolant time t in [0, 1]
instead of DiT's integer diffusion step. Module and parameter names match the published
SiT-XL/2 and DiT-XL/2 state dicts so they load directly (`load_state_dict_checked`).

Shapes: N batch, C channels, H = W = input_size, p patch size, T = (H/p)^2 tokens, D width.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from model.configs import SiTConfig
from model.errors import CheckpointMismatchError

# =============================================================================================
# Embeddings: patches, time, labels, positions
# =============================================================================================


def timestep_frequencies(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/(dim/2)), of t (N,) -> (N, dim).

    The DiT layout (cosines first); SiT feeds t in [0, 1] directly, without DiT's x1000 scaling.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): sinusoidal features then a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_frequencies(t, self.frequency_size)  # (N, 256), float32
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """y (N,) -> (N, D); row `num_classes` is the learned null label of classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k/(dim/2)): positions (M,) -> (M, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D position embedding (T, dim), tokens in row-major order.

    Token (row i, column j) gets [sincos_1d(j) | sincos_1d(i)], half the width per axis, the
    layout of the published DiT/SiT weights (MAE's numpy recipe, meshgrid with columns first).
    """
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    embed = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return embed.float()  # (T, dim)


# =============================================================================================
# Transformer blocks
# =============================================================================================


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample. x (N, T, D); shift, scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over one head's features whose gain follows the input dtype (fused under bf16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def attention_layer(hidden_size: int, num_heads: int, qk_norm: bool) -> nn.Module:
    """timm's multi-head self-attention, as DiT uses it (qkv, proj: the published parameter names).

    It runs through scaled_dot_product_attention (flash kernels on GPU). QK-norm (optional, not in
    the paper) RMS-normalises each head's queries and keys, bounding the logits, which otherwise
    grow and overflow in bf16 at scale.
    """
    head_norm = functools.partial(HeadRMSNorm, eps=1e-6)
    return Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=head_norm)


class SiTBlock(nn.Module):
    """Transformer block whose LayerNorms are shifted, scaled and gated by the condition c."""

    def __init__(self, config: SiTConfig):
        super().__init__()
        width = config.hidden_size
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = attention_layer(width, config.num_heads, config.qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        tanh_gelu = functools.partial(nn.GELU, approximate="tanh")  # DiT's approximate GELU
        self.mlp = Mlp(width, int(width * config.mlp_ratio), act_layer=tanh_gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # Six (N, D) vectors, in the order of the published weights' rows.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a linear map from each token to its p*p*C patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


# =============================================================================================
# The network
# =============================================================================================


class SiT(nn.Module):
    """Predicts a field (velocity, noise or score) with the shape of x from (x_t, t, y)."""

    def __init__(self, config: SiTConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, width)  # (N, T, D)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(config.num_classes, width)
        # Fixed, so not saved: rebuilt from the config. Published files that carry it still load.
        self.register_buffer("pos_embed", sincos_2d(width, config.grid_size)[None], persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList([SiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(width, config.patch_size, config.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch projection is a linear map on flattened patches; initialise it as one.
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero gates make every block the identity at initialisation (DiT Sec. 3.2),
        # and a zero output layer makes the fresh network predict exactly 0.
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*c) -> (N, c, H, W); c is read from x, so a 2C-channel published head also works."""
        n, p, grid = x.shape[0], self.config.patch_size, self.config.grid_size
        channels = x.shape[-1] // (p * p)
        x = x.reshape(n, grid, grid, p, p, channels)  # (N, H/p, W/p, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, c, H/p, p, W/p, p)
        return x.reshape(n, channels, grid * p, grid * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, hidden_depth: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x (N, C, H, W), t (N,) in [0, 1], y (N,) long with num_classes = null -> (N, C, H, W).

        With `hidden_depth` k (counted from 1) it also returns the tokens (N, T, D) that block k
        outputs, for representation alignment (model/repa.py); the prediction is unchanged.
        """
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        hidden = None
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c)  # (N, T, D)
            if index == hidden_depth:
                hidden = tokens
        output = self.unpatchify(self.final_layer(tokens, c))  # (N, C, H, W)
        return output if hidden_depth is None else (output, hidden)


# =============================================================================================
# Loading our own and published state dicts
# =============================================================================================

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DistributedDataParallel


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def _drop_sigma_half(weight: Tensor, patch_size: int, channels: int) -> Tensor:
    """Keep the first C of 2C output channels of a learn_sigma head (rows ordered (p, p, 2C))."""
    rows = weight.reshape(patch_size * patch_size, 2 * channels, *weight.shape[1:])
    return rows[:, :channels].reshape(patch_size * patch_size * channels, *weight.shape[1:])


def _normalise_state_dict(net: SiT, state_dict: dict) -> dict:
    """Unwrap, strip compile/DDP prefixes, drop the fixed pos_embed and a learn_sigma half."""
    if "ema" in state_dict and isinstance(state_dict["ema"], dict):  # SiT's training checkpoints
        state_dict = state_dict["ema"]
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    head_rows = net.final_layer.linear.out_features
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        value = cleaned.get(key)
        if value is not None and value.shape[0] == 2 * head_rows:
            cleaned[key] = _drop_sigma_half(value, net.config.patch_size, net.config.in_channels)
    return cleaned


def load_state_dict_checked(net: SiT, state_dict: dict, model_name: str) -> None:
    """Load our own or a published SiT/DiT state dict into `net`, or say exactly what does not fit.

    Published SiT-XL/2 and DiT-XL/2 files predict 2C channels (learn_sigma); the sigma half of the
    final linear is dropped. `pos_embed` is fixed and rebuilt, so it may be present or absent,
    but when present its shape must match (it encodes the input size).
    """
    cleaned = _normalise_state_dict(net, state_dict)
    expected = net.state_dict()
    expected["pos_embed"] = net.pos_embed
    for key, value in cleaned.items():
        if key not in expected:
            raise CheckpointMismatchError(
                f"checkpoint does not fit {model_name}: unexpected key {key} with shape {_shape(value)} (not in the model)"
            )
        if value.shape != expected[key].shape:
            raise CheckpointMismatchError(
                f"checkpoint does not fit {model_name}: {key} has shape {_shape(value)} in the checkpoint "
                f"but {_shape(expected[key])} in the model"
            )
    for key, value in expected.items():
        if key not in cleaned and key != "pos_embed":
            raise CheckpointMismatchError(
                f"checkpoint does not fit {model_name}: key {key} with shape {_shape(value)} is missing from the checkpoint"
            )
    cleaned.pop("pos_embed", None)
    net.load_state_dict(cleaned, strict=True)


# ---------------------------------------------------------------------------------------------
# Published DiT-XL/2: a DDPM noise model with integer timesteps
# ---------------------------------------------------------------------------------------------
# DiT was trained on DDPM's discrete schedule (1000 steps, beta linear from 1e-4 to 0.02), with the
# step index k (0 = nearly clean) fed to the same sinusoidal embedder, predicting the noise. That
# schedule is the discretisation of the VP interpolant (beta from 0.1 to 20 per unit time): the
# noise added up to step k is the VP path's at s = (k + 1) / 1000 diffusion time, i.e. t = 1 - s in
# our data-at-t=1 convention. So DiT samples as a (vp, noise) model once t is mapped back to k.
# The match is that of a discretisation: alpha_bar agrees within 1e-3 at every step, and the noise
# variance 1 - alpha_bar within 10% (at k = 0, where it is 1e-4).


def ddpm_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's cumulative signal fraction alpha_bar_k for k = 0 .. num_steps - 1 (float64)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


class DiscreteTimeInput(nn.Module):
    """Wraps a network trained on DDPM step indices so it takes continuous t in [0, 1] (data at 1)."""

    def __init__(self, net: nn.Module, num_steps: int = 1000):
        super().__init__()
        self.net, self.num_steps = net, num_steps

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        step = (self.num_steps * (1 - t) - 1).clamp(min=0)  # (N,) fractional DDPM step index
        return self.net(x, step, y)


# ---------------------------------------------------------------------------------------------
# Published REPA SiT-XL/2: the same network, trained in the opposite time direction
# ---------------------------------------------------------------------------------------------
# REPA (arXiv 2410.06940; its loss.py and samplers.py) trains SiT on x_s = (1 - s) x + s eps, data at
# s = 0 and noise at s = 1, with target velocity dx_s/ds = eps - x. In this project's time (noise at
# t = 0) that is the same path at s = 1 - t, and the velocity dx/dt = x - eps is its negative.


class ReversedTimeVelocity(nn.Module):
    """Wraps a velocity network trained with data at t = 0 (REPA's) so it takes our t (data at 1)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return -self.net(x, 1 - t, y)
