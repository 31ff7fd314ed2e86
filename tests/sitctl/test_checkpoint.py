"""Checkpoint names and picks: steps compare as numbers at any digit count, pruning and resume past the tenth."""

from __future__ import annotations

from dataclasses import asdict

from sitctl.artifacts import begin_artifact, finish_artifact, staging_dir
from sitctl.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, prune_checkpoints


def save(run_dir, step: int, config: dict | None = None, inputs=()):
    """A finished checkpoint artifact of `step` (no weights), named and recorded as save_checkpoint does."""
    out = checkpoint_dir(run_dir, step)
    staging = begin_artifact(out)
    (staging / "state.json").write_text(f'{{"step": {step}}}')
    return finish_artifact(staging, out, kind="checkpoint", config=config or {}, inputs=inputs, extra={"step": step})


def steps(run_dir) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir)]


def test_steps_are_ordered_as_numbers_whatever_their_digit_count(tmp_path):
    every = [123_456_789, 10, 9, 10_000_000, 100, 9_999_999, 99]  # saved out of order on purpose
    for step in every:
        save(tmp_path, step)
    assert checkpoint_dir(tmp_path, 9).name == "step-0000009"
    assert checkpoint_dir(tmp_path, 10_000_000).name == "step-10000000"  # past seven digits the name grows
    assert steps(tmp_path) == sorted(every)
    assert latest_checkpoint(tmp_path).extra["step"] == 123_456_789


def test_an_unfinished_checkpoint_is_never_listed_or_picked(tmp_path):
    for step in range(1, 11):
        save(tmp_path, step)
    staging_dir(checkpoint_dir(tmp_path, 11)).mkdir()  # killed while writing step 11
    checkpoint_dir(tmp_path, 12).mkdir()  # a step directory without a manifest
    assert steps(tmp_path) == list(range(1, 11))
    assert latest_checkpoint(tmp_path).path == checkpoint_dir(tmp_path, 10)
    assert latest_checkpoint(checkpoint_dir(tmp_path, 9)).extra["step"] == 9  # a checkpoint path is itself


def test_pruning_past_the_tenth_keeps_the_last_k_by_step_and_every_multiple_of_m(tmp_path):
    for step in range(1, 13):
        save(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep_last=3, keep_every=4)
    assert steps(tmp_path) == [4, 8, 10, 11, 12]
    assert removed == [1, 2, 3, 5, 6, 7, 9]


def test_train_resumes_from_the_newest_checkpoint_past_the_tenth(digits_latents_dir, tmp_path):
    from sitctl.data import open_latents
    from sitctl.train import find_resume_point
    from tests.sitctl.test_train import tiny

    latents = open_latents(digits_latents_dir)
    config = tiny(digits_latents_dir, tmp_path, steps=20, resume=True)
    for step in (5, 9, 10, 11, 12):
        save(tmp_path, step, asdict(config), [latents.artifact])
    staging_dir(checkpoint_dir(tmp_path, 13)).mkdir()  # killed while saving step 13
    assert find_resume_point(config, latents).path == checkpoint_dir(tmp_path, 12)


def test_pruning_never_removes_the_newest_checkpoint_which_is_the_resume_point(tmp_path):
    # --keep-last 0 --keep-every 5: only milestones are kept, but a save forced by SIGTERM at step 12
    # is what `train --resume` continues from; deleting it right after writing it loses the steps since 10.
    for step in (5, 10, 12):
        save(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=0, keep_every=5)
    assert steps(tmp_path) == [5, 10, 12]
    prune_checkpoints(tmp_path, keep_last=0, keep_every=0)
    assert steps(tmp_path) == [12]


def test_a_checkpoint_recording_an_unknown_interpolant_or_prediction_is_refused_naming_the_field(tmp_path):
    from model.configs import model_config
    from sitctl.checkpoint import checked_model_config
    from sitctl.errors import ArtifactError

    def recorded(name: str, **fields):
        out = tmp_path / name
        staging = begin_artifact(out)
        (staging / "state.json").write_text('{"step": 1}')
        extra = {"step": 1, "model": "SiT-T/2", "model_config": asdict(model_config("SiT-T/2")), "interp": "linear",
                 "pred": "velocity", **fields}
        return finish_artifact(staging, out, kind="checkpoint", config={}, extra=extra)

    assert checked_model_config(recorded("fine")) == model_config("SiT-T/2")
    for name, fields, message in (
        ("interp", {"interp": "cosine"}, "checkpoint manifest has interp='cosine', not one of linear, gvp, vp"),
        ("pred", {"pred": "x0"}, "checkpoint manifest has pred='x0', not one of velocity, score, noise"),
    ):
        artifact = recorded(name, **fields)
        try:
            checked_model_config(artifact)
        except ArtifactError as error:
            assert str(error) == f"{artifact.path}: {message}"
        else:
            raise AssertionError(f"a checkpoint with {fields} was accepted")
