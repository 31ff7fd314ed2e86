"""The workspace: numbered, immutable versions of every artifact kind, so commands need no paths.

A workspace is the current directory, or the nearest parent holding a `.sitctl-workspace`
marker file (as git looks for `.git`), so a command works from any subfolder. Artifacts live
in one folder per kind, each version a directory numbered from 1:

    latents/v1  latents/v2      encode
    runs/v1                     train (a run directory: its checkpoint artifacts step-NNNNNNN/ inside)
    samples/v1                  sample
    references/v1               eval ref, or eval fid's automatic reference
    metrics/v1                  eval (and metrics/results.jsonl, the results table)

A version is never rewritten: a stage writing without `--out` takes the next number, counting
unfinished `.vN.partial` staging directories too, so a killed run is never overwritten. The one
exception is the resume: an encode or sample run again exactly as it was typed (the same
settings, the same resolved input) continues its own interrupted version instead. Only
finished versions (a manifest that opens; for a run, a finished checkpoint) are ever picked
as an input. An input can be named by path, by `kind/vN`, or by a prefix of its content id.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from sitctl.artifacts import MANIFEST, Artifact, made_for, open_artifact
from sitctl.errors import ArtifactError, SitctlError

MARKER = ".sitctl-workspace"
# Artifact kind -> its folder in the workspace.
FOLDERS = {"latents": "latents", "checkpoint": "runs", "samples": "samples", "reference": "references", "metrics": "metrics"}
# What a user may type before /vN (folder names and singular spellings).
SPELLINGS = {**{folder: kind for kind, folder in FOLDERS.items()}, **{kind: kind for kind in FOLDERS},
             "run": "checkpoint", "checkpoints": "checkpoint", "ref": "reference"}
# The command that makes an artifact of each kind, for "none yet" errors.
MAKERS = {"latents": "sitctl encode SRC", "checkpoint": "sitctl train", "samples": "sitctl sample",
          "reference": "sitctl eval ref SRC (or sitctl eval fid, which builds one)", "metrics": "sitctl eval fid"}
VERSION = re.compile(r"^v(\d+)$")
PARTIAL = re.compile(r"^\.v(\d+)\.partial$")
NAME = re.compile(r"^(?P<folder>[a-z]+)/v(?P<number>\d+)(?P<rest>/.*)?$")
ID_PREFIX = re.compile(r"^[0-9a-f]{4,16}$")  # ids are 16 hex digits; 4 keeps `v1`-like words out


class WorkspaceError(SitctlError):
    """A name that resolves to no artifact, or to several; or no artifact of a kind yet."""


# ---------------------------------------------------------------------------------------------
# Where the workspace is
# ---------------------------------------------------------------------------------------------


def find_root(start: str | Path | None = None) -> Path:
    """The nearest directory from `start` (default: cwd) upward holding the marker; else `start` itself."""
    start = Path(start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if (directory / MARKER).is_file():
            return directory
    return start


def claim(root: Path) -> None:
    """Mark `root` as a workspace (once), so commands run from its subfolders find it."""
    marker = root / MARKER
    if not marker.is_file():
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"workspace": 1, "folders": sorted(FOLDERS.values())}) + "\n")


# ---------------------------------------------------------------------------------------------
# Versions of a kind
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One finished version: its name (`runs/v2`), number, directory and artifact.

    For a run, `artifact` is its newest finished checkpoint and `path` the run directory.
    """

    name: str
    number: int
    path: Path
    artifact: Artifact


def _numbers(folder: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), entry) for entry in folder.iterdir() if (m := pattern.match(entry.name))]
    return sorted(found)


def _open_version(kind: str, path: Path) -> Artifact | None:
    """The finished artifact of a version directory, or None (unfinished, failed or foreign)."""
    if kind == "checkpoint":
        from sitctl.checkpoint import list_checkpoints

        found = list_checkpoints(path)
        path = found[-1][1] if found else path
    if not (path / MANIFEST).is_file():
        return None
    try:
        return open_artifact(path, kind)
    except ArtifactError:
        return None


def finished_versions(root: Path, kind: str) -> list[Version]:
    """Every finished version of `kind`, oldest first."""
    folder = FOLDERS[kind]
    found = []
    for number, path in _numbers(root / folder, VERSION):
        artifact = _open_version(kind, path)
        if artifact is not None:
            found.append(Version(f"{folder}/v{number}", number, path, artifact))
    return found


def latest(root: Path, kind: str) -> Version:
    """The newest finished version of `kind`; one line naming the command that makes one if none."""
    found = finished_versions(root, kind)
    if not found:
        what = "finished train run (with a checkpoint)" if kind == "checkpoint" else f"finished {kind} artifact"
        raise WorkspaceError(f"no {what} in {FOLDERS[kind]}/ of the workspace {root} yet; make one with `{MAKERS[kind]}`")
    return found[-1]


def latest_run_dir(root: Path) -> Path:
    """The newest run directory, finished or not (what `train --resume` continues)."""
    found = _numbers(root / FOLDERS["checkpoint"], VERSION)
    if not found:
        raise WorkspaceError(f"no run in {root / 'runs'} to resume; start one with `sitctl train`")
    return found[-1][1]


def next_version(root: Path, kind: str) -> Path:
    """The directory of the next version: one past every number used, finished or not."""
    folder = root / FOLDERS[kind]
    used = [number for number, _ in _numbers(folder, VERSION) + _numbers(folder, PARTIAL)]
    return folder / f"v{max(used, default=0) + 1}"


def _unfinished_numbers(root: Path, kind: str) -> list[int]:
    folder = root / FOLDERS[kind]
    return [number for number, _ in _numbers(folder, PARTIAL) if not (folder / f"v{number}").exists()]


def unfinished(root: Path, kind: str) -> list[str]:
    """Names of versions that were started and never finished (`latents/v3`), for a hint."""
    return [f"{FOLDERS[kind]}/v{number}" for number in _unfinished_numbers(root, kind)]


# ---------------------------------------------------------------------------------------------
# Names: a path, kind/vN, or a content-id prefix
# ---------------------------------------------------------------------------------------------


def resolve(name: str, kinds: tuple[str, ...], root: Path | None = None) -> Path:
    """The path `name` stands for. An existing path, or anything that is not a version name or an
    id, is returned unchanged (the stage then reports it as it always has)."""
    if Path(name).exists():
        return Path(name)
    root = root or find_root()
    match = NAME.match(name)
    if match and match["folder"] in SPELLINGS:
        kind = SPELLINGS[match["folder"]]
        path = root / FOLDERS[kind] / f"v{int(match['number'])}"
        if not path.is_dir():
            have = ", ".join(v.name for v in finished_versions(root, kind)) or f"none yet; make one with `{MAKERS[kind]}`"
            raise WorkspaceError(f"{name} does not exist in the workspace {root} ({FOLDERS[kind]}: {have})")
        return path / match["rest"].lstrip("/") if match["rest"] else path
    if ID_PREFIX.match(name):
        return _by_id(name, kinds, root)
    return Path(name)


def _by_id(prefix: str, kinds: tuple[str, ...], root: Path) -> Path:
    matches = [(label, artifact) for label, artifact in all_artifacts(root, kinds) if artifact.id.startswith(prefix)]
    if not matches:
        raise WorkspaceError(f"no artifact in the workspace {root} has an id starting with {prefix}")
    if len(matches) > 1:
        listed = ", ".join(f"{label} ({artifact.id})" for label, artifact in matches[:6])
        raise WorkspaceError(f"id prefix {prefix} is ambiguous: {listed}; give more digits")
    return matches[0][1].path


def all_artifacts(root: Path, kinds: tuple[str, ...] = tuple(FOLDERS)) -> Iterator[tuple[str, Artifact]]:
    """(name, artifact) of every finished artifact of `kinds`, every checkpoint of every run included."""
    from sitctl.checkpoint import list_checkpoints

    for kind in kinds:
        folder = FOLDERS[kind]
        for number, path in _numbers(root / folder, VERSION):
            inside = [step_path for _, step_path in list_checkpoints(path)] if kind == "checkpoint" else [path]
            for artifact_path in inside:
                try:
                    artifact = open_artifact(artifact_path, kind)
                except ArtifactError:
                    continue
                suffix = f"/{artifact_path.name}" if kind == "checkpoint" else ""
                yield f"{folder}/v{number}{suffix}", artifact


def version_name(path: str | Path, root: Path) -> str | None:
    """`runs/v2` for a path inside a version of the workspace (a checkpoint by its run), else None."""
    try:
        parts = Path(path).resolve().relative_to(root).parts
    except ValueError:
        return None
    if len(parts) >= 2 and parts[0] in FOLDERS.values() and VERSION.match(parts[1]):
        return f"{parts[0]}/{parts[1]}"
    return None


def name_of(path: str | Path, root: Path) -> str:
    """The workspace name of `path` (`runs/v2`), else the path as given."""
    return version_name(path, root) or str(path)


# ---------------------------------------------------------------------------------------------
# What an artifact is, in a few words (the "using ..." line and `sitctl ls`)
# ---------------------------------------------------------------------------------------------


def facts(artifact: Artifact) -> str:
    """Headline facts of an artifact: `imagenet/, 1,281 images, vae ema`."""
    describe = {"latents": _latents_facts, "checkpoint": _checkpoint_facts, "samples": _samples_facts,
                "reference": _reference_facts, "metrics": _metrics_facts}.get(artifact.kind)
    try:
        return describe(artifact) if describe else ""
    except (KeyError, TypeError, ValueError):  # a manifest from an older sitctl lacks a record: no facts
        return ""


def _latents_facts(artifact: Artifact) -> str:
    extra = artifact.extra
    return f"{artifact.config.get('src')}, {extra['num_samples']:,} images, {extra['image_size']}px, vae {extra['vae']['name']}"


def _checkpoint_facts(artifact: Artifact) -> str:
    extra, config = artifact.extra, artifact.config
    text = f"{extra.get('model')}, {extra.get('interp')} {extra.get('pred')}, step {extra.get('step'):,}/{config.get('steps', 0):,}"
    loss = logged_loss(artifact.path.parent, extra["step"])
    return text + (f", loss {loss:.4f}" if loss is not None else "")


def logged_loss(run_dir: Path, step: int) -> float | None:
    """The last loss the run logged at or before `step` (its metrics.jsonl), if any."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    from sitctl.plots import read_metrics

    rows = [row for row in read_metrics(metrics) if row.get("step", 0) <= step and "loss" in row]  # not FID rows
    return rows[-1].get("loss") if rows else None


def _samples_facts(artifact: Artifact) -> str:
    config, extra = artifact.config, artifact.extra
    sampler = f"{config.get('mode')} {config.get('method')} {config.get('steps')} steps"
    if config.get("mode") == "sde":
        sampler += f" w {config.get('w')}"
    if config.get("cfg_scale", 1.0) != 1.0:
        sampler += f" cfg {config.get('cfg_scale')}"
    return f"{extra.get('num_samples', config.get('num')):,} images {extra.get('image_size')}px, {sampler}"


def _reference_facts(artifact: Artifact) -> str:
    extra = artifact.extra
    origin = artifact.config.get("sample_of") or extra.get("source")
    return f"{origin}, {extra['num_images']:,} images {extra['image_size']}px"


def _metrics_facts(artifact: Artifact) -> str:
    values = ", ".join(f"{key} {value:.4g}" for key, value in artifact.extra.get("values", {}).items())
    return f"{values} ({artifact.extra.get('num_samples', 0):,} samples)"


def age(artifact: Artifact, now: datetime.datetime | None = None) -> str:
    """How long ago the artifact was made: 45s, 12m, 3h, 2d."""
    created = datetime.datetime.fromisoformat(artifact.manifest["created"])
    seconds = ((now or datetime.datetime.now(datetime.timezone.utc)) - created).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


# ---------------------------------------------------------------------------------------------
# Stage defaults: fill a config's missing inputs and outputs from the workspace
# ---------------------------------------------------------------------------------------------


def with_defaults(config, say: Callable[[str], None] = print, root: Path | None = None):
    """`config` with every missing input (the latest finished artifact of its kind), named input
    (`kind/vN`, id prefix) and missing --out (the next version) filled in; each choice said in one line."""
    from sitctl import configs

    fill = {configs.EncodeConfig: _encode_defaults, configs.TrainConfig: _train_defaults,
            configs.SampleConfig: _sample_defaults, configs.EvalConfig: _eval_defaults,
            configs.ReferenceConfig: _reference_defaults, configs.SweepConfig: _sweep_defaults}[type(config)]
    return fill(config, root or find_root(), say)


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
    artifact = _open_version(kind, path) if kind == "checkpoint" else None
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
        for number in sorted(_unfinished_numbers(root, kind), reverse=True):
            if made_for(root / FOLDERS[kind] / f".v{number}.partial", request):
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
    checkpoint = _open_version("checkpoint", run_dir)
    path = checkpoint.inputs[0]["path"] if checkpoint is not None and checkpoint.inputs else None
    return path if path is not None and Path(path).is_dir() else None


def _sample_defaults(config, root: Path, say):
    config = replace(config, checkpoint=_input(root, config.checkpoint, "checkpoint", say))
    return replace(config, out=_output(root, config.out, "samples", say, request=config))


def _eval_defaults(config, root: Path, say):
    from sitctl.evaluate import auto_reference
    from sitctl.evaluate.registry import NEEDS_REFERENCE

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
    from sitctl.checkpoint import latest_checkpoint
    from sitctl.evaluate import auto_reference

    run = str(resolve(config.run, ("checkpoint",), root))
    ref = str(resolve(config.ref, ("reference",), root)) if config.ref is not None else None
    if ref is None:
        ref = str(auto_reference.reference_for(latest_checkpoint(run), root, config, say))
    return replace(config, run=run, ref=ref)


# ---------------------------------------------------------------------------------------------
# `sitctl ls`
# ---------------------------------------------------------------------------------------------


def ls_table(root: Path):
    """One rich table of every version in the workspace: name, id, age, made from, headline facts.

    Unfinished versions are listed too (marked, never picked), so a killed run is visible.
    """
    from rich.table import Table

    table = Table(title=f"workspace {root}", title_justify="left", expand=False)
    table.add_column("version", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("from", no_wrap=True)
    table.add_column("facts", overflow="fold")
    for kind, folder in FOLDERS.items():
        finished = {version.number: version for version in finished_versions(root, kind)}
        numbers = sorted({number for number, _ in _numbers(root / folder, VERSION) + _numbers(root / folder, PARTIAL)})
        for number in numbers:
            version = finished.get(number)
            if version is None:
                table.add_row(f"{folder}/v{number}", "-", "-", "-", "[yellow]unfinished[/] (never picked)")
                continue
            artifact = version.artifact
            made_from = "\n".join(_input_name(ref, root) for ref in artifact.inputs) or _raw_source(artifact)
            table.add_row(version.name, artifact.id[:8], age(artifact), made_from, facts(artifact) + _logs(artifact, root))
    return table


def _logs(artifact: Artifact, root: Path) -> str:
    """A run's tracker folder, on a line of its own (`tensorboard --logdir` it)."""
    from sitctl.trackers import log_dir_of

    log_dir = log_dir_of(artifact.config, artifact.path.parent) if artifact.kind == "checkpoint" else None
    if log_dir is None:
        return ""
    try:
        shown = str(log_dir.resolve().relative_to(root))
    except ValueError:
        shown = str(log_dir)
    return f"\n{artifact.config['tracker']} logs: {shown}"


def _input_name(ref: dict, root: Path) -> str:
    name = name_of(ref["path"], root)
    return name if name != ref["path"] else f"{ref['kind']} {ref['id'][:8]}"


def _raw_source(artifact: Artifact) -> str:
    source = artifact.config.get("src") or artifact.config.get("sample_of") or artifact.config.get("source") or "-"
    return Path(source).name + "/" if Path(source).is_absolute() else source


def resolve_any(name: str, root: Path | None = None) -> Path:
    """What `show`/`verify` open for a name: as `resolve`, with a run directory standing for its newest checkpoint."""
    path = resolve(name, tuple(FOLDERS), root)
    newest = None if (path / MANIFEST).is_file() else _open_version("checkpoint", path)
    return newest.path if newest is not None else path


def results_file(root: Path | None = None) -> Path:
    """The workspace's results table (eval appends each row beside its metrics/vN)."""
    return (root or find_root()) / FOLDERS["metrics"] / "results.jsonl"
