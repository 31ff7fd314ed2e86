"""The reference `sitctl eval fid` uses when no --ref is given: the one matching the samples' lineage.

Samples were drawn from a checkpoint trained on a latents artifact, which records the images it
came from (source and crop size). The matching reference is a workspace `references/vN` built
from that same source at the same size. If there is none, it is built once, from at most
`MAX_REFERENCE_IMAGES` real images, and later evaluations reuse it.

Which images, when a source holds more than the cap: for a folder, a seeded random choice
(`REFERENCE_SEED`) over the whole folder, so every class is represented; `build_reference` is
handed a temporary folder of symbolic links to exactly those files. A built-in dataset
(digits, Fashion-MNIST) takes its first N in dataset order, which is already mixed over classes.

Sources match when they are the same folder (by absolute path), or the same built-in dataset
(`digits:train` and `digits:holdout` are two splits of one dataset, and a held-out split is the
honest reference).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.sources import open_source
from sitctl import sample_store
from sitctl.artifacts import Artifact, ancestor, open_artifact
from sitctl.configs import EvalConfig, ReferenceConfig
from sitctl.errors import ArtifactError, ReferenceError
from sitctl.evaluate.reference import build_reference
from sitctl.records import LatentsInfo, ReferenceInfo
from sitctl.workspace import claim, facts, finished_versions, name_of, next_version

MAX_REFERENCE_IMAGES = 10_000  # FID-10K against real images: stable to about 0.1 at ImageNet scale
REFERENCE_SEED = 0


# ---------------------------------------------------------------------------------------------
# What the samples were trained on
# ---------------------------------------------------------------------------------------------


def lineage_source(artifact: Artifact) -> tuple[str, int] | None:
    """(source, image size) of the images behind the latents `artifact` descends from; None if unknown
    (drawn from a published .pt file, latents moved or deleted, or made before they were recorded)."""
    latents = ancestor(artifact, "latents")
    try:
        info = LatentsInfo.from_artifact(latents) if latents is not None else None
    except ArtifactError:  # a manifest from before the records (or made by hand): its source is unknown
        info = None
    if info is None or not info.source or info.image_size is None:
        return None
    # A folder by its absolute root (encode's SRC may have been relative); a built-in by its spec.
    spec = info.source["root"] if info.source["name"] == "folder" else latents.config["src"]
    return spec, info.image_size


def reference_source(reference: Artifact) -> str:
    """The source a reference's images came from (the whole source, when built from a sample of it)."""
    return reference.config.get("sample_of") or ReferenceInfo.from_artifact(reference).source


def same_source(one: str, other: str) -> bool:
    """The same folder, or two splits of the same built-in dataset."""

    def family(spec: str) -> str:
        return spec if Path(spec).is_absolute() else spec.partition(":")[0]

    return family(one) == family(other)


def check_matches(samples: Artifact, reference_path: str | Path) -> None:
    """Refuse a reference artifact whose image size or source differ from the samples' lineage."""
    if Path(reference_path).suffix == ".npz":
        return  # an ADM batch records no source; the eval stage checks its image size
    reference = open_artifact(reference_path, "reference")
    size, held = _stored_image_size(samples), ReferenceInfo.from_artifact(reference).image_size
    if size is not None and held != size:
        raise ReferenceError(f"reference {reference_path} holds {held}px images but the samples "
                             f"{samples.path} are {size}px; omit --ref to use (or build) a matching one")
    lineage = lineage_source(samples)
    if lineage is None:
        return  # no recorded source to compare with
    source, _ = lineage
    if not same_source(reference_source(reference), source):
        raise ReferenceError(f"reference {reference_path} was made from {reference_source(reference)}, but the samples "
                             f"{samples.path} descend from {source}; omit --ref to use (or build) a matching one")


def _stored_image_size(samples: Artifact) -> int | None:
    """The side of the images a samples artifact stores (read from the images, as the eval stage
    reads them); None when it stores none (the eval stage then says so)."""
    try:
        return sample_store.image_shape(samples.path)[0]
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Finding or building the matching reference
# ---------------------------------------------------------------------------------------------


def matching_reference(root: Path, source: str, image_size: int) -> Artifact | None:
    """The newest finished reference in the workspace made from `source` at `image_size`."""
    found = [version.artifact for version in finished_versions(root, "reference")
             if ReferenceInfo.from_artifact(version.artifact).image_size == image_size and same_source(reference_source(version.artifact), source)]
    return found[-1] if found else None


def reference_for(artifact: Artifact, root: Path, config: EvalConfig, say: Callable[[str], None]) -> Path:
    """The path of the workspace reference matching `artifact`'s lineage, built now if there is none."""
    lineage = lineage_source(artifact)
    if lineage is None:
        raise ReferenceError(f"the source images behind {artifact.path} are unknown (a published .pt file, or its latents "
                             "moved or deleted); pass --ref (a reference artifact or an ADM .npz)")
    source, image_size = lineage
    found = matching_reference(root, source, image_size)
    if found is None:
        found = build_auto_reference(root, source, image_size, config, say)
    say(f"using {name_of(found.path, root)} ({facts(found)})")
    return found.path


def build_auto_reference(root: Path, source: str, image_size: int, config: EvalConfig, say: Callable[[str], None]) -> Artifact:
    """Build `references/vN` from `source` (at most MAX_REFERENCE_IMAGES images) with build_reference."""
    claim(root)
    out = next_version(root, "reference")
    say(f"building {out.parent.name}/{out.name} from {source} (at most {MAX_REFERENCE_IMAGES:,} images, once)")
    images = open_source(source)
    view = None
    if images.name == "folder" and len(images) > MAX_REFERENCE_IMAGES:
        view = sampled_view(images, out.parent / f".{out.name}.images")
    settings = ReferenceConfig(
        source=str(view or source), out=str(out), image_size=image_size,
        max_images=None if view else MAX_REFERENCE_IMAGES, sample_of=source if view else None,
        batch_size=config.batch_size, device=config.device, inception_weights=config.inception_weights,
        fetch_weights=config.fetch_weights)
    try:
        return build_reference(settings)
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)


def sampled_view(images, view: Path) -> Path:
    """A folder of symbolic links to a seeded choice of MAX_REFERENCE_IMAGES files, same sub-paths."""
    chosen = np.sort(np.random.default_rng(REFERENCE_SEED).permutation(len(images))[:MAX_REFERENCE_IMAGES])
    shutil.rmtree(view, ignore_errors=True)  # left by a crash: rebuilt identically
    for index in chosen:
        link = view / images.paths[index]
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(images.root) / images.paths[index])
    return view
