"""Every `sitctl` command in the README and the user's guide parses against the real CLI.

The stages themselves are exercised at tiny size by their own tests and by the demo test; this
keeps the documentation from naming options, subcommands or values that no longer exist.
"""

import re
import shlex
from pathlib import Path

import pytest
import typer

from sitctl.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `sitctl`) for each sitctl command line in a bash block of the docs."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for start, word in enumerate(words):
                    if word == "sitctl" and start + 1 < len(words) and not words[start + 1].startswith("-"):
                        argv = words[start + 1 :]
                    elif word == "sitctl.cli":
                        argv = words[start + 1 :]
                    else:
                        continue
                    ends = [argv.index(operator) for operator in ("&&", "||", "&", ";", "|") if operator in argv]
                    argv = argv[: min(ends)] if ends else argv  # a shell operator ends the command
                    found.append((f"{document.name}: {line.strip()}", argv))
                    break
    return found


def parse(argv: list[str]) -> None:
    """Parse argv down to the leaf command, as click would before invoking it (nothing runs)."""
    # typer vendors its own click, so groups are recognised by what they do, not by class.
    command = typer.main.get_command(app)
    context = command.make_context("sitctl", list(argv))
    while hasattr(command, "resolve_command"):
        rest = [*getattr(context, "_protected_args", []), *context.args]
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)


COMMANDS = documented_commands()


def test_the_docs_show_every_stage():
    stages = {argv[0] for _, argv in COMMANDS}
    assert {"demo", "encode", "train", "sample", "eval", "show", "verify"} <= stages


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    parse(argv)


def test_a_misspelt_option_or_command_is_caught():
    with pytest.raises(Exception, match="--modle") as error:
        parse(["train", "latents/in256", "--modle", "SiT-XL/2", "--out", "runs/x"])
    assert type(error.value).__name__ == "NoSuchOption"
    with pytest.raises(Exception, match="fdi"):
        parse(["eval", "fdi", "samples/x"])
