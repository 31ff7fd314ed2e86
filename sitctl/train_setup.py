"""Setting up a training run: the settings resolved once, everything a user can get wrong checked,
then the network, EMA, optimizer, data and the watchers built. `prepare` returns the `Run` that
sitctl/train.py steps.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from torch import nn

from model.configs import ModelConfigError, model_config
from model.interpolants import Interpolant, interpolant
from model.network import SiT
from model.objectives import TIME_DISTRIBUTIONS, UniformTime
from sitctl import alignment as repa
from sitctl import checkpoint as checkpoints
from sitctl import distributed, memory, trackers, watch
from sitctl.artifacts import Artifact, is_finished
from sitctl.configs import TrainConfig
from sitctl.data import Latents, default_lanes, open_latents, rank_batches
from sitctl.errors import SitctlError
from sitctl.hardware import set_matmul_precision
from sitctl.identity import check_continues
from sitctl.metrics_log import LogWindow, trim_metrics
from sitctl.records import CheckpointInfo
from sitctl.signals import AgreedStop

DEFAULT_EVAL_EVERY = 25_000  # steps between FIDs when --eval-every is not given (and a reference is found)


@dataclass
class Run:
    """The mutable state of a training run on one rank."""

    config: TrainConfig  # resolved (see `resolve`): what the checkpoints record
    dist: distributed.Dist
    latents: Latents
    model_config: Any  # model.configs.SiTConfig
    net: nn.Module  # the plain network: what checkpoints hold
    ema: nn.Module
    forward: nn.Module  # net wrapped by DDP and/or torch.compile: what the loss calls
    optimizer: torch.optim.Optimizer
    batches: Iterator[dict]  # this rank's share of each global batch, from the run's data position
    interp: Interpolant  # --interp as the object the math takes
    time_distribution: Any  # --time-dist likewise (model.objectives)
    train_eps: float  # the range of training times, [train_eps, 1 - train_eps]
    sample_eps: float  # the end of sampling time the checkpoint records (previews and the FID use it too)
    micro_batch: int
    tracker: Any  # sitctl.trackers: TensorBoard, W&B or nothing (always nothing off rank 0)
    alignment: repa.Alignment | None  # REPA's encoder and projector (--repa-encoder), else None
    step: int = 0
    saved_step: int | None = None  # step of the newest checkpoint, known on every rank
    last_saved: Artifact | None = None  # that checkpoint, opened on rank 0
    window: LogWindow = field(default_factory=LogWindow)  # the steps since the last metrics row
    first_bad_step: torch.Tensor | None = None  # on the device: first step whose loss was not finite (0: none)
    agreed_stop: AgreedStop = field(default_factory=AgreedStop)  # the ranks' stop votes, read a step late
    evaluation: watch.TrainingEval | None = None  # when a FID is due in this run
    preview: watch.Preview | None = None  # on rank 0, when previews are on


def fit_model(config: TrainConfig, latents: Latents):
    """The SiTConfig of `config.model` sized to the latents; one clear line if it cannot fit."""
    channels, height, width = latents.latent_shape
    where = f"latents {latents.artifact.path} of shape {channels}x{height}x{width}"
    if height != width:
        raise SitctlError(f"{config.model} needs square inputs, but {where} are not square")
    try:
        return model_config(config.model, input_size=height, in_channels=channels, num_classes=latents.num_classes,
                            class_dropout_prob=config.label_dropout, qk_norm=config.qk_norm)
    except ModelConfigError as error:
        raise SitctlError(f"{config.model} does not fit {where}: {error}") from None


def plan_micro_batch(config: TrainConfig, world_size: int, model_config=None, device: torch.device | None = None,
                     is_main: bool = True) -> int:
    """Samples per forward on a rank: --micro-batch as given; else on a GPU the largest divisor of the
    rank's share whose traced footprint fits its free memory (sitctl/memory.py), said in one line; else
    the whole share (a CPU has no device memory to plan, and its results stay as they were)."""
    if config.global_batch % world_size:
        raise SitctlError(f"global batch {config.global_batch} does not split evenly over {world_size} processes")
    share = config.global_batch // world_size
    if config.micro_batch is None and device is not None and device.type == "cuda":
        micro = memory.micro_batch_for_device(model_config, config.precision, share, device)
        planned = memory.footprint(model_config, config.precision).at(micro) / memory.GiB
        Console(quiet=not is_main).print(f"micro-batch {micro} of the {share} samples per rank, the most that fit {device} "
                                         f"(about {planned:.1f} GiB); --micro-batch sets it", soft_wrap=True)
        return micro
    micro = config.micro_batch or share
    if share % micro:
        raise SitctlError(f"--micro-batch {micro} does not divide the per-rank batch {share}")
    return micro


def find_resume_point(config: TrainConfig, latents: Latents) -> Artifact | None:
    """The checkpoint to continue from, or None; refuses to overwrite or mix runs."""
    found = checkpoints.list_checkpoints(config.out)
    if found and not config.resume:
        raise SitctlError(f"{config.out} already holds checkpoints (latest {found[-1][1].name}); pass --resume or choose a new --out")
    if not found or not config.resume:
        return None
    artifact = checkpoints.latest_checkpoint(config.out)
    check_continues(artifact.config, config, f"run {artifact.path}",
                    "drop that option (a resume takes the run's settings) or choose a new --out")
    if artifact.inputs and artifact.inputs[0]["id"] != latents.artifact.id:
        raise SitctlError(f"cannot resume {artifact.path}: it was trained on latents {artifact.inputs[0]['path']}, not {latents.artifact.path}")
    return artifact


def time_distribution(config: TrainConfig):
    """--time-dist as the object the math takes (uniform has no parameters)."""
    if config.time_dist == "uniform":
        return UniformTime()
    return TIME_DISTRIBUTIONS[config.time_dist](mean=config.time_mean, std=config.time_std)


def resolve(config: TrainConfig, device: torch.device, world_size: int = 1) -> TrainConfig:
    """Every derived setting filled in, once; the run records these values.

    --precision auto: bf16 autocast on a CUDA GPU that has bf16 (tensor cores, SDPA's flash kernels),
    fp32 elsewhere, so a checkpoint says what it was trained in; the data lanes for this many processes; REPA's depth
    of the model; the FID's period; the tracker's folder, absolute so that `sitctl show` and
    `sitctl eval` find it from anywhere.
    """
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = config.precision if config.precision != "auto" else ("bf16" if bf16 else "fp32")
    lanes = config.data_lanes or default_lanes(config.global_batch, world_size, config.loader_workers)
    return replace(config, precision=precision, data_lanes=lanes, repa_depth=repa.resolve_depth(config),
                   eval_every=DEFAULT_EVAL_EVERY if config.eval_every is None else config.eval_every,
                   log_dir=None if config.log_dir is None else os.path.abspath(config.log_dir))


def prepare(config: TrainConfig, d: distributed.Dist) -> Run:
    """Resolve the settings, check everything a user can get wrong, then build the network, EMA, optimizer and data."""
    fid_required = config.eval_every is not None  # a period asked for is honoured or refused; the default may skip
    config = resolve(config, d.device, d.world_size)
    if is_finished(config.out):  # never write a run into another stage's artifact
        raise SitctlError(f"{config.out} is a finished artifact, not a run directory; choose a new --out")
    latents = open_latents(config.latents)
    model_config = fit_model(config, latents)
    micro = plan_micro_batch(config, d.world_size, model_config, d.device, is_main=d.is_main)
    resume_from = find_resume_point(config, latents)
    alignment = repa.prepare_alignment(config, model_config, latents, d.device)  # None unless --repa-encoder
    start_step = 0 if resume_from is None else int(CheckpointInfo.from_artifact(resume_from).step)
    batches = rank_batches(
        latents, global_batch=config.global_batch, num_lanes=config.data_lanes, rank=d.rank, world_size=d.world_size,
        seed=config.seed, buffer=config.shuffle_buffer, workers=config.loader_workers, start_step=start_step,
        flip=config.flip, pin_memory=d.device.type == "cuda", images=alignment is not None,
    )
    if d.is_main:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        trim_metrics(config.out, start_step)
    tracker = trackers.open_run_tracker(config, d, start_step, latents.artifact.id)
    set_matmul_precision(config.precision)  # tf32 and bf16 allow TF32 tensor cores for fp32 matmuls; fp32 keeps them exact
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every world size
    random.seed(config.seed)  # and the python/numpy states a checkpoint records are the same every run
    np.random.seed(config.seed)
    net = SiT(model_config).to(d.device)
    ema = SiT(model_config).to(d.device).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    trained = [*net.parameters(), *(alignment.projector.parameters() if alignment else ())]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                  fused=d.device.type == "cuda")
    interp = interpolant(config.interp)  # names become objects here, at the edge; the math gets the object
    run = Run(config=config, dist=d, latents=latents, model_config=model_config, net=net, ema=ema, forward=net,
              optimizer=optimizer, batches=batches, interp=interp, time_distribution=time_distribution(config),
              train_eps=config.train_eps if config.train_eps is not None else interp.default_eps(config.pred)[0],
              sample_eps=interp.default_eps(config.pred)[1], micro_batch=micro, tracker=tracker,
              alignment=alignment, step=start_step)
    if resume_from is not None:
        saved = checkpoints.load_training_state(resume_from, model=net, ema=ema, optimizer=optimizer,
                                                modules=extra_modules(run))
        run.last_saved, run.saved_step = resume_from, start_step
        run.window = LogWindow.from_record(saved.get("log_window"), config.out, config.global_batch, d.device)
    run.forward = wrap_for_training(alignment.module(net) if alignment else net, config, d)
    run.evaluation = watch.prepare_eval(run, required=fid_required)
    run.preview = watch.prepare_preview(run)  # its VAE loaded now: a missing one fails before the first step
    return run


def extra_modules(run: Run) -> dict[str, nn.Module]:
    """Trained modules a checkpoint holds besides the network (REPA's projector)."""
    return {repa.PROJECTOR_FILE: run.alignment.projector} if run.alignment else {}


def wrap_for_training(net: nn.Module, config: TrainConfig, d: distributed.Dist) -> nn.Module:
    forward = net
    if d.active:
        # Gradients as views into DDP's buckets: no copy between them, and no second gradient buffer.
        # Not static_graph: with no_sync micro-batches it fails an internal assert (torch 2.14, gloo).
        # No buffer broadcast: the only buffer, the fixed sin-cos position table, is the same on every
        # rank by construction, and broadcasting it cost a collective every micro-batch.
        forward = nn.parallel.DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                                      gradient_as_bucket_view=True, broadcast_buffers=False)
    if config.compile:
        forward = torch.compile(forward)  # after DDP, so compiled graphs break at gradient buckets
    return forward
