"""Storage of generated images inside a `samples` artifact: one chunked HDF5 file per rank.

Each rank writes `images-rank{R:05d}.h5` holding three aligned datasets:
    images   (N, H, W, C) uint8, pixels quantised as clamp(127.5 x + 128, 0, 255)
    labels   (N,) int64 class labels (-1 for unconditional)
    indices  (N,) int64 global sample indices; image i depends on (seed, i) alone
Readers go through `iter_batches`, which returns samples in global index order whatever the
number of rank files, so nothing downstream depends on how many processes wrote them.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from sitctl.errors import first_line

RANK_FILE = "images-rank{rank:05d}.h5"


def rank_file(directory: Path, rank: int) -> Path:
    return Path(directory) / RANK_FILE.format(rank=rank)


class SampleWriter:
    """Appends batches to one rank's HDF5 file; reopening an existing file appends after its end."""

    def __init__(self, path: Path, image_shape: tuple[int, int, int], chunk: int = 64):
        self.path = Path(path)
        # No chunk cache: HDF5 then writes each chunk inside the call that fills it, so a full disk
        # raises there. With a cache the write happens when the cache is evicted, often in a
        # destructor whose error h5py only prints, and the batch would be counted as committed.
        self.handle = h5py.File(self.path, "a", rdcc_nbytes=0)
        self.failed = False
        if "images" not in self.handle:
            h, w, c = image_shape
            # track_times=False: no creation time in the file, so identical runs give identical bytes.
            self.handle.create_dataset("images", (0, h, w, c), np.uint8, maxshape=(None, h, w, c), chunks=(chunk, h, w, c),
                                       track_times=False)
            for name in ("labels", "indices"):
                self.handle.create_dataset(name, (0,), np.int64, maxshape=(None,), chunks=(max(chunk, 1024),),
                                           track_times=False)

    def __len__(self) -> int:
        return self.handle["indices"].shape[0]

    def append(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
        start, n = len(self), images.shape[0]
        try:
            for name, values in (("images", images), ("labels", labels), ("indices", indices)):
                dataset = self.handle[name]
                dataset.resize(start + n, axis=0)
                dataset[start : start + n] = values
            self.handle.flush()
            # The count is set only once the rows are flushed: a kill or a failed write leaves it behind.
            self.handle.attrs["committed"] = start + n
            self.handle.flush()
        except (OSError, RuntimeError) as error:
            self.failed = True
            code = getattr(error, "errno", None)
            raise OSError(code, os.strerror(code) if code else first_line(error)) from None

    def close(self) -> None:
        """Close the file; after a failed write (a full disk) the close fails too, and that adds nothing."""
        try:
            self.handle.close()
        except (OSError, RuntimeError):
            if not self.failed:
                raise


def quantize(x: np.ndarray) -> np.ndarray:
    """Map images in [-1, 1] (NCHW or NHWC float) to uint8 as the reference does: clamp(127.5 x + 128)."""
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def _rank_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("images-rank*.h5"))


def num_samples(directory: Path) -> int:
    total = 0
    for path in _rank_files(directory):
        with h5py.File(path, "r") as handle:
            total += handle["indices"].shape[0]
    return total


def image_shape(directory: Path) -> tuple[int, int, int]:
    files = _rank_files(directory)
    if not files:
        raise FileNotFoundError(f"no images-rank*.h5 in {directory}")
    with h5py.File(files[0], "r") as handle:
        return tuple(handle["images"].shape[1:])


def iter_batches(directory: Path, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (images uint8 NHWC, labels int64) in global sample-index order, `batch_size` at a time.

    Rows that are next to each other in one rank file and in index order are read as one slice,
    so a rank file written in index order costs one HDF5 read per batch, not one per image.
    """
    handles = [h5py.File(path, "r") for path in _rank_files(directory)]
    try:
        per_file = [handle["indices"][:] for handle in handles]
        if not per_file:
            return
        # (file number, row) of every stored sample, sorted by (global index, file, row).
        files = np.concatenate([np.full(len(indices), number) for number, indices in enumerate(per_file)])
        rows = np.concatenate([np.arange(len(indices)) for indices in per_file])
        order = np.lexsort((rows, files, np.concatenate(per_file)))
        files, rows = files[order], rows[order]
        for start in range(0, len(order), batch_size):
            images, labels = _read_rows(handles, files[start : start + batch_size], rows[start : start + batch_size])
            yield images, labels
    finally:
        for handle in handles:
            handle.close()


def _read_rows(handles: list, files: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of (files[k], rows[k]) for each k, one slice per run of consecutive rows."""
    breaks = np.flatnonzero((np.diff(files) != 0) | (np.diff(rows) != 1)) + 1
    images, labels = [], []
    for first, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
        handle, rows_slice = handles[files[first]], slice(int(rows[first]), int(rows[first]) + int(end - first))
        images.append(handle["images"][rows_slice])
        labels.append(handle["labels"][rows_slice])
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Resuming, the merged view, and the ADM reference-evaluator export
# ---------------------------------------------------------------------------------------------

VIRTUAL_FILE = "samples.h5"
DATASETS = ("images", "labels", "indices")


def repair_rank_file(path: Path) -> int:
    """Cut a rank file back to its committed rows (a batch cut short by a kill); return the count.

    A file HDF5 cannot open at all (killed during a metadata write) is deleted: its samples are
    simply drawn again, and they come out the same because they depend on (seed, index) alone.
    """
    try:
        handle = h5py.File(path, "a")
    except OSError:
        Path(path).unlink()
        return 0
    with handle:
        if not all(name in handle for name in DATASETS):  # killed while creating the datasets
            kept = None
        else:
            # No count yet means no append ever committed: rows there are a torn first batch (fill values).
            kept = int(handle.attrs.get("committed", 0))
            for name in DATASETS:
                handle[name].resize(kept, axis=0)
    if kept is None:
        Path(path).unlink()
        return 0
    return kept


def stored_indices(directory: Path) -> np.ndarray:
    """Global indices of every stored sample, over all rank files, in file order."""
    parts = [np.zeros(0, np.int64)]
    for path in _rank_files(directory):
        with h5py.File(path, "r") as handle:
            parts.append(handle["indices"][:])
    return np.concatenate(parts)


def _consecutive_runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """(first row, end row, first index) of each run of consecutive global indices in a file."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(indices)]])
    return [(int(a), int(b), int(indices[a])) for a, b in zip(starts, ends) if b > a]


def write_virtual_dataset(directory: Path, num: int) -> Path:
    """Write `samples.h5`: an HDF5 virtual dataset presenting all rank files as one, in index order.

    Nothing is copied; each run of consecutive indices in a rank file maps to its slice of the
    (num, H, W, C) view. Sources are named relative to the directory, so the artifact can move.
    """
    directory = Path(directory)
    shape = image_shape(directory)
    layouts = {
        "images": h5py.VirtualLayout((num, *shape), np.uint8),
        "labels": h5py.VirtualLayout((num,), np.int64),
        "indices": h5py.VirtualLayout((num,), np.int64),
    }
    for path in _rank_files(directory):
        with h5py.File(path, "r") as handle:
            indices = handle["indices"][:]
            sources = {name: h5py.VirtualSource(path.name, name, shape=handle[name].shape) for name in DATASETS}
        for first_row, end_row, first_index in _consecutive_runs(indices):
            rows = slice(first_row, end_row)
            target = slice(first_index, first_index + end_row - first_row)
            for name in DATASETS:
                layouts[name][target] = sources[name][rows]
    out = directory / VIRTUAL_FILE
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as handle:
        for name, layout in layouts.items():
            _create_untimed_virtual_dataset(handle, name, layout, fillvalue=-1 if name != "images" else 0)
    os.replace(tmp, out)
    return out


def _create_untimed_virtual_dataset(handle, name: str, layout, fillvalue: int) -> None:
    """h5py's create_virtual_dataset without the creation time HDF5 records by default.

    The timestamp would make two identical runs give different samples.h5 bytes, hence
    different artifact ids. h5py offers no track_times for virtual datasets, so the dataset is
    created through the low-level API with the layout's own mapping (its property list).
    """
    plist = layout._get_dcpl(handle.file.filename)
    plist.set_fill_value(np.array([fillvalue]))
    plist.set_obj_track_times(False)
    space = h5py.h5s.create_simple(layout.shape)
    h5py.h5d.create(handle.id, name.encode(), h5py.h5t.py_create(np.dtype(layout.dtype), logical=1), space, dcpl=plist)


def _batches_in_order(directory: Path, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Contiguous slices of `samples.h5` where it exists (fast), else `iter_batches`."""
    virtual = Path(directory) / VIRTUAL_FILE
    if not virtual.is_file():
        yield from iter_batches(directory, batch_size)
        return
    with h5py.File(virtual, "r") as handle:
        for start in range(0, handle["labels"].shape[0], batch_size):
            yield handle["images"][start : start + batch_size], handle["labels"][start : start + batch_size]


def export_npz(directory: Path, path: Path, batch_size: int = 1024) -> Path:
    """Write the ADM evaluator's layout: `.npz` with arr_0 uint8 (N, H, W, C) and arr_1 labels (N,).

    Streamed in index order through a zip member (stored, zip64), so 50K 256x256 images never
    need to sit in memory at once; `np.load(path)["arr_0"]` reads it back.
    """
    path = Path(path)
    count, shape = num_samples(directory), image_shape(directory)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (count, *shape)}
            np.lib.format.write_array_header_2_0(member, header)
            labels = []
            for images, batch_labels in _batches_in_order(directory, batch_size):
                member.write(np.ascontiguousarray(images).tobytes())
                labels.append(batch_labels)
        with archive.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.concatenate(labels))  # an artifact holds at least one image
    os.replace(tmp, path)
    return path
