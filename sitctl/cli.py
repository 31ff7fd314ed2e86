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
