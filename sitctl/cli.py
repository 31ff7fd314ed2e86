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
