"""The workspace: the four everyday commands work exactly as typed, in an empty directory.

The encode line loads the default VAE (`--vae ema`, i.e. `from_pretrained("stabilityai/sd-vae-ft-ema")`)
through a real Hugging Face cache holding a tiny random AutoencoderKL, offline; the source is a
folder of PNGs in class subfolders, so `imagenet/` is literally a folder. Only size options are
added to the documented lines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sitctl.artifacts import open_artifact
from sitctl.cli import app
from sitctl.errors import SitctlError
from tests.helpers import assert_one_error_line, offline_hub, ok, run_cli, run_cli_process

ENCODE = ["encode", "imagenet/", "--image-size", "16", "--workers", "0", "--shard-size", "16", "--device", "cpu"]
TRAIN = ["train", "--interp", "linear", "--pred", "velocity",
         "--model", "SiT-XS/4", "--steps", "4", "--global-batch", "8", "--data-lanes", "2", "--loader-workers", "0",
         "--shuffle-buffer", "8", "--ckpt-every", "2", "--log-every", "2", "--preview-every", "0",
         "--precision", "fp32", "--device", "cpu"]
SAMPLE = ["sample", "--mode", "sde", "--w", "1.0", "--steps", "4", "--num", "6", "--batch-size", "6", "--preview", "0",
          "--device", "cpu"]
EVAL = ["eval", "fid", "--allow-fewer", "--device", "cpu", "--no-fetch", "--batch-size", "32"]
CLASSES, PER_CLASS = 2, 6
HUB_ID = "stabilityai/sd-vae-ft-ema"


def failure(*argv: str) -> str:
    """The message of the one `error: ` line a refused command prints (exit status 2)."""
    done = run_cli(*argv)
    assert_one_error_line(done.returncode, done.stderr)
    return done.stderr.strip().removeprefix("error: ")


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny VAE in a Hugging Face cache, a folder of images, an empty workspace
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_vae_dir):
    """A Hugging Face hub cache holding the tiny VAE as if downloaded from stabilityai/sd-vae-ft-ema."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in Path(tiny_vae_dir).iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """imagenet/: 2 class folders of 6 random 20x20 PNGs (cropped to 16 by encode)."""
    root = tmp_path_factory.mktemp("data") / "imagenet"
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        (root / f"n{label:08d}").mkdir(parents=True)
        for index in range(PER_CLASS):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"n{label:08d}" / f"img{index}.png")
    return root


@pytest.fixture
def workspace(tmp_path, monkeypatch, hub_cache, images) -> Path:
    """An empty directory holding only imagenet/ (a link), as cwd, with the offline hub cache."""
    (tmp_path / "imagenet").symlink_to(images, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    offline_hub(monkeypatch, hub_cache)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def chain(tmp_path_factory, hub_cache, images):
    """The four documented lines run once in an empty workspace (shared by the tests that read it)."""
    root = tmp_path_factory.mktemp("chain")
    (root / "imagenet").symlink_to(images, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        offline_hub(patch, hub_cache)
        outputs = [ok(*ENCODE), ok(*TRAIN), ok(*SAMPLE), ok(*EVAL)]
    return root, outputs


# ---------------------------------------------------------------------------------------------
# The four lines
# ---------------------------------------------------------------------------------------------


def test_the_four_lines_run_in_an_empty_directory_and_end_with_an_fid(chain):
    root, (encode, train, sample, evaluate) = chain
    assert "writing latents/v1" in encode
    assert "using latents/v1 (imagenet/, 12 images, 16px, vae ema)" in train and "writing runs/v1" in train
    assert "using runs/v1 (SiT-XS/4, linear velocity, step 4/4" in sample and "writing samples/v1" in sample
    assert "using samples/v1 (6 images 16px, sde euler 4 steps w 1.0)" in evaluate
    assert "building references/v1 from" in evaluate and "writing metrics/v1" in evaluate
    fid = json.loads((root / "metrics" / "v1" / "metrics.json").read_text())["fid"]
    assert np.isfinite(fid) and fid > 0
    assert f"fid: {fid:.6g}" in evaluate


def test_the_default_vae_is_the_hub_ema_vae(chain):
    root, _ = chain
    manifest = json.loads((root / "latents" / "v1" / "manifest.json").read_text())
    assert manifest["extra"]["vae"] == {"name": "ema", "source": HUB_ID}
    assert manifest["config"]["vae"] == "ema"


def test_each_stage_records_the_version_before_it_as_its_input(chain):
    root, _ = chain
    inputs = lambda path: [Path(ref["path"]).resolve() for ref in json.loads((path / "manifest.json").read_text())["inputs"]]
    checkpoint = root / "runs" / "v1" / "step-0000004"
    assert inputs(checkpoint) == [(root / "latents" / "v1").resolve()]
    assert inputs(root / "samples" / "v1") == [checkpoint.resolve()]
    assert inputs(root / "metrics" / "v1") == [(root / "samples" / "v1").resolve(), (root / "references" / "v1").resolve()]


def test_the_automatic_reference_matches_the_lineage_and_is_reused(chain, monkeypatch):
    from sitctl.configs import EvalConfig
    from sitctl.defaults import with_defaults

    root, _ = chain
    reference = json.loads((root / "references" / "v1" / "manifest.json").read_text())
    assert reference["extra"]["source"] == str(root.joinpath("imagenet").resolve())
    assert reference["extra"]["image_size"] == 16 and reference["extra"]["num_images"] == CLASSES * PER_CLASS
    monkeypatch.chdir(root / "runs")  # from a subfolder, as git: the marker names the workspace
    said: list[str] = []
    config = with_defaults(EvalConfig(allow_fewer=True, device="cpu", fetch_weights=False), say=said.append)
    assert Path(config.samples) == root / "samples" / "v1" and Path(config.ref) == root / "references" / "v1"
    assert Path(config.out) == root / "metrics" / "v2"
    assert said[1].startswith("using references/v1 (") and not any("building" in line for line in said)
    assert not (root / "references" / "v2").exists()


def test_ls_show_and_verify_take_the_same_names(chain, monkeypatch):
    root, _ = chain
    monkeypatch.chdir(root)
    listing = CliRunner().invoke(app, ["ls"], terminal_width=80).output
    for name in ("latents/v1", "runs/v1", "samples/v1", "references/v1", "metrics/v1"):
        assert name in listing
    assert max(len(line) for line in listing.splitlines()) <= 80
    samples_id = json.loads((root / "samples" / "v1" / "manifest.json").read_text())["id"]
    assert samples_id[:8] in listing
    for name in ("samples/v1", samples_id[:6], str(root / "samples" / "v1")):
        assert f"samples {samples_id}" in ok("verify", name)
    assert "step-0000004" in ok("show", "runs/v1")


def test_eval_table_reads_the_workspace_results_at_80_columns(chain, monkeypatch):
    root, _ = chain
    monkeypatch.chdir(root)
    table = CliRunner().invoke(app, ["eval", "table"], terminal_width=80).output
    assert "samples/v1" in table and "…" not in table
    assert max(len(line) for line in table.splitlines()) <= 80


# ---------------------------------------------------------------------------------------------
# Versions: never rewritten, only finished ones picked
# ---------------------------------------------------------------------------------------------


def test_a_rerun_makes_v2_leaves_v1_untouched_and_the_next_stage_picks_v2(workspace):
    ok(*ENCODE)
    before = (workspace / "latents" / "v1" / "manifest.json").read_bytes()
    assert "writing latents/v2" in ok(*ENCODE)
    assert (workspace / "latents" / "v1" / "manifest.json").read_bytes() == before
    output = ok(*TRAIN[:-2], "--steps", "2", "--device", "cpu")
    assert "using latents/v2 (" in output


def test_a_killed_encode_leaves_nothing_a_later_stage_picks(workspace):
    # A real process, on one torch thread as this one: the hook exits it at once, as a kill would.
    killed = run_cli_process(*ENCODE, "--shard-size", "4", env={"SITCTL_TEST_CRASH_AFTER_SHARDS": "1"})
    assert killed.returncode == 75, killed.stderr
    assert (workspace / "latents" / ".v1.partial").is_dir() and not (workspace / "latents" / "v1").exists()
    message = failure(*TRAIN)
    assert "no finished latents artifact" in message and "sitctl encode SRC" in message
    # Other settings (the default shard size) start the next version and say how to resume the first.
    assert "writing latents/v2 (latents/v1 unfinished: rerun with --out latents/v1 to resume it)" in ok(*ENCODE)
    assert "using latents/v2" in ok(*TRAIN[:-2], "--steps", "2", "--device", "cpu")
    # The killed command, typed again, continues its own version, to the bytes of a run never killed.
    assert "resuming latents/v1 (interrupted, begun by this same command)" in ok(*ENCODE, "--shard-size", "4")
    ok(*ENCODE, "--shard-size", "4", "--out", "straight")
    assert open_artifact(workspace / "latents" / "v1").id == open_artifact(workspace / "straight").id
    assert not (workspace / "latents" / "v3").exists() and not (workspace / "latents" / "v1" / "request.json").exists()


def test_a_killed_sample_typed_again_resumes_its_version_and_other_settings_do_not(workspace):
    from sitctl.sample import CRASH_HOOK

    ok(*ENCODE)
    ok(*TRAIN)
    command = [*SAMPLE[:SAMPLE.index("--batch-size")], "--batch-size", "2", *SAMPLE[SAMPLE.index("--batch-size") + 2:]]
    killed = run_cli_process(*command, env={CRASH_HOOK: "1"})  # one torch thread as here: the same bytes resumed
    assert killed.returncode == 17, killed.stderr
    assert "writing samples/v2 (samples/v1 unfinished" in ok(*command, "--w", "0.5")
    assert "resuming samples/v1 (interrupted, begun by this same command)" in ok(*command)
    ok(*command, "--out", "straight")
    assert open_artifact(workspace / "samples" / "v1").id == open_artifact(workspace / "straight").id


def test_resume_without_a_path_continues_the_latest_run_on_its_own_latents(workspace):
    ok(*ENCODE)
    ok(*TRAIN[:-2], "--steps", "2", "--device", "cpu")
    ok(*ENCODE)  # latents/v2 exists now, but the run was trained on v1
    output = ok(*TRAIN, "--resume")
    assert "resuming runs/v1" in output and "using latents/v1" in output
    steps = sorted(path.name for path in (workspace / "runs" / "v1").glob("step-*"))
    assert steps == ["step-0000002", "step-0000004"] and not (workspace / "runs" / "v2").exists()


def test_explicit_paths_work_as_before_and_write_no_marker(workspace):
    ok(*ENCODE, "--out", "mine/latents-a")
    assert (workspace / "mine" / "latents-a" / "manifest.json").is_file()
    assert not (workspace / ".sitctl-workspace").exists() and not (workspace / "latents").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needs", [
    (TRAIN, "sitctl encode SRC"), (SAMPLE, "sitctl train"), (EVAL, "sitctl sample")])
def test_a_stage_with_nothing_to_read_names_the_command_that_makes_it(workspace, argv, needs):
    message = failure(*argv)
    assert message.startswith("no finished") and f"`{needs}`" in message


def test_a_missing_version_lists_the_ones_there(workspace):
    ok(*ENCODE)
    message = failure("train", "latents/v7", *TRAIN[1:])
    assert message.startswith("latents/v7 does not exist") and "latents: latents/v1" in message


def test_an_ambiguous_id_prefix_is_refused(workspace):
    # Two valid artifacts whose content ids share their first 4 hex digits: search file contents
    # until two ids collide there (about 300 tries by the birthday bound).
    import hashlib

    from sitctl.artifacts import content_id

    seen: dict[str, tuple[bytes, dict]] = {}
    for counter in range(200_000):
        data = str(counter).encode()
        files = {"note.txt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        prefix = content_id(files)[:4]
        if prefix in seen:
            break
        seen[prefix] = (data, files)
    for number, (data, files) in ((1, seen[prefix]), (2, (data, files))):
        path = workspace / "latents" / f"v{number}"
        path.mkdir(parents=True)
        (path / "note.txt").write_bytes(data)
        (path / "manifest.json").write_text(json.dumps(
            {"schema": 1, "kind": "latents", "id": content_id(files), "config": {}, "inputs": [], "extra": {}, "files": files}))
    message = failure("show", prefix)
    assert message.startswith(f"id prefix {prefix} is ambiguous") and "latents/v1" in message and "latents/v2" in message
    second = content_id(files)  # a longer prefix that only one of them has picks it
    longer = next(second[:n] for n in range(5, 17) if not content_id(seen[prefix][1]).startswith(second[:n]))
    assert second in ok("show", longer)


def make_reference(out: Path, source: str, image_size: int) -> Path:
    """A reference artifact's manifest as build_reference writes it (only its records are read here)."""
    from sitctl.artifacts import begin_artifact, finish_artifact

    staging = begin_artifact(out)
    (staging / "statistics.npz").write_bytes(b"unused")
    finish_artifact(staging, out, kind="reference", config={"source": source, "image_size": image_size},
                    extra={"num_images": 2, "image_size": image_size, "source": source})
    return out


def test_a_reference_of_another_size_or_source_is_refused(chain, monkeypatch, tmp_path):
    root, _ = chain
    monkeypatch.chdir(root)
    other_folder = make_reference(tmp_path / "source", str(tmp_path / "other-images"), 16)
    digits = make_reference(tmp_path / "digits", "digits:holdout", 16)
    bigger = make_reference(tmp_path / "size", str(root.joinpath("imagenet").resolve()), 32)
    assert "was made from" in failure(*EVAL, "--ref", str(other_folder))
    assert "was made from digits:holdout" in failure(*EVAL, "--ref", str(digits))
    assert "holds 32px images but the samples" in failure(*EVAL, "--ref", str(bigger))


def test_a_user_error_is_one_line_and_exit_2(workspace):
    result = run_cli("sample")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no finished train run")


def test_under_torchrun_a_missing_out_is_refused_not_guessed(workspace, monkeypatch):
    from sitctl.configs import EncodeConfig
    from sitctl.defaults import with_defaults
    from sitctl.workspace import WorkspaceError

    monkeypatch.setenv("WORLD_SIZE", "2")  # each rank would count versions on its own and pick apart
    with pytest.raises(WorkspaceError, match="under torchrun pass --out"):
        with_defaults(EncodeConfig(src="imagenet/"), say=lambda line: None)
    config = with_defaults(EncodeConfig(src="imagenet/", out="latents/in16"), say=lambda line: None)
    assert config.out == "latents/in16"


# ---------------------------------------------------------------------------------------------
# "latest" and "next" past v9 (issue 24): numbers compare as numbers, unfinished ones never picked
# ---------------------------------------------------------------------------------------------


def finished(out: Path, kind: str = "samples", *, config=None, extra=None, note: str | None = None):
    """A finished artifact of `kind` at `out` holding note.txt: by default its own path, so content ids
    differ per path; `note=""` leaves it empty of files (the id of no content, the same for all)."""
    from sitctl.artifacts import begin_artifact, finish_artifact

    staging = begin_artifact(out)
    if note != "":
        (staging / "note.txt").write_text(str(out) if note is None else note)
    return finish_artifact(staging, out, kind=kind, config=config or {}, extra=extra or {})


def test_latest_and_resolve_take_v10_after_v9_and_v12_last(tmp_path):
    from sitctl.workspace import finished_versions, latest, next_version, resolve

    for number in range(1, 13):
        finished(tmp_path / "samples" / f"v{number}")
    assert [version.number for version in finished_versions(tmp_path, "samples")] == list(range(1, 13))
    assert latest(tmp_path, "samples").name == "samples/v12"
    assert resolve("samples/v10", ("samples",), tmp_path) == tmp_path / "samples" / "v10"
    assert resolve("samples/v1", ("samples",), tmp_path) == tmp_path / "samples" / "v1"
    assert next_version(tmp_path, "samples") == tmp_path / "samples" / "v13"
    shutil.rmtree(tmp_path / "samples" / "v3")  # a deleted version: the next is still past the newest
    assert next_version(tmp_path, "samples") == tmp_path / "samples" / "v13"


def test_next_after_v9_is_v10_and_after_an_unfinished_v10_is_v11_which_latest_never_picks(tmp_path):
    from sitctl.artifacts import staging_dir
    from sitctl.workspace import latest, next_version, unfinished

    for number in range(1, 10):
        finished(tmp_path / "latents" / f"v{number}", kind="latents")
    assert next_version(tmp_path, "latents") == tmp_path / "latents" / "v10"
    staging_dir(tmp_path / "latents" / "v10").mkdir()  # a killed encode: .v10.partial
    assert next_version(tmp_path, "latents") == tmp_path / "latents" / "v11"
    assert unfinished(tmp_path, "latents") == ["latents/v10"]
    assert latest(tmp_path, "latents").name == "latents/v9"
    (tmp_path / "latents" / "v11").mkdir()  # a version directory without a manifest: not finished either
    assert latest(tmp_path, "latents").name == "latents/v9"
    assert next_version(tmp_path, "latents") == tmp_path / "latents" / "v12"


def test_the_latest_run_is_v10_after_v9_and_its_newest_checkpoint_is_step_10_after_step_9(tmp_path):
    from sitctl.artifacts import staging_dir
    from sitctl.workspace import latest, latest_run_dir

    runs = tmp_path / "runs"
    finished(runs / "v9" / "step-0000012", kind="checkpoint")
    for step in (9, 10):
        finished(runs / "v10" / f"step-{step:07d}", kind="checkpoint")
    staging_dir(runs / "v10" / "step-0000011").mkdir(parents=True)  # a checkpoint being written
    staging_dir(runs / "v11" / "step-0000001").mkdir(parents=True)  # a run with no finished checkpoint yet
    newest = latest(tmp_path, "checkpoint")
    assert newest.name == "runs/v10" and newest.artifact.path == runs / "v10" / "step-0000010"
    assert latest_run_dir(tmp_path) == runs / "v11"  # what `train --resume` continues, finished or not



def test_the_facts_and_ages_ls_shows_are_exact(tmp_path):
    import datetime

    from rich.console import Console

    from sitctl.workspace import age, facts, ls_table

    def made(name, kind, config=None, extra=None):
        return finished(tmp_path / name, kind, config=config, extra=extra, note="")

    metrics = made("metrics/v1", "metrics", extra={"values": {"fid": 12.34567, "sfid": 3.0}, "num_samples": 50000})
    assert facts(metrics) == "fid 12.35, sfid 3 (50,000 samples)"
    assert facts(made("metrics/v2", "metrics")) == " (0 samples)"
    latents = made("latents/v1", "latents", {"src": "imagenet/"}, {"num_samples": 1281167, "image_size": 256,
                                                                    "vae": {"name": "ema"}})
    assert facts(latents) == "imagenet/, 1,281,167 images, 256px, vae ema"
    samples = made("samples/v1", "samples", {"mode": "sde", "method": "euler", "steps": 250, "w": 1.0, "cfg_scale": 1.5},
                   {"num_samples": 50000, "image_size": 256})
    assert facts(samples) == "50,000 images 256px, sde euler 250 steps w 1.0 cfg 1.5"
    reference = made("references/v1", "reference", {}, {"source": "imagenet/", "num_images": 10000, "image_size": 256})
    assert facts(reference) == "imagenet/, 10,000 images 256px"
    assert facts(made("latents/v2", "latents")) == ""  # an older manifest without the record: no facts, no error
    ode = made("samples/v2", "samples", {"mode": "ode", "method": "dopri5", "steps": 50, "num": 8}, {"image_size": 32})
    assert facts(ode) == "8 images 32px, ode dopri5 50 steps"  # no w for an ODE, no cfg at scale 1; the count asked for
    (tmp_path / "runs/v1").mkdir(parents=True)
    (tmp_path / "runs/v1/metrics.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"step": 60, "loss": 0.9}, {"step": 100, "loss": 0.5}, {"step": 200, "loss": 0.25}, {"step": 200, "fid": 80.0}, {"step": 300, "loss": 0.1}]))
    checkpoint = made("runs/v1/step-0000200", "checkpoint", {"steps": 400000},
                      {"model": "SiT-XL/2", "interp": "linear", "pred": "velocity", "step": 200})
    assert facts(checkpoint) == "SiT-XL/2, linear velocity, step 200/400,000, loss 0.2500"  # the loss at its step
    early = made("runs/v1/step-0000050", "checkpoint", {}, {"model": "SiT-XL/2", "interp": "gvp", "pred": "score",
                                                             "step": 50})
    assert facts(early) == "SiT-XL/2, gvp score, step 50/0"  # nothing logged yet at step 50

    created = datetime.datetime.fromisoformat(metrics.manifest["created"])
    for seconds, shown in [(-5, "0s"), (0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"),
                           (86399, "23h"), (86400, "1d"), (2 * 86400 + 5, "2d")]:
        assert age(metrics, created + datetime.timedelta(seconds=seconds)) == shown

    console = Console(width=150, record=True)
    console.print(ls_table(tmp_path))
    assert console.export_text().splitlines()[0].rstrip() == f"workspace {tmp_path}"  # the title, at the left


def test_ls_draws_every_version_with_long_facts_folded_and_names_kept_whole(tmp_path, monkeypatch):
    from rich.console import Console

    from sitctl import workspace
    from sitctl.artifacts import staging_dir

    def made(name, kind, config, extra):
        finished(tmp_path / name, kind, config=config, extra=extra, note="")

    made("latents/v1", "latents", {"src": "/data/imagenet"},
         {"num_samples": 1281167, "image_size": 256, "vae": {"name": "stabilityai/sd-vae-ft-ema"}})
    staging_dir(tmp_path / "latents/v2").mkdir(parents=True)  # killed while being written
    made("metrics/v1", "metrics", {}, {"values": {"fid": 2.06, "sfid": 4.49, "is": 277.5, "precision": 0.83,
                                                                    "recall": 0.59}, "num_samples": 50000})
    monkeypatch.setattr(workspace, "age", lambda artifact, now=None: "5m")  # ages: test_the_facts_and_ages_...
    table = workspace.ls_table(tmp_path)
    table.title = None  # it holds tmp_path; its place: test_the_facts_and_ages_ls_shows_are_exact
    console = Console(width=60, record=True)
    console.print(table)
    assert console.export_text().splitlines() == [
        '┏━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━━━━━━┓',
        '┃ version    ┃ id       ┃ age ┃ from      ┃ facts          ┃',
        '┡━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━━━━━━┩',
        '│ latents/v1 │ e3b0c442 │  5m │ imagenet/ │ /data/imagenet │',
        '│            │          │     │           │ , 1,281,167    │',
        '│            │          │     │           │ images, 256px, │',
        '│            │          │     │           │ vae            │',
        '│            │          │     │           │ stabilityai/sd │',
        '│            │          │     │           │ -vae-ft-ema    │',
        '│ latents/v2 │ -        │   - │ -         │ unfinished     │',
        '│            │          │     │           │ (never picked) │',
        '│ metrics/v1 │ e3b0c442 │  5m │ -         │ fid 2.06, sfid │',
        '│            │          │     │           │ 4.49, is       │',
        '│            │          │     │           │ 277.5,         │',
        '│            │          │     │           │ precision      │',
        '│            │          │     │           │ 0.83, recall   │',
        '│            │          │     │           │ 0.59 (50,000   │',
        '│            │          │     │           │ samples)       │',
        '└────────────┴──────────┴─────┴───────────┴────────────────┘',
    ]
    narrow = Console(width=50, record=True)  # too narrow for all: the facts give way, names and ids stay whole
    narrow.print(table)
    assert "│ latents/v1 │ e3b0c442 │  5m │ imagenet/ │ /dat │" in narrow.export_text().splitlines()


def test_every_checkpoint_and_version_is_found_by_its_id_and_an_unknown_or_ambiguous_prefix_is_one_line(tmp_path):
    from sitctl.workspace import _input_name, all_artifacts, facts, resolve, resolve_any, version_name

    def made(name, kind, note="", config=None):  # a note gives the artifact its own content id
        return finished(tmp_path / name, kind, config=config, extra={"step": 1}, note=note)

    latents = made("latents/v1", "latents", "a")
    made("latents/v2", "samples", "b")  # another kind in the latents folder: never taken for latents
    made("runs/v1/step-0000001", "samples", "c")  # likewise inside a run; the next step is still found
    step = made("runs/v1/step-0000002", "checkpoint", "d")
    labels = {label: artifact.id for label, artifact in all_artifacts(tmp_path)}
    assert labels == {"latents/v1": latents.id, "runs/v1/step-0000002": step.id}
    assert resolve(step.id[:6], ("checkpoint",), tmp_path) == step.path
    assert resolve_any("latents/v1", tmp_path) == latents.path  # the root it is given, wherever the shell is
    assert _input_name({"path": str(latents.path), "kind": "latents", "id": latents.id}, tmp_path) == "latents/v1"
    assert version_name(tmp_path / "latents", tmp_path) is None and version_name(tmp_path / "notes/v1", tmp_path) is None
    assert _input_name({"path": "/elsewhere/l", "kind": "latents", "id": "0123456789abcdef"}, tmp_path) == "latents 01234567"
    reference = made("references/v1", "reference", "", {"sample_of": "latents/v1"})
    assert facts(type(reference)(path=reference.path, manifest={**reference.manifest, "extra": {
        "source": "imagenet/", "num_images": 8, "image_size": 32}})) == "latents/v1, 8 images 32px"  # what it samples

    for number in range(1, 8):  # seven empty artifacts share the id of no content
        made(f"metrics/v{number}", "metrics")
    empty = next(artifact.id for label, artifact in all_artifacts(tmp_path, ("metrics",)))
    with pytest.raises(SitctlError) as error:
        resolve(empty[:8], ("metrics",), tmp_path)
    assert str(error.value) == (f"id prefix {empty[:8]} is ambiguous: "
                                + ", ".join(f"metrics/v{n} ({empty})" for n in range(1, 7)) + "; give more digits")
    with pytest.raises(SitctlError) as error:
        resolve("fedcba98", ("latents", "checkpoint"), tmp_path)
    assert str(error.value) == f"no artifact in the workspace {tmp_path} has an id starting with fedcba98"


def test_ls_names_where_each_version_came_from_and_a_runs_logs_and_skips_only_the_unfinished(tmp_path):
    from rich.console import Console

    from sitctl.artifacts import staging_dir
    from sitctl.workspace import latest_run_dir, ls_table

    with pytest.raises(SitctlError) as error:
        latest_run_dir(tmp_path)
    assert str(error.value) == f"no run in {tmp_path / 'runs'} to resume; start one with `sitctl train`"

    def made(name, kind, config):
        return finished(tmp_path / name, kind, config=config, extra={"step": 3}, note="")

    staging_dir(tmp_path / "references/v1").mkdir(parents=True)  # unfinished, before finished ones
    made("references/v2", "reference", {"sample_of": "latents/v1"})
    made("references/v3", "reference", {"source": "/data/fashion-mnist"})
    made("runs/v1/step-0000003", "checkpoint", {"tracker": "tensorboard"})
    console = Console(width=200, record=True)
    console.print(ls_table(tmp_path))
    text = console.export_text().splitlines()
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]] for line in text if line.startswith("│")}
    assert rows["references/v1"][3] == "unfinished (never picked)"
    assert rows["references/v2"][2] == "latents/v1" and rows["references/v3"][2] == "fashion-mnist/"
    assert rows["runs/v1"][2] == "-" and rows[""][3] == "tensorboard logs: runs/v1/logs"  # on a line of its own
    assert max(len(line.rstrip()) for line in text) < 150  # not stretched to the console's width


def test_names_resolve_inside_versions_and_missing_ones_list_what_there_is(tmp_path, monkeypatch):
    from sitctl.workspace import MARKER, claim, find_root, latest, name_of, resolve

    root = tmp_path / "new" / "workspace"  # its parent does not exist yet
    claim(root)
    assert json.loads((root / MARKER).read_text()) == {"workspace": 1, "folders": sorted(
        ["latents", "runs", "samples", "references", "metrics"])}
    assert (root / MARKER).read_text().endswith("}\n") and find_root(root / "deeper") == root
    for number in (1, 2):
        finished(root / f"runs/v{number}/step-0000003", "checkpoint", extra={"step": 3}, note="")
    monkeypatch.chdir(tmp_path)  # outside the workspace: the root given is the one used
    assert resolve("runs/v2/step-0000003", ("checkpoint",), root) == root / "runs/v2/step-0000003"
    assert resolve("run/v1", ("checkpoint",), root) == root / "runs/v1"
    assert resolve("nothing/here", ("checkpoint",), root) == Path("nothing/here")  # not a name: left to the stage
    with pytest.raises(SitctlError) as error:
        resolve("runs/v9", ("checkpoint",), root)
    assert str(error.value) == f"runs/v9 does not exist in the workspace {root} (runs: runs/v1, runs/v2)"
    with pytest.raises(SitctlError) as error:
        latest(root, "samples")
    assert str(error.value) == f"no finished samples artifact in samples/ of the workspace {root} yet; make one with `sitctl sample`"
    with pytest.raises(SitctlError) as error:
        latest(tmp_path, "checkpoint")
    assert str(error.value).startswith("no finished train run (with a checkpoint) in runs/ of the workspace")
    assert name_of("/elsewhere/x", root) == "/elsewhere/x" and name_of(root / "runs/v1/step-0000003", root) == "runs/v1"


def test_a_version_holding_another_kind_is_skipped_and_ls_shows_each_input_and_outside_logs_on_its_own_line(tmp_path):
    from rich.console import Console

    from sitctl.artifacts import begin_artifact, finish_artifact
    from sitctl.workspace import finished_versions, latest, ls_table

    samples = finished(tmp_path / "samples/v1", "samples", note="")
    finished(tmp_path / "samples/v2", "latents", note="")  # a latents artifact copied into samples/: not a samples version
    assert [(version.name, version.path) for version in finished_versions(tmp_path, "samples")] == [
        ("samples/v1", tmp_path / "samples/v1")]
    assert latest(tmp_path, "samples").path == samples.path
    reference = finished(tmp_path / "references/v1", "reference", note="")
    metrics = finish_artifact(begin_artifact(tmp_path / "metrics/v1"), tmp_path / "metrics/v1", kind="metrics", config={},
                              inputs=[samples, reference], extra={"values": {"fid": 1.5}, "num_samples": 4})
    logs = tmp_path.parent / f"{tmp_path.name}-logs"  # --log-dir outside the workspace: shown as given, whole
    finished(tmp_path / "runs/v1/step-0000001", "checkpoint", config={"tracker": "tensorboard", "log_dir": str(logs)},
             extra={"step": 1}, note="")
    console = Console(width=400, record=True)
    console.print(ls_table(tmp_path))
    lines = console.export_text().splitlines()
    row = next(index for index, line in enumerate(lines) if "metrics/v1" in line)
    assert [cell.strip() for cell in lines[row].split("│")[1:4]] == ["metrics/v1", metrics.id[:8], "0s"]
    assert [lines[row].split("│")[4].strip(), lines[row + 1].split("│")[4].strip()] == ["samples/v1", "references/v1"]
    assert any(line.split("│")[5].strip() == f"tensorboard logs: {logs}" for line in lines if line.startswith("│"))
