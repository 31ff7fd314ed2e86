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


# ---------------------------------------------------------------------------------------------
# Shards made elsewhere (webdataset, tar, another release): read by name, refused in one line
# ---------------------------------------------------------------------------------------------

SHAPE = (2, 2, 4, 2, 2)


def npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def tar_of(path, members, pax=None, format=tarfile.PAX_FORMAT) -> str:
    """A tar of (name, bytes) members as GNU/pax tools write them; `pax` adds records to every header (a dict, or
    a function of the member's name giving one)."""
    import io

    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = dict(pax(name) if callable(pax) else pax)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def moments(seed=0, dtype=np.float16, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_a_shard_stores_moments_as_float16_and_crops_as_uint8_whatever_type_they_come_in(tmp_path):
    crop = np.arange(6 * 6 * 3).reshape(6, 6, 3) % 256  # int64
    sample = Sample(key="k", label=1, moments=moments(dtype=np.float32), path="p", image=crop)
    write_shard(tmp_path / "a.tar", [sample])
    index = open_shard(tmp_path / "a.tar", SHAPE)
    np.testing.assert_array_equal(index.moments(0), sample.moments.astype(np.float16))
    out = np.zeros((1, 6, 6, 3), np.uint8)
    index.images.read_into(np.array([0]), out, "a.tar")
    assert np.array_equal(out[0], crop)


def test_members_are_grouped_by_the_first_dot_of_their_basename_and_pax_records_give_their_names(tmp_path):
    # Keys under dotted folders (webdataset keeps the folders in the key); long names travel in pax records
    # beside others (a comment holding '='), as GNU tar and python's tarfile write them.
    long_folder = "run.v1/" + "d" * 120 + "/x.y=z"
    keys = [f"{long_folder}/000001", "run.v1/000002"]
    members = [(f"{key}.{suffix}", data) for key in keys
               for suffix, data in (("cls", b"3"), ("moments.npy", npy(moments())), ("path.txt", b"a=b"))]
    index = open_shard(tar_of(tmp_path / "a.tar", members, pax={"comment": "made by=tar", "mtime": "1"}), SHAPE)
    assert index.keys == tuple(keys) and index.labels.tolist() == [3, 3]
    path_first = tar_of(tmp_path / "b.tar", members, pax=lambda name: {"path": name, "comment": "made by tar"})
    assert open_shard(path_first, SHAPE).keys == tuple(keys)  # the path record before a value with spaces
    np.testing.assert_array_equal(index.moments(1), moments())


def test_a_marker_whose_shard_was_deleted_counts_for_nothing(tmp_path):
    sha256 = write_shard(tmp_path / shard_name(3), samples(2))
    mark_done(tmp_path, 3, {"sha256": sha256})
    (tmp_path / shard_name(3)).unlink()
    assert done_record(tmp_path, 3) is None


def crop(side=6, dtype=np.uint8):
    return npy(np.zeros((side, side, 3), dtype))


GOOD = [("k1.cls", b"1"), ("k1.moments.npy", npy(moments()))]
BROKEN = {  # what a shard holds -> the one line that refuses it (after "a.tar: ")
    "a member outside any sample": (GOOD + [("README", b"hi")], "sample README lacks a .cls or .moments.npy member"),
    "a sample without moments": (GOOD + [("k2.cls", b"2")], "sample k2 lacks a .cls or .moments.npy member"),
    "moments as float32": ([("k1.cls", b"1"), ("k1.moments.npy", npy(moments(dtype=np.float32)))],
                           "moments are float32, expected float16"),
    "moments in Fortran order": ([("k1.cls", b"1"), ("k1.moments.npy", npy(np.asfortranarray(moments())))],
                                 "moments are float16 (Fortran order), expected float16"),
    "moments of another size": ([("k1.cls", b"1"), ("k1.moments.npy", npy(moments(shape=(2, 2, 4, 2, 3))))],
                                "sample k1 has moments (2, 2, 4, 2, 3), expected (2, 2, 4, 2, 2)"),
    "a label of words": (GOOD + [("k2.cls", b"a label of several words"), ("k2.moments.npy", npy(moments()))],
                         "sample k2 has label b'a label of several w', not a class number"),  # its first 20 bytes
    "a later sample's moments big-endian": (GOOD + [("k2.cls", b"1"), ("k2.moments.npy", npy(moments(dtype=">f2")))],
                                            "sample k2 has moments of another shape or type than the shard's first"),
    "a later sample's moments with a byte after them": (
        GOOD + [("k2.cls", b"1"), ("k2.moments.npy", npy(moments()) + b"\0")],
        "sample k2 has moments of another shape or type than the shard's first"),
    "a later sample's moments of another size": (
        GOOD + [("k2.cls", b"1"), ("k2.moments.npy", npy(moments(shape=(2, 2, 4, 1, 2))))],
        "sample k2 has moments of another shape or type than the shard's first"),
    "crops of two formats": (GOOD + [("k1.image.npy", crop()), ("k2.cls", b"1"), ("k2.moments.npy", npy(moments())),
                                     ("k2.image.png", b"x")],
                             "some samples lack their image, or images are stored in several formats"),
    "crops as jpg": (GOOD + [("k1.image.jpg", b"x")], "images stored as .image.jpg, expected one of npy, png"),
    "crops not square": (GOOD + [("k1.image.npy", npy(np.zeros((6, 5, 3), np.uint8)))],
                         "images have shape (6, 5, 3), expected (S, S, 3)"),
    "crops as int16": (GOOD + [("k1.image.npy", crop(dtype=np.int16))], "images are int16, expected uint8"),
    "crops of 4 channels": (GOOD + [("k1.image.npy", npy(np.zeros((6, 6, 4), np.uint8)))],
                            "images have shape (6, 6, 4), expected (S, S, 3)"),
    "crops in gray": (GOOD + [("k1.image.npy", npy(np.zeros((6, 6), np.uint8)))], "images have shape (6, 6), expected (S, S, 3)"),
    "every crop stored twice": (GOOD + [("k1.image.npy", crop()), ("k1.image.png", b"x")],
                                "some samples lack their image, or images are stored in several formats"),
    "a later crop of another type": (GOOD + [("k1.image.npy", crop()), ("k2.cls", b"1"), ("k2.moments.npy", npy(moments())),
                                             ("k2.image.npy", crop(dtype=np.int8))],
                                     "images of another shape or type than the shard's first"),
    "a later crop with bytes after it": (GOOD + [("k1.image.npy", crop()), ("k2.cls", b"1"),
                                                 ("k2.moments.npy", npy(moments())), ("k2.image.npy", crop() + b"\0")],
                                         "images of another shape or type than the shard's first"),
    "moments that are not .npy": ([("k1.cls", b"1"), ("k1.moments.npy", b"PK\x03\x04 a zip")],
                                  "moments are not a readable .npy array (numpy's reason)"),
    "a later crop of another side": (GOOD + [("k1.image.npy", crop()), ("k2.cls", b"1"), ("k2.moments.npy", npy(moments())),
                                             ("k2.image.npy", crop(side=5))],
                                     "images of another shape or type than the shard's first"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_shard_made_elsewhere_that_does_not_hold_latents_is_refused_in_one_line(tmp_path, case):
    members, message = BROKEN[case]
    with pytest.raises(ArtifactError) as error:
        open_shard(tar_of(tmp_path / "a.tar", members), SHAPE)
    expected = f"{tmp_path / 'a.tar'}: {message}"
    if expected.endswith("(numpy's reason)"):  # numpy's own words, which change between its releases
        assert str(error.value).startswith(expected.removesuffix("numpy's reason)")) and "\n" not in str(error.value)
    else:
        assert str(error.value) == expected


def test_a_truncated_shard_a_link_inside_or_a_missing_file_is_refused_in_one_line(tmp_path):
    path = tar_of(tmp_path / "a.tar", GOOD + [("k2.cls", b"2"), ("k2.moments.npy", npy(moments()))])
    (tmp_path / "cut.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:3700])  # inside k2's moments
    with pytest.raises(ArtifactError) as error:
        open_shard(tmp_path / "cut.tar", SHAPE)
    assert str(error.value) == f"{tmp_path / 'cut.tar'}: tar member 'k2.moments.npy' runs past the end of the file (truncated?)"
    with tarfile.open(tmp_path / "link.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k1.cls")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ArtifactError) as error:
        open_shard(tmp_path / "link.tar", SHAPE)
    assert str(error.value) == f"{tmp_path / 'link.tar'}: tar member 'k1.cls' has type b'2'; shards hold regular files only"
    with pytest.raises(ArtifactError) as error:
        open_shard(tmp_path / "gone.tar", SHAPE)
    assert str(error.value) == f"cannot read shard {tmp_path / 'gone.tar'}: No such file or directory"
    assert len(open_shard(path, SHAPE)) == 2


def test_a_one_sample_shard_an_empty_file_and_npy_format_2_read_as_they_are(tmp_path):
    import io

    for image_format in ("npy", "png"):  # one sample: no stride between samples, one crop to size the rest
        sample = Sample(key="k", label=2, moments=moments(), path="p", image=np.full((6, 6, 3), 9, np.uint8),
                        image_format=image_format)
        write_shard(tmp_path / f"{image_format}.tar", [sample])
        index = open_shard(tmp_path / f"{image_format}.tar", SHAPE)
        np.testing.assert_array_equal(index.view_bytes(np.array([0]), np.array([1])).view(np.float16)[0], moments()[1].ravel())
        out = np.zeros((1, 6, 6, 3), np.uint8)
        index.images.read_into(np.array([0]), out, "one")
        assert (out == 9).all() and index.images.side == 6
    (tmp_path / "empty.tar").write_bytes(b"")
    assert len(open_shard(tmp_path / "empty.tar", SHAPE)) == 0
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, moments(), version=(2, 0))  # what numpy writes for very long headers
    index = open_shard(tar_of(tmp_path / "v2.tar", [("k.cls", b"1"), ("k.moments.npy", buffer.getvalue())]), SHAPE)
    np.testing.assert_array_equal(index.moments(0), moments())


def patch_header(path, member: int, field: slice, value: bytes) -> None:
    """Fill a header field of member number `member` as another tar writer does, with the checksum made to fit."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        start = tar.getmembers()[member].offset_data - 512  # its ustar header, after any pax header
    data[start + field.start : start + field.stop] = value
    data[start + 148 : start + 156] = b" " * 8
    data[start + 148 : start + 156] = b"%06o\0 " % sum(data[start : start + 512])
    path.write_bytes(bytes(data))


def test_tars_of_other_writers_are_read_by_their_full_names_and_sizes(tmp_path):
    import io

    long_key = "z" * 154 + "/" + "z" * 88  # ustar splits it into prefix and name; its headers sum past 0o77777
    full_key = "p" * 20 + "/" + "k" * 75  # k.cls fills the 100-byte name field, with no NUL after it
    short_prefix = "q/" + "k" * 88  # k.moments.npy: a prefix of one letter
    members = [(f"{key}.{suffix}", data) for key in (long_key, full_key, short_prefix)
               for suffix, data in (("cls", b"4"), ("moments.npy", npy(moments())))]
    index = open_shard(tar_of(tmp_path / "ustar.tar", members, format=tarfile.USTAR_FORMAT), SHAPE)
    assert index.keys == (long_key, full_key, short_prefix) and index.labels.tolist() == [4, 4, 4]

    # A size only in a pax record (as for members past 8 GiB) and a folder entry whose size field is left blank.
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_folder("d"))
        for name, data in [("d/k.cls", b"5"), ("d/k.moments.npy", npy(moments(3)))]:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), {"size": str(len(data))}
            tar.addfile(info, io.BytesIO(data))
    patch_header(tmp_path / "pax.tar", 0, slice(124, 136), b"\0" * 12)
    patch_header(tmp_path / "pax.tar", 2, slice(124, 136), b"\0" * 12)
    index = open_shard(tmp_path / "pax.tar", SHAPE)
    assert index.keys == ("d/k",) and index.labels.tolist() == [5]
    np.testing.assert_array_equal(index.moments(0), moments(3))

    # A tar cut right after its last member's data: no end-of-archive blocks, every member still read.
    with tarfile.open(tmp_path / "pax.tar") as tar:
        end = tar.getmembers()[-1].offset_data + tar.getmembers()[-1].size  # not even padded to its block
    (tmp_path / "no-end.tar").write_bytes((tmp_path / "pax.tar").read_bytes()[:end])
    assert open_shard(tmp_path / "no-end.tar", SHAPE).keys == ("d/k",)


def _folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
