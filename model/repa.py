"""Representation alignment (REPA, Yu et al. 2024, arXiv 2410.06940): the math, no encoder loading.

REPA adds to the interpolant loss a term that pulls the hidden tokens of one early SiT block
towards the patch features of a frozen self-supervised encoder (DINOv2) of the same clean image:

    h      = output of block `depth` (counted from 1), (N, T, D)
    z_hat  = MLP(h) per token, (N, T, E)             REPA's `build_mlp` (models/sit.py): three
                                                     linear layers of width 2048 with SiLU between
    z      = encoder patch tokens, (N, T, E)         no class or register tokens
    L_align = - mean over samples and tokens of cos(z_hat, z)        REPA's loss.py `proj_loss`

and trains on L_interpolant + coeff * L_align (REPA's --proj-coeff, 0.5). The projector only
exists in training: sampling uses the SiT alone. Both sides are normalised in fp32, because
users of REPA's code saw the loss turn NaN in fp16 after 70-160K steps otherwise.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.network import SiT


class Projector(nn.Sequential):
    """Per-token MLP from the SiT width D to the encoder width E: Linear-SiLU-Linear-SiLU-Linear.

    Initialised as REPA does it (its SiT.initialize_weights applies xavier-uniform and zero
    biases to every linear layer, the projector's included).
    """

    def __init__(self, hidden_size: int, encoder_size: int, width: int = 2048):
        super().__init__(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, encoder_size))
        for module in self:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)


class AlignedSiT(nn.Module):
    """A SiT and its projector as one module, so that DDP and torch.compile see every trained
    parameter in one forward: (x, t, y) -> (prediction (N, C, H, W), projected tokens (N, T, E))."""

    def __init__(self, net: SiT, projector: Projector, depth: int):
        super().__init__()
        self.net, self.projector, self.depth = net, projector, depth

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        output, hidden = self.net(x, t, y, hidden_depth=self.depth)  # (N, C, H, W), (N, T, D)
        return output, self.projector(hidden)  # (N, T, E)


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Per-sample REPA loss: minus the mean over tokens of the cosine similarity, (N, T, E) x2 -> (N,).

    Normalisation and the cosine run in fp32 whatever the inputs' dtype; `target` carries no gradient.
    """
    projected = F.normalize(projected.float(), dim=-1)  # (N, T, E)
    target = F.normalize(target.detach().float(), dim=-1)  # (N, T, E)
    return -(projected * target).sum(dim=-1).mean(dim=-1)  # (N,)
