"""Rank files: torn appends are cut back, the virtual dataset orders them, the .npz export reads back."""

from __future__ import annotations

import shutil

import h5py
import numpy as np

from sitctl.sample_store import (
    SampleWriter, _first_line, export_npz, iter_batches, rank_file, repair_rank_file, stored_indices, write_virtual_dataset,
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
    assert _first_line(OSError(message)) == "Can't synchronously write data (file write failed: time = Sun Dec  6, filename = 'x.h5')"
    assert _first_line(RuntimeError()) == "RuntimeError"
