"""The sample stage: determinism across processes, batch sizes and kills; exports; published files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from model.network import SiT
from sitctl.artifacts import open_artifact, staging_dir
from sitctl.errors import ArtifactError, CheckpointMismatchError, SitctlError
from sitctl.sample import CRASH_HOOK, SampleConfig, class_labels, rank_blocks, sample_stage
from sitctl.sample_store import rank_file
# test_recipes.py imports randomised_sit and write_checkpoint from here.
from tests.helpers import randomised_sit, run_cli, run_cli_process, write_checkpoint
from tests.torchrun import torchrun

# Ten images in blocks of 4: rank 0 of 2 gets blocks [0..3] and [8, 9], rank 1 gets [4..7].
SETTINGS = dict(mode="sde", steps=6, cfg_scale=1.5, num=10, batch_size=4, device="cpu", preview=4)
CLI_ARGS = ["--mode", "sde", "--steps", "6", "--cfg", "1.5", "--num-samples", "10", "--batch-size", "4", "--device", "cpu",
            "--preview", "4"]


def read_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, labels) of a finished samples artifact, in index order."""
    artifact = open_artifact(path, "samples")
    with h5py.File(artifact.file("samples.h5"), "r") as handle:
        assert np.array_equal(handle["indices"][:], np.arange(len(handle["indices"])))
        return handle["images"][:], handle["labels"][:]


@pytest.fixture(scope="module")
def reference(pixel_run, tmp_path_factory) -> Path:
    """One uninterrupted single-process run, with the .npz export."""
    out = tmp_path_factory.mktemp("samples") / "reference"
    sample_stage(SampleConfig(checkpoint=str(pixel_run), out=str(out), npz=True, **SETTINGS))
    return out


# ---------------------------------------------------------------------------------------------
# Who draws what
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_rank_blocks_cover_every_index_once_in_whole_batches(world_size):
    blocks = [block for rank in range(world_size) for block in rank_blocks(23, 5, rank, world_size)]
    assert sorted(i for block in blocks for i in block) == list(range(23))
    assert sorted(block.start for block in blocks) == [0, 5, 10, 15, 20]  # the same batches at any world size


def test_balanced_labels_give_each_class_its_share_in_a_seeded_order():
    labels = class_labels(25, 10, seed=3, scheme="balanced")
    assert sorted(np.bincount(labels, minlength=10)) == [2] * 5 + [3] * 5
    assert np.array_equal(labels, class_labels(25, 10, seed=3, scheme="balanced"))
    assert not np.array_equal(labels, class_labels(25, 10, seed=4, scheme="balanced"))
    assert class_labels(1000, 10, seed=0, scheme="uniform").max() == 9


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_reference_run_is_a_complete_samples_artifact(reference, pixel_run):
    artifact = open_artifact(reference, "samples")
    images, labels = read_samples(reference)
    assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
    assert sorted(np.bincount(labels, minlength=10)) == [1] * 10  # 10 images, 10 classes: one each
    assert images.std() > 10  # a random network still draws varied pixels, not a constant
    assert artifact.inputs[0]["kind"] == "checkpoint"
    assert artifact.extra["num_samples"] == 10 and artifact.extra["image_size"] == 8
    assert artifact.extra["vae"]["name"] == "none" and artifact.config["method"] == "euler"
    assert (reference / "preview.png").is_file()


@pytest.mark.slow
def test_two_processes_draw_byte_identical_images_and_labels(pixel_run, reference, tmp_path):
    out = tmp_path / "two"
    torchrun(["-m", "sitctl.cli", "sample", str(pixel_run), "--out", str(out), *CLI_ARGS], nproc=2)
    images, labels = read_samples(out)
    expected_images, expected_labels = read_samples(reference)
    assert np.array_equal(labels, expected_labels)
    assert np.array_equal(images, expected_images)
    assert rank_file(out, 1).is_file() and open_artifact(out).extra["world_size"] == 2


def test_batch_sizes_agree_up_to_float_rounding(pixel_run, reference, tmp_path):
    out = tmp_path / "batch3"
    sample_stage(SampleConfig(checkpoint=str(pixel_run), out=str(out), **{**SETTINGS, "batch_size": 3}))
    images, labels = read_samples(out)
    expected_images, expected_labels = read_samples(reference)
    assert np.array_equal(labels, expected_labels)  # labels depend on (seed, index) alone
    difference = np.abs(images.astype(int) - expected_images.astype(int))
    assert difference.max() <= 2 and (difference <= 1).mean() > 0.99


def test_killed_run_resumes_to_the_images_of_an_uninterrupted_one(pixel_run, reference, tmp_path):
    out = tmp_path / "resumed"
    # A real process: the hook exits it at once, skipping every `finally` as a kill would.
    killed = run_cli_process("sample", pixel_run, "--out", out, *CLI_ARGS, env={CRASH_HOOK: "1"})
    assert killed.returncode == 17, killed.stderr
    with pytest.raises(ArtifactError, match="not finished"):
        open_artifact(out)
    # Fake a kill in the middle of the next append: rows resized and half written, never committed.
    with h5py.File(rank_file(staging_dir(out), 0), "a") as handle:
        assert handle["indices"].shape[0] == 4
        for name in ("images", "labels", "indices"):
            handle[name].resize(6, axis=0)
        handle["indices"][4:6] = [4, 5]
    changed = run_cli("sample", str(pixel_run), "--out", str(out), *CLI_ARGS, "--seed", "1")
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1  # one line: mixing runs is refused
    assert "--seed 0, now 1" in changed.stderr, changed.stderr
    sample_stage(SampleConfig(checkpoint=str(pixel_run), out=str(out), **SETTINGS))
    images, labels = read_samples(out)
    expected_images, expected_labels = read_samples(reference)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)


# ---------------------------------------------------------------------------------------------
# Export, published checkpoints, bad input
# ---------------------------------------------------------------------------------------------


def test_npz_export_reads_back_in_the_adm_layout(reference, tmp_path):
    from sitctl.sample import export_samples_npz

    images, labels = read_samples(reference)
    bundled = np.load(reference / "samples.npz")
    assert bundled["arr_0"].dtype == np.uint8 and bundled["arr_0"].shape == (10, 8, 8, 3)  # NHWC
    assert np.array_equal(bundled["arr_0"], images) and np.array_equal(bundled["arr_1"], labels)
    exported = np.load(export_samples_npz(reference, tmp_path / "again.npz"))
    assert np.array_equal(exported["arr_0"], images)


def published_layout(net: SiT) -> dict[str, torch.Tensor]:
    """The state dict as the SiT release stores it: pos_embed saved, a learn_sigma head of 2C channels."""
    state = {key: value.clone() for key, value in net.state_dict().items()}
    state["pos_embed"] = net.pos_embed.clone()
    p, channels = net.config.patch_size, net.config.in_channels
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        mean_rows = state[key].reshape(p * p, channels, *state[key].shape[1:])  # rows ordered (p, p, C)
        sigma_rows = torch.randn_like(mean_rows)  # the half the sampler must ignore
        state[key] = torch.cat([mean_rows, sigma_rows], dim=1).reshape(p * p * 2 * channels, *state[key].shape[1:])
    return state


def test_published_checkpoint_samples_like_its_artifact_through_the_vae(tiny_vae_dir, tmp_path):
    from sitctl.encode import EncodeConfig, encode

    latents = tmp_path / "latents"
    encode(EncodeConfig(src="digits", out=str(latents), image_size=16, vae=str(tiny_vae_dir), limit=4,
                        shard_size=4, workers=0))
    net, config = randomised_sit(input_size=8, in_channels=4)
    checkpoint = write_checkpoint(tmp_path / "run", latents, net, config)
    published = tmp_path / "SiT-T-2-published.pt"
    torch.save(published_layout(net), published)
    args = ["--mode", "ode", "--method", "heun", "--steps", "3", "--num", "5", "--batch-size", "4", "--cfg", "2",
            "--device", "cpu"]
    result = run_cli("sample", str(published), "--model", "SiT-T/2", "--vae", str(tiny_vae_dir),
                     "--out", str(tmp_path / "from-file"), *args)
    assert result.returncode == 0, result.stderr
    sample_stage(SampleConfig(checkpoint=str(checkpoint), out=str(tmp_path / "from-artifact"), mode="ode",
                              method="heun", steps=3, num=5, batch_size=4, cfg_scale=2.0, device="cpu"))
    from_file, _ = read_samples(tmp_path / "from-file")
    from_artifact, _ = read_samples(tmp_path / "from-artifact")
    assert from_file.shape == (5, 16, 16, 3)  # decoded by the tiny VAE's 2x upsampling
    # Same weights and noise by two paths (a published file, a run's checkpoint) that may run other CPU
    # kernels, so a pixel may land one grey level apart at a rounding boundary. The decode scale is pinned exactly in
    # test_pixel_numbers.py.
    difference = np.abs(from_file.astype(int) - from_artifact.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    manifest = open_artifact(tmp_path / "from-file").manifest
    assert manifest["inputs"] == [] and manifest["extra"]["vae"]["name"] == "local"
    assert manifest["extra"]["model_config"]["num_classes"] == 10  # read off the label table

    with pytest.raises(CheckpointMismatchError, match="does not fit SiT-T/4"):  # another architecture
        sample_stage(SampleConfig(checkpoint=str(published), model="SiT-T/4", vae="none", out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists() and not staging_dir(tmp_path / "x").exists()


def test_bad_sources_fail_with_one_clear_error_before_sampling(pixel_run, tmp_path):
    out = str(tmp_path / "never")
    half_written = tmp_path / "half" / ".step-0000001.partial"
    half_written.mkdir(parents=True)
    (tmp_path / "empty-vae").mkdir()
    cases = [
        (dict(checkpoint=str(tmp_path / "missing")), "no finished checkpoint"),
        (dict(checkpoint=str(half_written.parent)), "no finished checkpoint"),
        (dict(checkpoint=str(pixel_run), vae=str(tmp_path / "empty-vae")), "cannot load"),
        (dict(checkpoint=str(pixel_run), model="SiT-T/2"), "only for bare .pt"),
        (dict(checkpoint=str(pixel_run), mode="ode", method="tweedie"), "--method"),
    ]
    for fields, message in cases:
        with pytest.raises(SitctlError, match=message):
            sample_stage(SampleConfig(out=out, **{**SETTINGS, **fields}))
    assert not Path(out).exists() and not staging_dir(out).exists()


def test_published_dit_file_samples_as_a_vp_noise_model_on_step_indices(tmp_path):
    from model.network import DiscreteTimeInput
    from sitctl.sample_source import open_source

    net, _ = randomised_sit(input_size=8, in_channels=3)
    published = tmp_path / "DiT-T-2-published.pt"
    torch.save(published_layout(net), published)
    config = SampleConfig(checkpoint=str(published), model="SiT-T/2", vae="none", published="dit",
                          out=str(tmp_path / "dit"), mode="sde", steps=4, num=3, batch_size=3, device="cpu")
    source = open_source(config, torch.device("cpu"))
    assert (source.interp.name, source.pred) == ("vp", "noise")
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():  # t = 0.5 reaches the DiT weights as DDPM step 499
        assert torch.equal(source.net(x, torch.full((2,), 0.5), y), net(x, torch.full((2,), 499.0), y))
    assert isinstance(source.net, DiscreteTimeInput)

    result = run_cli("sample", str(published), "--model", "SiT-T/2", "--vae", "none", "--published", "dit",
                     "--out", str(tmp_path / "dit"), "--mode", "sde", "--steps", "4", "--num", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert open_artifact(tmp_path / "dit").manifest["extra"]["interp"] == "vp"
    assert read_samples(tmp_path / "dit")[0].shape == (3, 8, 8, 3)


def test_bf16_sampling_stays_close_to_fp32_and_is_recorded(pixel_run, reference, tmp_path):
    out = tmp_path / "bf16"
    sample_stage(SampleConfig(checkpoint=str(pixel_run), out=str(out), **{**SETTINGS, "precision": "bf16"}))
    images, labels = read_samples(out)
    expected_images, expected_labels = read_samples(reference)
    assert np.array_equal(labels, expected_labels)
    difference = np.abs(images.astype(int) - expected_images.astype(int))
    # bf16 keeps 8 mantissa bits in the network only; the sampler integrates in fp32.
    assert 0 < difference.max() <= 4 and difference.mean() < 0.5  # measured: max 1, mean 0.09
    assert open_artifact(out).config["precision"] == "bf16"


def test_cuda_graphs_on_a_cpu_run_is_one_error_line_and_writes_nothing(pixel_run, tmp_path):
    done = run_cli("sample", str(pixel_run), "--out", str(tmp_path / "s"), *CLI_ARGS, "--cuda-graphs")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --cuda-graphs needs a CUDA device; this run is on cpu (drop --cuda-graphs, or use --compile)"]
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob("*.partial"))


def test_published_repa_checkpoints_sample_in_our_time_without_their_projectors(tmp_path):
    import argparse

    from sitctl.sample_source import open_source

    net, _ = randomised_sit(input_size=8, in_channels=3)
    release = {key: value.clone() for key, value in net.state_dict().items()}
    release["pos_embed"] = net.pos_embed.clone()  # REPA stores it (a frozen parameter); its head has C channels
    release |= {"projectors.0.0.weight": torch.randn(16, 64), "projectors.0.0.bias": torch.zeros(16),
                "projectors.0.4.weight": torch.randn(8, 16)}
    flat, training = tmp_path / "repa-flat.pt", tmp_path / "repa-0004000.pt"
    torch.save(release, flat)
    # REPA's train.py saves {"model", "ema", "opt", "args" (an argparse.Namespace), "steps"}.
    torch.save({"model": release, "ema": release, "opt": {}, "args": argparse.Namespace(proj_coeff=0.5, encoder_depth=8),
                "steps": 4000}, training)
    x, y, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 10]), torch.tensor([0.25, 0.9])
    for path in (flat, training):
        config = SampleConfig(checkpoint=str(path), model="SiT-T/2", vae="none", published="repa", out=str(tmp_path / "s"))
        source = open_source(config, torch.device("cpu"))
        assert (source.interp.name, source.pred) == ("linear", "velocity")
        with torch.no_grad():  # REPA's s = 1 - t runs from data to noise: the velocity turns round
            assert torch.equal(source.net(x, t, y), -net(x, 1 - t, y))
    with pytest.raises(SitctlError, match="holds REPA projector weights .* pass --published repa"):
        open_source(SampleConfig(checkpoint=str(flat), model="SiT-T/2", vae="none", out=str(tmp_path / "s")), torch.device("cpu"))
    release["decoder_blocks.0.weight"] = torch.zeros(2)  # anything else is still named
    torch.save(release, flat)
    with pytest.raises(SitctlError, match="unexpected key decoder_blocks.0.weight"):
        open_source(SampleConfig(checkpoint=str(flat), model="SiT-T/2", vae="none", published="repa", out=str(tmp_path / "s")),
                    torch.device("cpu"))
