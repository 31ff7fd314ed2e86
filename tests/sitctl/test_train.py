from dataclasses import replace

import pytest
import torch

from sitctl import distributed
from sitctl.artifacts import open_artifact, verify_artifact
from sitctl.checkpoint import list_checkpoints, load_network, prune_checkpoints
from sitctl.errors import ArtifactError, SitctlError
from sitctl.train import NAN_HOOK, NonFiniteLossError, prepare, train, train_loop
from tests.helpers import TINY, assert_same_files, make_latents, run_cli, tiny  # noqa: F401  (TINY: test_identity.py imports it from here)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(digits_latents_dir, tmp_path):
    straight = train(tiny(digits_latents_dir, tmp_path / "straight", steps=5, ckpt_every=5))
    train(tiny(digits_latents_dir, tmp_path / "pieces", steps=2, ckpt_every=100))
    # Resumed with a loader worker process: where samples are read does not change them.
    resumed = train(tiny(digits_latents_dir, tmp_path / "pieces", steps=5, ckpt_every=100, resume=True, loader_workers=1))
    assert resumed.extra["step"] == 5
    assert_same_files(straight.path, resumed.path)
    assert [step for step, _ in list_checkpoints(tmp_path / "pieces")] == [2, 5]


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu_and_the_run_records_which(digits_latents_dir, tmp_path,
                                                                                   monkeypatch):
    from sitctl.train import resolve

    config = tiny(digits_latents_dir, tmp_path / "run", steps=1)
    assert config.precision == "auto"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # a GPU without bf16 (V100)
    assert resolve(config, torch.device("cuda")).precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve(config, torch.device("cuda")).precision == "bf16"
    assert resolve(config, torch.device("cpu")).precision == "fp32"
    assert resolve(tiny(digits_latents_dir, tmp_path, precision="tf32"), torch.device("cuda")).precision == "tf32"
    assert train(config).config["precision"] == "fp32"


def test_resolve_fills_every_derived_setting_once(digits_latents_dir, tmp_path, monkeypatch):
    from sitctl.train import DEFAULT_EVAL_EVERY, resolve

    monkeypatch.chdir(tmp_path)
    config = tiny(digits_latents_dir, tmp_path / "run", steps=1, eval_every=None, log_dir="logs")
    resolved = resolve(config, torch.device("cpu"))
    assert (resolved.eval_every, resolved.log_dir, resolved.repa_depth) == (DEFAULT_EVAL_EVERY, str(tmp_path / "logs"), None)
    assert resolve(replace(config, eval_every=0), torch.device("cpu")).eval_every == 0
    assert resolve(replace(config, repa_encoder="dinov2-vitb14", model="SiT-XL/2"), torch.device("cpu")).repa_depth == 8
    assert resolve(resolved, torch.device("cpu")) == resolved  # resolving twice changes nothing
    assert resolve(replace(config, data_lanes=None, global_batch=256), torch.device("cpu"), world_size=32).data_lanes == 32


def test_checkpoint_links_its_latents_and_rebuilds_the_network_alone(digits_latents_dir, tmp_path):
    config = tiny(digits_latents_dir, tmp_path / "run", steps=3, ckpt_every=3, preview_every=3, preview_images=4, preview_steps=2)
    d = distributed.setup("cpu")
    run = prepare(config, d)
    train_loop(run)
    run.batches.close()
    checkpoint = open_artifact(tmp_path / "run" / "step-0000003", "checkpoint")
    latents = open_artifact(digits_latents_dir)
    assert checkpoint.inputs == [latents.ref()]
    assert checkpoint.extra["model_config"]["input_size"] == 8 and checkpoint.extra["interp"] == "linear"
    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
    for ema, trained in ((True, run.ema), (False, run.net)):
        net, model_config = load_network(tmp_path / "run", ema=ema)  # a run dir: its latest checkpoint
        assert model_config == run.model_config
        with torch.no_grad():
            assert torch.equal(net(x, t, y), trained.eval()(x, t, y))
    assert (tmp_path / "run" / "previews" / "step-0000003.png").is_file()
    assert (tmp_path / "run" / "loss.png").is_file()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(digits_latents_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_HOOK, "3")
    with pytest.raises(NonFiniteLossError, match=r"at step 3; .*step-0000002"):
        train(tiny(digits_latents_dir, tmp_path / "run", steps=5, ckpt_every=2))
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    verify_artifact(tmp_path / "run" / "step-0000002")
    assert not list(tmp_path.glob("run/.*partial"))


def test_nan_loss_between_log_lines_is_caught_before_the_next_save(digits_latents_dir, tmp_path, monkeypatch):
    # No log line reads the loss at step 3 (log every 10): the step-4 checkpoint must not be written.
    monkeypatch.setenv(NAN_HOOK, "3")
    with pytest.raises(NonFiniteLossError, match=r"at step 3; stopped at step 4 .*step-0000002"):
        train(tiny(digits_latents_dir, tmp_path / "run", steps=6, ckpt_every=2, log_every=10))
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no row was logged from the bad steps


def test_mismatched_inputs_fail_before_any_compute(digits_latents_dir, tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        train(tiny(tmp_path / "nothing-here", tmp_path / "a", steps=1))
    odd = make_latents(tmp_path / "odd", shape=(3, 6, 6))
    with pytest.raises(SitctlError, match="SiT-T/4 does not fit latents .* 3x6x6: input_size 6 is not divisible by patch_size 4"):
        train(tiny(odd.path, tmp_path / "b", steps=1, model="SiT-T/4"))
    with pytest.raises(SitctlError, match="--micro-batch 3 does not divide the per-rank batch 8"):
        train(tiny(digits_latents_dir, tmp_path / "c", steps=1, micro_batch=3))
    train(tiny(digits_latents_dir, tmp_path / "d", steps=1))
    with pytest.raises(SitctlError, match="already holds checkpoints .* pass --resume"):
        train(tiny(digits_latents_dir, tmp_path / "d", steps=2))
    with pytest.raises(SitctlError, match="made with --seed 0, now 1"):
        train(tiny(digits_latents_dir, tmp_path / "d", steps=2, resume=True, seed=1))


def test_cli_reports_a_wrong_artifact_kind_in_one_line(digits_latents_dir, tmp_path):
    train(tiny(digits_latents_dir, tmp_path / "run", steps=1))
    result = run_cli("train", tmp_path / "run" / "step-0000001", "--out", tmp_path / "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path}/run/step-0000001 is a 'checkpoint' artifact, expected 'latents'"]


def test_pruning_keeps_the_last_k_and_every_mth(tmp_path):
    for step in range(100, 1100, 100):
        (tmp_path / f"step-{step:07d}").mkdir()
        (tmp_path / f"step-{step:07d}" / "manifest.json").write_text("{}")
    prune_checkpoints(tmp_path, keep_last=2, keep_every=300)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [300, 600, 900, 1000]


def test_preview_decodes_samples_through_the_latents_vae(tiny_vae_dir, tmp_path):
    from PIL import Image

    from sitctl.encode import EncodeConfig, encode

    latents = encode(EncodeConfig(src="digits", out=str(tmp_path / "latents"), image_size=16, vae=str(tiny_vae_dir),
                                  limit=16, shard_size=16, workers=0))
    assert latents.extra["latent_shape"] == [4, 8, 8]
    train(tiny(latents.path, tmp_path / "run", steps=1, preview_every=1, preview_images=4, preview_steps=1))
    # 2x2 grid of decoded 16x16 images, 2-pixel gaps, upscaled 4x: (2 * (16 + 2) + 2) * 4 pixels a side.
    assert Image.open(tmp_path / "run" / "previews" / "step-0000001.png").size == (152, 152)
