"""What a first CUDA run would hit, pinned on CPU where the choice is plain Python (issue 33)."""

import signal

import pytest
import torch

from sitctl.data import _joined, check_lanes, default_lanes
from sitctl.distributed import rank_device
from sitctl.errors import SitctlError
from sitctl.signals import stop_votes


def test_device_cuda_n_is_honoured_by_one_process_and_refused_for_many():
    assert rank_device("cuda:1", local_rank=0, world_size=1, cuda_available=True) == "cuda:1"
    assert rank_device("cuda", local_rank=3, world_size=8, cuda_available=True) == "cuda:3"
    assert rank_device(None, local_rank=3, world_size=8, cuda_available=True) == "cuda:3"
    assert rank_device(None, local_rank=3, world_size=8, cuda_available=False) == "cpu"
    assert rank_device("cpu", local_rank=0, world_size=1, cuda_available=True) == "cpu"
    with pytest.raises(SitctlError, match=r"^--device cuda:1 names one GPU, but this job has 2 processes, each on "
                                          r"cuda:LOCAL_RANK; pass --device cuda \(or leave it out\)$"):
        rank_device("cuda:1", local_rank=0, world_size=2, cuda_available=True)


@pytest.mark.parametrize("world_size, workers, lanes", [(1, 1, 8), (2, 1, 8), (8, 1, 8), (4, 2, 8), (16, 1, 16),
                                                         (32, 1, 32), (8, 4, 32), (64, 1, 64)])
def test_the_default_lanes_feed_any_power_of_two_job_at_batch_256_and_stay_8_where_8_did(world_size, workers, lanes):
    assert default_lanes(256, world_size, workers) == lanes
    check_lanes(lanes, 256, world_size, workers, num_samples=1_281_167)  # the guide's SLURM job (4 x 8 GPUs) among them


def test_no_lane_count_fits_a_batch_that_does_not_split_over_the_readers():
    with pytest.raises(SitctlError, match="does not divide the global batch 256"):
        check_lanes(default_lanes(256, 3, 1), 256, 3, 1, num_samples=1000)


def test_stop_votes_are_made_on_the_device_without_a_host_list():
    assert stop_votes(signal.SIGTERM, "cpu").tolist() == [1.0, 0.0]
    assert stop_votes(signal.SIGINT, "cpu").tolist() == [0.0, 1.0]
    assert stop_votes(None, "cpu").tolist() == [0.0, 0.0]


def test_joined_worker_parts_keep_their_order_and_dtype():
    parts = [torch.arange(6, dtype=torch.uint8).reshape(3, 2), torch.arange(6, 10, dtype=torch.uint8).reshape(2, 2)]
    joined = _joined(parts, pin_memory=False)
    assert joined.dtype == torch.uint8 and joined.flatten().tolist() == list(range(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA driver")
def test_joined_worker_parts_stay_page_locked_so_copies_to_the_gpu_overlap():
    parts = [torch.ones(2, 3).pin_memory(), torch.zeros(1, 3).pin_memory()]
    joined = _joined(parts, pin_memory=True)
    assert joined.is_pinned() and torch.equal(joined, torch.cat(parts))
    assert not torch.cat(parts).is_pinned()  # why _joined exists


def test_encode_records_the_precision_its_vae_ran_in_not_auto(digits_latents_dir):
    from pipelines.moments import resolved_precision
    from sitctl.artifacts import open_artifact

    assert open_artifact(digits_latents_dir).config["precision"] == "auto"  # what was asked
    assert open_artifact(digits_latents_dir).extra["vae_precision"] == "fp32"  # what ran, on this CPU
    assert [resolved_precision(torch.device("cuda"), p) for p in ("auto", "fp32", "fp16", "bf16")] == ["bf16", "fp32", "fp16", "bf16"]
