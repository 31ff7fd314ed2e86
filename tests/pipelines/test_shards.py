"""Shard files: byte-identical rewrites, readable by plain webdataset, and done markers that notice damage."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipelines.shards import Sample, done_record, index_shard, mark_done, open_shard, shard_name, write_shard
from sitctl.errors import ArtifactError


def samples(count: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [
        Sample(key=f"class_{i}_img_JPEG", label=i % 3, moments=rng.standard_normal((2, 2, 4, 2, 2)).astype(np.float16), path=f"class/{i}.JPEG")
        for i in range(count)
    ]


def test_rewriting_a_shard_gives_identical_bytes(tmp_path):
    first = write_shard(tmp_path / "a.tar", samples(3))
    os.utime(tmp_path / "a.tar", (1, 1))  # the file's own mtime must not leak into a rewrite
    second = write_shard(tmp_path / "b.tar", samples(3))
    assert first == second and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o444)}
    assert [m.name for m in members[:3]] == ["class_0_img_JPEG.cls", "class_0_img_JPEG.moments.npy", "class_0_img_JPEG.path.txt"]
    assert not (tmp_path / "a.tar.tmp").exists()


def test_webdataset_reads_back_every_field(tmp_path):
    written = samples(4)
    write_shard(tmp_path / shard_name(7), written)
    read = list(wds.WebDataset(str(tmp_path / "shard-000007.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in read] == [s.key for s in written]
    assert [s["cls"] for s in read] == [s.label for s in written]
    assert [s["path.txt"] for s in read] == [s.path for s in written]
    for got, sample in zip(read, written):
        assert got["moments.npy"].dtype == np.float16
        np.testing.assert_array_equal(got["moments.npy"], sample.moments)


def test_done_marker_only_counts_while_the_shard_matches(tmp_path):
    assert done_record(tmp_path, 0) is None
    sha256 = write_shard(tmp_path / shard_name(0), samples(2))
    assert done_record(tmp_path, 0) is None  # written but not yet marked: a crash here redoes it
    mark_done(tmp_path, 0, {"sha256": sha256, "count": 2})
    assert done_record(tmp_path, 0) == {"sha256": sha256, "count": 2}
    with open(tmp_path / shard_name(0), "r+b") as handle:
        handle.seek(700)
        handle.write(b"!")
    assert done_record(tmp_path, 0) is None


def test_reader_returns_what_the_writer_wrote_and_checks_the_hash(tmp_path):
    written = samples(5)
    written[3] = Sample(key="k" * 150, label=12345, moments=written[3].moments, path="p" * 700)  # pax name, 2-block member
    sha256 = write_shard(tmp_path / "a.tar", written)
    index = open_shard(tmp_path / "a.tar", (2, 2, 4, 2, 2), sha256=sha256)
    assert list(index.keys) == [s.key for s in written] and index.labels.tolist() == [s.label for s in written]
    for row, sample in enumerate(written):
        np.testing.assert_array_equal(index.moments(row), sample.moments)
    # Irregular member sizes (the long path) take the per-sample copy; both views of every sample come back.
    for view in (0, 1):
        got = index.view_bytes(np.arange(5), np.full(5, view)).view(np.float16).reshape(5, 2, 4, 2, 2)
        np.testing.assert_array_equal(got, np.stack([s.moments[view] for s in written]))
    with pytest.raises(ArtifactError, match="a.tar does not match its recorded sha256"):
        open_shard(tmp_path / "a.tar", (2, 2, 4, 2, 2), sha256="0" * 64)


def test_reader_refuses_a_header_with_a_wrong_checksum(tmp_path):
    write_shard(tmp_path / "a.tar", samples(2))
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[0] ^= 1  # first member's name: still parses, but the header checksum no longer holds
    with pytest.raises(ArtifactError, match="broken tar header"):
        index_shard("a.tar", bytes(data), (2, 2, 4, 2, 2))


@pytest.mark.parametrize("image_format", ["npy", "png"])
def test_kept_crops_round_trip_byte_identically_beside_the_moments(tmp_path, image_format):
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(3)]
    kept = [Sample(key=s.key, label=s.label, moments=s.moments, path=s.path, image=crop, image_format=image_format)
            for s, crop in zip(samples(3), crops)]
    first, second = write_shard(tmp_path / "a.tar", kept), write_shard(tmp_path / "b.tar", kept)
    assert first == second
    index = open_shard(tmp_path / "a.tar", (2, 2, 4, 2, 2), sha256=first)
    out = np.zeros((3, 6, 6, 3), np.uint8)
    index.images.read_into(np.array([2, 0, 1]), out, "a.tar")
    assert all(np.array_equal(out[row], crops[sample]) for row, sample in enumerate([2, 0, 1]))
    assert index.table is not None or image_format == "png"  # the moments still read in one gather beside raw crops
    mixed = [kept[0], samples(3)[1]]  # one sample without its crop
    write_shard(tmp_path / "c.tar", mixed)
    with pytest.raises(ArtifactError, match="some samples lack their image"):
        open_shard(tmp_path / "c.tar", (2, 2, 4, 2, 2))
