"""Checkpoint names and picks: steps compare as numbers at any digit count, pruning and resume past the tenth."""

from __future__ import annotations

from dataclasses import asdict

import pytest

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
    assert prune_checkpoints(tmp_path, keep_last=1, keep_every=1) == []  # every step is a multiple of 1
    assert prune_checkpoints(tmp_path, keep_last=1, keep_every=0) == [4, 8, 10, 11]  # 0: no multiples kept


def test_train_resumes_from_the_newest_checkpoint_past_the_tenth(digits_latents_dir, tmp_path):
    from sitctl.data import open_latents
    from sitctl.train import find_resume_point
    from tests.helpers import tiny

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
        ("mapping", {"model_config": "SiT-T/2"}, "checkpoint manifest's model_config is not a mapping"),
        ("fields", {"model_config": {"depth": 2, "wings": 3}},
         "checkpoint manifest's model_config is not valid: SiTConfig.__init__() got an unexpected keyword argument 'wings'"),
    ):
        artifact = recorded(name, **fields)
        try:
            checked_model_config(artifact)
        except ArtifactError as error:
            assert str(error).startswith(f"{artifact.path}: {message}")
        else:
            raise AssertionError(f"a checkpoint with {fields} was accepted")


def test_weights_that_do_not_fit_the_recorded_model_are_refused_naming_it(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    from model.configs import model_config
    from model.network import SiT
    from sitctl.checkpoint import load_network
    from sitctl.errors import SitctlError

    config = model_config("SiT-T/2")
    out = checkpoint_dir(tmp_path, 1)
    staging = begin_artifact(out)
    weights = {**SiT(config).state_dict(), "extra.weight": torch.zeros(3)}
    save_file({key: value.contiguous() for key, value in weights.items()}, staging / "ema.safetensors")
    extra = {"step": 1, "model": "SiT-T/2", "model_config": asdict(config), "interp": "linear", "pred": "velocity"}
    finish_artifact(staging, out, kind="checkpoint", config={}, extra=extra)
    with pytest.raises(SitctlError, match=r"^checkpoint does not fit SiT-T/2: unexpected key extra.weight with shape"):
        load_network(tmp_path)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_an_optimizers_state_comes_back_whole_from_a_checkpoint_tensors_and_plain_numbers(tmp_path, momentum):
    # Torch's own optimizers keep tensors only; one that also keeps a plain number gets it back too, and one
    # that keeps plain numbers only (SGD without momentum keeps no buffer) as well.
    import torch

    from sitctl.checkpoint import load_training_state, save_checkpoint

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for parameter in group["params"]:
                    self.state[parameter]["count"] = self.state[parameter].get("count", 0) + 1

    torch.manual_seed(0)
    net, fresh = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    optimizer = CountingSGD(net.parameters(), lr=0.1, momentum=momentum)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 3)).pow(2).sum().backward()
        optimizer.step()
    before = optimizer.state_dict()
    assert before["state"][0]["count"] == 3 and torch.is_tensor(before["state"][0].get("momentum_buffer")) == bool(momentum)
    latents = save(tmp_path / "latents", 1)
    artifact = save_checkpoint(tmp_path / "run", 1, model=net, ema=net, optimizer=optimizer, state={}, config={},
                               latents=latents, extra={})
    restored = CountingSGD(fresh.parameters(), lr=0.1, momentum=momentum)
    saved = load_training_state(artifact, model=fresh, ema=torch.nn.Linear(3, 2), optimizer=restored)
    assert saved["step"] == 1  # state.json records the step it was saved at
    after = restored.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["state"].keys() == before["state"].keys()
    for index, entries in before["state"].items():
        assert after["state"][index]["count"] == entries["count"] == 3
        assert after["state"][index].keys() == entries.keys()
        if momentum:
            assert torch.equal(after["state"][index]["momentum_buffer"], entries["momentum_buffer"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))


def test_a_resumed_optimizer_keeps_its_own_kernel_choice_and_steps_to_the_same_numbers(tmp_path):
    # A run begun on a CPU (foreach AdamW) resumed on a GPU must step fused there, not take the saved flag.
    import torch

    from sitctl.checkpoint import load_training_state, save_checkpoint

    torch.manual_seed(0)
    net, data = torch.nn.Linear(3, 2), torch.randn(8, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, foreach=True)
    for _ in range(2):
        optimizer.zero_grad()
        net(data).pow(2).sum().backward()
        optimizer.step()
    artifact = save_checkpoint(tmp_path / "run", 2, model=net, ema=net, optimizer=optimizer, state={}, config={},
                               latents=save(tmp_path / "latents", 1), extra={})
    fresh = torch.nn.Linear(3, 2)
    fused = torch.optim.AdamW(fresh.parameters(), lr=0.1, fused=True)
    load_training_state(artifact, model=fresh, ema=torch.nn.Linear(3, 2), optimizer=fused)
    assert (fused.param_groups[0]["fused"], fused.param_groups[0]["foreach"]) == (True, None)
    for step_with, model in ((optimizer, net), (fused, fresh)):
        step_with.zero_grad()
        model(data).pow(2).sum().backward()
        step_with.step()
    for ours, theirs in zip(fresh.parameters(), net.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)  # fused and foreach round alike to float32


def test_an_artifact_of_another_kind_is_never_taken_for_a_checkpoint(tmp_path):
    import pytest

    from sitctl.errors import ArtifactError

    other = tmp_path / "latents"
    finish_artifact(begin_artifact(other), other, kind="latents", config={}, extra={})
    with pytest.raises(ArtifactError, match="'latents' artifact, expected 'checkpoint'"):
        latest_checkpoint(other)  # a path that is itself an artifact
    save(tmp_path / "run", 1)
    step = checkpoint_dir(tmp_path / "run", 2)
    finish_artifact(begin_artifact(step), step, kind="samples", config={}, extra={})
    with pytest.raises(ArtifactError, match="'samples' artifact, expected 'checkpoint'"):
        latest_checkpoint(tmp_path / "run")  # the newest step of a run


def test_a_crashed_steps_staging_is_discarded_and_finished_checkpoints_are_kept(tmp_path):
    from sitctl.checkpoint import discard_partial

    save(tmp_path, 1)
    staging = staging_dir(checkpoint_dir(tmp_path, 2))
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "model.safetensors").write_bytes(b"half")
    discard_partial(tmp_path, 2)
    discard_partial(tmp_path, 3)  # nothing there: nothing to do
    assert not staging.exists() and steps(tmp_path) == [1]


def test_a_checkpoint_file_that_is_unlisted_unreadable_altered_or_not_safetensors_is_one_line_naming_it(tmp_path):
    import pytest

    from sitctl.checkpoint import load_tensors, read_verified
    from sitctl.errors import ArtifactError

    out = checkpoint_dir(tmp_path, 1)
    staging = begin_artifact(out)
    (staging / "state.json").write_text('{"step": 1}')
    (staging / "model.safetensors").write_bytes(b"not a safetensors file, though its hash is recorded")
    (staging / "rng.safetensors").write_bytes(b"0123")
    artifact = finish_artifact(staging, out, kind="checkpoint", config={}, extra={"step": 1})
    where = artifact.path
    with pytest.raises(ArtifactError, match=rf"^{where}: model.safetensors is not a readable safetensors file: "):
        load_tensors(artifact, "model.safetensors")
    with pytest.raises(ArtifactError, match=rf"^{where}: the manifest lists no ema.safetensors$"):
        read_verified(artifact, "ema.safetensors")
    (where / "rng.safetensors").write_bytes(b"0124")  # one bit flipped after the manifest was written
    with pytest.raises(ArtifactError, match=rf"^{where}: rng.safetensors does not match its recorded sha256 "
                                            r"\(corrupt or tampered\); refused$"):
        read_verified(artifact, "rng.safetensors")
    (where / "rng.safetensors").unlink()
    with pytest.raises(ArtifactError, match=rf"^{where}: cannot read rng.safetensors: No such file or directory$"):
        read_verified(artifact, "rng.safetensors")


def test_a_checkpoint_that_fills_the_disk_is_one_line_naming_the_disk_and_how_to_go_on(tmp_path):
    import pytest
    import torch

    from sitctl.checkpoint import save_checkpoint
    from sitctl.errors import ArtifactError
    from tests.helpers import small_disk

    net = torch.nn.Linear(64, 64)  # 16 KiB of weights, written twice (model and EMA): more than the disk holds
    latents = save(tmp_path / "latents", 1)
    disk = tmp_path / "disk"
    with small_disk(disk, "16k"):
        with pytest.raises(ArtifactError) as error:
            save_checkpoint(disk / "run", 1, model=net, ema=net, optimizer=torch.optim.SGD(net.parameters()), state={},
                            config={}, latents=latents, extra={})
        staging = staging_dir(checkpoint_dir(disk / "run", 1))
        assert str(error.value) == (f"cannot write checkpoint {staging} (disk mounted at {disk}): No space left on device; "
                                    "free space (or make it writable) and rerun with --resume")
        assert list_checkpoints(disk / "run") == []
