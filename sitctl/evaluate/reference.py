"""Reference statistics of real images: our `reference` artifact, or an ADM reference batch .npz.

A reference artifact (made by `sitctl eval ref`) holds the real images exactly as the encode stage
crops them (ADM's center_crop_arr), in sample_store's HDF5 layout, plus their Inception pool
features `features.npy` (N, 2048) float32 and `statistics.npz` (mu (2048,), sigma (2048, 2048),
and the spatial mu_s (2023,), sigma_s (2023, 2023) of ADM's sFID; float64). References made before
sFID existed lack mu_s/sigma_s: they stay readable, and sFID against them re-extracts their stored
images each time. An ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz from guided-diffusion's
evaluations) holds `arr_0` (N, H, W, 3) uint8 and its precomputed `mu`, `sigma`, `mu_s`, `sigma_s`;
we read it for the paper's numbers (arr_0 and the spatial pair may be absent) and can write one
from our artifact.
"""

from __future__ import annotations

import hashlib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipelines.sources import CroppedImages, ImageSource, open_source
from sitctl import sample_store
from sitctl.artifacts import (
    Artifact, begin_artifact, disk_errors, finish_artifact, open_artifact, output_lock, staging_dir
)
from sitctl.configs import ReferenceConfig
from sitctl.distributed import usable_cores
from sitctl.errors import ReferenceError
from sitctl.evaluate.inception import (
    POOL_FEATURES, SPATIAL_FEATURES, create_extractor, extract_features, pick_device, resolve_weights
)
from sitctl.evaluate.metrics import Gaussian, feature_statistics
from sitctl.records import ReferenceInfo
from sitctl.signals import stop_on_signals

FEATURES_FILE = "features.npy"
STATISTICS_FILE = "statistics.npz"
SPATIAL_KEYS = ("mu_s", "sigma_s")  # ADM's names for the spatial statistics, in both file kinds


# ---------------------------------------------------------------------------------------------
# Real images, cropped as encode crops them
# ---------------------------------------------------------------------------------------------


def cropped_batches(source: ImageSource, image_size: int, batch_size: int, errors: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (crops (B, S, S, 3) uint8, labels (B,) int64) in source order, cropped by encode's own CroppedImages.

    Decoding runs on a few threads (PIL releases the GIL). An unreadable file is skipped and
    listed in `errors` as "PATH: reason", as encode lists it in errors.jsonl.
    """
    dataset = CroppedImages(source, image_size)
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        for start in range(0, len(dataset), batch_size):
            items = list(pool.map(dataset.__getitem__, range(start, min(start + batch_size, len(dataset)))))
            errors.extend(f"{source.paths[index]}: {reason}" for index, crop, reason in items if crop is None)
            kept = [(crop, source.labels[index]) for index, crop, _ in items if crop is not None]
            if kept:
                yield np.stack([crop for crop, _ in kept]), np.array([label for _, label in kept], np.int64)


# ---------------------------------------------------------------------------------------------
# Building a reference artifact
# ---------------------------------------------------------------------------------------------


def build_reference(config: ReferenceConfig) -> Artifact:
    """Crop the real images, store them, extract their Inception features, finish the artifact.

    A stop signal ends it between batches (sitctl/signals.py); the rerun starts the reference afresh.
    """
    with stop_on_signals():  # from the start, so a signal while loading stops at the first batch
        return _build_reference(config)


def _build_reference(config: ReferenceConfig) -> Artifact:
    source = open_source(config.source).subset(slice(0, config.max_images))  # SourceError before any slow setup
    device = pick_device(config.device)
    weights = resolve_weights(config.inception_weights, fetch=config.fetch_weights)
    extractor = create_extractor(weights, [POOL_FEATURES, SPATIAL_FEATURES], device)
    with output_lock(config.out), disk_errors("write", staging_dir(config.out), hint="free space (or make it writable) and rerun"):
        staging = begin_artifact(config.out)
        return _write_reference(config, source, weights, extractor, staging, device)


def _write_reference(config: ReferenceConfig, source: ImageSource, weights, extractor, staging: Path, device) -> Artifact:
    """Store the crops and their features in `staging` and publish the reference artifact."""
    images_file = sample_store.rank_file(staging, 0)
    images_file.unlink(missing_ok=True)  # a crashed earlier attempt restarts from scratch
    writer = sample_store.SampleWriter(images_file, (config.image_size, config.image_size, 3))
    errors: list[str] = []
    batches = cropped_batches(source, config.image_size, config.batch_size, errors)

    def stored(batch_iter):  # write each batch to the HDF5 file on its way to the network
        for images, labels in batch_iter:
            start = len(writer)
            writer.append(images, labels, np.arange(start, start + len(images), dtype=np.int64))
            yield images

    try:
        found = extract_features(extractor, stored(batches), device=device, total=len(source), label="reference")
    finally:
        writer.close()
    features = found[POOL_FEATURES].numpy()  # (N, 2048) float32
    if len(features) < 2:
        raise ReferenceError(f"{config.source} gave {len(features)} readable image(s); a reference needs at least 2")
    statistics, spatial = feature_statistics(features), feature_statistics(found[SPATIAL_FEATURES])
    np.save(staging / FEATURES_FILE, features)
    np.savez(staging / STATISTICS_FILE, mu=statistics.mu, sigma=statistics.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    extra = ReferenceInfo(
        num_images=len(features), image_size=config.image_size, source=_describe_source(config.source, source),
        inception=weights.describe(), num_errors=len(errors), errors=errors[:20],
    ).to_extra()
    return finish_artifact(staging, config.out, kind="reference", config=asdict(config), extra=extra)


def _describe_source(spec: str, source: ImageSource) -> str:
    return source.root if source.name == "folder" else spec  # a folder by its absolute path


# ---------------------------------------------------------------------------------------------
# Reading a reference (artifact or ADM .npz)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What the metrics need from a reference, whichever file it came from."""

    id: str
    path: Path
    image_size: int | None
    """Side of the real images; None for an .npz holding statistics only (no arr_0)."""
    num_images: int | None
    statistics: Gaussian
    artifact: Artifact | None = None
    spatial_statistics: Gaussian | None = None
    """mu_s/sigma_s of ADM's sFID; None when the file predates them (then sFID extracts the images)."""

    def images(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """The real images, uint8 NHWC batches (for KID/PRC against an .npz, which has no features)."""
        if self.artifact is not None:
            for images, _ in sample_store.iter_batches(self.artifact.path, batch_size):
                yield images
            return
        if self.image_size is None:
            raise ReferenceError(f"{self.path} holds statistics only (no arr_0 images); KID, precision/recall, and sFID "
                                 "without mu_s/sigma_s need the reference images")
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
        statistics, spatial = Gaussian(mu=stats["mu"], sigma=stats["sigma"]), _spatial_statistics(stats)
    info = ReferenceInfo.from_artifact(artifact)
    return Reference(artifact.id, path, info.image_size, info.num_images, statistics, artifact, spatial)


def _spatial_statistics(data) -> Gaussian | None:
    """mu_s/sigma_s from an opened .npz, when it holds both."""
    if not set(SPATIAL_KEYS) <= set(data.files):
        return None
    return Gaussian(mu=data["mu_s"].astype(np.float64), sigma=data["sigma_s"].astype(np.float64))


def read_adm_npz(path: Path) -> Reference:
    """Read mu/sigma (and mu_s/sigma_s) of an ADM reference batch; arr_0's shape comes from its header, not its data."""
    if not path.is_file():
        raise ReferenceError(f"{path}: no such reference file")
    try:
        with np.load(path) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ReferenceError(f"{path} is not an ADM reference batch: it lacks {', '.join(sorted(missing))}")
            statistics = Gaussian(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64))
            spatial, has_images = _spatial_statistics(data), "arr_0" in data.files
        shape = _npz_array_shape(path, "arr_0") if has_images else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:  # EOFError: an empty file
        reason = (str(error).strip().splitlines() or ["empty or cut short"])[0]
        raise ReferenceError(f"{path} is unreadable as .npz: {reason}") from None
    if shape is not None and (len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3):
        raise ReferenceError(f"{path}: arr_0 has shape {shape}, expected (N, S, S, 3) images")
    # The id hashes mu and sigma only, as before sFID: a reference keeps its id and its eval folders.
    digest = hashlib.sha256(statistics.mu.tobytes() + statistics.sigma.tobytes()).hexdigest()[:16]
    size, count = (shape[1], shape[0]) if shape is not None else (None, None)
    return Reference(digest, path, size, count, statistics, spatial_statistics=spatial)


def _npz_array_shape(path: Path, name: str) -> tuple[int, ...]:
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(handle)
    return tuple(shape)


def write_adm_npz(reference: Artifact, path: str | Path, batch_size: int = 1024) -> Path:
    """Export a reference artifact in ADM's format: arr_0 (N, S, S, 3) uint8, arr_1 labels, mu, sigma, mu_s, sigma_s.

    The images stream through sample_store.export_npz (never all in memory); the statistics are
    appended, as in ADM's own VIRTUAL_*_labeled.npz reference batches.
    """
    path = sample_store.export_npz(reference.path, Path(path), batch_size)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with np.load(reference.file(STATISTICS_FILE)) as stats:
            for name in ("mu", "sigma", *(key for key in SPATIAL_KEYS if key in stats.files)):
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, stats[name])
    return path
