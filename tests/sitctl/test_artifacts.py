"""The artifact layer: manifests, refusal of wrong/newer/incomplete/tampered artifacts, lineage, and
the `sitctl show` / `sitctl verify` commands."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess

import pytest
from rich.console import Console

from sitctl.artifacts import (
    MANIFEST, SCHEMA_VERSION, ancestor, begin_artifact, finish_artifact, open_artifact, staging_dir, verify_artifact,
)
from sitctl.errors import ArtifactError
from sitctl.show import show
from tests.helpers import run_cli


def make(out, kind, files, inputs=(), config=None, extra=None):
    staging = begin_artifact(out)
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    return finish_artifact(staging, out, kind=kind, config=config or {}, inputs=inputs, extra=extra)


@pytest.fixture
def chain(tmp_path):
    """latents -> checkpoint -> samples, as the stages would leave them."""
    latents = make(tmp_path / "latents", "latents", {"shard-000000.tar": b"x" * 100}, config={"src": "digits"}, extra={"num_samples": 3})
    checkpoint = make(tmp_path / "ckpt", "checkpoint", {"model.safetensors": b"weights", "state.json": b"{}"}, inputs=[latents])
    samples = make(tmp_path / "samples", "samples", {"images-rank00000.h5": b"h5"}, inputs=[checkpoint])
    return latents, checkpoint, samples


def edit_manifest(path, **changes):
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_records_files_hashes_and_inputs(chain):
    latents, checkpoint, _ = chain
    opened = open_artifact(checkpoint.path, "checkpoint")
    assert opened.manifest["schema"] == SCHEMA_VERSION and opened.kind == "checkpoint"
    assert opened.manifest["files"]["model.safetensors"] == {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert opened.inputs == [{"kind": "latents", "id": latents.id, "path": str(latents.path.resolve())}]
    assert not staging_dir(checkpoint.path).exists()


def test_content_id_depends_only_on_file_contents(tmp_path):
    one = make(tmp_path / "a", "latents", {"f": b"same"}, config={"x": 1})
    two = make(tmp_path / "b", "latents", {"f": b"same"}, config={"x": 2})
    three = make(tmp_path / "c", "latents", {"f": b"other"})
    assert one.id == two.id != three.id


def test_artifacts_are_never_overwritten(chain):
    latents, _, _ = chain
    with pytest.raises(ArtifactError, match="already exists"):
        begin_artifact(latents.path)


def test_open_refuses_wrong_kind_newer_schema_and_missing_files(chain):
    latents, checkpoint, _ = chain
    with pytest.raises(ArtifactError, match="is a 'latents' artifact, expected 'checkpoint'"):
        open_artifact(latents.path, "checkpoint")
    edit_manifest(checkpoint.path, schema=SCHEMA_VERSION + 1)
    with pytest.raises(ArtifactError, match="newer than this sitctl"):
        open_artifact(checkpoint.path)
    (latents.path / "shard-000000.tar").unlink()
    with pytest.raises(ArtifactError, match="shard-000000.tar listed in the manifest is missing"):
        open_artifact(latents.path)


def test_unfinished_artifact_is_not_read_as_finished(tmp_path):
    begin_artifact(tmp_path / "half")
    with pytest.raises(ArtifactError, match="not finished"):
        open_artifact(tmp_path / "half")


def test_verify_catches_same_size_tampering(chain):
    latents, _, _ = chain
    assert verify_artifact(latents.path).id == latents.id
    (latents.path / "shard-000000.tar").write_bytes(b"y" * 100)  # same size: only the hash can tell
    open_artifact(latents.path)
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        verify_artifact(latents.path)


def test_lineage_reaches_raw_data_and_marks_missing_parents(chain):
    latents, checkpoint, samples = chain
    assert ancestor(open_artifact(samples.path), "latents").id == latents.id
    console = Console(record=True, width=200, file=io.StringIO())
    show(samples.path, console=console)
    tree = console.export_text().split(f"samples {samples.id}")[-1].splitlines()[1:]  # below the root
    assert tree == [
        f"└── checkpoint {checkpoint.id}  {checkpoint.path}",
        f"    └── latents {latents.id}  {latents.path}",
        "        └── raw data digits",
    ]
    (checkpoint.path / MANIFEST).unlink()
    console = Console(record=True, width=200, file=io.StringIO())
    show(samples.path, console=console)
    assert console.export_text().splitlines()[-1].endswith(f"checkpoint {checkpoint.id}  {checkpoint.path}  (missing)")


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_cli_verify_and_show(chain):
    latents, checkpoint, samples = chain
    ok = run_cli("verify", str(latents.path))
    assert ok.returncode == 0 and ok.stdout.startswith(f"OK {latents.path}: latents {latents.id}, 1 files verified")
    shown = run_cli("show", str(samples.path))
    assert shown.returncode == 0 and "raw data digits" in shown.stdout and latents.id in shown.stdout
    assert_one_line_error(run_cli("verify", str(latents.path), "--kind", "checkpoint"), "expected 'checkpoint'")
    (latents.path / "shard-000000.tar").write_bytes(b"z" * 100)
    assert_one_line_error(run_cli("verify", str(latents.path)), "does not match its recorded sha256")
    (checkpoint.path / "state.json").unlink()
    assert_one_line_error(run_cli("show", str(checkpoint.path)), "state.json listed in the manifest is missing")
    edit_manifest(samples.path, schema=SCHEMA_VERSION + 1)
    assert_one_line_error(run_cli("verify", str(samples.path)), "upgrade sitctl")
    assert_one_line_error(run_cli("show", str(samples.path.parent / "nowhere")), "no such artifact directory")


# ---------------------------------------------------------------------------------------------
# Hand edits and names outside the artifact
# ---------------------------------------------------------------------------------------------


def forge_manifest(path, files=None, **changes):
    """Edit a manifest as a careful attacker would: id and digest recomputed to match the edit."""
    from sitctl.artifacts import content_id, manifest_digest

    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    if files is not None:
        manifest["files"] = files
        manifest["id"] = content_id(files)
    manifest["digest"] = manifest_digest(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_a_hand_edited_manifest_is_refused_on_open(chain):
    latents, checkpoint, _ = chain
    manifest = json.loads((latents.path / MANIFEST).read_text())
    manifest["extra"]["num_samples"] = 3000  # a shard count or scale factor changed by hand
    (latents.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="edited after it was written"):
        open_artifact(latents.path)
    edit_manifest(checkpoint.path, id="0123456789abcdef")
    with pytest.raises(ArtifactError, match="does not match its file table"):
        open_artifact(checkpoint.path)


@pytest.mark.parametrize("field", ["files", "id", "inputs", "config"])
def test_a_manifest_missing_a_field_is_refused_in_one_line(chain, field):
    latents, _, _ = chain
    manifest = json.loads((latents.path / MANIFEST).read_text())
    del manifest[field]
    (latents.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"'{field}' is missing"):
        open_artifact(latents.path)


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/hostname", "a/../../x", "./f", "a//b", ""])
def test_file_entries_outside_the_artifact_are_refused_before_reading(tmp_path, name):
    (tmp_path / "secret.txt").write_bytes(b"secret")
    artifact = make(tmp_path / "a", "latents", {"f": b"data"})
    forge_manifest(artifact.path, files={name: {"size": 1, "sha256": "0" * 64}})
    for opener in (open_artifact, verify_artifact):
        with pytest.raises(ArtifactError, match="not a plain relative path") as caught:
            opener(artifact.path)
        assert "bytes" not in str(caught.value)  # nothing about the real file leaks


def test_a_symlink_leading_out_of_the_artifact_is_refused(tmp_path):
    (tmp_path / "secret.txt").write_bytes(b"secret")
    artifact = make(tmp_path / "a", "latents", {"f": b"secret"})
    (artifact.path / "f").unlink()
    (artifact.path / "f").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ArtifactError, match="leads outside the artifact"):
        verify_artifact(artifact.path)


def test_latents_shard_names_must_be_files_of_the_artifact(tmp_path):
    other = make(tmp_path / "other", "latents", {"shard-000000.tar": b"theirs"})
    latents = make(tmp_path / "mine", "latents", {"shard-000000.tar": b"mine"},
                   extra={"shards": [{"name": "shard-000000.tar", "count": 1}]})
    assert open_artifact(latents.path).extra["shards"][0]["name"] == "shard-000000.tar"
    forge_manifest(latents.path, extra={"shards": [{"name": f"../{other.path.name}/shard-000000.tar", "count": 1}]})
    with pytest.raises(ArtifactError, match="not one of the artifact's own files"):
        open_artifact(latents.path)
