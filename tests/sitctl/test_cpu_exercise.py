"""What a CUDA run takes, exercised on the CPU wherever torch runs it there (issue 33, item 3).

torch.compile runs with the aot_eager backend here: Dynamo traces the same graphs (DDP buckets,
no_sync, REPA's aligned module, guidance) as on a GPU; only inductor's C++ build, minutes on two
cores, is left to the GPU check. bf16 autocast runs on the CPU as on a GPU, with other kernels.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sitctl.artifacts import open_artifact
from sitctl.checkpoint import list_checkpoints
from sitctl.encode import EncodeConfig, encode
from sitctl.metrics_log import metrics_path
from sitctl.plots import read_metrics
from sitctl.sample import SampleConfig, sample_stage
from sitctl.train import train
from tests.helpers import assert_same_files, tiny

pytestmark = pytest.mark.slow  # compile traces take tens of seconds each on two cores

REPA = dict(repa_encoder="dinov2-vitb14", repa_projector_width=64)  # the tiny encoder stands in for DINOv2-B/14


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile as the stages call it, with the backend that needs no C++ compiler."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def digits_with_images(tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "digits"
    encode(EncodeConfig(src="digits", out=str(out), image_size=8, vae="none", limit=64, shard_size=32, workers=0,
                        encoder_targets="images"))
    return out


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(metrics_path(run_dir)) if "loss" in row]


def test_compiled_training_with_micro_batches_follows_eager_training(digits_latents_dir, tmp_path, aot_eager):
    eager = train(tiny(digits_latents_dir, tmp_path / "eager", steps=3, micro_batch=4))
    compiled = train(tiny(digits_latents_dir, tmp_path / "compiled", steps=3, micro_batch=4, compile=True))
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-4, atol=1e-6)
    assert compiled.config["compile"] and not eager.config["compile"]


def test_bf16_training_in_micro_batches_resumes_to_the_uninterrupted_run_bit_for_bit(digits_latents_dir, tmp_path):
    settings = dict(precision="bf16", micro_batch=4, preview_every=2, preview_images=4, preview_steps=2)
    straight = train(tiny(digits_latents_dir, tmp_path / "straight", steps=4, ckpt_every=4, **settings))
    train(tiny(digits_latents_dir, tmp_path / "pieces", steps=2, ckpt_every=2, **settings))
    resumed = train(tiny(digits_latents_dir, tmp_path / "pieces", steps=4, ckpt_every=2, resume=True, **settings))
    assert resumed.config["precision"] == "bf16" and [step for step, _ in list_checkpoints(tmp_path / "pieces")] == [2, 4]
    assert_same_files(straight.path, resumed.path)
    assert (tmp_path / "pieces" / "previews" / "step-0000004.png").is_file()  # a bf16 run's preview, drawn in fp32 around the net


def test_repa_trains_compiled_and_under_bf16(digits_with_images, tmp_path, tiny_encoder, aot_eager):
    run = train(tiny(digits_with_images, tmp_path / "run", steps=2, precision="bf16", compile=True, micro_batch=4, **REPA))
    rows = [row for row in read_metrics(metrics_path(tmp_path / "run")) if "loss" in row]
    assert run.config["repa_depth"] is not None and all(torch.isfinite(torch.tensor([row["loss"], row["align_loss"]])).all()
                                                         for row in rows)


def test_compiled_sampling_with_a_short_last_block_and_a_guidance_interval_follows_eager(digits_latents_dir, tmp_path,
                                                                                         aot_eager):
    run = train(tiny(digits_latents_dir, tmp_path / "run", steps=1))
    settings = dict(checkpoint=str(run.path), mode="sde", steps=4, cfg_scale=2.0, guidance_interval=(0.3, 1.0), num=7,
                    batch_size=3, device="cpu", preview=0)  # 7 = 3 + 3 + 1: the last block is short
    eager = sample_stage(SampleConfig(out=str(tmp_path / "eager"), **settings))
    compiled = sample_stage(SampleConfig(out=str(tmp_path / "compiled"), compile=True, **settings))
    from sitctl.sample_store import iter_batches

    images = [torch.cat([torch.from_numpy(batch) for batch, _ in iter_batches(artifact.path)]).int()
              for artifact in (eager, compiled)]
    assert images[0].shape[0] == 7 and (images[0] - images[1]).abs().max() <= 1  # uint8 levels: rounding at most
    assert open_artifact(compiled.path).config["compile"]


def test_two_processes_in_bf16_micro_batches_resume_to_the_run_one_process_trains(digits_latents_dir, tmp_path):
    # DDP's no_sync micro-batches under bf16 autocast on gloo, stopped at step 2 and resumed to 4, against one
    # process stepping the same batches: the all-reduce order only rounds differently.
    from tests.helpers import tiny_flags
    from tests.torchrun import torchrun

    flags = tiny_flags(eval_every=0, precision="bf16", micro_batch=2)
    for steps in ("2", "4"):
        torchrun(["-m", "sitctl.cli", "train", str(digits_latents_dir), "--out", str(tmp_path / "two"), "--steps", steps,
                  "--ckpt-every", "2", *(["--resume"] if steps == "4" else []), *flags])
    one = train(tiny(digits_latents_dir, tmp_path / "one", steps=4, ckpt_every=4, precision="bf16", micro_batch=2))
    two = open_artifact(tmp_path / "two" / "step-0000004")
    assert two.config["precision"] == one.config["precision"] == "bf16"
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=2e-2, atol=1e-3)
