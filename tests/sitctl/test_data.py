import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from sitctl.artifacts import begin_artifact, finish_artifact
from pipelines.shards import open_shard
from sitctl.data import (
    LaneReader,
    buffer_order,
    interpolant_noise,
    lane_units,
    latents_from_moments,
    open_latents,
    rank_batches,
)
from sitctl.errors import ArtifactError, SitctlError


def make_latents(out, *, num_samples=24, num_shards=3, shape=(3, 8, 8), num_classes=4, seed=0, kind="latents", std=0.1,
                 label=lambda index, num_classes: str(index % num_classes)):
    """A small latents artifact following the shared contract (posterior std `std`, scale 1)."""
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
                moments = np.stack([views, np.full_like(views, std)], axis=1)  # (2 views, mean/std, C, H, W)
                buffer = io.BytesIO()
                np.save(buffer, moments)
                histogram[label(index, num_classes)] += 1
                writer.write({"__key__": f"img{index:05d}", "moments.npy": buffer.getvalue(),
                              "cls": label(index, num_classes).encode(), "path.txt": f"src/{index}.png".encode()})
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


def keys_of(latents, shards, samples):
    opened = [open_shard(path, (2, 2, *latents.latent_shape)) for path in latents.shard_paths]
    return [opened[shard].keys[sample] for shard, sample in zip(shards.tolist(), samples.tolist())]


def test_each_epoch_of_the_lanes_reads_every_sample_once(latents):
    keys = []
    for lane in range(4):
        size = sum(len(range(r, latents.shard_counts[s], k)) for s, r, k in lane_units(latents.shard_counts, 4, lane, 3, 0))
        keys += keys_of(latents, *LaneReader(latents.shard_counts, 4, lane, seed=3, buffer=5, consumed=0).take(size))
    assert sorted(keys) == [f"img{i:05d}" for i in range(24)]


def test_epochs_differ_in_order(latents):
    reader = LaneReader(latents.shard_counts, 1, 0, seed=3, buffer=5, consumed=0)
    first, second = [keys_of(latents, *reader.take(24)) for _ in range(2)]
    assert sorted(first) == sorted(second) and first != second


def test_shuffle_buffer_emits_a_permutation_within_its_window():
    rng = np.random.default_rng(0)
    order = buffer_order(100, 10, rng)
    assert sorted(order.tolist()) == list(range(100))
    # Item i can only leave after it entered: at most `buffer - 1` items ahead of the reading position.
    assert all(item <= emitted + 9 for emitted, item in enumerate(order.tolist()))
    assert buffer_order(100, 1, rng).tolist() == list(range(100))  # one slot: reading order


def test_latent_is_mean_plus_std_noise_of_the_chosen_view_times_scale():
    view = torch.zeros(2, 2, 1, 2, 2, dtype=torch.float16)
    view[0, 0], view[1, 0] = 1.0, -1.0  # means
    view[:, 1] = 0.5  # std
    noise = torch.full((2, 1, 2, 2), 2.0)
    out = latents_from_moments(view, noise, scale=0.25)
    assert torch.allclose(out[0], torch.full((1, 2, 2), (1.0 + 0.5 * 2.0) * 0.25))
    assert torch.allclose(out[1], torch.full((1, 2, 2), (-1.0 + 0.5 * 2.0) * 0.25))


def test_flips_take_the_stored_flipped_view_and_no_flip_keeps_the_original(tmp_path):
    # Posterior std 0: a training latent is exactly the chosen view's mean.
    latents = open_latents(make_latents(tmp_path / "latents", num_samples=8, num_shards=1, std=0.0).path)
    index = open_shard(latents.shard_paths[0], (2, 2, *latents.latent_shape))
    for flip in (True, False):
        batch = next(rank_batches(latents, global_batch=8, num_lanes=1, rank=0, world_size=1, seed=1, buffer=1,
                                  workers=0, start_step=0, flip=flip))
        chosen = []
        for row in range(8):  # one slot in the buffer: the lane reads the shard in order
            stored = torch.from_numpy(index.moments(row)[:, 0].astype(np.float32))  # (2 views, C, H, W) means
            chosen += [view for view in (0, 1) if torch.equal(batch["x1"][row], stored[view])]
        assert chosen == [0] * 8 if not flip else sorted(set(chosen)) == [0, 1] and len(chosen) == 8


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


def rehash(artifact_path):
    """Record a damaged shard's new sha256 in the manifest, as if encode had written it that way."""
    from sitctl.artifacts import content_id, manifest_digest, sha256_file

    manifest_path = artifact_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = sha256_file(artifact_path / name)
    manifest["id"] = content_id(manifest["files"])
    manifest["digest"] = manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))


def damaged_latents(tmp_path, damage):
    """Latents whose shard 1 is damaged: 'bitflip' (hash left stale), 'header' or 'label' (hash updated)."""
    label = (lambda index, classes: "cat" if index == 4 else str(index % classes)) if damage == "label" else None
    artifact = make_latents(tmp_path / damage, **({"label": label} if label else {}))
    shard = artifact.path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    if damage == "bitflip":
        data[2000] ^= 1  # inside the first sample's moments: same size, same header
    elif damage == "header":
        with tarfile.open(shard) as tar:
            header = tar.getmembers()[4].offset  # the second sample's first member
        data[header + 124 : header + 136] = b"zz\0\0\0\0\0\0\0\0\0\0"  # a size field that is not octal
    shard.write_bytes(bytes(data))
    if damage != "bitflip":
        rehash(artifact.path)
    return open_latents(artifact.path)


@pytest.mark.parametrize("damage, message", [
    ("bitflip", r"shard .*shard-000001\.tar does not match its recorded sha256"),
    ("header", r".*shard-000001\.tar: broken tar header at byte"),
    ("label", r".*shard-000001\.tar: sample img00004 has label b'cat', not a class number"),
])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_shard_is_one_line_naming_it_even_from_a_worker(tmp_path, damage, message, workers):
    latents = damaged_latents(tmp_path, damage)
    stream = batches(latents, workers=workers, lanes=4, batch=8)
    with pytest.raises(ArtifactError, match=message) as caught:
        for _ in range(4):  # the lanes read shard 1 within the first epoch (three shards, four lanes)
            next(stream)
    stream.close()
    assert "\n" not in str(caught.value)


def test_cli_train_on_a_bit_flipped_shard_prints_one_error_line(tmp_path):
    latents = damaged_latents(tmp_path, "bitflip")
    result = subprocess.run(
        [sys.executable, "-m", "sitctl.cli", "train", str(latents.artifact.path), "--out", str(tmp_path / "run"),
         "--model", "SiT-T/2", "--global-batch", "8", "--data-lanes", "4", "--steps", "4", "--preview-every", "0",
         "--device", "cpu"],  # the default --loader-workers 1: the error starts in a worker process
        capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: shard ") and "shard-000001.tar" in lines[0], result.stderr


def test_interpolant_noise_is_the_same_for_any_split_of_the_lanes():
    positions, shape, cpu = torch.arange(8), (3, 4, 4), torch.device("cpu")
    whole = interpolant_noise(3, 5, positions, 2, shape, cpu)  # 4 lanes of 2
    halves = [interpolant_noise(3, 5, part, 2, shape, cpu) for part in positions.split(4)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(interpolant_noise(3, 6, positions, 2, shape, cpu), whole)  # a new draw every step
    assert not torch.equal(whole[:2], whole[2:4])  # and every lane
