"""WebDataset shards of a latents artifact, written so that reruns are byte-identical.

A shard is a plain tar named from its global index (`shard-000000.tar`). Each sample is three
members sharing the sample's key: `KEY.cls` (label as ascii int), `KEY.moments.npy` (float16
(2, 2, C, H, W)) and `KEY.path.txt` (source path), plus, when encode keeps them for an alignment
encoder, the unflipped center crop as `KEY.image.npy` ((S, S, 3) uint8) or `KEY.image.png`. Member headers carry fixed mtime, owner and
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

from model.errors import ArtifactError
from pipelines.files import sha256_file, write_json_atomic
from pipelines.images import decode_png, png_bytes

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
    image: np.ndarray | None = None  # (S, S, 3) uint8 unflipped crop, kept for an alignment encoder
    image_format: str = "npy"  # how the image is stored: npy (raw, read without decoding) or png


IMAGE_FORMATS = ("npy", "png")


def _npy_bytes(array: np.ndarray, dtype) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order."""
    members = [
        (f"{sample.key}.cls", str(sample.label).encode()),
        (f"{sample.key}.moments.npy", _npy_bytes(sample.moments, np.float16)),
        (f"{sample.key}.path.txt", sample.path.encode()),
    ]
    if sample.image is not None:
        image = png_bytes(sample.image) if sample.image_format == "png" else _npy_bytes(sample.image, np.uint8)
        members.append((f"{sample.key}.image.{sample.image_format}", image))
    return members


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


# ---------------------------------------------------------------------------------------------
# Reading: one pass over a shard's tar headers, then arrays straight from the mapped file
# ---------------------------------------------------------------------------------------------
#
# The trainer reads each shard many times (every epoch, by every lane that owns a residue of
# it). Parsing tar headers and np.load-ing each array is most of a streaming reader's time, so a
# shard is indexed once (names, sizes and offsets of its members) and its arrays are then
# numpy views into the memory-mapped file. The format is POSIX ustar with pax extended headers,
# as tarfile writes it above (and as webdataset's TarWriter does).

TAR_BLOCK = 512
_REGULAR, _PAX, _GLOBAL_PAX, _DIRECTORY = (b"0", b"\0"), b"x", b"g", b"5"


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # byte offset of the member's data in the file
    size: int


def _octal(field: bytes) -> int:
    return int(field.rstrip(b"\0 ").decode("ascii") or "0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """The `LENGTH KEY=VALUE\\n` records of a pax extended header."""
    records, position = {}, 0
    while position < len(data):
        length = int(data[position : data.index(b" ", position)])
        key, _, value = data[data.index(b" ", position) + 1 : position + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        position += length
    return records


def _header_checksums_ok(buffer: np.ndarray, offsets: list[int]) -> bool:
    """Each header's stored checksum equals the byte sum with its own checksum field as spaces."""
    if not offsets:
        return True
    headers = buffer[np.asarray(offsets)[:, None] + np.arange(TAR_BLOCK)].astype(np.int64)  # (members, 512)
    computed = headers.sum(1) - headers[:, 148:156].sum(1) + 8 * ord(" ")
    stored = [_octal(buffer[offset + 148 : offset + 156].tobytes()) for offset in offsets]
    return bool(np.array_equal(computed, np.asarray(stored)))


def tar_members(data, where: str) -> list[TarMember]:
    """The regular files of an uncompressed tar in `data` (bytes or mmap); ArtifactError if broken."""

    members, headers, position, pax = [], [], 0, {}
    while position + TAR_BLOCK <= len(data):
        header = data[position : position + TAR_BLOCK]
        if header.count(0) == TAR_BLOCK:
            break  # the end-of-archive zero block
        try:
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
            name = header[:100].partition(b"\0")[0].decode()
            if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
                name = header[345:500].partition(b"\0")[0].decode() + "/" + name
        except (ValueError, UnicodeDecodeError):
            raise ArtifactError(f"{where}: broken tar header at byte {position}") from None
        start, kind = position + TAR_BLOCK, header[156:157]
        if start + size > len(data):
            raise ArtifactError(f"{where}: tar member {name!r} runs past the end of the file (truncated?)")
        headers.append(position)
        if kind == _PAX:
            pax = _pax_records(bytes(data[start : start + size]))
        elif kind in _REGULAR:
            members.append(TarMember(pax.get("path", name), start, size))
            pax = {}
        elif kind not in (_GLOBAL_PAX, _DIRECTORY):
            raise ArtifactError(f"{where}: tar member {name!r} has type {kind!r}; shards hold regular files only")
        position = start + -(-size // TAR_BLOCK) * TAR_BLOCK
    if not _header_checksums_ok(np.frombuffer(data, np.uint8), headers):
        raise ArtifactError(f"{where}: broken tar header (checksum mismatch)")
    return members


def _split_name(name: str) -> tuple[str, str]:
    """(key, suffix) as webdataset groups members: the key ends at the first dot of the basename."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


@dataclass(frozen=True)
class ShardIndex:
    """A latents shard, indexed once: per sample its key, label and where its moments array lies."""

    path: str
    buffer: np.ndarray  # (file bytes,) uint8 view of the memory-mapped shard
    keys: tuple[str, ...]
    labels: np.ndarray  # (n,) int64
    moments_offsets: np.ndarray  # (n,) int64: first byte of each float16 (2, 2, C, H, W) array
    moments_shape: tuple[int, ...]
    table: np.ndarray | None = None  # (n, 2 views, bytes) strided view of every sample's moments, if evenly spaced
    images: ShardImages | None = None  # the kept crops, if the shard has them

    def __len__(self) -> int:
        return len(self.keys)

    def view_bytes(self, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        """(n, bytes) copies of view `views[i]` (0 original, 1 flipped) of each sample's moments."""
        if self.table is not None:
            return self.table[samples, views.astype(np.int64)]  # one fancy-index gather copies them all
        half = int(np.prod(self.moments_shape[1:])) * 2
        starts = self.moments_offsets[samples] + half * views.astype(np.int64)
        return np.stack([self.buffer[start : start + half] for start in starts.tolist()])

    def moments(self, sample: int) -> np.ndarray:
        """The float16 (2 views, mean/std, C, H, W) moments of one sample, a view into the file."""
        count = int(np.prod(self.moments_shape))
        start = int(self.moments_offsets[sample])
        return self.buffer[start : start + 2 * count].view(np.float16).reshape(self.moments_shape)


def _npy_header(payload: bytes, where: str, what: str = "moments", expected=np.float16) -> tuple[int, tuple[int, ...]]:
    """(header length, shape) of a C-ordered .npy payload of dtype `expected`; parsed without unpickling anything."""

    stream = io.BytesIO(payload[:4096])
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
    except ValueError as error:
        raise ArtifactError(f"{where}: {what} are not a readable .npy array ({error})") from None
    if dtype != expected or fortran_order:
        raise ArtifactError(f"{where}: {what} are {dtype}{' (Fortran order)' if fortran_order else ''}, expected {np.dtype(expected)}")
    return stream.tell(), tuple(shape)


@dataclass(frozen=True)
class ShardImages:
    """Where each sample's kept crop lies in a shard: raw uint8 arrays (read as views) or PNG bytes."""

    buffer: np.ndarray  # (file bytes,) uint8 view of the mapped shard
    format: str  # npy or png
    offsets: np.ndarray  # (n,) int64: first byte of each array's data (npy) or of each PNG
    sizes: np.ndarray  # (n,) int64: bytes of each
    side: int

    def read_into(self, samples: np.ndarray, out: np.ndarray, where: str) -> None:
        """Write the (unflipped) crops of `samples` into `out` (n, S, S, 3) uint8."""

        for row, sample in enumerate(samples.tolist()):
            start, size = int(self.offsets[sample]), int(self.sizes[sample])
            if self.format == "npy":  # a contiguous copy out of the mapped file
                out[row] = self.buffer[start : start + size].reshape(self.side, self.side, 3)
                continue
            try:
                decode_png(self.buffer[start : start + size], out[row])
            except (OSError, ValueError) as error:
                raise ArtifactError(f"{where}: sample {sample}'s image is not a readable PNG crop ({error})") from None


def _index_images(data, where: str, samples: dict[str, dict[str, TarMember]]) -> ShardImages | None:
    """The kept crops of a shard's samples (in `samples` order), or None when it has none."""

    formats = {suffix for members in samples.values() for suffix in members if suffix.startswith("image.")}
    if not formats:
        return None
    if len(formats) > 1 or any(not formats <= set(members) for members in samples.values()):
        raise ArtifactError(f"{where}: some samples lack their image, or images are stored in several formats")
    suffix = formats.pop()
    image_format = suffix.removeprefix("image.")
    if image_format not in IMAGE_FORMATS:
        raise ArtifactError(f"{where}: images stored as .{suffix}, expected one of {', '.join(IMAGE_FORMATS)}")
    members = [member[suffix] for member in samples.values()]
    offsets = np.asarray([member.offset for member in members], np.int64)
    sizes = np.asarray([member.size for member in members], np.int64)
    if image_format == "npy":
        first = members[0]
        length, shape = _npy_header(bytes(data[first.offset : first.offset + 4096]), where, "images", np.uint8)
        if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
            raise ArtifactError(f"{where}: images have shape {shape}, expected (S, S, 3)")
        header = bytes(data[first.offset : first.offset + length])
        if (sizes != length + int(np.prod(shape))).any() or any(data[o : o + length] != header for o in offsets.tolist()):
            raise ArtifactError(f"{where}: images of another shape or type than the shard's first")
        offsets, sizes, side = offsets + length, sizes - length, shape[0]
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(bytes(data[offsets[0] : offsets[0] + sizes[0]]))) as image:
                side = image.size[0]
        except OSError as error:
            raise ArtifactError(f"{where}: the first sample's image is not a readable PNG crop ({error})") from None
    return ShardImages(buffer=np.frombuffer(data, np.uint8), format=image_format, offsets=offsets, sizes=sizes, side=side)


def index_shard(path: str | Path, data, moments_shape: tuple[int, ...]) -> ShardIndex:
    """Index a latents shard held in `data` (bytes or mmap): each sample needs .cls and .moments.npy."""

    where = str(path)
    samples: dict[str, dict[str, TarMember]] = {}
    for member in tar_members(data, where):
        key, suffix = _split_name(member.name)
        samples.setdefault(key, {})[suffix] = member
    keys, labels, offsets, header = [], [], [], None
    expected = 2 * int(np.prod(moments_shape))  # float16 bytes
    for key, members in samples.items():
        if "cls" not in members or "moments.npy" not in members:
            raise ArtifactError(f"{where}: sample {key} lacks a .cls or .moments.npy member")
        label_member, moments_member = members["cls"], members["moments.npy"]
        label = bytes(data[label_member.offset : label_member.offset + label_member.size])
        if not label.strip().isdigit():
            raise ArtifactError(f"{where}: sample {key} has label {label[:20]!r}, not a class number")
        if header is None:  # every array of a shard has the same header: parse the first, compare the rest
            length, shape = _npy_header(bytes(data[moments_member.offset : moments_member.offset + 4096]), where)
            if shape != tuple(moments_shape):
                raise ArtifactError(f"{where}: sample {key} has moments {shape}, expected {tuple(moments_shape)}")
            header = bytes(data[moments_member.offset : moments_member.offset + length])
        start = moments_member.offset
        if moments_member.size != len(header) + expected or data[start : start + len(header)] != header:
            raise ArtifactError(f"{where}: sample {key} has moments of another shape or type than the shard's first")
        keys.append(key)
        labels.append(int(label))
        offsets.append(start + len(header))
    buffer, offsets = np.frombuffer(data, np.uint8), np.asarray(offsets, np.int64)
    return ShardIndex(path=where, buffer=buffer, keys=tuple(keys), labels=np.asarray(labels, np.int64),
                      moments_offsets=offsets, moments_shape=tuple(moments_shape),
                      table=_evenly_spaced_table(buffer, offsets, expected // 2),
                      images=_index_images(data, where, samples))


def _evenly_spaced_table(buffer: np.ndarray, offsets: np.ndarray, half: int) -> np.ndarray | None:
    """A read-only (n, 2, half) view of the moments when samples lie at a fixed stride, else None.

    They do in our shards: every member is padded to 512-byte blocks and the small ones (label,
    path) fit one block, so sample i's array starts at offsets[0] + i * stride.
    """
    stride = np.diff(offsets)
    if len(offsets) == 0 or (len(stride) and (stride != stride[0]).any()):
        return None
    step = int(stride[0]) if len(stride) else 2 * half
    return np.lib.stride_tricks.as_strided(buffer[int(offsets[0]) :], shape=(len(offsets), 2, half),
                                           strides=(step, half, 1), writeable=False)


def open_shard(path: str | Path, moments_shape: tuple[int, ...], sha256: str | None = None) -> ShardIndex:
    """Memory-map a latents shard, check it against `sha256` (if given) and index it.

    The hash reads the whole file once (about 700 MB/s on one core): callers keep the index for
    later epochs instead of re-opening the shard.
    """
    import hashlib
    import mmap


    try:
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(handle.fileno()).st_size else b""
    except OSError as error:
        raise ArtifactError(f"cannot read shard {path}: {error.strerror}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"shard {path} does not match its recorded sha256 (corrupt or modified since encode)")
    return index_shard(path, data, moments_shape)
