"""Versioned, immutable artifacts: the one file format every stage reads and writes.

An artifact is a directory with a `manifest.json` that records its kind, schema version, a
content id (from the files' hashes), creation time, toolkit version and git commit, the full
config of the stage that made it, its inputs (kind, id and path of each parent artifact) and
every file with its size and sha256.

Writing: `begin_artifact(out)` gives a staging directory `.NAME.partial` beside `out` (kept
across crashes, so a stage can resume into it); `finish_artifact(...)` hashes the files, writes
the manifest and renames the staging directory into place. A directory without a manifest is
never read as finished, and an existing artifact is never overwritten.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sitctl import __version__
from pipelines.files import sha256_file, write_json_atomic
from sitctl.errors import ArtifactError, OtherRankStopped

SCHEMA_VERSION = 1
KINDS = ("latents", "checkpoint", "samples", "reference", "metrics", "bench")
MANIFEST = "manifest.json"
STAGING_SUFFIX = ".partial"  # `.NAME.partial` beside NAME: where an artifact is made before it is published


@dataclass(frozen=True)
class Artifact:
    """A finished artifact on disk and its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.get("extra", {})

    def file(self, name: str) -> Path:
        return self.path / name

    def ref(self) -> dict[str, str]:
        """How a child artifact records this one as its input."""
        return {"kind": self.kind, "id": self.id, "path": str(self.path.resolve())}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def staging_dir(out: str | Path) -> Path:
    """The deterministic staging directory of `out`, so a rerun can resume into it."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def staging_pattern(name: str) -> str:
    """A regular expression matching the staging directory names of outputs named by `name` (a regex)."""
    return rf"^\.{name}{re.escape(STAGING_SUFFIX)}$"


def is_finished(path: str | Path) -> bool:
    """Whether `path` holds a finished artifact (its manifest is written last)."""
    return (Path(path) / MANIFEST).is_file()


def open_artifact(path: str | Path, kind: str | Iterable[str] | None = None) -> Artifact:
    """Open a finished artifact, checking kind, schema version and each file's presence and size."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        if staging_dir(path).is_dir():
            raise ArtifactError(f"{path} is not finished (a half-written {staging_dir(path).name} exists); rerun its stage to complete it")
        raise ArtifactError(f"{path}: no such artifact directory")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: not an artifact, or not finished")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{manifest_path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema"), int) or "kind" not in manifest:
        raise ArtifactError(f"{manifest_path} is not an artifact manifest")
    if manifest["schema"] > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema {manifest['schema']}, newer than this sitctl's {SCHEMA_VERSION}; upgrade sitctl"
        )
    check_manifest(manifest, manifest_path)
    wanted = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if wanted and manifest["kind"] not in wanted:
        raise ArtifactError(f"{path} is a '{manifest['kind']}' artifact, expected {' or '.join(repr(k) for k in wanted)}")
    for name, entry in manifest["files"].items():
        file = path / name
        if file.is_symlink() or not file.resolve().is_relative_to(path.resolve()):
            raise ArtifactError(f"{path}: file {name} listed in the manifest leads outside the artifact; refused")
        if not file.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing")
        if file.stat().st_size != entry["size"]:
            raise ArtifactError(f"{path}: file {name} has {file.stat().st_size} bytes, manifest says {entry['size']}")
    return Artifact(path=path, manifest=manifest)


# Fields every manifest has, with their JSON types; a manifest lacking one is not readable.
_MANIFEST_FIELDS = {"kind": str, "id": str, "config": dict, "inputs": list, "files": dict}

# Lists in `extra` whose items name files ({"name": ...}) that a stage opens: each must be one of
# the hashed files, hence a plain path inside the artifact (latents shards are streamed by name).
_FILE_LISTS = {"latents": ("shards",)}


def check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Refuse a manifest that is malformed or was edited after it was written.

    The content id is recomputed from the file table, and the manifest digest (over every other
    field) from the manifest itself, so a hand edit of a size, a hash, the config or the extra
    (a scale factor, a shard count) is caught when the artifact is opened, not only by `verify`.
    """
    for key, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{where} is not a valid manifest: '{key}' is missing or not a {kind.__name__}")
    for name, entry in manifest["files"].items():
        check_member_name(name, where)
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            raise ArtifactError(f"{where} is not a valid manifest: file {name} needs an integer size and a sha256")
    for field in _FILE_LISTS.get(manifest["kind"], ()):
        for item in (manifest.get("extra") or {}).get(field, []):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or name not in manifest["files"]:
                raise ArtifactError(f"{where}: {field} entry {name!r} is not one of the artifact's own files; refused")
    if content_id(manifest["files"]) != manifest["id"]:
        raise ArtifactError(f"{where}: content id {manifest['id']} does not match its file table (edited by hand?)")
    recorded = manifest.get("digest")  # absent only in manifests written before it was introduced
    if recorded is not None and recorded != manifest_digest(manifest):
        raise ArtifactError(f"{where} was edited after it was written (its digest does not match); refused")


def check_member_name(name: str, where: Path | str) -> None:
    """A file named by a manifest (or a shard list) must be a plain relative path inside the artifact."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise ArtifactError(f"{where}: file name {name!r} is not a plain relative path inside the artifact; refused")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    canonical = json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify_artifact(path: str | Path) -> Artifact:
    """Open an artifact and recheck the sha256 of every file; raise ArtifactError on any mismatch."""
    artifact = open_artifact(path)
    for name, entry in artifact.manifest["files"].items():
        if sha256_file(artifact.path / name) != entry["sha256"]:
            raise ArtifactError(f"{artifact.path}: file {name} does not match its recorded sha256 (tampered or corrupt)")
    if content_id(artifact.manifest["files"]) != artifact.id:
        raise ArtifactError(f"{artifact.path}: content id does not match its files")
    return artifact


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def begin_artifact(out: str | Path) -> Path:
    """Refuse an existing `out`; create (or reuse, to resume) its staging directory and return it."""
    out = Path(out)
    if out.exists():
        raise ArtifactError(f"{out} already exists; artifacts are never overwritten, choose a new --out")
    staging = staging_dir(out)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArtifactError(f"cannot write to {out.parent}: {error.strerror}") from None
    return staging


REQUEST_FILE = "request.json"  # in a staging dir: the command's settings, for the workspace to resume it


def lock_path(out: str | Path) -> Path:
    """The lock file of `out`: beside it, so it is neither in the staging dir nor in the artifact."""
    out = Path(os.path.abspath(out))  # out/x and /home/me/out/x are the same output
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | Path, d=None):
    """Hold the lock of `out` while inside; a second writer fails at once, naming the holder.

    Only rank 0 of a job takes it (RANK unset means a single process), so the ranks of one
    torchrun job do not exclude each other. Given the job's `Dist`, every rank waits for rank
    0's answer: when the lock is refused, the other ranks stop too, before writing anything and
    without a word (rank 0 says why), instead of dying in a collective that rank 0 never joins.
    The kernel drops an flock when its holder dies, so a killed run never leaves a stale lock.
    """
    rank = d.rank if d is not None else int(os.environ.get("RANK", "0"))
    path, handle, refusal = lock_path(out), None, None
    if rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = _locked_file(path, out)
        except ArtifactError as error:
            refusal = error
        except OSError as error:
            refusal = ArtifactError(write_failure("write to", path.parent, error))
    if d is not None and d.active:
        from sitctl.distributed import all_agree  # start-up cost: torch, which `sitctl ls`, show and verify never need

        if not all_agree(d, refusal is None) and refusal is None:
            raise OtherRankStopped(f"rank 0 could not lock {out}")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if handle is not None:
            path.unlink(missing_ok=True)
            handle.close()


def _locked_file(path: Path, out: str | Path):
    """Open and flock `path`; retry if it was unlinked by a finishing holder between open and lock."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            handle.close()
            raise ArtifactError(f"{out} is being written by {holder}; wait for it to end or stop it, then rerun") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            handle.truncate(0)
            handle.write(f"sitctl process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            return handle
        handle.close()


def content_id(files: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return digest.hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def finish_artifact(
    staging: Path,
    out: str | Path,
    *,
    kind: str,
    config: dict[str, Any],
    inputs: Iterable[Artifact] = (),
    extra: dict[str, Any] | None = None,
    private: Iterable[str] = (),
) -> Artifact:
    """Hash every file in `staging`, write the manifest, and rename the directory to `out`.

    `private` names top-level entries of the staging dir (a stage's resume records) that are left
    out of the manifest and deleted only after the rename. Deleting them before would open a
    window where a kill leaves finished-looking data without the settings it was made with, and
    a rerun with other settings would then publish it under those.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    out, private = Path(out), set(private) | {REQUEST_FILE}
    files = {}
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        name = file.relative_to(staging).as_posix()
        if name != MANIFEST and not name.endswith(".tmp") and name.split("/")[0] not in private:
            files[name] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    manifest = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "id": content_id(files),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sitctl_version": __version__,
        "git_commit": _git_commit(),
        "config": config,
        "inputs": [parent.ref() for parent in inputs],
        "extra": extra or {},
        "files": files,
    }
    manifest["digest"] = manifest_digest(manifest)
    write_json_atomic(staging / MANIFEST, manifest)
    if out.exists():
        raise ArtifactError(f"{out} already exists; artifacts are never overwritten, choose a new --out")
    os.replace(staging, out)
    for name in private:
        _remove(out / name)
    return Artifact(path=out, manifest=manifest)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def write_failure(action: str, path: str | Path, error: OSError) -> str:
    """One line for a failed write, naming the disk: "cannot write X (disk /scratch): No space left on device"."""
    # errno's own text: h5py's strerror runs over lines (timestamps, file descriptors, buffers).
    reason = os.strerror(error.errno) if error.errno else (str(error).splitlines() or ["I/O error"])[0]
    return f"cannot {action} {path} (disk mounted at {mount_point(path)}): {reason}"


# Errors of the disk rather than of the program: full, over quota, read-only, not writable, failing.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG})


@contextlib.contextmanager
def disk_errors(action: str, where: str | Path, hint: str = "free space (or make it writable) and rerun to resume"):
    """Turn a failed write of the disk's making into one ArtifactError line naming the disk.

    safetensors reports I/O failures as its own exception with "(os error N)" in the text, so
    those are mapped back to the OSError they stand for.
    """
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        raise ArtifactError(f"{write_failure(action, where, error)}; {hint}") from None
    except Exception as error:
        code = _safetensors_errno(error)
        if code not in DISK_ERRNOS:
            raise
        raise ArtifactError(f"{write_failure(action, where, OSError(code, os.strerror(code)))}; {hint}") from None


def _safetensors_errno(error: Exception) -> int | None:
    match = re.search(r"\(os error (\d+)\)", str(error)) if type(error).__name__ == "SafetensorError" else None
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Lineage
# ---------------------------------------------------------------------------------------------


def parents(artifact: Artifact) -> list[Artifact | dict[str, Any]]:
    """The input artifacts, opened where they still exist (else their recorded reference)."""
    found: list[Artifact | dict[str, Any]] = []
    for ref in artifact.inputs:
        try:
            found.append(open_artifact(ref["path"]))
        except ArtifactError:
            found.append(ref)
    return found


def ancestor(artifact: Artifact, kind: str) -> Artifact | None:
    """The nearest ancestor (or the artifact itself) of the given kind, if it can be opened."""
    if artifact.kind == kind:
        return artifact
    for parent in parents(artifact):
        if isinstance(parent, Artifact):
            found = ancestor(parent, kind)
            if found is not None:
                return found
    return None
