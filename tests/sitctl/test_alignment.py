"""REPA in training (sitctl/alignment.py, sitctl/encoders.py): a tiny encoder through the real loading path."""

import pytest
import torch

from sitctl.checkpoint import list_checkpoints
from sitctl.encode import EncodeConfig, encode
from sitctl.train import train
from tests.sitctl.test_train import tiny, weights


@pytest.fixture(scope="module")
def digits_with_images(tmp_path_factory):
    """64 digits at 8x8 pixels (`--vae none`), each sample also keeping its crop as raw uint8."""
    out = tmp_path_factory.mktemp("latents") / "digits-images"
    encode(EncodeConfig(src="digits", out=str(out), image_size=8, vae="none", limit=64, shard_size=32, workers=0,
                        encoder_targets="images"))
    return out


def test_smoke(digits_with_images, tmp_path, tiny_encoder):
    done = train(tiny(digits_with_images, tmp_path / "run", steps=3, ckpt_every=3, repa_encoder="dinov2-vitb14"))
    print(done.config, (tmp_path / "run" / "metrics.jsonl").read_text())
    print(sorted(p.name for p in done.path.iterdir()))
