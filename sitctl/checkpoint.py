"""Checkpoint artifacts of a training run: save, find, prune and load them.

A run directory (e.g. runs/xl2-linear) holds one artifact of kind "checkpoint" per saved step,
`step-0000100/`, each written atomically through artifacts.begin_artifact/finish_artifact:

    model.safetensors      the trained weights
    ema.safetensors        the EMA weights (what sampling uses)
    projector.safetensors  with REPA only: the alignment projector (training state, never sampled)
    optimizer.safetensors  every optimizer state tensor, keyed "state.<param index>.<name>"
    optimizer.json         the optimizer's param_groups and non-tensor state
    rng.safetensors        torch CPU / CUDA and numpy RNG states
    state.json             step, data position, python RNG state and anything else the loop keeps

Nothing is pickled. The manifest's extra holds `model_config` (asdict of SiTConfig), `model`,
`interp`, `pred` and `step`, so `load_network` rebuilds the network from the artifact alone.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from model.configs import SiTConfig
from model.interpolants import NAMES
from model.objectives import PREDICTIONS
from sitctl.artifacts import Artifact, begin_artifact, disk_errors, finish_artifact, is_finished, open_artifact, staging_dir
from sitctl.errors import ArtifactError
from sitctl.records import CheckpointInfo

STEP_DIR = re.compile(r"^step-(\d{7,})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints in a run directory as (step, path), oldest first."""
    run_dir = Path(run_dir)
    found = []
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        match = STEP_DIR.match(path.name)
        if match and is_finished(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(path: str | Path) -> Artifact:
    """The checkpoint artifact at `path`, or the newest one in the run directory `path`."""
    path = Path(path)
    if is_finished(path):
        return open_artifact(path, "checkpoint")
    found = list_checkpoints(path)
    if not found:
        raise ArtifactError(f"{path} holds no finished checkpoint (step-NNNNNNN/ with a manifest)")
    return open_artifact(found[-1][1], "checkpoint")


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into its tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_states() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{index}"] = value
    _, keys, position, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    numpy_rest = [int(position), int(has_gauss), float(cached)]
    return tensors, {"numpy": numpy_rest, "python": random.getstate()}


def save_checkpoint(
    run_dir: str | Path, step: int, *, model: torch.nn.Module, ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer, state: dict[str, Any], config: dict[str, Any],
    latents: Artifact, extra: dict[str, Any], modules: dict[str, torch.nn.Module] | None = None,
) -> Artifact:
    """Write step-NNNNNNN/ atomically (staging dir, then rename); returns the finished artifact.

    `modules` are further trained modules of the run (REPA's projector), saved as NAME.safetensors.
    """
    out = checkpoint_dir(run_dir, step)
    staging = begin_artifact(out)
    with disk_errors("write checkpoint", staging, hint="free space (or make it writable) and rerun with --resume"):
        return _write_checkpoint(staging, out, step, model=model, ema=ema, optimizer=optimizer, state=state,
                                 config=config, latents=latents, extra=extra, modules=modules or {})


def _write_checkpoint(staging: Path, out: Path, step: int, *, model, ema, optimizer, state, config, latents,
                      extra, modules) -> Artifact:
    save_file(_cpu_state(model), staging / "model.safetensors")
    save_file(_cpu_state(ema), staging / "ema.safetensors")
    for name, module in modules.items():
        save_file(_cpu_state(module), staging / f"{name}.safetensors")
    optimizer_tensors, optimizer_json = _optimizer_files(optimizer)
    save_file(optimizer_tensors, staging / "optimizer.safetensors")
    (staging / "optimizer.json").write_text(json.dumps(optimizer_json, indent=1))
    rng_tensors, rng_json = _rng_states()
    save_file(rng_tensors, staging / "rng.safetensors")
    (staging / "state.json").write_text(json.dumps({"step": step, **state, "rng": rng_json}, indent=1))
    return finish_artifact(staging, out, kind="checkpoint", config=config, inputs=[latents], extra={**extra, "step": step})


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_every: int) -> list[int]:
    """Delete finished checkpoints except the last `keep_last` (the newest always) and every multiple of `keep_every`."""
    found = list_checkpoints(run_dir)
    # The newest is the resume point (a save forced by SIGTERM, or the run's last): even with
    # --keep-last 0 it stays, or a resume would silently go back to an older one (or to step 0).
    recent = {step for step, _ in found[-max(keep_last, 1):]}
    removed = []
    for step, path in found:
        if step in recent or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(path)
        removed.append(step)
    return removed


def discard_partial(run_dir: str | Path, step: int) -> None:
    """Remove a half-written staging directory of `step` left by a crash."""
    staging = staging_dir(checkpoint_dir(run_dir, step))
    if staging.is_dir():
        shutil.rmtree(staging)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_verified(artifact: Artifact, name: str) -> bytes:
    """The bytes of one file of the artifact, checked against the sha256 its manifest records.

    The check runs on the very bytes that are then parsed, so a flipped bit (same size, so the
    open-time size check passes) or a file swapped after opening is refused, not trained on.
    """
    entry = artifact.manifest["files"].get(name)
    if entry is None:
        raise ArtifactError(f"{artifact.path}: the manifest lists no {name}")
    try:
        data = artifact.file(name).read_bytes()
    except OSError as error:
        raise ArtifactError(f"{artifact.path}: cannot read {name}: {error.strerror}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ArtifactError(f"{artifact.path}: {name} does not match its recorded sha256 (corrupt or tampered); refused")
    return data


def load_tensors(artifact: Artifact, name: str) -> dict[str, torch.Tensor]:
    """A verified .safetensors file of the artifact as a dict of CPU tensors."""
    try:
        tensors = safetensors_load(read_verified(artifact, name))
    except SafetensorError as error:  # hashes match but the writer wrote something unreadable
        raise ArtifactError(f"{artifact.path}: {name} is not a readable safetensors file: {error}") from None
    return tensors


KERNEL_CHOICES = ("fused", "foreach", "capturable")  # how an optimizer steps, not what it computes


def load_training_state(artifact: Artifact, *, model, ema, optimizer, modules=None) -> dict[str, Any]:
    """Restore weights (and those of `modules`, as saved), optimizer and RNG states in place; return state.json.

    Tensors are read on the CPU: load_state_dict copies each into its parameter, on that parameter's device.
    """
    model.load_state_dict(load_tensors(artifact, "model.safetensors"))
    ema.load_state_dict(load_tensors(artifact, "ema.safetensors"))
    for name, module in (modules or {}).items():
        module.load_state_dict(load_tensors(artifact, f"{name}.safetensors"))
    optimizer_json = json.loads(read_verified(artifact, "optimizer.json"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_tensors(artifact, "optimizer.safetensors").items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in optimizer_json["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    # Optimizer.load_state_dict casts and moves each tensor to its parameter's device. The kernel
    # choices are this process's, not the saved ones: a run begun on a CPU resumes fused on a GPU.
    kernels = [{key: group[key] for key in KERNEL_CHOICES if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": optimizer_json["param_groups"]})
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)
    saved = json.loads(read_verified(artifact, "state.json"))
    _restore_rng(load_tensors(artifact, "rng.safetensors"), saved["rng"])
    return saved


def _restore_rng(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    position, has_gauss, cached = rest["numpy"]
    np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))


def checked_model_config(artifact: Artifact):
    """The SiTConfig a checkpoint records, after checking that what stages read from it makes sense."""
    info = CheckpointInfo.from_artifact(artifact)  # one line if a field is missing
    for key, value, allowed in (("interp", info.interp, NAMES), ("pred", info.pred, PREDICTIONS)):
        if value not in allowed:
            raise ArtifactError(f"{artifact.path}: checkpoint manifest has {key}={value!r}, not one of {', '.join(allowed)}")
    if not isinstance(info.model_config, dict):
        raise ArtifactError(f"{artifact.path}: checkpoint manifest's model_config is not a mapping")
    try:
        return SiTConfig(**info.model_config)
    except (TypeError, ValueError) as error:  # unknown or missing fields, or values the config refuses
        raise ArtifactError(f"{artifact.path}: checkpoint manifest's model_config is not valid: {error}") from None


def load_network(artifact: Artifact | str | Path, *, ema: bool = True, device: str | torch.device = "cpu"):
    """Rebuild the network of a checkpoint (or a run dir's latest) from the artifact alone.

    Returns (net in eval mode on `device`, SiTConfig).
    """
    if not isinstance(artifact, Artifact):
        artifact = latest_checkpoint(artifact)
    from model.network import SiT, load_state_dict_checked  # here: timm (its layers) costs seconds of import to verify, show, ls

    config = checked_model_config(artifact)
    net = SiT(config)
    weights = load_tensors(artifact, "ema.safetensors" if ema else "model.safetensors")
    load_state_dict_checked(net, weights, CheckpointInfo.from_artifact(artifact).model)
    return net.to(device).eval(), config
