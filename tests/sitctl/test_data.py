import io
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from sitctl.artifacts import begin_artifact, finish_artifact
from sitctl.data import (
    lane_stream,
    lane_units,
    latents_from_moments,
    open_latents,
    rank_batches,
)
from sitctl.errors import ArtifactError, SitctlError


def make_latents(out, *, num_samples=24, num_shards=3, shape=(3, 8, 8), num_classes=4, seed=0, kind="latents"):
    """A small latents artifact following the shared contract (posterior std 0.1, scale 1)."""
    rng = np.random.default_rng(seed)
    staging = begin_artifact(out)
    shards, histogram = [], Counter()
    for shard in range(num_shards):
        name = f"shard-{shard:06d}.tar"
        indices = range(shard, num_samples, num_shards)
        with wds.TarWriter(str(staging / name), encoder=False, mtime=0) as writer:  # plain headers, as encode writes
            for index in indices:
                mean = rng.uniform(-1, 1, shape).astype(np.float16)
                views = np.stack([mean, mean[..., ::-1]])  # [original, flipped]
                moments = np.stack([views, np.full_like(views, 0.1)], axis=1)  # (2 views, mean/std, C, H, W)
                buffer = io.BytesIO()
                np.save(buffer, moments)
                label = index % num_classes
                histogram[label] += 1
                writer.write({"__key__": f"img{index:05d}", "moments.npy": buffer.getvalue(),
                              "cls": str(label).encode(), "path.txt": f"src/{index}.png".encode()})
        shards.append({"name": name, "count": len(indices)})
    extra = {
        "shards": shards, "num_samples": num_samples, "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)], "latent_shape": list(shape), "scale_factor": 1.0,
        "image_size": shape[1], "vae": {"name": "none", "source": None},
        "class_histogram": {str(k): v for k, v in sorted(histogram.items())}, "num_errors": 0,
    }
    return finish_artifact(staging, out, kind=kind, config={"source": "test"}, extra=extra)


def take(stream, steps):
    """`steps` consecutive items of a rank's stream, each key concatenated over steps."""
    items = [next(stream) for _ in range(steps)]
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def batches(latents, *, world_size=1, rank=0, workers=0, start_step=0, lanes=4, batch=8, seed=3):
    return rank_batches(latents, global_batch=batch, num_lanes=lanes, rank=rank, world_size=world_size,
                        seed=seed, buffer=5, workers=workers, start_step=start_step)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return open_latents(make_latents(tmp_path_factory.mktemp("data") / "latents").path)


def test_global_batch_is_the_same_for_any_rank_and_worker_split(latents):
    steps = 7  # 56 samples: crosses two epochs of 24
    single = take(batches(latents), steps)
    assert torch.equal(single["positions"], torch.arange(8).repeat(steps))
    for ranks, workers in ((2, 0), (4, 0), (1, 2)):
        per_rank = [take(batches(latents, world_size=ranks, rank=r, workers=workers), steps) for r in range(ranks)]
        for key, value in single.items():
            # Rank r holds positions [r B/W, (r+1) B/W) of each step's global batch.
            joined = torch.stack([part[key].reshape(steps, -1, *value.shape[1:]) for part in per_rank], 1)
            assert torch.equal(joined.reshape(value.shape), value), key


def test_starting_at_a_step_continues_the_same_stream(latents):
    full = take(batches(latents), 9)
    resumed = take(batches(latents, start_step=5), 4)
    for key, value in full.items():
        assert torch.equal(resumed[key], value[5 * 8 :]), key


def test_each_epoch_of_the_lanes_reads_every_sample_once(latents):
    keys = []
    for lane in range(4):
        size = sum(len(range(r, latents.shard_counts[s], k)) for s, r, k in lane_units(latents.shard_counts, 4, lane, 3, 0))
        stream = lane_stream(latents, 4, lane, seed=3, buffer=5, consumed=0)
        keys += [next(stream)["__key__"] for _ in range(size)]
    assert sorted(keys) == [f"img{i:05d}" for i in range(24)]


def test_epochs_differ_in_order(latents):
    stream = lane_stream(latents, 1, 0, seed=3, buffer=5, consumed=0)
    first, second = [[next(stream)["__key__"] for _ in range(24)] for _ in range(2)]
    assert sorted(first) == sorted(second) and first != second


def test_latent_is_mean_plus_std_noise_of_the_chosen_view_times_scale():
    moments = torch.zeros(2, 2, 2, 1, 2, 2, dtype=torch.float16)
    moments[:, 0, 0] = 1.0  # original mean
    moments[:, 1, 0] = -1.0  # flipped mean
    moments[:, :, 1] = 0.5  # std
    noise = torch.full((2, 1, 2, 2), 2.0)
    out = latents_from_moments(moments, noise, torch.tensor([False, True]), scale=0.25)
    assert torch.allclose(out[0], torch.full((1, 2, 2), (1.0 + 0.5 * 2.0) * 0.25))
    assert torch.allclose(out[1], torch.full((1, 2, 2), (-1.0 + 0.5 * 2.0) * 0.25))


def test_wrong_kind_and_missing_shard_are_one_line_errors(tmp_path):
    wrong = make_latents(tmp_path / "samples", kind="samples")
    with pytest.raises(ArtifactError, match="'samples' artifact, expected 'latents'"):
        open_latents(wrong.path)
    good = make_latents(tmp_path / "latents")
    (good.path / "shard-000001.tar").unlink()
    with pytest.raises(ArtifactError, match="shard-000001.tar"):
        open_latents(good.path)


def test_lanes_that_do_not_split_evenly_are_refused(latents):
    with pytest.raises(SitctlError, match="does not divide the global batch"):
        batches(latents, lanes=3, batch=8)
    with pytest.raises(SitctlError, match="not a multiple of 4 ranks"):
        batches(latents, lanes=2, world_size=4)
