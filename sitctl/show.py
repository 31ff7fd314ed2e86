"""`sitctl show` and `sitctl verify`: an artifact's summary, its lineage, and a full hash check."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.tree import Tree

from sitctl.artifacts import Artifact, open_artifact, parents, verify_artifact
from sitctl.trackers import logs_of

MAX_LIST = 8  # longer lists (class names, shard tables) are summarised by their length


def show(path: str | Path, *, kind: str | None = None, console: Console | None = None) -> Artifact:
    """Print the summary table and lineage tree of the artifact at `path`."""
    artifact = open_artifact(path, kind)
    (console or Console()).print(Group(summary_table(artifact), lineage_tree(artifact)))
    return artifact


def verify(path: str | Path, *, kind: str | None = None) -> Artifact:
    """Check kind (if given), schema, presence, size and sha256 of every file; raise ArtifactError if any fails."""
    if kind is not None:
        open_artifact(path, kind)
    return verify_artifact(path)


def summary_table(artifact: Artifact) -> Table:
    """Kind, id, provenance, file count and size, then the config and extra fields worth reading."""
    manifest = artifact.manifest
    table = Table(title=f"{artifact.kind} artifact {artifact.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    sizes = [entry["size"] for entry in manifest["files"].values()]
    rows = [
        ("id", artifact.id),
        ("created", manifest.get("created")),
        ("sitctl", f"{manifest.get('sitctl_version')} (git {str(manifest.get('git_commit') or '?')[:12]}, schema {manifest['schema']})"),
        ("files", f"{len(sizes)} files, {human_size(sum(sizes))}"),
        ("inputs", ", ".join(f"{ref['kind']} {ref['id']}" for ref in artifact.inputs) or "none"),
    ]
    if artifact.kind == "checkpoint":  # where to watch the run: `tensorboard --logdir` this folder

        rows.append(("logs", logs_of(artifact) or "none (--tracker none)"))
    rows += [(f"config.{k}", v) for k, v in flatten(artifact.config)]
    rows += [(k, v) for k, v in flatten(artifact.extra)]
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value))
    return table


def lineage_tree(artifact: Artifact) -> Tree:
    """This artifact, its inputs, theirs, ... back to the raw data the first stage read."""
    tree = Tree(_label(artifact))
    _add_parents(tree, artifact)
    return tree


def _add_parents(node: Tree, artifact: Artifact) -> None:
    found = parents(artifact)
    for parent in found:
        if isinstance(parent, Artifact):
            _add_parents(node.add(_label(parent)), parent)
        else:  # recorded but no longer openable: show the reference
            node.add(f"[bold]{parent['kind']}[/] {parent['id']}  {parent['path']}  [red](missing)[/]")
    if not found and "src" in artifact.config:
        root = (artifact.extra.get("source") or {}).get("root")
        node.add(f"[bold]raw data[/] {artifact.config['src']}" + (f"  ({root})" if root else ""))


def _label(artifact: Artifact) -> str:
    return f"[bold]{artifact.kind}[/] {artifact.id}  {artifact.path}"


def flatten(mapping: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) pairs; long or nested lists become '[N items]'."""
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list) and (len(value) > MAX_LIST or any(isinstance(v, (dict, list)) for v in value)):
            yield f"{prefix}{key}", f"[{len(value)} items]"
        else:
            yield f"{prefix}{key}", value


def human_size(size: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
