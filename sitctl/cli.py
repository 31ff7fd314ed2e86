"""The `sitctl` command line: thin typer commands that build a config and call a stage function.

Each command's docstring is its --help text. Heavy imports (torch, diffusers) happen inside
the commands, so `sitctl --help` stays fast. Errors a user can cause (SitctlError) are printed
as one line on stderr with exit status 2; a stage stopped by SIGTERM or SIGINT (sitctl/signals.py)
prints what it saved and how to continue, and exits 128 + the signal number. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import typer

from sitctl import __version__, configs
from sitctl.errors import SitctlError
from sitctl.evaluate.registry import ALL_WITH_REFERENCE, REGISTRY
from sitctl.options import config_command
from sitctl.signals import Interrupted

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


def _command(typer_app: typer.Typer, command: str, config_class: type, report: Callable[[Any], None],
             doc: str, stage: bool = False, **options: Any) -> None:
    """Register `command`: its options come from the config dataclass (declared once there).

    stage: the command makes or reads artifacts, so its config is settled by sitctl/defaults.py
    (recipe, what it continues, the workspace's inputs and --out); else it is the command line's alone.
    """
    if stage:
        options["settle"] = _settled
    typer_app.command(command)(config_command(config_class, report, doc=doc, **options))


def _settled(cls: type, typed: dict[str, Any], untyped: dict[str, Any]):
    """The stage's config from every source, built once (sitctl/defaults.py); choices said on rank 0."""
    from sitctl.defaults import settled_config  # start-up cost: the stages' modules import torch

    return settled_config(cls, typed, untyped, say=_say)


# ---------------------------------------------------------------------------------------------
# encode, show, verify (artifacts and the encode stage)
# ---------------------------------------------------------------------------------------------


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(line: str) -> None:
    """The one line saying which input a stage took or which version it writes (rank 0 only)."""
    if _main_rank():
        typer.echo(line)


def _encode(config) -> None:
    from sitctl.encode import encode  # start-up cost: `sitctl --help` loads no stage
    from sitctl.records import LatentsInfo  # start-up cost: `sitctl --help` loads no stage

    artifact = encode(config)
    if artifact is not None:
        info = LatentsInfo.from_artifact(artifact)
        typer.echo(f"wrote {artifact.path}: {info.num_samples} samples in {len(info.shards)} shards, {info.num_errors} skipped")


_command(app, "encode", configs.EncodeConfig, _encode, stage=True, doc="""Encode images into a latents artifact: VAE moments of each image and its flip, in WebDataset shards.

    Runs as one process or under torchrun (shard i goes to rank i % world); rerunning after a crash
    resumes from the complete shards.
    """)


NAME_HELP = "An artifact: a directory, kind/vN (e.g. runs/v2: its newest checkpoint) or an id prefix."


def _artifact_path(name: str) -> str:
    from sitctl.workspace import resolve_any  # start-up cost: `sitctl --help` loads no stage

    return str(resolve_any(name))


@app.command()
def show(
    path: str = typer.Argument(..., help=NAME_HELP),
    kind: str = typer.Option(None, "--kind", help="Fail unless the artifact is of this kind."),
) -> None:
    """Print an artifact's summary and its lineage back to the raw data."""
    from sitctl.show import show as run_show  # start-up cost: `sitctl --help` loads no stage

    run_show(_artifact_path(path), kind=kind)


@app.command()
def verify(
    path: str = typer.Argument(..., help=NAME_HELP),
    kind: str = typer.Option(None, "--kind", help="Fail unless the artifact is of this kind."),
) -> None:
    """Recheck the sha256 of every file of an artifact: prints OK, or one error line (exit 2)."""
    from sitctl.show import verify as run_verify  # start-up cost: `sitctl --help` loads no stage

    artifact = run_verify(_artifact_path(path), kind=kind)
    typer.echo(f"OK {artifact.path}: {artifact.kind} {artifact.id}, {len(artifact.manifest['files'])} files verified")


@app.command("ls")
def list_workspace() -> None:
    """List every artifact version of the workspace (this folder, or the nearest parent marked as one)."""
    from rich.console import Console

    from sitctl.workspace import find_root, ls_table  # start-up cost: `sitctl --help` loads no stage

    Console().print(ls_table(find_root()))


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _train(config) -> None:
    from sitctl.records import CheckpointInfo  # start-up cost: `sitctl --help` loads no stage
    from sitctl.train import train  # start-up cost: `sitctl --help` loads no stage

    artifact = train(config)
    if artifact is not None:
        typer.echo(f"checkpoint {artifact.path} (step {CheckpointInfo.from_artifact(artifact).step})")


_command(app, "train", configs.TrainConfig, _train, stage=True, doc="""Train a SiT on a latents artifact, as one process or under torchrun; checkpoints are artifacts.

    SIGTERM or Ctrl-C saves a checkpoint and exits; rerun with --resume to continue exactly.
    """)


@app.command("recipes")
def recipes() -> None:
    """List the named recipes: published setups for `sitctl train/sample --recipe NAME`."""
    from sitctl.recipes import describe, recipe_names  # start-up cost: `sitctl --help` loads no stage

    for name in recipe_names():
        entry = describe(name)
        typer.echo(f"{name:<14} [{entry['stages']}] {entry['description']}\n{'':<15}reproduces: {entry['reproduces']} ({entry['paper']})")


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def _sample(config) -> None:
    from sitctl.records import SamplesInfo  # start-up cost: `sitctl --help` loads no stage
    from sitctl.sample import sample_stage  # start-up cost: `sitctl --help` loads no stage

    artifact = sample_stage(config)
    if _main_rank():
        info = SamplesInfo.from_artifact(artifact)
        typer.echo(f"wrote {artifact.path}: {info.num_samples} images of {info.image_size}px ({artifact.id})")


_command(app, "sample", configs.SampleConfig, _sample, stage=True, doc="""Draw images from a checkpoint into a samples artifact (one process or under torchrun).

    Defaults are the paper's: SDE Euler-Maruyama, 250 steps, diffusion sigma, w 1, last step mean
    0.04; ODE dopri5 with atol 1e-6, rtol 1e-3; EMA weights; no guidance. Image i is the same on
    any number of processes; a killed run resumes where it stopped when rerun.
    """)


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

eval_app = typer.Typer(
    help="Score samples against real images: FID, sFID, IS, KID, precision/recall, the papers' row; references, tables, sweeps.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(eval_app, name="eval")


def _evaluate(config) -> None:
    from sitctl.evaluate.results import paper_row  # start-up cost: `sitctl --help` loads no stage
    from sitctl.evaluate.stage import evaluate_stage  # start-up cost: `sitctl --help` loads no stage
    from sitctl.records import MetricsInfo  # start-up cost: `sitctl --help` loads no stage

    info = MetricsInfo.from_artifact(artifact := evaluate_stage(config))
    if "paper" in config.metrics:
        for line in paper_row(info.values, info.unavailable, info.num_samples):
            typer.echo(line)
    else:
        for name, value in info.values.items():
            typer.echo(f"{name}: {value:.6g}")
    typer.echo(f"metrics artifact: {artifact.path} ({info.num_samples} samples)")


for _metric in REGISTRY.values():  # one `sitctl eval NAME` per registered metric
    _command(eval_app, _metric.name, configs.EvalConfig, _evaluate, stage=True, doc=_metric.help,
             fixed={"metrics": (_metric.name,)})
_command(eval_app, "all", configs.EvalConfig, _evaluate, stage=True, fixed={"metrics": ALL_WITH_REFERENCE},
         doc="FID, KID and precision/recall in one pass (add IS with `eval is`).")


def _reference(config) -> None:
    from sitctl.evaluate.reference import build_reference  # start-up cost: `sitctl --help` loads no stage
    from sitctl.records import ReferenceInfo  # start-up cost: `sitctl --help` loads no stage

    artifact = build_reference(config)
    typer.echo(f"reference artifact: {artifact.path} ({ReferenceInfo.from_artifact(artifact).num_images} images, id {artifact.id})")


_command(eval_app, "ref", configs.ReferenceConfig, _reference, stage=True,
         doc="Make a reference artifact: real images cropped as encode crops them, their Inception features and mu/sigma.")


@eval_app.command("ref-npz")
def eval_ref_npz(
    ref: str = typer.Argument(..., help="Reference artifact directory."),
    out: str = typer.Argument(..., help="The .npz file to write."),
) -> None:
    """Export a reference artifact as an ADM reference batch .npz (arr_0 images, mu, sigma, mu_s, sigma_s)."""
    from sitctl.artifacts import open_artifact  # start-up cost: `sitctl --help` loads no stage
    from sitctl.evaluate.reference import write_adm_npz  # start-up cost: `sitctl --help` loads no stage

    typer.echo(f"wrote {write_adm_npz(open_artifact(ref, 'reference'), out)}")


@eval_app.command("table")
def eval_table(path: str = typer.Argument(None, help="A results.jsonl, or a folder holding one (default: the workspace's metrics/results.jsonl, else ./results.jsonl).")) -> None:
    """Print the results table (every evaluation appended to results.jsonl)."""
    from rich.console import Console

    from sitctl.evaluate.results import read_results, results_table  # start-up cost: `sitctl --help` loads no stage
    from sitctl.workspace import results_file  # start-up cost: `sitctl --help` loads no stage

    if path is None:
        path = str(results_file()) if results_file().is_file() else "."
    Console().print(results_table(read_results(path)))


def _sweep(config) -> None:
    from sitctl.evaluate.sweep import sweep_stage  # start-up cost: `sitctl --help` loads no stage

    summary = sweep_stage(config)
    for point in summary["points"]:
        typer.echo(f"cfg {point['cfg_scale']}  w {point['w']}  {config.metric} {point['value']:.6g}")
    typer.echo(f"plot: {summary['plot']}")


_command(eval_app, "sweep", configs.SweepConfig, _sweep, stage=True,
         doc="Sample and score RUN for each w and/or guidance scale (reusing finished points); plot metric vs value.")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def _demo(config) -> None:
    from sitctl.demo import run_demo  # start-up cost: `sitctl --help` loads no stage

    run_demo(config)


_command(app, "demo", configs.DemoConfig, _demo, doc="""Run encode -> train -> sample -> eval on scikit-learn's digits, on CPU, in a few minutes.

    Prints each stage's progress, the FID against held-out real digits (real FID Inception
    network, offline) and the path of the sample grid PNG.
    """)


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def _doctor(config) -> None:
    from sitctl.doctor import run_doctor  # start-up cost: `sitctl --help` loads no stage

    run_doctor(config)


_command(app, "doctor", configs.DoctorConfig, _doctor, doc="""Check this machine before spending GPU hours: versions, GPUs, kernels, offline files, a measured check.

    Reports torch/CUDA/cuDNN/NCCL and library versions, GPUs and memory, bf16, the attention
    kernels available, whether torch.compile works, which offline files are present (with the
    command that fetches each), and train-step, sampling and loader throughput against the
    figures expected on this hardware, with a verdict.
    """)


# ---------------------------------------------------------------------------------------------
# study
# ---------------------------------------------------------------------------------------------


def _study(config) -> None:
    import json

    from sitctl.study.run import study_command  # start-up cost: `sitctl --help` loads no stage

    typer.echo(json.dumps(study_command(config), indent=2))


_command(app, "study", configs.StudyConfig, _study, doc="""Run the SiT paper's ablations at small scale on Fashion-MNIST (docs/REPRODUCTION.md).

    DiT -> SiT path, interpolant x prediction, samplers and training seeds, one choice at a time;
    `--ablations convergence` adds FID against training step for SiT, REPA, logit-normal t and DiT
    (about 2 hours); every point is an artifact reused by a rerun, so the study runs in several
    sittings (--max-minutes).
    """)


def run_app(typer_app: typer.Typer, args: list[str] | None = None, prog_name: str | None = None) -> None:
    """Run a typer app: usage errors as click reports them, SitctlError as one line; both exit 2.

    Standalone mode lets click print --help, usage errors and Ctrl-C itself (it vendors its own
    exception classes inside typer, so they are not caught here); a user error raised by a
    stage is one red line; a stage stopped by a signal says what it saved and how to continue
    it, and exits 128 + the signal number; anything else is a bug and keeps its traceback.
    """
    try:
        typer_app(args=args, prog_name=prog_name)
    except Interrupted as stopped:
        if not stopped.quiet:  # under torchrun, rank 0 speaks for every rank
            typer.echo(stopped.line(list(sys.argv[1:] if args is None else args)), err=True)
        sys.exit(stopped.exit_code)
    except SitctlError as error:
        if not getattr(error, "quiet", False):  # under torchrun, the rank that failed says why
            typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(2)


def main() -> None:
    """Console entry point of `sitctl`."""
    run_app(app)


if __name__ == "__main__":
    main()
