"""WebDataset shards of a latents artifact, written so that reruns are byte-identical.

A shard is a plain tar named from its global index (`shard-000000.tar`). Each sample is three
members sharing the sample's key: `KEY.cls` (label as ascii int), `KEY.moments.npy` (float16
(2, 2, C, H, W)) and `KEY.path.txt` (source path). Member headers carry fixed mtime, owner and
mode, so the bytes depend only on the samples. A shard is written as `NAME.tmp` and renamed,
and a done marker with its sha256 is recorded after the rename, so a resumed run can keep
complete shards and redo the rest.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.files import sha256_file, write_json_atomic

SHARD_NAME = "shard-{index:06d}.tar"
PROGRESS_DIR = "_progress"  # done markers, inside the staging directory only


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index=index)


@dataclass(frozen=True)
class Sample:
    """One encoded image as stored in a shard."""

    key: str
    label: int
    moments: np.ndarray  # (2, 2, C, H, W) float16
    path: str


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(sample.moments, dtype=np.float16), allow_pickle=False)
    return [
        (f"{sample.key}.cls", str(sample.label).encode()),
        (f"{sample.key}.moments.npy", buffer.getvalue()),
        (f"{sample.key}.path.txt", sample.path.encode()),
    ]


def write_shard(path: Path, samples: list[Sample]) -> str:
    """Write samples to `path` through `path.tmp` (fixed headers) and return the tar's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for name, data in sample_members(sample):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


# ---------------------------------------------------------------------------------------------
# Done markers: which shards of a staging directory are complete
# ---------------------------------------------------------------------------------------------


def marker_path(staging: Path, index: int) -> Path:
    return staging / PROGRESS_DIR / f"{shard_name(index)}.json"


def mark_done(staging: Path, index: int, record: dict) -> None:
    """Record a complete shard: record holds at least its sha256, count, histogram and errors."""
    marker_path(staging, index).parent.mkdir(exist_ok=True)
    write_json_atomic(marker_path(staging, index), record)


def done_record(staging: Path, index: int) -> dict | None:
    """The marker of shard `index` if its tar is present and still matches the recorded sha256."""
    marker, shard = marker_path(staging, index), staging / shard_name(index)
    if not marker.is_file() or not shard.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if sha256_file(shard) == record.get("sha256") else None
