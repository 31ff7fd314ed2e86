"""Where the sample stage's model comes from: a checkpoint artifact (its lineage says how to sample
and decode it) or a published SiT/DiT `.pt` state dict (no lineage: --model and --vae say it)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.configs import model_config as preset
from model.interpolants import Interpolant, interpolant
from model.network import DiscreteTimeInput, ReversedTimeVelocity, SiT, load_state_dict_checked
from sitctl.artifacts import ancestor, sha256_file
from sitctl.checkpoint import latest_checkpoint, load_network
from sitctl.configs import SampleConfig
from sitctl.errors import ArtifactError, SampleError
from sitctl.records import CheckpointInfo, LatentsInfo


@dataclass(frozen=True)
class Source:
    """A loaded network and what its lineage says about sampling and decoding it."""

    net: Any  # model.network.SiT in eval mode, on the device
    model_config: Any  # model.configs.SiTConfig
    interp: Interpolant  # the interpolant it was trained on, an object from here on
    pred: str  # what it predicts: velocity, score or noise
    vae: str  # what sitctl.vae.load_vae is given: ema, mse, none, a hub id or a directory
    scale_factor: float | None  # latents were multiplied by this in training; None = the VAE's own
    artifact: Any  # the checkpoint Artifact (recorded as input), or None for a .pt file
    identity: str  # checkpoint id or .pt sha256: a resumed run must sample the same weights
    description: dict[str, Any] = field(default_factory=dict)  # provenance for the manifest
    sample_eps: float | None = None  # the checkpoint's recorded default t range; None: the interpolant's


def open_source(config: SampleConfig, device) -> Source:
    """Resolve and load the model named by `config.checkpoint`; all user errors surface here."""
    path = Path(config.checkpoint)
    if path.is_file():
        return _open_published(config, path, device)
    if config.model is not None:
        raise SampleError("--model is only for bare .pt files; a checkpoint artifact records its model")

    artifact = latest_checkpoint(path)
    info = CheckpointInfo.from_artifact(artifact)
    net, model_config = load_network(artifact, ema=config.ema, device=device)
    vae, scale_factor = lineage_vae(artifact, config.vae)
    return Source(
        net=net.eval(), model_config=model_config, interp=interpolant(info.interp), pred=info.pred, sample_eps=info.sample_eps,
        vae=vae, scale_factor=scale_factor, artifact=artifact, identity=f"checkpoint:{artifact.id}",
        description={"checkpoint": str(artifact.path.resolve()), "step": info.step},
    )


def lineage_vae(checkpoint, override: str | None) -> tuple[str, float | None]:
    """The VAE and scale factor of the latents the checkpoint was trained on; --vae overrides the VAE."""
    latents = ancestor(checkpoint, "latents")
    info = LatentsInfo.from_artifact(latents) if latents is not None else None
    scale = float(info.scale_factor) if info is not None else None
    if override is not None:
        return override, scale
    if latents is None:
        raise ArtifactError(
            f"the latents artifact of {checkpoint.path} cannot be opened (moved or deleted), so its VAE is "
            "unknown; pass --vae ema|mse|none|DIR"
        )
    return info.vae["source"] or info.vae["name"], scale


def _open_published(config: SampleConfig, path: Path, device) -> Source:
    """A published SiT or DiT .pt state dict (see SampleConfig.published); shape inferred."""
    if config.model is None or config.vae is None:
        raise SampleError(f"{path} is a bare state dict with no lineage: pass --model (e.g. SiT-XL/2) and --vae")
    try:
        # REPA's training checkpoints also hold its argparse.Namespace of settings: plain data, allowed by name.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # empty, truncated, not a torch file, or pickled objects beyond tensors
        # torch's own text is left out: it can be empty, or advise unpickling the file unsafely.
        raise ArtifactError(f"{path} is not a readable torch state dict of tensors "
                            "(read with weights_only=True: nothing in it was run)") from None
    if not isinstance(state_dict, dict):
        raise ArtifactError(f"{path} does not hold a state dict")
    # Reference training checkpoints hold {"model", "ema", "opt", "args"}; released files are bare EMA weights.
    weights = state_dict.get("ema" if config.ema else "model", state_dict)
    if not isinstance(weights, dict):
        raise ArtifactError(f"{path} does not hold a state dict")
    weights = _without_projectors(weights, path, config.published)
    shape = _shape_from_state_dict(weights)
    if "input_size" not in shape:  # the releases store pos_embed; our checkpoints do not (it is rebuilt)
        raise SampleError(f"{path} holds no pos_embed, so its image size is unknown; for a file of a checkpoint "
                          "artifact pass the artifact directory instead")
    model_config = preset(config.model, **shape)
    net = SiT(model_config)
    load_state_dict_checked(net, weights, config.model)
    interp, pred = "linear", "velocity"
    if config.published == "dit":  # DDPM's schedule is the discretised VP path (model.network)
        net, interp, pred = DiscreteTimeInput(net), "vp", "noise"
    elif config.published == "repa":  # the linear path with data at t = 0 (model.network)
        net = ReversedTimeVelocity(net)
    digest = sha256_file(path)
    return Source(
        net=net.to(device).eval(), model_config=model_config, interp=interpolant(interp), pred=pred,
        vae=config.vae, scale_factor=None, artifact=None, identity=f"file:{digest}",
        description={"file": str(path.resolve()), "sha256": digest, "model": config.model, "published": config.published},
    )


REPA_PROJECTORS = "projectors."  # REPA's alignment MLPs (models/sit.py): training-only, never sampled


def _without_projectors(weights: dict, path: Path, published: str) -> dict:
    """A REPA release without its projector keys; in a file said to be another kind they mean a mistake."""
    projectors = [key for key in weights if isinstance(key, str) and key.startswith(REPA_PROJECTORS)]
    if projectors and published != "repa":
        raise SampleError(f"{path} holds REPA projector weights ({projectors[0]}, ...): it is a REPA checkpoint, "
                          "trained with data at t = 0; pass --published repa")
    return {key: value for key, value in weights.items() if key not in projectors}


def _shape_from_state_dict(weights: dict) -> dict[str, int]:
    """input_size, in_channels and num_classes read off the published tensors.

    x_embedder.proj.weight is (D, C, p, p); the label table has num_classes + 1 rows (the last
    is the null class); the stored pos_embed (1, T, D) gives input_size = sqrt(T) p. What is
    absent keeps the preset's value, and load_state_dict_checked reports any misfit.
    """
    overrides = {}
    proj = weights.get("x_embedder.proj.weight")
    table = weights.get("y_embedder.embedding_table.weight")
    position = weights.get("pos_embed")
    if proj is not None and proj.ndim == 4:
        overrides["in_channels"] = int(proj.shape[1])
        if position is not None and position.ndim == 3:
            overrides["input_size"] = round(position.shape[1] ** 0.5) * int(proj.shape[-1])
    if table is not None and table.ndim == 2 and table.shape[0] > 1:
        overrides["num_classes"] = int(table.shape[0]) - 1
    return overrides
