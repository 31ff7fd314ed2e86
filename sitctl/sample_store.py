"""Storage of generated images inside a `samples` artifact: one chunked HDF5 file per rank.

Each rank writes `images-rank{R:05d}.h5` holding three aligned datasets:
    images   (N, H, W, C) uint8, pixels quantised as clamp(127.5 x + 128, 0, 255)
    labels   (N,) int64 class labels (-1 for unconditional)
    indices  (N,) int64 global sample indices; image i depends on (seed, i) alone
Readers go through `iter_batches`, which returns samples in global index order whatever the
number of rank files, so nothing downstream depends on how many processes wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

RANK_FILE = "images-rank{rank:05d}.h5"


def rank_file(directory: Path, rank: int) -> Path:
    return Path(directory) / RANK_FILE.format(rank=rank)


class SampleWriter:
    """Appends batches to one rank's HDF5 file; reopening an existing file appends after its end."""

    def __init__(self, path: Path, image_shape: tuple[int, int, int], chunk: int = 64):
        self.path = Path(path)
        self.handle = h5py.File(self.path, "a")
        if "images" not in self.handle:
            h, w, c = image_shape
            self.handle.create_dataset("images", (0, h, w, c), np.uint8, maxshape=(None, h, w, c), chunks=(chunk, h, w, c))
            self.handle.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(max(chunk, 1024),))
            self.handle.create_dataset("indices", (0,), np.int64, maxshape=(None,), chunks=(max(chunk, 1024),))

    def __len__(self) -> int:
        return self.handle["indices"].shape[0]

    def indices(self) -> np.ndarray:
        return self.handle["indices"][:]

    def append(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
        start, n = len(self), images.shape[0]
        for name, values in (("images", images), ("labels", labels), ("indices", indices)):
            dataset = self.handle[name]
            dataset.resize(start + n, axis=0)
            dataset[start : start + n] = values
        self.handle.flush()

    def truncate(self, n: int) -> None:
        """Keep only the first n samples (drops a batch that was being written when killed)."""
        for name in ("images", "labels", "indices"):
            self.handle[name].resize(n, axis=0)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


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
    """Yield (images uint8 NHWC, labels int64) in global sample-index order, `batch_size` at a time."""
    handles = [h5py.File(path, "r") for path in _rank_files(directory)]
    try:
        # (global index, file number, row) for every stored sample, sorted by global index.
        locations = [
            (index, number, row)
            for number, handle in enumerate(handles)
            for row, index in enumerate(handle["indices"][:])
        ]
        locations.sort()
        for start in range(0, len(locations), batch_size):
            chunk = locations[start : start + batch_size]
            images = np.stack([handles[number]["images"][row] for _, number, row in chunk])
            labels = np.array([handles[number]["labels"][row] for _, number, row in chunk], dtype=np.int64)
            yield images, labels
    finally:
        for handle in handles:
            handle.close()


def write_images(directory: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Store a whole uint8 NHWC array as rank 0's file (used for references and in tests)."""
    labels = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    writer = SampleWriter(rank_file(directory, 0), tuple(images.shape[1:]))
    try:
        writer.append(images, labels, np.arange(len(images), dtype=np.int64))
    finally:
        writer.close()
