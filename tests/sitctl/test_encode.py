"""The encode stage on a tiny class-folder dataset with corrupt files and odd image modes."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from pipelines.images import center_crop_arr
from sitctl.artifacts import open_artifact, staging_dir
from sitctl.encode import EncodeConfig, encode
from sitctl.errors import SitctlError
from tests.helpers import offline_hub, read_shards, run_cli, write_idx

SIZE = 16
GOOD = {  # relative path -> PIL mode it is saved in; sizes differ so the crop does real work
    "cat/rgb.jpg": "RGB", "cat/gray.png": "L", "cat/palette.png": "P",
    "dog/cmyk.jpg": "CMYK", "dog/alpha.png": "RGBA", "dog/deeper/rgb.png": "RGB",
}
BAD = {"cat/empty.png": "empty file", "dog/truncated.jpg": "truncated", "dog/notes.txt": "not an image"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """cat/, dog/ and an empty bird/ class; six readable images in four modes, three bad files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for number, (relative, mode) in enumerate(sorted(GOOD.items())):
        pixels = rng.integers(0, 256, (20 + 3 * number, 24, 3), dtype=np.uint8)  # (H, W, 3), H varies
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels)
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        image.save(root / relative)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (root / "dog/truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "cat/empty.png").write_bytes(b"")
    (root / "dog/notes.txt").write_text("not a picture")
    (root / "dog/.DS_Store").write_bytes(b"hidden files are not data")
    (root / "bird").mkdir()
    return root


@pytest.fixture(scope="module")
def vae_latents(image_folder, tiny_vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "latents"
    config = EncodeConfig(src=str(image_folder), out=str(out), image_size=SIZE, vae=str(tiny_vae_dir), shard_size=4, batch_size=3, workers=0)
    return encode(config)


def test_vae_encode_stores_posterior_moments_of_image_and_flip(vae_latents, image_folder, tiny_vae_dir):
    samples = read_shards(vae_latents.path)
    assert sorted(samples[k]["path.txt"] for k in samples) == sorted(GOOD)
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    for sample in samples.values():
        crop = center_crop_arr(Image.open(image_folder / sample["path.txt"]), SIZE)  # (S, S, 3) uint8
        pixels = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            expected = [vae.encode(view).latent_dist for view in (pixels, pixels.flip(-1))]
        moments = sample["moments.npy"]
        assert moments.dtype == np.float16 and moments.shape == (2, 2, 4, SIZE // 2, SIZE // 2)
        for view, posterior in enumerate(expected):
            np.testing.assert_allclose(moments[view, 0], posterior.mean[0].numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(moments[view, 1], posterior.std[0].numpy(), atol=2e-3, rtol=2e-3)
        assert sample["cls"] == ["bird", "cat", "dog"].index(sample["path.txt"].split("/")[0])


def test_vae_manifest_records_shards_classes_and_vae(vae_latents, tiny_vae_dir):
    extra = vae_latents.extra
    counts = [shard["count"] for shard in extra["shards"]]
    assert len(counts) == 3 and sum(counts) == 6  # 9 files in shards of 4; the 3 bad ones skipped
    assert sum(counts) == len(read_shards(vae_latents.path))
    assert extra["num_samples"] == 6 and extra["num_errors"] == 3
    assert extra["class_names"] == ["bird", "cat", "dog"] and extra["num_classes"] == 3
    assert extra["class_histogram"] == [0, 3, 3]
    assert extra["latent_shape"] == [4, SIZE // 2, SIZE // 2]
    assert extra["scale_factor"] == pytest.approx(0.18215)
    assert extra["vae"] == {"name": "local", "source": str(tiny_vae_dir.resolve())}
    assert vae_latents.config["image_size"] == SIZE


def test_bad_files_are_listed_with_reasons(vae_latents):
    errors = [json.loads(line) for line in (vae_latents.path / "errors.jsonl").read_text().splitlines()]
    assert {error["path"]: error["reason"] for error in errors}.keys() == BAD.keys()
    for error in errors:
        assert BAD[error["path"]] in error["reason"].lower()


def test_pixel_space_stores_exact_pixels_and_flips(image_folder, tmp_path):
    artifact = encode(EncodeConfig(src=str(image_folder), out=str(tmp_path / "px"), image_size=SIZE, vae="none", workers=0))
    samples = read_shards(artifact.path)
    assert len(samples) == len(GOOD) and artifact.extra["latent_shape"] == [3, SIZE, SIZE]
    for sample in samples.values():
        crop = center_crop_arr(Image.open(image_folder / sample["path.txt"]), SIZE)
        pixels = np.transpose(crop, (2, 0, 1)).astype(np.float32) / 127.5 - 1  # (3, S, S) in [-1, 1]
        moments = sample["moments.npy"].astype(np.float32)
        np.testing.assert_array_equal(moments[0, 0], pixels.astype(np.float16))
        np.testing.assert_array_equal(moments[1, 0], moments[0, 0][:, :, ::-1])  # the flip, exactly
        assert not moments[:, 1].any()  # std is 0 without a VAE
    assert artifact.extra["scale_factor"] == 1.0 and artifact.extra["vae"] == {"name": "none", "source": None}


def test_keys_are_stable_from_source_paths(image_folder, tmp_path):
    one = encode(EncodeConfig(src=str(image_folder), out=str(tmp_path / "a"), image_size=8, vae="none", shard_size=2, workers=0))
    two = encode(EncodeConfig(src=str(image_folder), out=str(tmp_path / "b"), image_size=8, vae="none", shard_size=5, workers=2))
    keys = {key: sample["path.txt"] for key, sample in read_shards(one.path).items()}
    assert keys == {key: sample["path.txt"] for key, sample in read_shards(two.path).items()}
    assert keys["dog_deeper_rgb_png"] == "dog/deeper/rgb.png"


def test_digits_limit_and_labels(digits_latents_dir):
    from sklearn.datasets import load_digits

    artifact = open_artifact(digits_latents_dir, "latents")  # the shared fixture: 64 digits, shards of 32
    samples = read_shards(artifact.path)
    assert len(samples) == 64 and [s["count"] for s in artifact.extra["shards"]] == [32, 32]
    digits = load_digits()
    for key, sample in samples.items():
        index = int(key.split("_")[1])
        assert sample["cls"] == digits.target[index]
        expected = np.round(digits.images[index] * 255 / 16) / 127.5 - 1  # 8x8 needs no resize
        np.testing.assert_allclose(sample["moments.npy"][0, 0, 0], expected, atol=1e-3)


def test_fashion_mnist_from_idx_files(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", pixels)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    artifact = encode(EncodeConfig(src=f"fashion-mnist:{tmp_path}", out=str(tmp_path / "f"), image_size=28, vae="none", workers=0))
    assert artifact.extra["class_names"][5] == "Sandal" and artifact.extra["class_histogram"] == [1] * 6 + [0] * 4
    for key, sample in read_shards(artifact.path).items():
        index = int(key.rsplit("_", 1)[1])
        assert sample["cls"] == index
        np.testing.assert_array_equal(sample["moments.npy"][0, 0, 1], (pixels[index] / 127.5 - 1).astype(np.float16))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"src": "missing-folder"}, "does not exist"),
        ({"vae": "nonsense"}, "unknown VAE 'nonsense'"),
        ({"out": "{file}/out"}, "cannot write"),
        ({"out": "{existing}"}, "already exists"),
    ],
)
def test_user_errors_are_one_line_and_leave_nothing_finished(change, message, image_folder, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "existing").mkdir()
    settings = {"src": str(image_folder), "out": str(tmp_path / "out"), "image_size": 8, "vae": "none", "workers": 0}
    settings.update({k: v.format(file=tmp_path / "file", existing=tmp_path / "existing") for k, v in change.items()})
    with pytest.raises(SitctlError, match=message) as caught:
        encode(EncodeConfig(**settings))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "data" / "only-class").mkdir(parents=True)
    with pytest.raises(SitctlError, match="no files"):
        encode(EncodeConfig(src=str(tmp_path / "data"), out=str(tmp_path / "out"), vae="none", workers=0))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "notes.txt").write_text("no subfolders and no image files")
    with pytest.raises(SitctlError, match="no class subfolders and no image files") as caught:
        encode(EncodeConfig(src=str(tmp_path / "flat"), out=str(tmp_path / "out"), vae="none", workers=0))
    assert "\n" not in str(caught.value)


def test_all_files_unreadable_is_refused_and_not_published(tmp_path):
    (tmp_path / "data" / "c").mkdir(parents=True)
    (tmp_path / "data" / "c" / "x.txt").write_text("text")
    with pytest.raises(SitctlError, match="no readable images"):
        encode(EncodeConfig(src=str(tmp_path / "data"), out=str(tmp_path / "out"), image_size=8, vae="none", workers=0))
    assert not (tmp_path / "out").exists() and staging_dir(tmp_path / "out").is_dir()


def test_unloadable_local_vae_is_one_line(tmp_path):
    (tmp_path / "not-a-vae").mkdir()
    with pytest.raises(SitctlError, match="cannot load a diffusers AutoencoderKL from") as caught:
        encode(EncodeConfig(src="digits", out=str(tmp_path / "out"), vae=str(tmp_path / "not-a-vae"), workers=0))
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_cli_hub_vae_offline_says_to_download_it(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hf" / "hub")  # an empty cache, and no network
    result = run_cli("encode", "digits", "--out", tmp_path / "out", "--vae", "ema")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot fetch VAE 'ema' (stabilityai/sd-vae-ft-ema)")
    assert "--vae DIR" in result.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Past the tenth shard (issue 24): names, order and done markers
# ---------------------------------------------------------------------------------------------

TWELVE_SHARDS = dict(src="digits", image_size=8, vae="none", limit=24, shard_size=2, workers=0)


def test_shards_past_the_tenth_are_listed_and_read_in_their_planned_order(tmp_path):
    from pipelines.shards import open_shard, shard_name
    from pipelines.sources import open_source
    from sitctl.data import open_latents
    from sitctl.encode import plan_shards

    config = EncodeConfig(out=str(tmp_path / "latents"), **TWELVE_SHARDS)
    artifact = encode(config)
    assert [shard["name"] for shard in artifact.extra["shards"]] == [shard_name(index) for index in range(12)]
    source, latents = open_source("digits"), open_latents(artifact.path)
    for index, (path, items) in enumerate(zip(latents.shard_paths, plan_shards(len(source), config), strict=True)):
        assert path.endswith(shard_name(index))
        assert open_shard(path, (2, 2, *latents.latent_shape)).keys == tuple(source.keys[item] for item in items)


def test_a_resumed_encode_keeps_the_eleven_marked_shards_and_writes_the_twelfth(tmp_path):
    from pipelines.sources import open_source
    from sitctl.encode import encode_shards, plan_shards
    from sitctl.vae import load_vae

    straight = encode(EncodeConfig(out=str(tmp_path / "straight"), **TWELVE_SHARDS))
    # A run that stopped after shard 10 (the eleventh): its staging dir holds 11 marked shards.
    config = EncodeConfig(out=str(tmp_path / "resumed"), **TWELVE_SHARDS)
    staging, source = staging_dir(config.out), open_source("digits")
    staging.mkdir()
    shards = dict(enumerate(plan_shards(len(source), config)))
    vae, _ = load_vae("none", torch.device("cpu"))
    encode_shards(source, {index: shards[index] for index in range(11)}, staging, vae, config, torch.device("cpu"),
                  show_progress=False)
    kept = {path.name: path.stat().st_ino for path in staging.glob("shard-*.tar")}
    resumed = encode(config)
    assert len(kept) == 11 and all((resumed.path / name).stat().st_ino == inode for name, inode in kept.items())
    assert resumed.id == straight.id


def test_default_workers_never_exceed_the_usable_cores_so_the_loader_does_not_warn(tmp_path, capfd):
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # as a scheduler or taskset narrows a job (this thread, and the workers it forks)
    try:
        done = run_cli("encode", "digits", "--out", tmp_path / "latents", "--vae", "none", "--image-size", "8", "--limit", "32",
                       "--shard-size", "16", capture=capfd)
    finally:
        os.sched_setaffinity(0, cores)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no "This DataLoader will create 4 worker processes"
