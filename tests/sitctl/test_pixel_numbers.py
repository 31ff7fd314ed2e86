"""Numbers on the way from latents to pixels, against values written out here.

Quantisation is the reference's clamp(127.5 x + 128) to uint8; decoding divides by the scale factor
the latents artifact recorded; a sample is its noise moved by the network's velocity; a preview grid
puts image i at row i // ncol, column i % ncol with white 2-pixel gaps, enlarged by repetition.
"""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from model.configs import model_config
from model.network import SiT
from sitctl import distributed
from sitctl.artifacts import open_artifact
from sitctl.checkpoint import save_checkpoint
from sitctl.data import latents_from_moments
from sitctl.plots import save_image_grid
from sitctl.decode import Decoder, load_decoder
from sitctl.sample import SampleConfig, sample_stage
from sitctl.sample_source import open_source
from sitctl.train import prepare
from tests.helpers import read_shards, tiny


def reference_quantize(x: np.ndarray) -> np.ndarray:
    """ADM/DiT's clamp(127.5 x + 128, 0, 255) then truncation to uint8, spelt out in float64."""
    return np.floor(np.clip(127.5 * np.asarray(x, np.float64) + 128.0, 0.0, 255.0)).astype(np.uint8)


def assert_pixels_match(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal, except that float rounding may move a value sitting on a level boundary by one level."""
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    difference = np.abs(actual.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99, (difference.max(), (difference == 0).mean())


def test_known_pixel_latents_give_the_reference_uint8_levels():
    # One (1, 3, 1, 8) pixel-space image; channel c holds the row of values times (1, 0.5, -1).
    values = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 1.2])
    latents = torch.stack([values, 0.5 * values, -values])[None, :, None, :]
    images = Decoder(vae=None, scale_factor=1.0, record={"name": "none", "source": None})(latents)
    assert images.dtype == np.uint8 and images.shape == (1, 1, 8, 3)  # NHWC
    # 127.5 x + 128, clamped to [0, 255] and truncated: worked out by hand.
    assert images[0, 0, :, 0].tolist() == [0, 0, 64, 128, 166, 255, 255, 255]
    assert images[0, 0, :, 1].tolist() == [32, 64, 96, 128, 147, 191, 191, 204]
    assert images[0, 0, :, 2].tolist() == [255, 255, 191, 128, 89, 0, 0, 0]


@pytest.fixture(scope="module")
def vae_world(tiny_vae_dir, tmp_path_factory):
    """Digits encoded at 16 px through the tiny VAE, and a checkpoint trained on those latents."""
    from sitctl.encode import EncodeConfig, encode

    root = tmp_path_factory.mktemp("vae-world")
    latents = encode(EncodeConfig(src="digits", out=str(root / "latents"), image_size=16, vae=str(tiny_vae_dir),
                                  limit=8, shard_size=8, workers=0))
    config = model_config("SiT-T/2", input_size=8, in_channels=4, num_classes=latents.extra["num_classes"])
    net = SiT(config)
    extra = {"model_config": asdict(config), "model": "SiT-T/2", "interp": "linear", "pred": "velocity"}
    save_checkpoint(root / "run", 1, model=net, ema=net, optimizer=torch.optim.AdamW(net.parameters()), state={},
                    config={}, latents=latents, extra=extra)
    return {"root": root, "latents": latents, "run": root / "run"}


def test_latents_round_trip_encode_to_decode_at_the_recorded_scale_factor(vae_world, tiny_vae_dir):
    from diffusers import AutoencoderKL

    latents = vae_world["latents"]
    # The tiny VAE's config carries Stable Diffusion's scaling, and the manifest records it.
    assert latents.extra["scale_factor"] == pytest.approx(0.18215)
    samples = read_shards(latents.path)
    means = torch.from_numpy(np.stack([samples[key]["moments.npy"][0, 0] for key in sorted(samples)])).float()  # (8, 4, 8, 8)
    # What the trainer sees: the posterior mean times the recorded scale (zero noise, no flip).
    moments = torch.from_numpy(np.stack([samples[key]["moments.npy"] for key in sorted(samples)]))
    original_view = moments[:, 0]  # (8, 2, 4, 8, 8): [mean, std] of the unflipped image
    training = latents_from_moments(original_view, torch.zeros_like(means), latents.extra["scale_factor"])
    # Expected: the VAE's own decode of the unscaled mean, quantised by the formula.
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        expected = reference_quantize(vae.decode(means).sample.permute(0, 2, 3, 1).numpy())
    assert expected.std() > 5  # a decoder output with structure, not one flat level
    source = open_source(SampleConfig(checkpoint=str(vae_world["run"]), out="-", device="cpu"), torch.device("cpu"))
    sample_decoder = load_decoder(source, torch.device("cpu"))
    run = prepare(tiny(latents.path, vae_world["root"] / "train", data_lanes=1, preview_every=1), distributed.setup("cpu"))
    run.batches.close()
    preview_decoder = run.preview.decoder
    for decoder in (sample_decoder, preview_decoder):
        assert decoder.scale_factor == latents.extra["scale_factor"]
        assert_pixels_match(decoder(training), expected)


@pytest.fixture(scope="module")
def constant_velocity_samples(digits_latents_dir, tmp_path_factory):
    """Samples of a network whose output is exactly 0.25 everywhere: fresh SiT, output bias 0.25."""
    config = model_config("SiT-T/2", input_size=8, in_channels=3, num_classes=10)
    net = SiT(config)  # zero-initialised output weights: the output is the output bias alone
    with torch.no_grad():
        net.final_layer.linear.bias.fill_(0.25)
    root = tmp_path_factory.mktemp("constant")
    extra = {"model_config": asdict(config), "model": "SiT-T/2", "interp": "linear", "pred": "velocity"}
    save_checkpoint(root / "run", 1, model=net, ema=net, optimizer=torch.optim.AdamW(net.parameters()), state={},
                    config={}, latents=open_artifact(digits_latents_dir), extra=extra)
    settings = SampleConfig(checkpoint=str(root / "run"), out=str(root / "samples"), mode="ode", method="euler",
                            steps=4, num=6, batch_size=4, seed=3, device="cpu", preview=4)
    return sample_stage(settings), settings


def test_sample_pixels_are_the_noise_moved_by_the_velocity(constant_velocity_samples):
    import h5py

    artifact, settings = constant_velocity_samples
    with h5py.File(artifact.file("samples.h5"), "r") as handle:
        images = handle["images"][:]
    # Image i's noise: N(0, I) from a torch generator seeded by SeedSequence([seed, i]) (the
    # sampler's documented contract); the linear velocity ODE from t = 0 to 1 adds v = 0.25.
    expected = []
    for index in range(settings.num):
        seed = int(np.random.SeedSequence([settings.seed, index]).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)
        noise = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(seed))
        expected.append(reference_quantize((noise + 0.25).permute(1, 2, 0).numpy()))
    assert_pixels_match(images, np.stack(expected))


def test_sample_preview_grid_lays_the_first_images_out_row_by_row(constant_velocity_samples):
    import h5py

    artifact, settings = constant_velocity_samples
    with h5py.File(artifact.file("samples.h5"), "r") as handle:
        images = handle["images"][:]
    assert settings.preview == 4 < len(images)
    grid = np.asarray(Image.open(artifact.path / "preview.png"))
    # The first 4 images of 8 px: 2 per row, 2 rows; 2-px white gaps; enlarged 64 // 8 = 8 times.
    assert grid.shape == ((2 * 10 + 2) * 8, (2 * 10 + 2) * 8, 3)
    small = grid[::8, ::8].copy()  # undo the nearest-neighbour enlargement
    assert np.array_equal(np.repeat(np.repeat(small, 8, 0), 8, 1), grid)
    for index, image in enumerate(images[:4]):
        top, left = 2 + 10 * (index // 2), 2 + 10 * (index % 2)
        assert np.array_equal(small[top : top + 8, left : left + 8], image), index
        small[top : top + 8, left : left + 8] = 255
    assert (small == 255).all()  # everything else is the white gap


def test_image_grid_pixels_with_a_given_layout(tmp_path):
    # Image i is filled with level 10 (i + 1) and has a black pixel at its top left corner.
    images = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    images[:, 0, 0] = 0
    grid = np.asarray(Image.open(save_image_grid(images, tmp_path / "grid.png", nrow=2, upscale=1)))
    assert grid.shape == (3 * 4 + 2, 2 * 5 + 2)  # rows of 2, 3 rows: (2 + 2) * 3 + 2 by (3 + 2) * 2 + 2
    expected = np.array([
        [255] * 12,
        [255] * 12,
        [255, 255, 0, 10, 10, 255, 255, 0, 20, 20, 255, 255],
        [255, 255, 10, 10, 10, 255, 255, 20, 20, 20, 255, 255],
        [255] * 12,
        [255] * 12,
        [255, 255, 0, 30, 30, 255, 255, 0, 40, 40, 255, 255],
        [255, 255, 30, 30, 30, 255, 255, 40, 40, 40, 255, 255],
        [255] * 12,
        [255] * 12,
        [255, 255, 0, 50, 50, 255, 255, 255, 255, 255, 255, 255],
        [255, 255, 50, 50, 50, 255, 255, 255, 255, 255, 255, 255],
        [255] * 12,
        [255] * 12,
    ], np.uint8)
    assert np.array_equal(grid, expected)
