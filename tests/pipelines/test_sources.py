"""Image sources: the idx parser, Fashion-MNIST and digits, folder keys, and decoding failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.sources import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, CroppedImages, SourceError, fashion_mnist_spec, open_source, read_idx,
    stable_keys,
)
from tests.helpers import write_idx  # test_study.py imports it from here


@pytest.fixture
def fashion_dir(tmp_path):
    """A 5-image Fashion-MNIST in the Debian layout: gzipped train images and labels."""
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([9, 0, 3, 3, 7], dtype=np.uint8))
    return tmp_path


def test_read_idx_round_trips_types_and_compression(tmp_path):
    for name, array, code in [
        ("a.idx", np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        ("b.idx.gz", np.array([-5, 70000, 3], dtype=np.int32), 0x0C),
        ("c.idx", np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2), 0x0D),
    ]:
        write_idx(tmp_path / name, array, code)
        read = read_idx(tmp_path / name)
        np.testing.assert_array_equal(read, array)
        assert read.shape == array.shape


def test_read_idx_refuses_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(SourceError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "full", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "full").read_bytes()[:-3])
    with pytest.raises(SourceError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_source_reads_debian_layout(fashion_dir):
    source = open_source(f"fashion-mnist:{fashion_dir}")
    assert source.labels == [9, 0, 3, 3, 7] and source.class_names == FASHION_MNIST_CLASSES
    assert source.keys[2] == "fashion-mnist_train_00002" and source.paths[2] == "train-images-idx3-ubyte.gz[2]"
    pixels = read_idx(fashion_dir / "train-images-idx3-ubyte.gz")
    index, crop, reason = CroppedImages(source, 28)[4]
    assert (index, reason) == (4, None)
    np.testing.assert_array_equal(crop, np.repeat(pixels[4][:, :, None], 3, axis=2))  # gray -> RGB, no resize


def test_fashion_mnist_test_split_reads_the_t10k_files_and_old_spellings_still_mean_train(fashion_dir):
    rng = np.random.default_rng(2)
    test_pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(fashion_dir / "t10k-images-idx3-ubyte.gz", test_pixels)
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 8], dtype=np.uint8))
    test = open_source(f"fashion-mnist:test:{fashion_dir}")
    assert test.labels == [1, 2, 8] and test.keys[0] == "fashion-mnist_test_00000"
    assert test.paths[2] == "t10k-images-idx3-ubyte.gz[2]"
    np.testing.assert_array_equal(test.pixels, test_pixels)
    for spec in (f"fashion-mnist:{fashion_dir}", f"fashion-mnist:train:{fashion_dir}"):
        assert open_source(spec).labels == [9, 0, 3, 3, 7]


def test_fashion_mnist_split_spellings_name_split_and_folder():
    assert fashion_mnist_spec("") == ("train", FASHION_MNIST_DIR)
    assert fashion_mnist_spec("test") == ("test", FASHION_MNIST_DIR)
    assert fashion_mnist_spec("train:/data/f") == ("train", "/data/f")
    assert fashion_mnist_spec("/data/f") == ("train", "/data/f")
    assert fashion_mnist_spec("./test") == ("train", "./test")  # a folder named test, as documented


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        open_source(f"fashion-mnist:{tmp_path}")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_is_the_60000_image_train_split():
    source = open_source("fashion-mnist")
    assert len(source) == 60000 and source.pixels.shape == (60000, 28, 28)
    assert np.bincount(source.labels).tolist() == [6000] * 10


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_test_split_has_10000_images():
    source = open_source("fashion-mnist:test")
    assert len(source) == 10000 and np.bincount(source.labels).tolist() == [1000] * 10


def test_digits_are_rescaled_to_full_gray_range():
    source = open_source("digits")
    assert len(source) == 1797 and source.pixels.dtype == np.uint8 and source.pixels.max() == 255
    assert sorted(set(source.labels)) == list(range(10))


def test_digits_train_and_holdout_split_all_digits_in_dataset_order():
    full, train, holdout = (open_source(spec) for spec in ("digits", "digits:train", "digits:holdout"))
    assert (len(train), len(holdout)) == (1500, 297)
    assert set(train.keys).isdisjoint(holdout.keys)
    assert train.keys + holdout.keys == full.keys and train.labels + holdout.labels == full.labels
    np.testing.assert_array_equal(np.concatenate([train.pixels, holdout.pixels]), full.pixels)
    with pytest.raises(SourceError, match="unknown digits split 'test'"):
        open_source("digits:test")


def test_flat_folder_of_images_is_one_class_and_a_folder_of_neither_is_refused(tmp_path):
    (tmp_path / "b.JPEG").write_bytes(b"")  # file contents are judged at load time, not here
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("listed too: it fails at load time like any bad file")
    (tmp_path / ".hidden.png").write_bytes(b"")
    source = open_source(str(tmp_path))
    assert source.paths == ["a.png", "b.JPEG", "notes.txt"] and source.labels == [0, 0, 0]
    assert source.class_names == [tmp_path.name] and source.keys == ["a_png", "b_JPEG", "notes_txt"]
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "notes.txt").write_text("no image here")
    with pytest.raises(SourceError, match="has no class subfolders and no image files"):
        open_source(str(tmp_path / "only-text"))


def test_stable_keys_have_no_dots_and_never_collide():
    paths = ["cat/a.b.png", "cat/a_b_png", "dog/x.JPEG", "dog/deep/y z.png"]
    keys = stable_keys(paths)
    assert keys[2:] == ["dog_x_JPEG", "dog_deep_y_z_png"]
    assert len(set(keys)) == 4 and not any("." in key for key in keys)
    assert keys[0].startswith("cat_a_b_png-") and keys[1].startswith("cat_a_b_png-")
