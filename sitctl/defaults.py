"""Stage default policy: what a command means when an input or `--out` is left out in a workspace.

The workspace module says where things are (versions, names, facts); this module decides, for each
stage, which finished artifact is its input, which version it writes, and when a rerun resumes an
interrupted one. It may call into the stages (the eval stage's automatic reference), which is why
it sits above both.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from sitctl import configs
from sitctl.artifacts import MANIFEST, open_artifact, staging_dir
from sitctl.checkpoint import latest_checkpoint
from sitctl.evaluate import auto_reference
from sitctl.evaluate.registry import NEEDS_REFERENCE
from sitctl.configs import resolve_sample
from sitctl.identity import REQUEST, made_for, read_request, resumed
from sitctl.recipes import recipe_layers
from sitctl.settings import Layer, build, merge
from sitctl.workspace import (
    FOLDERS, WorkspaceError, claim, facts, find_root, latest, latest_run_dir, name_of, next_version, open_version,
    resolve, unfinished, unfinished_numbers, version_name
)


def settled_config(cls: type, typed: dict[str, Any], untyped: dict[str, Any], say: Callable[[str], None] = print,
                   root: Path | None = None):
    """The config a command means, built once from its layers (sitctl/settings.py), then its
    missing inputs and --out filled from the workspace (`with_defaults`).

    Lowest first: the defaults, the recipe's settings, the settings of what the command continues
    (train --resume, or encode/sample into an interrupted --out), and what was typed.
    """
    root = root or find_root()
    typed_layer = ("the command line", typed)
    layers = [("defaults", untyped), *recipe_layers(cls, {**untyped, **typed}.get("recipe"), typed)]
    continued = _continued(cls, merge(cls, [*layers, typed_layer]), root, typed)
    config = build(cls, [*layers, *continued, typed_layer])
    return with_defaults(config, say=say, root=root)


def with_defaults(config, say: Callable[[str], None] = print, root: Path | None = None):
    """`config` with every missing input (the latest finished artifact of its kind), named input
    (`kind/vN`, id prefix) and missing --out (the next version) filled in; each choice said in one line."""
    root = root or find_root()
    fill = {configs.EncodeConfig: _encode_defaults, configs.TrainConfig: _train_defaults,
            configs.SampleConfig: _sample_defaults, configs.EvalConfig: _eval_defaults,
            configs.ReferenceConfig: _reference_defaults, configs.SweepConfig: _sweep_defaults}[type(config)]
    return fill(config, root, say)


def _continued(cls: type, values: dict[str, Any], root: Path, typed: dict[str, Any]) -> list[Layer]:
    """The layer of the run or interrupted artifact `values` continue, if any: its settings not typed."""
    if cls is configs.TrainConfig:
        if not values.get("resume"):
            return []
        run_dir = Path(values["out"]) if values.get("out") is not None else latest_run_dir(root)
        newest = open_version("checkpoint", run_dir)
        # A run continues on its own latents (found by _train_defaults), so inputs are not taken here.
        return [(f"run {newest.path}", resumed(cls, newest.config, typed))] if newest is not None else []
    if cls in (configs.EncodeConfig, configs.SampleConfig) and values.get("out") is not None:
        note = read_request(staging_dir(values["out"]))
        return [(f"the request of {values['out']}", resumed(cls, note, typed, REQUEST))] if note is not None else []
    return []


def _input(root: Path, name: str | None, kind: str, say: Callable[[str], None], *, chosen: bool = False) -> str:
    """The path of a stage's input: the latest finished `kind` when not given, else `name` resolved.

    chosen: `name` was picked here, not typed, so it is said even when it is a plain path."""
    if name is None:
        version = latest(root, kind)
        path, label = version.artifact.path, version.name
    else:
        path = resolve(name, (kind,), root)
        if path == Path(name) and not chosen:
            return name  # an explicit path: used exactly as typed
        label = name_of(path, root)
    artifact = open_version(kind, path) if kind == "checkpoint" else None
    artifact = artifact or (open_artifact(path, kind) if (path / MANIFEST).is_file() else None)
    say(f"using {label} ({facts(artifact)})" if artifact is not None else f"using {label}")
    return str(path)


def _output(root: Path, out: str | None, kind: str, say: Callable[[str], None], request=None) -> str:
    """`out` as given; else an interrupted version begun by this same `request` (the stage's config,
    inputs resolved), to resume; else the workspace's next version of `kind` (the workspace is marked first)."""
    if out is not None:
        return out
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Ranks start apart and would each see a different "next" number.
        raise WorkspaceError(f"under torchrun pass --out: the ranks cannot agree on the next {FOLDERS[kind]}/vN by themselves")
    claim(root)
    if request is not None:
        for number in sorted(unfinished_numbers(root, kind), reverse=True):
            if made_for(staging_dir(root / FOLDERS[kind] / f"v{number}"), request):
                say(f"resuming {FOLDERS[kind]}/v{number} (interrupted, begun by this same command)")
                return str(root / FOLDERS[kind] / f"v{number}")
    path = next_version(root, kind)
    left = unfinished(root, kind)
    note = f" ({', '.join(left)} unfinished: rerun with --out {left[-1]} to resume it)" if left else ""
    say(f"writing {FOLDERS[kind]}/{path.name}{note}")
    return str(path)


def _encode_defaults(config, root: Path, say):
    return replace(config, out=_output(root, config.out, "latents", say, request=config))


def _train_defaults(config, root: Path, say):
    out, latents = config.out, config.latents
    if config.resume and out is None:
        out = str(latest_run_dir(root))
        say(f"resuming {name_of(out, root)}")
    chosen = config.resume and latents is None and out is not None
    if chosen:
        latents = _latents_of_run(Path(out))  # a resumed run continues on its own latents
    eval_ref = str(resolve(config.eval_ref, ("reference",), root)) if config.eval_ref is not None else None
    return replace(config, latents=_input(root, latents, "latents", say, chosen=chosen),
                   out=_output(root, out, "checkpoint", say), eval_ref=eval_ref)


def _latents_of_run(run_dir: Path) -> str | None:
    """The latents path the run's newest checkpoint was trained on, if it still exists."""
    checkpoint = open_version("checkpoint", run_dir)
    path = checkpoint.inputs[0]["path"] if checkpoint is not None and checkpoint.inputs else None
    return path if path is not None and Path(path).is_dir() else None


def _sample_defaults(config, root: Path, say):
    # Resolved first: an interrupted version's note holds the sampler it resolved to.
    config = replace(resolve_sample(config), checkpoint=_input(root, config.checkpoint, "checkpoint", say))
    return replace(config, out=_output(root, config.out, "samples", say, request=config))


def _eval_defaults(config, root: Path, say):
    samples = _input(root, config.samples, "samples", say)
    ref = config.ref
    if ref is not None:
        ref = str(resolve(ref, ("reference",), root))
        auto_reference.check_matches(open_artifact(samples, "samples"), ref)
    elif any(metric in NEEDS_REFERENCE for metric in config.metrics):
        ref = str(auto_reference.reference_for(open_artifact(samples, "samples"), root, config, say))
    out = config.out
    if out is not None or version_name(samples, root) is not None:
        out = _output(root, out, "metrics", say)
    # else: samples outside the workspace keep the stage's default, a folder beside them (as before)
    return replace(config, samples=samples, ref=ref, out=out)


def _reference_defaults(config, root: Path, say):
    return replace(config, out=_output(root, config.out, "reference", say))


def _sweep_defaults(config, root: Path, say):
    run = str(resolve(config.run, ("checkpoint",), root))
    ref = str(resolve(config.ref, ("reference",), root)) if config.ref is not None else None
    if ref is None:
        ref = str(auto_reference.reference_for(latest_checkpoint(run), root, config, say))
    return replace(config, run=run, ref=ref)
