"""Typed records between stages: what each artifact kind promises the next stage, written once, read once.

A stage writes its record into the manifest's `extra` with `to_extra()`; the next stage reads it
with `Info.from_artifact(artifact)`, which checks that every field is there (an artifact from an
older sitctl, or a hand-edited one, is one ArtifactError line) instead of indexing a dict
wherever a value is needed. The keys are the field names, so manifests read as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sitctl.errors import ArtifactError


class _Record:
    """to/from the manifest's `extra` for a frozen dataclass whose fields are JSON values."""

    KIND = ""

    def to_extra(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_artifact(cls, artifact) -> Any:
        if artifact.kind != cls.KIND:
            raise ArtifactError(f"{artifact.path} is a '{artifact.kind}' artifact, expected '{cls.KIND}'")
        extra = artifact.extra
        names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
        required = [field.name for field in dataclasses.fields(cls)  # type: ignore[arg-type]
                    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in extra]
        if missing:
            raise ArtifactError(f"{artifact.path}: manifest lacks {', '.join(missing)}; remake it with this sitctl")
        return cls(**{name: extra[name] for name in names if name in extra})


@dataclass(frozen=True)
class LatentsInfo(_Record):
    """A `latents` artifact (sitctl encode): shards of VAE moments and what made them."""

    KIND = "latents"
    shards: list[dict[str, Any]]
    """[{name, count}] in shard order."""
    num_classes: int
    latent_shape: list[int]
    """[C, H, W] of one latent."""
    scale_factor: float
    """Latents are multiplied by this for training and divided by it before decoding."""
    num_samples: int | None = None
    image_size: int | None = None
    vae: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "none", "source": None})
    """{name, source}: the VAE that encoded the images (and decodes samples)."""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    """{name, root}: the images encoded (the lineage a reference must match)."""
    class_names: list[str] = dataclasses.field(default_factory=list)
    class_histogram: list[int] = dataclasses.field(default_factory=list)
    num_errors: int = 0
    encoder_targets: str = "none"
    """What each sample also holds for an alignment encoder: none, or images (`KEY.image.png`, the center crop)."""
    vae_precision: str | None = None
    """What the VAE ran in (--precision auto resolved on the device): fp32, fp16 or bf16; None in latents made before it was recorded."""


@dataclass(frozen=True)
class CheckpointInfo(_Record):
    """A `checkpoint` artifact (sitctl train): the network and how to sample it."""

    KIND = "checkpoint"
    step: int
    model: str
    model_config: dict[str, Any]
    """asdict of model.configs.SiTConfig."""
    interp: str
    pred: str
    train_eps: float | None = None
    sample_eps: float | None = None
    """The default t range of sampling for this interpolant and prediction (read back by sample)."""
    latent_shape: list[int] | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class SamplesInfo(_Record):
    """A `samples` artifact (sitctl sample): uint8 images and where they came from."""

    KIND = "samples"
    num_samples: int
    image_size: int
    image_shape: list[int] | None = None
    """[H, W, C]."""
    num_classes: int | None = None
    class_counts: list[int] | None = None
    model_config: dict[str, Any] | None = None
    interp: str | None = None
    pred: str | None = None
    vae: dict[str, Any] | None = None
    scale_factor: float | None = None
    source: dict[str, Any] | None = None
    """Where the model came from: {checkpoint, step} or {file, sha256, model, published}."""
    world_size: int = 1
    virtual_file: str | None = None
    npz: str | None = None


@dataclass(frozen=True)
class ReferenceInfo(_Record):
    """A `reference` artifact (sitctl eval ref): real images and their Inception statistics."""

    KIND = "reference"
    num_images: int
    image_size: int
    source: str | None = None
    """The real images as encode would read them: a built-in's spec, or a folder's absolute path (the
    lineage a sample must match)."""
    inception: dict[str, Any] | None = None
    num_errors: int = 0
    errors: list[Any] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class MetricsInfo(_Record):
    """A `metrics` artifact (sitctl eval): the values and what they were measured against."""

    KIND = "metrics"
    values: dict[str, float]
    num_samples: int | None = None
    num_expected: int | None = None
    reference: dict[str, Any] | None = None
    inception: dict[str, Any] | None = None
    lineage: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)
    """{value: why} for values the run could not give (the paper row's IS without a class head)."""
