"""The command line is generated from the stage configs: same options, defaults and help as the hand-written one.

`data/cli_before.json` is every command's parameters as they were when options were written by
hand in cli.py (taken just before the switch). A change there must be intended and listed in
INTENDED; new options are allowed.
"""

import json
import math
from pathlib import Path

import pytest
import typer

from sitctl.bench import app as bench_app
from sitctl.cli import app
from sitctl.configs import EncodeConfig, SampleConfig, TrainConfig
from sitctl.errors import SitctlError
from sitctl.options import field_docs

BEFORE = Path(__file__).parent / "data" / "cli_before.json"
# (command, option names) -> the fields whose change is intended, with why.
INTENDED: dict[tuple[str, tuple[str, ...]], set[str]] = {
    # issue 14: the loader benchmark measures synthetic 4x32x32 (ImageNet-256) latents, not digits.
    ("bench all", ("--latents",)): {"help"},
    ("bench loader", ("--latents",)): {"help"},
    ("bench loader", ("--images",)): {"default", "help"},
    ("bench loader", ("--seconds",)): {"help"},
    # The workspace (issue 11): inputs and --out are optional; a missing one is the latest
    # finished artifact of its kind / the next version, and the help says so.
    ("sitctl encode", ("--out",)): {"help", "required"},
    ("sitctl train", ("latents",)): {"help", "required"},
    ("sitctl train", ("--out",)): {"help", "required"},
    ("sitctl train", ("--resume",)): {"help"},  # without --out: the latest run
    ("sitctl sample", ("checkpoint",)): {"help", "required"},
    ("sitctl sample", ("--out",)): {"help", "required"},
    ("sitctl eval ref", ("--out",)): {"help", "required"},
    ("sitctl eval sweep", ("--ref",)): {"help"},  # default: the reference of the run's lineage
    **{(f"sitctl eval {name}", ("samples",)): {"help", "required"} for name in ("fid", "is", "kid", "prc", "all")},
    # default --out is metrics/vN, no longer a folder beside the samples; default --ref: the lineage's reference
    **{(f"sitctl eval {name}", (option,)): {"help"} for name in ("fid", "is", "kid", "prc", "all")
       for option in ("--out", "--ref")},
    ("sitctl train", ("--precision",)): {"default", "help"},  # issue 14: auto = bf16 on CUDA, fp32 on CPU
    ("sitctl eval table", ("path",)): {"default", "help"},  # default: the workspace's metrics/results.jsonl
    ("sitctl show", ("path",)): {"help"},  # also kind/vN or an id prefix
    ("sitctl verify", ("path",)): {"help"},
    # One declaration of the Inception settings for eval, eval ref and eval sweep (their help said the same in three ways).
    **{(f"sitctl eval {name}", ("--device",)): {"help"} for name in ("fid", "is", "kid", "prc", "all", "ref", "sweep")},
    ("sitctl eval sweep", ("--metric",)): {"help"},  # issue 21: sfid can be swept too
    ("sitctl sample", ("--published",)): {"help"},  # issue 19: a REPA release is a third kind
    ("sitctl encode", ("--workers",)): {"default", "help"},  # issue 22: 4, or fewer on a machine with fewer usable cores
    # issue 32: a period typed is honoured or refused; the default (25,000 steps) may skip with a note
    ("sitctl train", ("--eval-every",)): {"default", "help"},
    # issue 33: 8 lanes where 8 work, else a multiple of the processes (the guide's 4 x 8 GPUs ran into 8)
    ("sitctl train", ("--data-lanes",)): {"default", "help"},
}
# issue 14: bench loader reports start-up apart from steady state; issue 21: eval prc names torch-fidelity (eval paper has
# ADM's), eval ref-npz also exports mu_s/sigma_s
CHANGED_COMMAND_HELP = {"bench loader", "sitctl eval prc", "sitctl eval ref-npz"}


def _commands(group, prefix):
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def current_parameters() -> dict[str, dict]:
    found = {}
    for root, prefix in ((app, "sitctl"), (bench_app, "bench")):
        for path, command in _commands(typer.main.get_command(root), prefix):
            params = {}
            for param in command.params:
                default = list(param.default) if isinstance(param.default, tuple) else param.default
                params[tuple(sorted(param.opts + param.secondary_opts))] = {
                    "default": default, "help": getattr(param, "help", None), "required": param.required,
                    "kind": type(param).__name__}
            found[path] = {"help": (command.help or "").strip(), "params": params}
    return found


def test_every_option_keeps_its_names_default_and_help():
    before, now = json.loads(BEFORE.read_text()), current_parameters()
    assert set(before) <= set(now)
    for command, spec in before.items():
        assert now[command]["help"] == spec["help"] or command in CHANGED_COMMAND_HELP, command
        for param in spec["params"].values():
            names = tuple(param["opts"])
            assert names in now[command]["params"], (command, names)
            changed = {key for key in ("default", "help", "required", "kind")
                       if now[command]["params"][names][key] != param[key]}
            assert changed <= INTENDED.get((command, names), set()), (command, names, changed)


def test_option_help_is_the_config_field_docstring():
    now = current_parameters()["sitctl train"]["params"]
    assert now[("--lr",)]["help"] == field_docs(TrainConfig)["lr"]
    assert now[("--ema-decay",)]["default"] == TrainConfig.__dataclass_fields__["ema_decay"].default


@pytest.mark.parametrize("make", [
    lambda: TrainConfig(latents="l", out="o", lr=math.nan),
    lambda: TrainConfig(latents="l", out="o", betas=(0.9, math.inf)),
    lambda: SampleConfig(checkpoint="c", out="o", cfg_scale=math.nan),
    lambda: SampleConfig(checkpoint="c", out="o", w=math.inf),
    lambda: SampleConfig(checkpoint="c", out="o", guidance_interval=(0.0, math.nan)),
])
def test_non_finite_numbers_are_refused_up_front(make):
    with pytest.raises(SitctlError, match="must be a finite number"):
        make()


@pytest.mark.parametrize("make", [
    lambda device: TrainConfig(latents="l", out="o", device=device),
    lambda device: EncodeConfig(src="s", out="o", device=device),
    lambda device: SampleConfig(checkpoint="c", out="o", device=device),
])
def test_unknown_devices_are_refused(make):
    for device in ("tpu", "cuda:x", "mps"):
        with pytest.raises(SitctlError, match="--device must be cpu, cuda or cuda:N"):
            make(device)
    make("cuda:1")  # a valid name is accepted (whether it exists is checked when the stage starts)


def test_cli_reports_a_non_finite_option_in_one_line(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["sample", str(tmp_path), "--out", str(tmp_path / "s"), "--cfg", "nan"])
    assert result.exit_code != 0
    assert str(result.exception) == "--cfg must be a finite number, got nan"
