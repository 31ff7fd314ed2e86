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
    checkpoint: str = typer.Argument(..., help="Checkpoint artifact, run dir (its latest checkpoint), or a published SiT .pt file."),
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
        seed=seed, labels=labels, ema=ema, model=model, vae=vae, npz=npz, preview=preview, device=device, tf32=tf32,
    )
    artifact = sample_stage(config)
    if int(os.environ.get("RANK", "0")) == 0:
        extra = artifact.extra
        typer.echo(f"wrote {artifact.path}: {extra['num_samples']} images of {extra['image_size']}px ({artifact.id})")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit status 2."""
    try:
        app(standalone_mode=False)
    except SitctlError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit code and message
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
