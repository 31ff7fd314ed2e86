"""Where raw images come from: a folder (of class subfolders, or flat), or a built-in dataset.

A source is a fixed, ordered list of items, each with a stable key, the path it was read from
(relative to the source root, so keys and shards do not depend on where the data lives), a
label, and a way to load it as a PIL image. `open_source(spec)` parses the SRC argument:

    DIR                  one subfolder per class (the ImageNet train layout); labels follow the
                         sorted folder names. A DIR with no class subfolders but image files
                         directly in it (an ImageNet val or sample dump) is one class, label 0.
    digits               scikit-learn's bundled 8x8 digits (all 1797), labels 0-9
    digits:train         the first 1500 digits in dataset order
    digits:holdout       the other 297, for an FID reference the model never trained on
    fashion-mnist[:DIR]  the Fashion-MNIST train split (60000) as idx files (Debian's
                         dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist)
    fashion-mnist:train[:DIR]  the same, named explicitly
    fashion-mnist:test[:DIR]   the 10000-image test split (t10k files): an FID reference the
                         model never trained on
A DIR literally named `train` or `test` is written ./train or ./test.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.images import center_crop_arr
from model.errors import SitctlError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
DIGITS_TRAIN = 1500  # digits:train is items [0, 1500), digits:holdout the other 297
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Split name -> the stem its idx files share (the test split's files are named t10k-*).
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class SourceError(SitctlError):
    """SRC is missing, empty or not in a layout encode can read."""


@dataclass(frozen=True, eq=False)
class ImageSource:
    """An ordered list of images: item i is (keys[i], paths[i], labels[i]) and loads with load(i)."""

    name: str  # "folder", "digits" or "fashion-mnist"
    root: str | None  # absolute directory the paths are relative to (None for bundled data)
    class_names: list[str]
    keys: list[str]
    paths: list[str]
    labels: list[int]
    pixels: np.ndarray | None = None  # (N, H, W) uint8 for in-memory datasets, else None

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, items: slice) -> ImageSource:
        """The items in `items` (a slice of the list), keys and paths unchanged."""
        pixels = None if self.pixels is None else self.pixels[items]
        return replace(self, keys=self.keys[items], paths=self.paths[items], labels=self.labels[items], pixels=pixels)

    def load(self, index: int) -> Image.Image:
        """The decoded image; raises (any exception) when the file is not a readable image."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels[index])  # (H, W) uint8 -> mode L
        with Image.open(Path(self.root) / self.paths[index]) as image:
            image.load()  # decode now, so a truncated file fails here rather than later
            return image.copy()


def open_source(spec: str) -> ImageSource:
    """Parse SRC (see the module docstring) and list its items."""
    if spec == "digits":
        return digits_source()
    if spec.startswith("digits:"):
        return digits_split(digits_source(), spec.partition(":")[2])
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        split, directory = fashion_mnist_spec(spec.partition(":")[2])
        return fashion_mnist_source(directory, split)
    return folder_source(spec)


# ---------------------------------------------------------------------------------------------
# A folder of class subfolders, or a flat folder of images
# ---------------------------------------------------------------------------------------------


def folder_source(directory: str | Path) -> ImageSource:
    """Every non-hidden file under SRC/CLASS/ (recursively), else directly in SRC; undecodable ones fail at load time."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise SourceError(f"input folder {directory} does not exist (expected SRC/CLASS/IMAGE files, or digits / fashion-mnist)")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_names:
        return _flat_folder_source(root, directory)
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        for path in _files_below(root / class_name):
            paths.append(path.relative_to(root).as_posix())
            labels.append(label)
    if not paths:
        raise SourceError(f"input folder {directory} has class subfolders but no files in them")
    return ImageSource(name="folder", root=str(root), class_names=class_names, keys=stable_keys(paths), paths=paths, labels=labels)


def _flat_folder_source(root: Path, directory: str | Path) -> ImageSource:
    """Image files directly in SRC (no class subfolders) as one class with label 0."""
    files = sorted(entry.name for entry in os.scandir(root) if entry.is_file() and not entry.name.startswith("."))
    # Any image suffix makes it an image folder; its other files then fail at load time and are listed.
    if not any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in files):
        raise SourceError(f"input folder {directory} has no class subfolders and no image files (expected SRC/CLASS/IMAGE or SRC/IMAGE files)")
    return ImageSource(name="folder", root=str(root), class_names=[root.name], keys=stable_keys(files), paths=files, labels=[0] * len(files))


def _files_below(directory: Path) -> list[Path]:
    files = []
    for parent, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files.extend(Path(parent) / f for f in filenames if not f.startswith("."))
    return sorted(files)


def stable_keys(paths: list[str]) -> list[str]:
    """WebDataset keys from relative paths: characters other than [A-Za-z0-9_-] become '_'.

    WebDataset splits a member name at its first '.', so keys must have none. Paths that would
    collide after this (say 'a b.png' and 'a_b.png') get an 8-hex hash of the path appended.
    """
    keys = [re.sub(r"[^A-Za-z0-9_-]", "_", path) for path in paths]
    counts = Counter(keys)
    return [
        f"{key}-{hashlib.sha1(path.encode()).hexdigest()[:8]}" if counts[key] > 1 else key
        for key, path in zip(keys, paths)
    ]


# ---------------------------------------------------------------------------------------------
# Built-in datasets held in memory
# ---------------------------------------------------------------------------------------------


def digits_source() -> ImageSource:
    """scikit-learn's 1797 bundled 8x8 digits; gray levels 0..16 are rescaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    count = len(pixels)
    return ImageSource(
        name="digits", root=None, class_names=[str(d) for d in range(10)],
        keys=[f"digits_{i:05d}" for i in range(count)], paths=[f"load_digits[{i}]" for i in range(count)],
        labels=[int(y) for y in digits.target], pixels=pixels,
    )


def digits_split(source: ImageSource, split: str) -> ImageSource:
    """`train`: the first DIGITS_TRAIN items of `source` in dataset order; `holdout`: the rest."""
    if split not in ("train", "holdout"):
        raise SourceError(f"unknown digits split {split!r} (expected digits, digits:train or digits:holdout)")
    return source.subset(slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None))


def fashion_mnist_spec(rest: str) -> tuple[str, str]:
    """(split, directory) from what follows `fashion-mnist:`: "", DIR, SPLIT or SPLIT:DIR."""
    split, _, directory = rest.partition(":")
    if split in FASHION_MNIST_SPLITS:
        return split, directory or FASHION_MNIST_DIR
    return "train", rest or FASHION_MNIST_DIR  # the older spelling fashion-mnist:DIR


def fashion_mnist_source(directory: str | Path, split: str = "train") -> ImageSource:
    """A Fashion-MNIST split (train: 60000, test: 10000 28x28 images) from its idx files, gzipped or not."""
    if split not in FASHION_MNIST_SPLITS:
        raise SourceError(f"unknown Fashion-MNIST split {split!r} (expected {' or '.join(FASHION_MNIST_SPLITS)})")
    root = Path(directory).resolve()
    stem = FASHION_MNIST_SPLITS[split]
    images_file = _find_idx(root, f"{stem}-images-idx3-ubyte")
    labels_file = _find_idx(root, f"{stem}-labels-idx1-ubyte")
    pixels, labels = read_idx(images_file), read_idx(labels_file)
    if pixels.ndim != 3 or labels.ndim != 1 or len(pixels) != len(labels):
        raise SourceError(f"{root}: idx files hold shapes {pixels.shape} and {labels.shape}, expected (N, H, W) and (N,)")
    return ImageSource(
        name="fashion-mnist", root=str(root), class_names=list(FASHION_MNIST_CLASSES),
        keys=[f"fashion-mnist_{split}_{i:05d}" for i in range(len(labels))],
        paths=[f"{images_file.name}[{i}]" for i in range(len(labels))],
        labels=[int(y) for y in labels], pixels=pixels,
    )


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise SourceError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; "
        "install it with `apt-get install dataset-fashion-mnist` or pass fashion-mnist[:train|:test]:DIR"
    )


# idx type codes (yann.lecun.com/exdb/mnist): the third magic byte names the element type.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0 0 TYPE NDIM, NDIM big-endian uint32 sizes, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise SourceError(f"cannot read idx file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise SourceError(f"{path} is not an idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != dtype.itemsize * int(np.prod(shape)):
        raise SourceError(f"{path} is truncated: header says shape {shape}, file has {len(data) - offset} data bytes")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------
# Decoding for a DataLoader
# ---------------------------------------------------------------------------------------------


class CroppedImages:
    """Map-style dataset: index -> (index, (S, S, 3) uint8 crop or None, reason or None).

    Decoding runs in DataLoader workers. A file that cannot be decoded is not an error of the
    run: its reason is returned so the stage can skip it and list it in errors.jsonl.
    """

    def __init__(self, source: ImageSource, image_size: int):
        self.source = source
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        if self.source.pixels is None:
            path = Path(self.source.root) / self.source.paths[index]
            try:
                if path.stat().st_size == 0:
                    return index, None, "empty file"
            except OSError as error:
                return index, None, f"unreadable: {error.strerror}"
        try:
            image = self.source.load(index)
        # PIL raises many types on hostile input (OSError, SyntaxError, ValueError,
        # DecompressionBombError, ...); any of them means "this file is not a usable image".
        except Exception as error:  # noqa: BLE001
            return index, None, _reason(error)
        return index, center_crop_arr(image, self.image_size), None


def _reason(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can identify"
    if isinstance(error, OSError) and error.strerror:
        return f"unreadable: {error.strerror}"
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__


def collate_items(batch: list) -> list:
    """Keep the (index, crop, reason) triples as a list: some crops are None."""
    return batch
