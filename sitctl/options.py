"""Command-line options generated from the stage config dataclasses: each setting is declared once.

A stage's frozen config dataclass is the single place where a setting lives: its field holds the
type and the default, the docstring under the field is the `--help` text, and `setting(...)`
metadata says how it is spelled on the command line (extra names, an argument, a `--x/--no-x`
pair, a tuple split into several options, a text parser). `config_command` turns the dataclass
into a typer command whose callback builds the config and hands it to the stage function, so a
new field shows up on the command line with its default and help and nothing else to edit.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import typing
from typing import Any, Callable

import typer

from sitctl.errors import SitctlError

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, *, flags: tuple[str, ...] = (), argument: bool = False, cli: bool = True,
            negatable: bool = False, invert: str | None = None, split: tuple[tuple[str, str], ...] = (),
            parse: Callable[[str], Any] | None = None, shown: str | None = None, repeat: bool = False) -> Any:
    """A config field with its command-line spelling (the docstring below the field is its help).

    flags: option names (default `--field-name`); argument: a positional argument instead;
    cli=False: not on the command line; negatable: a bool as `--x/--no-x`; invert: a bool set
    False by this flag (`--no-fetch` for fetch_weights); split: a tuple field as one option per
    element, each (flag, help); parse: the option is text turned into the value by this function,
    with `shown` as the default text; repeat: a tuple field given by repeating the option.
    """
    metadata = {"flags": flags, "argument": argument, "cli": cli, "negatable": negatable, "invert": invert,
                "split": split, "parse": parse, "shown": shown, "repeat": repeat}
    return dataclasses.field(default=default, metadata={"sitctl": metadata})


def _spelling(field: dataclasses.Field) -> dict[str, Any]:
    return field.metadata.get("sitctl") or setting().metadata["sitctl"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), whitespace-normalised, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_of(field: dataclasses.Field) -> str:
    """How a user spells this field on the command line (for error messages)."""
    spell = _spelling(field)
    return spell["invert"] or (spell["flags"] or (_flag(field.name),))[0]


def _parameters(cls: type, exclude: tuple[str, ...]) -> list[tuple[inspect.Parameter, Callable | None]]:
    """(typer parameter, how its value goes into the config kwargs) for every command-line field."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    out: list[tuple[inspect.Parameter, Callable | None]] = []
    for field in dataclasses.fields(cls):
        spell = _spelling(field)
        if not spell["cli"] or field.name in exclude or not field.init:
            continue
        help_text = docs.get(field.name)
        default = ... if field.default is MISSING else field.default
        if spell["split"]:
            for index, (flag, part_help) in enumerate(spell["split"]):
                name = flag.lstrip("-").replace("-", "_")
                info = typer.Option(default[index], flag, help=part_help)
                out.append((inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=float),
                            None))  # gathered into one tuple by config_command
            continue
        annotation, value_of = hints[field.name], _identity(field.name)
        item_type = _tuple_item(annotation)
        if spell["repeat"] and item_type is not None:  # --steps 20 --steps 50
            annotation, default, value_of = list[item_type], list(default), _as_tuple(field.name)
        elif spell["parse"] is None and item_type is not None:  # tuple[X, ...]: comma-separated on the command line
            spell = {**spell, "parse": _comma_list(item_type, spell["flags"] or (_flag(field.name),)),
                     "shown": ",".join(str(item) for item in default) or None}
        if spell["parse"] is not None:  # typed as text on the command line, parsed into the field
            default = spell["shown"]
            annotation = str if default is not None else (str | None)
            value_of = _parsed(field.name, spell["parse"])
        if spell["argument"]:
            info = typer.Argument(default, help=help_text)
            name = field.name
        elif spell["invert"]:
            name = spell["invert"].lstrip("-").replace("-", "_")
            info = typer.Option(False, spell["invert"], help=help_text)
            value_of = _inverted(field.name, name)
        else:
            flags = spell["flags"] or (_flag(field.name),)
            if spell["negatable"]:
                flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
            info = typer.Option(default, *flags, help=help_text)
            name = field.name
        out.append((inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation),
                    value_of))
    return out


def _tuple_item(annotation: Any) -> type | None:
    """X for tuple[X, ...], else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _comma_list(item_type: type, flags: tuple[str, ...]) -> Callable[[str | None], tuple]:
    def parse(text: str | None) -> tuple:
        try:
            return tuple(item_type(part.strip()) for part in (text or "").split(",") if part.strip())
        except ValueError:
            raise SitctlError(f"{flags[0]} takes comma-separated {item_type.__name__} values like 0,0.5,1, got {text!r}") from None
    return parse


def _as_tuple(name: str) -> Callable:
    return lambda values, kwargs: kwargs.__setitem__(name, tuple(values[name]))


def _identity(name: str) -> Callable:
    return lambda values, kwargs: kwargs.__setitem__(name, values[name])


def _parsed(name: str, parse: Callable[[str], Any]) -> Callable:
    return lambda values, kwargs: kwargs.__setitem__(name, parse(values[name]))


def _inverted(name: str, option: str) -> Callable:
    return lambda values, kwargs: kwargs.__setitem__(name, not values[option])


def config_command(cls: type, run: Callable[[Any], None], *, doc: str, exclude: tuple[str, ...] = (),
                   fixed: dict[str, Any] | None = None) -> Callable:
    """A typer command function whose options are `cls`'s fields; it builds `cls` and calls `run`."""
    parameters = _parameters(cls, exclude)
    split_fields = {field.name: [flag.lstrip("-").replace("-", "_") for flag, _ in _spelling(field)["split"]]
                    for field in dataclasses.fields(cls) if _spelling(field)["split"] and field.name not in exclude}

    def command(**values: Any) -> None:
        kwargs: dict[str, Any] = dict(fixed or {})
        for _, value_of in parameters:
            if value_of is not None:
                value_of(values, kwargs)
        for name, parts in split_fields.items():  # --beta1 --beta2 -> betas
            kwargs[name] = tuple(values[part] for part in parts)
        run(cls(**kwargs))

    command.__signature__ = inspect.Signature([parameter for parameter, _ in parameters])  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


# ---------------------------------------------------------------------------------------------
# Checks shared by every config's __post_init__
# ---------------------------------------------------------------------------------------------


def _floats_in(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, (tuple, list)):
        return [item for item in value if isinstance(item, float)]
    return []


def check_finite(config: Any) -> None:
    """Refuse NaN and infinity in any float setting (they would flow silently into images and losses)."""
    for field in dataclasses.fields(config):
        for number in _floats_in(getattr(config, field.name)):
            if not math.isfinite(number):
                raise SitctlError(f"{flag_of(field)} must be a finite number, got {number}")



def check_device(device: str | None) -> None:
    """Refuse a device other than cpu, cuda or cuda:N (torch would otherwise fail late, or not at all)."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise SitctlError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
