"""REPA in training (sitctl/alignment.py, sitctl/encoders.py): encode keeps the crops, the loader pairs
each with its latent's view, and a tiny timm ViT is loaded by the call that loads DINOv2."""

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from sitctl.artifacts import staging_dir
from sitctl.checkpoint import list_checkpoints, load_network
from sitctl.data import ShardCache, gather_images, gather_views, open_latents, rank_batches
from sitctl.encode import EncodeConfig, encode
from sitctl.encoders import load_encoder, prepare_images
from sitctl.errors import ArtifactError, SitctlError
from sitctl.train import train
from tests.helpers import assert_same_files, ok, run_cli, tiny, tiny_flags, weights
from tests.torchrun import torchrun

REPA = dict(repa_encoder="dinov2-vitb14", repa_projector_width=64)  # the tiny encoder stands in for DINOv2-B/14


def encoded_digits(tmp_path_factory, targets: str):
    """64 digits at 8x8 pixels (`--vae none`), each sample also keeping its crop (raw uint8 or PNG)."""
    out = tmp_path_factory.mktemp("latents") / f"digits-{targets}"
    encode(EncodeConfig(src="digits", out=str(out), image_size=8, vae="none", limit=64, shard_size=32, workers=0,
                        encoder_targets=targets))
    return out


@pytest.fixture(scope="module")
def digits_with_images(tmp_path_factory):
    return encoded_digits(tmp_path_factory, "images")


@pytest.fixture(scope="module")
def digits_with_pngs(tmp_path_factory):
    return encoded_digits(tmp_path_factory, "png")


@pytest.mark.parametrize("kept", ["digits_with_images", "digits_with_pngs"])
def test_each_kept_crop_comes_in_the_view_its_latent_was_drawn_from(kept, request):
    latents = open_latents(request.getfixturevalue(kept))
    assert (latents.encoder_targets, latents.image_size) in (("images", 8), ("png", 8))
    stream = rank_batches(latents, global_batch=32, num_lanes=2, rank=0, world_size=1, seed=0, buffer=16, workers=0,
                          start_step=0, images=True)
    batch = next(stream)
    stream.close()
    # Pixel-space latents are the crops in [-1, 1] (float16): in the same view, they are the same picture.
    pixels = batch["images"].permute(0, 3, 1, 2).float() / 127.5 - 1
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (32, 8, 8, 3)
    assert (pixels - batch["x1"]).abs().max() < 1e-2
    mirrored = (pixels.flip(-1) - batch["x1"]).abs().amax((1, 2, 3)) < 1e-2
    symmetric = (pixels.flip(-1) - pixels).abs().amax((1, 2, 3)) < 1e-2
    assert (mirrored & ~symmetric).sum() == 0  # never the other view
    flipped = [row for row in range(32) if not symmetric[row]]
    assert flipped  # the batch holds flipped samples too: the check above compared both views


def test_a_chunk_across_two_shards_gathers_each_samples_own_crop_in_its_latents_view(digits_with_images):
    latents = open_latents(digits_with_images)
    shards = np.array([1, 0, 0, 1, 1, 0, 1])
    samples = np.array([3, 30, 0, 31, 17, 5, 3])
    flip = np.array([True, False, True, False, True, True, False])
    images = torch.zeros(len(shards), 8, 8, 3, dtype=torch.uint8)
    gather_images(ShardCache(latents), shards, samples, flip, images)
    # Pixel-space latents are the crops in [-1, 1]: each row is the picture of its own latent's chosen view.
    moments, _ = gather_views(ShardCache(latents), shards, samples, flip)
    expected = torch.from_numpy(moments[:, 0].astype(np.float32))
    pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (pixels - expected).abs().amax((1, 2, 3)).max() < 1e-2
    assert not torch.equal(images[0], images[6])  # the same sample in both views: mirrored in row 0 only
    assert torch.equal(images[0], images[6].flip(1))


def test_a_shard_without_crops_of_the_asked_size_is_one_artifact_error(digits_latents_dir, digits_with_images):
    plain, kept = open_latents(digits_latents_dir), open_latents(digits_with_images)
    two = (np.array([0, 1]), np.array([0, 0]), np.array([False, False]))
    with pytest.raises(ArtifactError, match=r"shard-\d+\.tar holds no 8-px images, though its manifest says it does$"):
        gather_images(ShardCache(plain), *two, torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ArtifactError, match=r"holds no 4-px images"):
        gather_images(ShardCache(kept), *two, torch.zeros(2, 4, 4, 3, dtype=torch.uint8))


def test_a_crop_that_is_not_a_readable_png_is_one_error_naming_its_shard_and_sample(digits_with_pngs, tmp_path):
    latents = open_latents(digits_with_pngs)
    broken = tmp_path / "shard.tar"
    broken.write_bytes(Path(latents.shard_paths[1]).read_bytes())
    with tarfile.open(broken) as tar:
        first, second = [m for m in tar.getmembers() if m.name.endswith(".image.png")][:2]
    with open(broken, "r+b") as file:  # the crop's bytes zeroed in place: the tar still reads, the PNG does not
        file.seek(second.offset_data)
        file.write(bytes(second.size))
    # The recorded hash is the one check that guards against this; it is left out to reach the reader.
    damaged = replace(latents, shard_paths=(latents.shard_paths[0], str(broken)), shard_sha256=(None, None))
    flip = np.zeros(2, bool)
    for shards in (np.array([1, 1]), np.array([0, 1])):  # the chunk in one shard (read in place) or across two
        with pytest.raises(ArtifactError, match=rf"^{broken}: sample 1's image is not a readable PNG crop"):
            gather_images(ShardCache(damaged), shards, np.array([1, 1]), flip, torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with open(broken, "r+b") as file:  # the first crop, which the shard's index reads for the side: one line too
        file.seek(first.offset_data)
        file.write(bytes(first.size))
    with pytest.raises(ArtifactError, match=rf"^{broken}: the first sample's image is not a readable PNG crop"):
        gather_images(ShardCache(damaged), np.array([1]), np.array([1]), flip[:1], torch.zeros(1, 8, 8, 3, dtype=torch.uint8))


def test_encoder_preprocessing_is_repas():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # REPA's preprocess_raw_image for dinov2: x / 255, Normalize(ImageNet), interpolate(224 per 256, bicubic).
    x = images.permute(0, 3, 1, 2).float() / 255.0
    expected = F.interpolate((x - mean) / std, 28, mode="bicubic")
    torch.testing.assert_close(prepare_images(images, 28, mean, std), expected)


def test_the_tiny_encoder_loads_by_dinov2s_call_and_gives_patch_tokens_only(tiny_encoder):
    encoder = load_encoder("dinov2-vitb14", grid=4, device=torch.device("cpu"))
    assert encoder.side == 16 and encoder.width == 32  # 4-px patches x 4x4 tokens
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 32)
    # Independently: timm's own forward_features at 16 px, class token dropped.
    again = timm.create_model("hf-hub:timm/vit_base_patch14_dinov2.lvd142m", pretrained=True, num_classes=0, img_size=16,
                              pretrained_cfg_overlay={"hf_hub_filename": "model.safetensors"}).eval()
    with torch.no_grad():
        expected = again.forward_features(prepare_images(images, 16, encoder.mean, encoder.std))[:, 1:]
    torch.testing.assert_close(tokens, expected)


def test_coefficient_zero_trains_and_logs_the_plain_run_bitwise(digits_with_images, tmp_path, tiny_encoder):
    plain = train(tiny(digits_with_images, tmp_path / "plain", steps=3, ckpt_every=3))
    aligned = train(tiny(digits_with_images, tmp_path / "zero", steps=3, ckpt_every=3, repa_coeff=0.0, **REPA))
    assert_same_files(plain.path, aligned.path, names=("model", "ema"))
    ours, theirs = weights(plain.path, "optimizer"), weights(aligned.path, "optimizer")
    assert all(torch.equal(value, theirs[key]) for key, value in ours.items())  # the projector's entries come after
    assert weights(aligned.path, "projector")  # it was there all along, trained by nothing
    # The logged interpolant loss is the plain run's, and the alignment is minus a mean cosine, in [-1, 1].
    plain_rows, aligned_rows = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                                for name in ("plain", "zero"))
    assert [row["loss"] for row in aligned_rows] == [row["loss"] for row in plain_rows]
    assert all(-1.0 <= row["align_loss"] <= 1.0 for row in aligned_rows)


def test_resume_with_repa_on_equals_an_uninterrupted_run(digits_with_images, tmp_path, tiny_encoder):
    straight = train(tiny(digits_with_images, tmp_path / "straight", steps=4, ckpt_every=4, **REPA))
    train(tiny(digits_with_images, tmp_path / "pieces", steps=2, ckpt_every=100, **REPA))
    resumed = train(tiny(digits_with_images, tmp_path / "pieces", steps=4, ckpt_every=100, resume=True, **REPA))
    assert_same_files(straight.path, resumed.path, names=("model", "ema", "optimizer", "projector"))
    assert straight.config["repa_depth"] == 1  # SiT-T's default, recorded
    halfway = weights(tmp_path / "pieces" / "step-0000002", "projector")
    assert not torch.equal(halfway["4.weight"], weights(resumed.path, "projector")["4.weight"])  # it is trained
    rows = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4 and all('"align_loss": -' in row for row in rows)
    with pytest.raises(SitctlError, match="made with --repa-coeff 0.5, now 0.25"):
        train(tiny(digits_with_images, tmp_path / "pieces", steps=5, resume=True, **REPA, repa_coeff=0.25))


def test_sampling_a_repa_run_reads_only_the_network(digits_with_images, tmp_path, tiny_encoder):
    run = train(tiny(digits_with_images, tmp_path / "run", steps=1, ckpt_every=1, **REPA))
    assert not any(key.startswith("projector") for key in weights(run.path, "ema"))
    net, _ = load_network(run.path)
    assert sum(p.numel() for p in net.parameters()) == sum(v.numel() for v in weights(run.path, "model").values())


def test_repa_mistakes_are_one_line_and_write_nothing(digits_latents_dir, digits_with_images, tmp_path, tiny_encoder):
    cases = [
        (dict(repa_encoder="dinov3"), "unknown --repa-encoder 'dinov3'"),
        (dict(repa_depth=3), "--repa-depth needs --repa-encoder"),
        (dict(repa_encoder="dinov2-vitb14", repa_image_size=20),
         "encoder dinov2-vitb14 gives a 5x5 grid of 4-px patches at 20 px, but the model has 4x4 tokens"),
        (dict(repa_encoder="dinov2-vits14"), "cannot load encoder dinov2-vits14 .*not in the cache.*hf download timm/vit_small_patch14_dinov2"),
        (dict(repa_encoder="dinov2-vitb14", repa_depth=3), "--repa-depth 3 is past the last block of SiT-T/2"),
    ]
    for number, (fields, message) in enumerate(cases):
        out = tmp_path / f"run{number}"
        with pytest.raises(SitctlError, match=message):
            train(tiny(digits_with_images, out, steps=1, **fields))
        assert not out.exists() and not staging_dir(out).exists()
    # From the command line: latents encoded without images.
    out = tmp_path / "cli"
    result = run_cli("train", digits_latents_dir, "--out", out, "--model", "SiT-T/2", "--repa-encoder", "dinov2-vitb14",
                     "--device", "cpu")
    assert result.returncode != 0 and not out.exists()
    assert result.stderr.strip().splitlines() == [
        f"error: --repa-encoder needs the images the latents were encoded from, and {digits_latents_dir} holds none; "
        "encode again with --encoder-targets images (or png)"]


@pytest.mark.slow
def test_two_processes_train_repa_as_one(digits_with_images, tmp_path, tiny_encoder):
    flags = tiny_flags(**REPA)
    torchrun(["-m", "sitctl.cli", "train", str(digits_with_images), "--out", str(tmp_path / "two"),
              "--steps", "3", "--ckpt-every", "3", *flags])
    one = train(tiny(digits_with_images, tmp_path / "one", steps=3, ckpt_every=3, micro_batch=2, **REPA))
    for name in ("model", "ema", "projector"):
        two_weights, one_weights = weights(tmp_path / "two" / "step-0000003", name), weights(one.path, name)
        for key, value in one_weights.items():
            torch.testing.assert_close(two_weights[key], value, rtol=0, atol=2e-6, msg=f"{name} {key}")


def test_the_repa_recipe_encodes_trains_resumes_and_samples_in_a_tiny_workspace(tmp_path, monkeypatch, tiny_encoder):
    monkeypatch.chdir(tmp_path)
    for variable in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(variable, raising=False)
    quick = ["--loader-workers", "0", "--preview-every", "0", "--log-every", "1", "--device", "cpu"]
    ok("encode", "digits", "--image-size", "8", "--vae", "none", "--limit", "64", "--shard-size", "32", "--workers", "0",
       "--encoder-targets", "images", "--device", "cpu")
    # REPA's recipe, made tiny on the command line (which wins): SiT-T/2 has two blocks, so align block 1.
    ok("train", "--recipe", "repa-xl2", "--model", "SiT-T/2", "--repa-depth", "1", "--repa-projector-width", "64",
       "--global-batch", "8", "--data-lanes", "2", "--steps", "2", "--ckpt-every", "2", *quick)
    ok("train", "--resume", "--steps", "3", *quick)
    (first, _), (last, resumed) = list_checkpoints(tmp_path / "runs" / "v1")
    assert (first, last) == (2, 3)
    recorded = json.loads((resumed / "manifest.json").read_text())["config"]  # the resume kept the recipe's settings
    assert (recorded["repa_encoder"], recorded["repa_coeff"], recorded["repa_depth"], recorded["grad_clip"]) == \
        ("dinov2-vitb14", 0.5, 1, 1.0)
    ok("sample", "--recipe", "repa-xl2", "--num", "4", "--steps", "4", "--batch-size", "4", "--preview", "0", "--device", "cpu")
    assert (tmp_path / "samples" / "v1" / "manifest.json").is_file()
