"""Rank files: torn appends are cut back, the virtual dataset orders them, the .npz export reads back."""

from __future__ import annotations

import shutil

import h5py
import pytest
import numpy as np

from model.errors import first_line
from sitctl.sample_store import (
    SampleWriter, export_npz, image_shape, iter_batches, rank_file, repair_rank_file, stored_indices, write_virtual_dataset,
)


def write_round_robin(directory, images, batch, world_size):
    """Store images as `world_size` ranks would: block b of `batch` indices in rank b % world_size's file."""
    writers = [SampleWriter(rank_file(directory, rank), images.shape[1:], chunk=2) for rank in range(world_size)]
    for block, start in enumerate(range(0, len(images), batch)):
        indices = np.arange(start, min(start + batch, len(images)))
        writers[block % world_size].append(images[indices], indices % 3, indices)
    for writer in writers:
        writer.close()


def test_repair_cuts_a_torn_append_and_deletes_an_unreadable_file(tmp_path):
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    write_round_robin(tmp_path, images, batch=3, world_size=1)
    with h5py.File(rank_file(tmp_path, 0), "a") as handle:  # a kill mid-append: rows grown, never committed
        for name in ("images", "labels", "indices"):
            handle[name].resize(8, axis=0)
    rank_file(tmp_path, 1).write_bytes(b"\x89HDF\r\n killed while writing")
    assert repair_rank_file(rank_file(tmp_path, 0)) == 6
    assert repair_rank_file(rank_file(tmp_path, 1)) == 0 and not rank_file(tmp_path, 1).exists()
    assert stored_indices(tmp_path).tolist() == list(range(6))


def test_virtual_dataset_presents_rank_files_in_index_order_after_a_move(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    write_round_robin(tmp_path / "a", images, batch=2, world_size=3)
    write_virtual_dataset(tmp_path / "a", 11)
    shutil.move(tmp_path / "a", tmp_path / "b")  # sources are relative: the artifact can move
    with h5py.File(tmp_path / "b" / "samples.h5", "r") as handle:
        assert np.array_equal(handle["images"][:], images)
        assert np.array_equal(handle["indices"][:], np.arange(11))
        assert np.array_equal(handle["labels"][:], np.arange(11) % 3)
    ordered = np.concatenate([batch for batch, _ in iter_batches(tmp_path / "b", 4)])
    assert np.array_equal(ordered, images)

    export_npz(tmp_path / "b", tmp_path / "b.npz", batch_size=4)
    exported = np.load(tmp_path / "b.npz")
    assert exported["arr_0"].dtype == np.uint8 and np.array_equal(exported["arr_0"], images)
    assert np.array_equal(exported["arr_1"], np.arange(11) % 3)


def test_more_than_ten_rank_files_read_back_in_global_index_order(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (30, 2, 2, 3), dtype=np.uint8)
    write_round_robin(tmp_path, images, batch=2, world_size=12)
    assert rank_file(tmp_path, 10).name == "images-rank00010.h5" and rank_file(tmp_path, 11).is_file()
    assert sorted(stored_indices(tmp_path).tolist()) == list(range(30))
    ordered = [batch for batch in iter_batches(tmp_path, 7)]
    assert np.array_equal(np.concatenate([images for images, _ in ordered]), images)
    assert np.array_equal(np.concatenate([labels for _, labels in ordered]), np.arange(30) % 3)
    write_virtual_dataset(tmp_path, 30)
    with h5py.File(tmp_path / "samples.h5", "r") as handle:
        assert np.array_equal(handle["images"][:], images) and np.array_equal(handle["indices"][:], np.arange(30))


def test_a_rank_file_killed_in_its_first_append_keeps_nothing(tmp_path):
    # The rows were grown but never committed (no `committed` count yet): what they hold is
    # HDF5's fill value, index 0 over and over, not samples; they must go and be drawn again.
    writer = SampleWriter(rank_file(tmp_path, 0), (2, 2, 3))
    for name in ("images", "labels", "indices"):
        writer.handle[name].resize(3, axis=0)
    writer.close()
    assert repair_rank_file(rank_file(tmp_path, 0)) == 0
    assert stored_indices(tmp_path).tolist() == []
    # The resumed rank appends after the cut, so its first batch is then row 0.
    writer = SampleWriter(rank_file(tmp_path, 0), (2, 2, 3))
    writer.append(np.zeros((2, 2, 2, 3), np.uint8), np.array([1, 2]), np.array([0, 1]))
    writer.close()
    assert stored_indices(tmp_path).tolist() == [0, 1]


def test_a_failed_write_is_told_by_the_first_line_of_hdf5s_message_or_the_errors_name():
    message = "Can't synchronously write data (file write failed: time = Sun Dec  6, filename = 'x.h5')\n  errno = 28"
    assert first_line(OSError(message)) == "Can't synchronously write data (file write failed: time = Sun Dec  6, filename = 'x.h5')"
    assert first_line(OSError("\n  only on the second line")) == "only on the second line"
    assert first_line(RuntimeError()) == first_line(RuntimeError("  ")) == "RuntimeError"


# Rank files as a resumed run with another world size leaves them: each file holds its indices in
# any order, one holds none, and runs of consecutive indices are broken by gaps of 2 and by steps back.
SCATTERED = {0: [0, 4, 2, 7, 6, 8, 10, 9], 1: [3, 1, 5, 11, 13], 2: [], 3: [12]}


def write_scattered(directory, images):
    for rank, indices in SCATTERED.items():
        writer = SampleWriter(rank_file(directory, rank), images.shape[1:], chunk=2)
        if indices:
            writer.append(images[indices], np.array(indices) * 7 % 10, np.array(indices))
        writer.close()


def test_samples_read_back_in_index_order_whatever_order_and_file_each_index_was_written_in(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (14, 2, 2, 3), dtype=np.uint8)
    write_scattered(tmp_path, images)
    indices = stored_indices(tmp_path)
    assert indices.dtype == np.int64 and indices.tolist() == sum(SCATTERED.values(), [])  # file order
    for batch_size in (1, 3, 100):
        batches = list(iter_batches(tmp_path, batch_size))
        assert [len(labels) for _, labels in batches] == [len(part) for part in np.array_split(
            np.arange(14), range(batch_size, 14, batch_size))]
        assert np.array_equal(np.concatenate([batch for batch, _ in batches]), images)
        labels = np.concatenate([labels for _, labels in batches])
        assert labels.dtype == np.int64 and labels.tolist() == [i * 7 % 10 for i in range(14)]

    export_npz(tmp_path, tmp_path / "read.npz", batch_size=4)  # no samples.h5 yet: read through the rank files
    write_virtual_dataset(tmp_path, 14)
    with h5py.File(tmp_path / "samples.h5", "r") as handle:
        assert np.array_equal(handle["images"][:], images)
        assert handle["labels"].dtype == handle["indices"].dtype == np.int64
        assert handle["indices"][:].tolist() == list(range(14))
    export_npz(tmp_path, tmp_path / "virtual.npz", batch_size=4)  # through samples.h5: the same file
    assert (tmp_path / "read.npz").read_bytes() == (tmp_path / "virtual.npz").read_bytes()
    assert np.array_equal(np.load(tmp_path / "read.npz")["arr_0"], images)


def test_an_index_no_rank_file_holds_reads_as_label_and_index_minus_one_and_a_black_image(tmp_path):
    images = np.full((3, 2, 2, 3), 200, np.uint8)
    writer = SampleWriter(rank_file(tmp_path, 0), (2, 2, 3), chunk=2)
    writer.append(images[[0, 2]], np.array([4, 5]), np.array([0, 2]))  # index 1 never drawn
    writer.close()
    write_virtual_dataset(tmp_path, 3)
    with h5py.File(tmp_path / "samples.h5", "r") as handle:  # a hole is told from sample 0, label 0 or a dark image
        assert handle["indices"][:].tolist() == [0, -1, 2] and handle["labels"][:].tolist() == [4, -1, 5]
        assert handle["images"][1].max() == 0 and handle["images"][2].min() == 200


def test_rank_files_and_samples_h5_written_seconds_apart_are_the_same_bytes(tmp_path):
    import time

    images = np.random.default_rng(3).integers(0, 256, (5, 2, 2, 3), dtype=np.uint8)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        write_round_robin(tmp_path / name, images, batch=2, world_size=2)
        write_virtual_dataset(tmp_path / name, 5)
        time.sleep(1.1)  # HDF5 records times in seconds
    for path in sorted((tmp_path / "first").iterdir()):
        assert path.read_bytes() == (tmp_path / "second" / path.name).read_bytes(), path.name


def test_a_file_killed_while_its_datasets_were_made_is_deleted_and_its_samples_drawn_again(tmp_path):
    with h5py.File(rank_file(tmp_path, 0), "w") as handle:  # images made, labels and indices not yet
        handle.create_dataset("images", (0, 2, 2, 3), np.uint8, maxshape=(None, 2, 2, 3))
    assert repair_rank_file(rank_file(tmp_path, 0)) == 0
    assert not rank_file(tmp_path, 0).exists()


def test_a_full_disk_stops_the_append_that_meets_it_and_every_row_counted_reads_back_as_written(tmp_path):
    from tests.helpers import small_disk

    disk = tmp_path / "disk"
    with small_disk(disk, "48k") as resize:
        writer = SampleWriter(rank_file(disk, 0), (8, 8, 3), chunk=2)
        written = 0
        with pytest.raises(OSError) as error:
            for block in range(1000):  # 400 KB of images: more than the disk holds
                writer.append(np.full((2, 8, 8, 3), block, np.uint8), np.array([block, block]), np.arange(2) + written)
                written += 2
        assert str(error.value) == "[Errno 28] No space left on device" and 0 < written < 400  # the OS's words
        writer.close()  # the close fails too after the failed write: that adds nothing
        resize("1m")
        assert repair_rank_file(rank_file(disk, 0)) == written  # not one row the disk did not take
        images, labels = np.concatenate([batch for batch, _ in iter_batches(disk, 64)]), stored_indices(disk)
        assert np.array_equal(images[:, 0, 0, 0], np.arange(written) // 2) and labels.tolist() == list(range(written))


def test_a_rank_file_whose_close_cannot_write_says_so(tmp_path):
    import os

    writer = SampleWriter(rank_file(tmp_path, 0), (2, 2, 3))  # its datasets are not on disk yet
    full = os.open("/dev/full", os.O_WRONLY)  # the kernel's device whose every write fails with ENOSPC
    try:
        os.dup2(full, writer.handle.id.get_vfd_handle())
        with pytest.raises((OSError, RuntimeError)):
            writer.close()
    finally:
        os.close(full)


def test_an_export_past_zips_32_bit_limit_is_written_as_zip64(tmp_path, monkeypatch):
    import zipfile

    images = np.random.default_rng(4).integers(0, 256, (11, 4, 4, 3), dtype=np.uint8)
    (tmp_path / "s").mkdir()
    write_round_robin(tmp_path / "s", images, batch=2, world_size=2)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)  # 50K images of 256px are 9.8 GB; the limit is 2 GiB
    export_npz(tmp_path / "s", tmp_path / "s.npz", batch_size=4)
    exported = np.load(tmp_path / "s.npz")
    assert np.array_equal(exported["arr_0"], images) and exported["arr_1"].tolist() == (np.arange(11) % 3).tolist()


def test_pixels_quantize_as_the_reference_does_clamped_127_5_x_plus_128():
    from sitctl.sample_store import quantize

    x = np.array([-2.0, -1.0, -1.0 / 255, 0.0, 0.5, 0.99, 1.0, 3.0], np.float32)
    assert quantize(x).tolist() == [0, 0, 127, 128, 191, 254, 255, 255]  # floor(127.5 x + 128.5 - 0.5)
    assert quantize(x).dtype == np.uint8


def test_images_that_are_not_uint8_nhwc_are_refused_and_a_folder_without_rank_files_named(tmp_path):
    writer = SampleWriter(rank_file(tmp_path, 0), (2, 2, 3))
    with pytest.raises(ValueError) as error:
        writer.append(np.zeros((1, 2, 2, 3), np.float32), np.zeros(1), np.zeros(1))  # pixels as floats: not quantized
    assert str(error.value) == "images must be uint8 NHWC, got float32 (1, 2, 2, 3)"
    with pytest.raises(ValueError, match=r"got uint8 \(2, 2, 3\)"):
        writer.append(np.zeros((2, 2, 3), np.uint8), np.zeros(1), np.zeros(1))  # one image without its batch axis
    writer.close()
    assert len(stored_indices(tmp_path)) == 0
    with pytest.raises(FileNotFoundError) as missing:
        image_shape(tmp_path / "elsewhere")
    assert str(missing.value) == f"no images-rank*.h5 in {tmp_path / 'elsewhere'}"
