"""The alignment encoder's input side (sitctl/encoders.py, through sitctl/alignment.py): REPA's order.

REPA's preprocess_raw_image (sihyun-yu/REPA train.py, DINOv2 branch) scales the uint8 image to
[0, 1], normalises it with the encoder's mean and std, and only then resizes it (bicubic, torch's
interpolate, 224 px per 256). A bicubic resize is a per-channel weighted sum whose weights add up
to one, so it commutes with the per-channel affine normalisation: the other order differs only by
float rounding (about 2e-6 here, inside assert_close's tolerance). Comparing outputs cannot tell the
orders apart, so the test below also checks what the resize is handed.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.repa import Projector
from sitctl.alignment import Alignment
from sitctl.encoders import Encoder

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, DINOv2's
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class SeeingNetwork(nn.Module):
    """Stands in for the ViT: keeps the input it was given and returns one token per pixel."""

    num_prefix_tokens, num_features = 0, 3

    def forward_features(self, x: Tensor) -> Tensor:
        self.seen = x.clone()  # (N, 3, S, S)
        return x.flatten(2).transpose(1, 2)  # (N, S*S, 3)


def test_the_encoder_normalises_the_image_and_then_resizes_it_bicubically_as_repa_does(monkeypatch):
    # 32 px to 28 px: REPA's 256 -> 224 ratio, so the resize is a real (downsampling) one.
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    network = SeeingNetwork()
    alignment = Alignment(encoder=Encoder(network=network, side=28, mean=MEAN, std=STD), projector=Projector(4, 3, 8),
                          depth=1, coeff=0.5)
    resize, resized = F.interpolate, []

    def recording_resize(x: Tensor, *args, **kwargs) -> Tensor:
        resized.append(x.clone())
        return resize(x, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", recording_resize)
    alignment.targets(images)
    # Independently, with plain torch ops in REPA's order: x / 255, Normalize(mean, std), bicubic resize.
    normalised = (images.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD  # (2, 3, 32, 32)
    assert len(resized) == 1, "the encoder's input is resized once, by torch's interpolate"
    torch.testing.assert_close(resized[0], normalised,
                               msg=lambda why: f"the resize must be handed the normalised image (REPA's order): {why}")
    torch.testing.assert_close(network.seen, resize(normalised, size=(28, 28), mode="bicubic"))
