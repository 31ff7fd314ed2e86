"""The train stage: a latents artifact in, checkpoint artifacts of a SiT out.

One code path for 1 process or N under torchrun (sitctl/distributed.py). The global batch is
split over ranks by sitctl/data.py so that every sample, and every random number it needs, is
the same whatever the number of processes; a rank's share may be cut into micro-batches whose
gradients are accumulated. Defaults are the SiT paper's (arXiv 2401.08740, Sec. 4 / App. C,
which keeps DiT's recipe): AdamW, lr 1e-4, no weight decay, betas (0.9, 0.999), constant lr,
global batch 256, EMA 0.9999 updated every step, label dropout 0.1.

The loop reads as train_step / maybe_log / maybe_checkpoint / maybe_preview. A SIGTERM or
SIGINT sets a flag (sitctl/signals.py) that all ranks agree on a step boundary later; the run
saves at once (no preview, no loss plot) and raises Interrupted, which exits 128 + the signal; a
NaN or inf loss stops the run at the next log, preview or checkpoint, before anything after it
is saved, leaving the last checkpoint as it was. No step waits for the device otherwise: its
statistics (sitctl/step_stats.py) stay on it until a log line reads them
(sitctl/metrics_log.py). Previews and the FID of the EMA weights are sitctl/watch.py's; settings
resolved, checks and the run's construction are sitctl/train_setup.py's.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from model.objectives import times_from_uniform, training_loss
from sitctl import alignment as repa
from sitctl import checkpoint as checkpoints
from sitctl import distributed, memory, trackers, watch
from sitctl.artifacts import Artifact, disk_errors, output_lock
from sitctl.configs import TrainConfig
from sitctl.data import interpolant_noise
from sitctl.errors import SitctlError
from sitctl.hardware import alignment_flops_per_image, training_mfu
from sitctl.metrics_log import LogWindow, append_row, metrics_path
from sitctl.plots import save_loss_curve
from sitctl.progress import peak_memory_gib, progress
from sitctl.records import CheckpointInfo
from sitctl.signals import STOP_SIGNALS, StopRequest, stop_on_signals, stop_votes
from sitctl.step_stats import StepStats
from sitctl.train_setup import (  # noqa: F401 (the stage's API, imported from here: resolve, prepare, the default period)
    DEFAULT_EVAL_EVERY, Run, extra_modules, find_resume_point, plan_micro_batch, prepare, resolve
)

NAN_HOOK = "SITCTL_TEST_NAN_AT_STEP"  # tests plant a NaN loss at this (1-based) step


class NonFiniteLossError(SitctlError):
    """The loss became NaN or inf; the run stops before saving anything trained from it."""


# =============================================================================================
# Setting up =============================================================================================


def _no_sync(run: Run, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    ddp = getattr(run.forward, "_orig_mod", run.forward)
    if last or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> StepStats:
    """Forward and backward this rank's share in micro-batches; return its statistics (on the device)."""
    config, device = run.config, run.dist.device
    # Loader batches are pinned on CUDA, so these copies overlap with the host's next work.
    x1 = batch["x1"].to(device, non_blocking=True)  # (n, C, H, W)
    x0 = interpolant_noise(config.seed, run.step, batch["positions"], config.global_batch // config.data_lanes,
                           x1.shape[1:], device)  # (n, C, H, W), drawn on the device
    null = torch.full_like(batch["labels"], run.model_config.num_classes)
    y = torch.where(batch["drop"] < config.label_dropout, null, batch["labels"]).to(device, non_blocking=True)  # (n,)
    t = times_from_uniform(batch["time"], train_eps=run.train_eps, discrete_steps=config.discrete_steps,
                           distribution=run.time_distribution)
    t = t.to(device, non_blocking=True)  # (n,)
    images = batch["images"].to(device, non_blocking=True) if run.alignment else None  # (n, S, S, 3) uint8
    n, losses, aligns = len(x1), [], []
    for start in range(0, n, run.micro_batch):
        part = slice(start, start + run.micro_batch)
        objective = dict(interp=run.interp, pred=config.pred, weight=config.loss_weight, train_eps=run.train_eps,
                         t=t[part], x0=x0[part])
        with _no_sync(run, last=start + run.micro_batch >= n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                if run.alignment is None:
                    loss = total = training_loss(run.forward, x1[part], y[part], **objective)
                else:  # REPA: the encoder runs on this rank's own micro-batch
                    loss, align = repa.aligned_loss(run.alignment, run.forward, images[part], x1[part], y[part], **objective)
                    total = loss.float() + run.alignment.coeff * align
                    aligns.append(align.detach())
            # Sum over the rank's share / share size; DDP then averages ranks: the global-batch mean.
            (total.float().sum() / n).backward()
        losses.append(loss.detach().float())
    losses = torch.cat(losses)  # (n,)
    if os.environ.get(NAN_HOOK) == str(run.step + 1):
        losses = losses * float("nan")
    return StepStats.of(losses, t.float(), torch.cat(aligns) if aligns else None)


def reduce_step(run: Run, stats: StepStats, signum: int | None) -> tuple[StepStats, int]:
    """Sum the ranks' statistics and stop votes in one collective; they stay on the device.

    Nothing here waits for the device: a non-finite loss is noted on the device (check_finite
    reads it before anything is logged or saved), and the stop votes are read one step late.
    Returns the summed statistics and the signal the ranks agreed to stop on (0: none yet).
    """
    votes = stop_votes(signum, run.dist.device)  # one per signal, so every rank learns which one stopped the run
    summed = distributed.all_reduce_sum(run.dist, torch.cat([stats.pack(), votes]))
    if run.first_bad_step is None:
        run.first_bad_step = torch.zeros((), dtype=torch.int64, device=summed.device)
    bad = ~torch.isfinite(summed).all() & (run.first_bad_step == 0)
    run.first_bad_step = torch.where(bad, run.step + 1, run.first_bad_step)
    return StepStats.unpack(summed[: -len(STOP_SIGNALS)]), run.agreed_stop(summed[-len(STOP_SIGNALS):])


def check_finite(run: Run) -> None:
    """Raise if a loss since the last check was NaN or inf; called before logging or saving (reads the device)."""
    if run.first_bad_step is not None and int(run.first_bad_step):
        config = run.config
        saved = checkpoints.checkpoint_dir(config.out, run.saved_step) if run.saved_step else "none yet"
        raise NonFiniteLossError(f"loss is NaN or inf at step {int(run.first_bad_step)}; stopped at step {run.step} "
                                 f"without saving its updates (last checkpoint: {saved})")


def apply_update(run: Run) -> torch.Tensor | None:
    """Clip (optionally), step the optimizer and the EMA; return the gradient norm before clipping.

    The norm (a pass over every gradient) is only computed when it clips or is logged: else None.
    """
    parameters = [p for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]  # REPA's projector too
    norm = None
    if run.config.grad_clip is not None:
        norm = nn.utils.clip_grad_norm_(parameters, run.config.grad_clip)
    elif is_log_step(run, run.step + 1):
        norm = nn.utils.get_total_norm([p.grad for p in parameters])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        # ema <- decay * ema + (1 - decay) * param, every step (DiT/SiT's update_ema).
        torch._foreach_lerp_(list(run.ema.parameters()), list(run.net.parameters()), 1.0 - run.config.ema_decay)
    return None if norm is None else norm.detach()


def is_log_step(run: Run, step: int) -> bool:
    return step % run.config.log_every == 0 or step == run.config.steps


# =============================================================================================
# The loop
# =============================================================================================


def train(config: TrainConfig) -> Artifact | None:
    """Run (or resume) training; returns the last checkpoint artifact on rank 0, None elsewhere."""
    d = distributed.setup(config.device)
    run = None
    hint = "free space (or make it writable) and rerun with --resume"
    try:
        # A signal while preparing is kept too: the run then stops after its first step.
        with stop_on_signals(), output_lock(config.out, d), disk_errors("write the run", config.out, hint=hint):
            run = prepare(config, d)
            train_loop(run)
        return run.last_saved if d.is_main else None
    except torch.OutOfMemoryError:
        if run is None:  # while preparing: not the micro-batch's doing
            raise
        raise memory.out_of_memory(run.micro_batch, d.device) from None
    finally:
        if run is not None:
            run.batches.close()  # stops the loader workers now, not at interpreter exit
            run.tracker.close()
        distributed.teardown(d)


def train_loop(run: Run) -> None:
    """Step until config.steps; on a signal every rank saves at the same step and raises Interrupted."""
    config = run.config
    with stop_on_signals() as stop, progress_bar(run) as progress:
        task = progress.add_task("train", total=config.steps, completed=run.step)
        while run.step < config.steps:
            started = time.perf_counter()
            stats = train_step(run, next(run.batches))
            stats, stopping = reduce_step(run, stats, stop.signum)
            grad_norm = apply_update(run)
            run.step += 1
            progress.update(task, completed=run.step)
            maybe_log(run, stats, grad_norm, time.perf_counter() - started, progress.console)
            if not stopping:  # a stop saves first; a FID would hold the checkpoint back
                maybe_evaluate(run, progress.console)
            maybe_checkpoint(run, force=stopping or run.step == config.steps, plot=not stopping)
            if stopping and run.step < config.steps:  # a signal in the last step is too late to matter
                raise stopped(run, stop, stopping)
            maybe_preview(run)


def stopped(run: Run, stop: StopRequest, signum: int):
    """The Interrupted of a run that saved step run.step on the agreed signal; rank 0 says it."""
    stop.signum = stop.signum or signum  # a rank that was not signalled itself stops on its peers' signal
    saved = checkpoints.checkpoint_dir(run.config.out, run.step)
    return stop.interrupted(f"at step {run.step} of {run.config.steps}; saved {saved}", resume_option="--resume",
                            quiet=not run.dist.is_main)


def progress_bar(run: Run):
    """The steps bar; its console (stdout, silent off rank 0) also carries the log lines."""
    return progress("steps", main=run.dist.is_main, console=Console(quiet=not run.dist.is_main))


# =============================================================================================
# Logs, checkpoints, previews, FID
# =============================================================================================


def maybe_log(run: Run, stats: StepStats, grad_norm: torch.Tensor | None, seconds: float, console) -> None:
    """Add this step to the window; every log_every steps read it back, write a metrics.jsonl row and a console line.

    images/s counts only the steps' own time (data, forward, backward, update), not checkpoints
    or previews. grad_norm is the logged step's norm (before clipping).
    """
    run.window.add(stats, seconds)
    if not is_log_step(run, run.step):
        return
    check_finite(run)
    window, run.window = run.window, LogWindow()
    images_per_sec = window.steps * run.config.global_batch / window.seconds
    row = {"step": run.step, **window.stats.losses(), "images_per_sec": images_per_sec,
           "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
           "memory_gib": peak_memory_gib(run.dist.device),
           "mfu": training_mfu(run.model_config, images_per_sec, run.dist.device, run.config.precision,
                               run.dist.world_size, alignment_flops_per_image(run.alignment, run.model_config.num_tokens))}
    if window.stats.align_sum is not None:  # REPA's loss (minus the mean cosine), apart from the interpolant's
        row["align_loss"] = window.stats.align_loss()
    if run.dist.is_main:
        append_row(run.config.out, row)
        run.tracker.scalars(run.step, trackers.flat_scalars(row, prefix="train/"))
        run.tracker.flush()  # as current as metrics.jsonl: a kill loses no logged step
        console.print(f"step {row['step']:>8}  loss {row['loss']:.4f}  {row['images_per_sec']:8.1f} img/s  "
                      f"lr {row['lr']:.1e}  grad {row['grad_norm']:.3f}  mem {row['memory_gib']:.2f} GiB", soft_wrap=True)


def checkpoint_extra(run: Run) -> dict[str, Any]:
    """What later stages read from a checkpoint's manifest, so no flag is repeated."""
    return CheckpointInfo(
        step=run.step, model=run.config.model, model_config=asdict(run.model_config), interp=run.config.interp,
        pred=run.config.pred, train_eps=run.train_eps, sample_eps=run.sample_eps,
        latent_shape=list(run.latents.latent_shape), num_classes=run.latents.num_classes,
    ).to_extra()


def maybe_checkpoint(run: Run, force: bool = False, plot: bool = True) -> None:
    """Save on rank 0 every ckpt_every steps (or when forced), prune old ones, redraw the loss curve (if `plot`).

    A stop signal saves with plot=False: within a scheduler's grace period only what the resume needs.
    """
    config = run.config
    if (run.step % config.ckpt_every and not force) or run.saved_step == run.step:
        return
    check_finite(run)  # a non-finite update is never saved
    if run.dist.is_main:
        consumed = run.step * (config.global_batch // config.data_lanes)
        state = {"samples_seen": run.step * config.global_batch, "world_size": run.dist.world_size,
                 "data": {"lanes": config.data_lanes, "samples_per_lane": consumed},
                 "log_window": run.window.record()}
        checkpoints.discard_partial(config.out, run.step)
        run.last_saved = checkpoints.save_checkpoint(
            config.out, run.step, model=run.net, ema=run.ema, optimizer=run.optimizer, state=state,
            config=asdict(config), latents=run.latents.artifact, extra=checkpoint_extra(run), modules=extra_modules(run),
        )
        run.tracker.text(run.step, "checkpoint", f"{run.last_saved.path.resolve()} (id {run.last_saved.id}): "
                                                 f"sitctl show {run.last_saved.id}")
        checkpoints.prune_checkpoints(config.out, config.keep_last, config.keep_every)
        if plot and metrics_path(config.out).is_file():
            save_loss_curve(metrics_path(config.out), Path(config.out) / "loss.png")
    run.saved_step = run.step
    distributed.barrier(run.dist)


def maybe_preview(run: Run) -> None:
    """Every preview_every steps rank 0 saves a grid of EMA samples (fixed noise and labels)."""
    config = run.config
    if not config.preview_every or run.step % config.preview_every:
        return
    check_finite(run)  # on every rank, so that all of them stop together
    if run.preview is not None:
        path = watch.draw_preview(run.preview, config.out, run.step)
        run.tracker.image(run.step, "preview", watch.read_png(path))


def maybe_evaluate(run: Run, console) -> None:
    """Every eval_every steps: FID of the EMA weights (sitctl/watch.py) into metrics.jsonl, fid.png and the tracker."""
    if run.evaluation is None or run.step % run.config.eval_every:
        return
    check_finite(run)  # a NaN network is not sampled, on any rank
    row = watch.measure_fid(run.evaluation, run.dist)
    if run.dist.is_main:
        watch.record_fid(run.config.out, run.step, row)
        run.tracker.scalars(run.step, {"eval/fid": row["fid"]})
        console.print(f"step {run.step:>8}  FID {row['fid']:.4f}  ({row['fid_num']} images, {row['fid_sampler']}, "
                      f"{row['fid_seconds']:.1f} s)", soft_wrap=True)
