"""Forward multiply-accumulate count of a SiT network, per sample.

The "Gflops" of the DiT and SiT papers count multiply-adds of the matrix products (linear layers,
the patch convolution and the two attention products) and ignore norms, activations and softmax;
`forward_flops` counts the same, so SiT-XL/2 on 32x32x4 latents gives the published 118.6 G.
Our head predicts C channels where the published one predicts 2C (learn_sigma); the difference
is T*D*p*p*C MACs, under 0.01% for XL/2. A training step costs about 3x the forward MACs, each
MAC being 2 floating-point operations.
"""

from __future__ import annotations

from model.configs import SiTConfig

TIMESTEP_FREQUENCIES = 256  # width of the sinusoidal time features, as in model.network


def block_flops(config: SiTConfig) -> int:
    """MACs of one adaLN-Zero block for one sample."""
    tokens, width = config.num_tokens, config.hidden_size
    mlp_hidden = int(width * config.mlp_ratio)
    modulation = width * 6 * width  # (D,) -> (6D,), once per sample, not per token
    projections = tokens * width * (3 * width + width)  # qkv and output projection
    attention = 2 * tokens * tokens * width  # Q K^T and softmax(.) V over all heads
    mlp = 2 * tokens * width * mlp_hidden
    return modulation + projections + attention + mlp


def forward_flops(config: SiTConfig) -> int:
    """Multiply-adds of one forward pass for one sample (the papers' Gflops figure, times 1e9)."""
    tokens, width = config.num_tokens, config.hidden_size
    patch_values = config.patch_size**2 * config.in_channels
    patch_embed = tokens * patch_values * width
    timestep = TIMESTEP_FREQUENCIES * width + width * width  # label embedding is a lookup: free
    final_layer = width * 2 * width + tokens * width * patch_values
    return patch_embed + timestep + config.depth * block_flops(config) + final_layer


def train_step_flops(config: SiTConfig, batch: int) -> int:
    """Floating-point operations of one training step: forward + backward = 3x forward, 2 per MAC."""
    return 3 * 2 * forward_flops(config) * batch
