"""Fixtures shared across the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """torch on one thread in the test process, as in every process the tests start (OMP_NUM_THREADS=1). The
    tensors here are small, and on two busy cores a second OpenMP thread makes each op wait until it is
    scheduled: an exp of 4,000 float64s took 12 ms on two threads and 45 us on one, a test of the SDE sampler
    55 s instead of 4."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def pixel_run(digits_latents_dir, tmp_path_factory) -> Path:
    """A run dir holding one checkpoint of a random SiT-T/2 on the 8x8 RGB digits (vae none); read only."""
    from tests.helpers import randomised_sit, write_checkpoint

    net, config = randomised_sit(input_size=8, in_channels=3)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    write_checkpoint(run_dir, digits_latents_dir, net, config)
    return run_dir


TINY_ENCODER_REPO = "timm/vit_base_patch14_dinov2.lvd142m"  # what --repa-encoder dinov2-vitb14 loads


@pytest.fixture(scope="session")
def tiny_encoder_home(tmp_path_factory):
    """A Hugging Face home whose hub cache holds, under DINOv2-B/14's repository, a randomly
    initialised tiny timm ViT (width 32, 4-px patches, 16 px) saved as timm saves hub models
    (config.json + model.safetensors in snapshots/REV, refs/main naming REV): code under test
    loads it through the very timm call that loads DINOv2."""
    import torch
    import timm
    from timm.models import save_for_hf

    home = tmp_path_factory.mktemp("hf-home")
    revision = "0" * 40
    repo = home / "hub" / ("models--" + TINY_ENCODER_REPO.replace("/", "--"))
    model_args = dict(embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=16)
    torch.manual_seed(0)
    encoder = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, **model_args)
    save_for_hf(encoder, repo / "snapshots" / revision, model_args=model_args, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return home


@pytest.fixture
def tiny_encoder(tiny_encoder_home, monkeypatch):
    """Point this process and its children at the tiny encoder's cache, offline: the hub is never asked."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tiny_encoder_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_encoder_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tiny_encoder_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tiny_encoder_home


@pytest.fixture
def tiny_fashion(tmp_path):
    """Fashion-MNIST in the Debian layout: 48 train and 16 test images of bright squares on black."""
    import numpy as np

    from tests.helpers import write_idx

    rng = np.random.default_rng(0)

    def images(count):
        pixels = np.zeros((count, 28, 28), np.uint8)
        for image, corner in zip(pixels, rng.integers(2, 14, (count, 2))):
            image[corner[0] : corner[0] + 12, corner[1] : corner[1] + 12] = rng.integers(100, 256)
        return pixels

    for stem, count in (("train", 48), ("t10k", 16)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images(count))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", (np.arange(count) % 10).astype(np.uint8))
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def the_suite_leaves_the_checkout_alone():
    """No test may turn the repository into a workspace (a stage run with the checkout as working directory)."""
    marker = Path(__file__).resolve().parent.parent / ".sitctl-workspace"
    existed = marker.exists()
    yield
    assert existed or not marker.exists(), f"a test made {marker.parent} a workspace; run stages in tmp_path"
