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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rich.table import Table

from sitctl.artifacts import MANIFEST, Artifact, open_artifact, staging_pattern
from sitctl.checkpoint import list_checkpoints
from sitctl.errors import ArtifactError, SitctlError
from sitctl.metrics_log import metrics_path
from sitctl.plots import read_metrics
from sitctl.trackers import log_dir_of

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
PARTIAL = re.compile(staging_pattern(r"v(\d+)"))
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


def open_version(kind: str, path: Path) -> Artifact | None:
    """The finished artifact of a version directory, or None (unfinished, failed or foreign)."""
    if kind == "checkpoint":
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
        artifact = open_version(kind, path)
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


def unfinished_numbers(root: Path, kind: str) -> list[int]:
    folder = root / FOLDERS[kind]
    return [number for number, _ in _numbers(folder, PARTIAL) if not (folder / f"v{number}").exists()]


def unfinished(root: Path, kind: str) -> list[str]:
    """Names of versions that were started and never finished (`latents/v3`), for a hint."""
    return [f"{FOLDERS[kind]}/v{number}" for number in unfinished_numbers(root, kind)]


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
    metrics = metrics_path(run_dir)
    if not metrics.is_file():
        return None

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
# `sitctl ls`
# ---------------------------------------------------------------------------------------------


def ls_table(root: Path):
    """One rich table of every version in the workspace: name, id, age, made from, headline facts.

    Unfinished versions are listed too (marked, never picked), so a killed run is visible.
    """
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
    newest = None if (path / MANIFEST).is_file() else open_version("checkpoint", path)
    return newest.path if newest is not None else path


def results_file(root: Path | None = None) -> Path:
    """The workspace's results table (eval appends each row beside its metrics/vN)."""
    return (root or find_root()) / FOLDERS["metrics"] / "results.jsonl"
