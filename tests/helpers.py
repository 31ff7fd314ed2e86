"""What many test modules share, as plain functions and constants (their fixtures are in tests/conftest.py).

The tiny training run (one spec, as a config or as options), small random networks and a checkpoint
of one, shards and idx files as other tools read and write them, the command line run in this process
as the console script runs it, an offline Hugging Face hub and a small disk.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import struct
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file
from torch import nn

from model.configs import SiTConfig, model_config
from model.network import SiT
from sitctl.artifacts import begin_artifact, finish_artifact, open_artifact
from sitctl.checkpoint import save_checkpoint
from sitctl.configs import TrainConfig

# ---------------------------------------------------------------------------------------------
# The tiny training run
# ---------------------------------------------------------------------------------------------

# SiT-T/2 (2 blocks of width 64), batches of 8 from two lanes read in the test process, on the CPU: a step
# takes milliseconds. A test that needs another setting passes it at its call site.
TINY = dict(model="SiT-T/2", global_batch=8, data_lanes=2, shuffle_buffer=16, loader_workers=0, log_every=1,
            preview_every=0, lr=1e-3, device="cpu")


def tiny(latents, out, **overrides) -> TrainConfig:
    """The tiny run's TrainConfig on `latents`, written to `out`."""
    return TrainConfig(latents=str(latents), out=str(out), **{**TINY, **overrides})


def tiny_flags(**overrides) -> list[str]:
    """The tiny run's settings as `sitctl train` options (`--global-batch 8 ...`)."""
    settings = {**TINY, **overrides}
    return [word for name, value in settings.items() for word in ("--" + name.replace("_", "-"), str(value))]


def weights(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / f"{name}.safetensors")


def assert_same_files(a: Path, b: Path, names=("model", "ema", "optimizer")) -> None:
    """The two checkpoints hold the same tensors, bit for bit."""
    for name in names:
        left, right = weights(a, name), weights(b, name)
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), (name, key)


# ---------------------------------------------------------------------------------------------
# Small random networks, their inputs, a checkpoint of one
# ---------------------------------------------------------------------------------------------


def tiny_sit_config(**overrides) -> SiTConfig:
    """SiT-T/2 on 8x8 inputs of 3 channels, 10 classes (the network tests' size)."""
    settings = {"input_size": 8, "in_channels": 3, "num_classes": 10} | overrides
    return model_config("SiT-T/2", **settings)


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (the zero-initialised ones too) random values, so outputs carry signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return net


def inputs(config: SiTConfig, n: int = 3, seed: int = 1):
    """(x, t, y) for a network of `config`; the last label is the null class."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=generator)
    t = torch.rand(n, generator=generator)
    y = torch.arange(n) % (config.num_classes + 1)  # includes the null label when n > num_classes
    y[-1] = config.num_classes
    return x, t, y


def randomised_sit(**overrides) -> tuple[SiT, SiTConfig]:
    """A SiT-T/2 with every weight random, so its velocity (and each image) depends on all of them."""
    config = model_config("SiT-T/2", num_classes=10, **overrides)
    net = SiT(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.05, generator=generator)
    return net, config


def write_checkpoint(run_dir: Path, latents_dir: Path, net: SiT, config) -> Path:
    """Save `net` (as model and EMA) as step 1 of a run on `latents_dir`; the checkpoint's path."""
    optimizer = torch.optim.AdamW(net.parameters())
    extra = {"model_config": asdict(config), "model": "SiT-T/2", "interp": "linear", "pred": "velocity"}
    artifact = save_checkpoint(run_dir, 1, model=net, ema=net, optimizer=optimizer, state={}, config={},
                               latents=open_artifact(latents_dir), extra=extra)
    return artifact.path


# ---------------------------------------------------------------------------------------------
# Artifacts and files made and read by hand
# ---------------------------------------------------------------------------------------------


def make_latents(out: Path, *, num_samples=24, num_shards=3, shape=(3, 8, 8), num_classes=4, seed=0, kind="latents", std=0.1,
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


def sample_bytes(path: Path) -> dict[str, bytes]:
    """What must not change across a kill: the id, the merged images and labels, the preview."""
    artifact = open_artifact(path, "samples")
    with h5py.File(artifact.file("samples.h5"), "r") as handle:
        return {"id": artifact.id.encode(), "images": handle["images"][:].tobytes(), "labels": handle["labels"][:].tobytes(),
                "preview": artifact.file("preview.png").read_bytes()}


def read_shards(artifact_dir: Path) -> dict[str, dict]:
    """Every sample of every shard of a latents artifact, read with plain webdataset, keyed by __key__."""
    urls = [str(artifact_dir / shard["name"]) for shard in open_artifact(artifact_dir).extra["shards"]]
    return {sample["__key__"]: sample for sample in wds.WebDataset(urls, shardshuffle=False).decode()}


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    """An idx file as the MNIST format defines it: 0, 0, type, ndim, big-endian sizes, big-endian data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# The command line, in this process
# ---------------------------------------------------------------------------------------------

# What a fresh interpreter does not print (Python's default warning filters).
_SILENT_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_cli(*args, env: dict[str, str] | None = None, capture=None) -> subprocess.CompletedProcess:
    """Run `sitctl ARGS` in this process as the console script does: its exit status, stdout and stderr.

    Saves the seconds a `python -m sitctl.cli` spends importing torch. The warnings a fresh interpreter
    would print end stderr. `env` is set for the run only (a variable read at import, such as
    huggingface_hub's, needs a monkeypatch too). `capture`: pytest's capsys, or capfd to also see what
    forked loader workers write; without one, click's test isolation takes the output.
    """
    from click.testing import CliRunner

    argv = [str(arg) for arg in args]
    if capture is None:
        with CliRunner().isolation(env=env) as (stdout, stderr, _):
            status, warned = _run_console_script(argv)
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    else:
        capture.readouterr()  # what ran before is not this command's output
        with mock.patch.dict(os.environ, env or {}):
            status, warned = _run_console_script(argv)
        out, err = capture.readouterr()
    return subprocess.CompletedProcess(["sitctl", *argv], status, out, err + warned)


def _run_console_script(argv: list[str]) -> tuple[int, str]:
    """`sitctl ARGV` as the console script runs it: (exit status, the warnings a fresh interpreter prints)."""
    from sitctl.cli import main

    saved, sys.argv = sys.argv, ["sitctl", *argv]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once per place, as in a fresh interpreter
        try:
            main()
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        finally:
            sys.argv = saved
    shown = [w for w in caught if not issubclass(w.category, _SILENT_WARNINGS)]
    return status, "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in shown)


def run_cli_process(*args, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m sitctl.cli ARGS` in a process of its own, on one thread: for what only a real process shows
    (an exit that skips every `finally`, a signal to its group)."""
    return subprocess.run([sys.executable, "-m", "sitctl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def ok(*args) -> str:
    """`sitctl ARGS` in this process, which must succeed: what it printed (stdout, then stderr)."""
    done = run_cli(*args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout + done.stderr


def cli(*args, capsys) -> tuple[int, str]:
    """`sitctl ARGS` in this process: (exit status, stderr)."""
    done = run_cli(*args, capture=capsys)
    return done.returncode, done.stderr


def assert_one_error_line(status: int, stderr: str, *needles: str) -> None:
    """Exit status 2 and one `error: ` line on stderr holding every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------
# An offline Hugging Face hub; a small disk (root only: a real tmpfs)
# ---------------------------------------------------------------------------------------------


def offline_hub(patch: pytest.MonkeyPatch, cache: Path) -> None:
    """HF_HUB_CACHE=cache HF_HUB_OFFLINE=1, as a user sets them: in the environment (for child
    processes) and in huggingface_hub's constants, which it read from the environment at import."""
    import huggingface_hub.constants

    patch.setenv("HF_HUB_CACHE", str(cache))
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@contextlib.contextmanager
def small_disk(directory: Path, size: str):
    """A tmpfs of `size` mounted at `directory`; `resize(size)` grows it in place (freeing space)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def resize(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(directory)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(directory)])
