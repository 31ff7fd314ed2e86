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
TYPED_SOURCES = ("COMMANDLINE", "ENVIRONMENT")  # click's ParameterSource names: a value the user gave


def setting(default: Any = MISSING, *, flags: tuple[str, ...] = (), argument: bool = False, cli: bool = True,
            negatable: bool = False, invert: str | None = None, split: tuple[tuple[str, str], ...] = (),
            parse: Callable[[str], Any] | None = None, shown: str | None = None, repeat: bool = False,
            role: str = "shapes") -> Any:
    """A config field with its command-line spelling (the docstring below the field is its help).

    flags: option names (default `--field-name`); argument: a positional argument instead;
    cli=False: not on the command line; negatable: a bool as `--x/--no-x`; invert: a bool set
    False by this flag (`--no-fetch` for fetch_weights); split: a tuple field as one option per
    element, each (flag, help); parse: the option is text turned into the value by this function,
    with `shown` as the default text; repeat: a tuple field given by repeating the option;
    role: what the field is to the output, `shapes` unless said (sitctl/identity.py).
    """
    metadata = {"flags": flags, "argument": argument, "cli": cli, "negatable": negatable, "invert": invert,
                "split": split, "parse": parse, "shown": shown, "repeat": repeat, "role": role}
    return dataclasses.field(default=default, metadata={"sitctl": metadata})


def spelling(field: dataclasses.Field) -> dict[str, Any]:
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
    spell = spelling(field)
    return spell["invert"] or (spell["flags"] or (_flag(field.name),))[0]


def flag_named(config: Any, name: str) -> str:
    """How a user spells field `name` of a config (or its class) on the command line."""
    return flag_of(next(field for field in dataclasses.fields(config) if field.name == name))


def _option(field: str, parameter: inspect.Parameter, convert: str = "value", parse: Callable | None = None) -> dict:
    """One command-line option as plain data: the typer parameter, and how its value becomes the
    field's (`value` as is, `tuple` from a repeated option, `parse` from text, `invert` a --no-x
    flag, `part` one element of a split tuple)."""
    return {"field": field, "parameter": parameter, "convert": convert, "parse": parse}


def _keyword(name: str, info: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def _options(cls: type, exclude: tuple[str, ...]) -> list[dict]:
    """The options of every command-line field of `cls`, in field order."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    out: list[dict] = []
    for field in dataclasses.fields(cls):
        spell = spelling(field)
        if not spell["cli"] or field.name in exclude or not field.init:
            continue
        help_text = docs.get(field.name)
        default = ... if field.default is MISSING else field.default
        if spell["split"]:  # --beta1 --beta2 -> betas
            for index, (flag, part_help) in enumerate(spell["split"]):
                name = flag.lstrip("-").replace("-", "_")
                out.append(_option(field.name, _keyword(name, typer.Option(default[index], flag, help=part_help), float), "part"))
            continue
        annotation, convert, parse = hints[field.name], "value", spell["parse"]
        item_type = _tuple_item(annotation)
        if spell["repeat"] and item_type is not None:  # --steps 20 --steps 50
            annotation, default, convert = list[item_type], list(default), "tuple"
        elif parse is None and item_type is not None:  # tuple[X, ...]: comma-separated on the command line
            parse = _comma_list(item_type, spell["flags"] or (_flag(field.name),))
            spell = {**spell, "shown": ",".join(str(item) for item in default) or None}
        if parse is not None:  # typed as text on the command line, parsed into the field
            default, convert = spell["shown"], "parse"
            annotation = str if default is not None else (str | None)
        if spell["argument"]:
            out.append(_option(field.name, _keyword(field.name, typer.Argument(default, help=help_text), annotation), convert, parse))
        elif spell["invert"]:
            name = spell["invert"].lstrip("-").replace("-", "_")
            out.append(_option(field.name, _keyword(name, typer.Option(False, spell["invert"], help=help_text), annotation), "invert"))
        else:
            flags = spell["flags"] or (_flag(field.name),)
            if spell["negatable"]:
                flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
            out.append(_option(field.name, _keyword(field.name, typer.Option(default, *flags, help=help_text), annotation), convert, parse))
    return out


def _config_kwargs(options: list[dict], values: dict[str, Any]) -> dict[str, Any]:
    """The config's keyword arguments from the values typer parsed, option by option."""
    kwargs: dict[str, Any] = {}
    for option in options:
        field, value = option["field"], values[option["parameter"].name]
        if option["convert"] == "part":
            kwargs[field] = (*kwargs.get(field, ()), value)
        elif option["convert"] == "tuple":
            kwargs[field] = tuple(value)
        elif option["convert"] == "parse":
            kwargs[field] = option["parse"](value)
        elif option["convert"] == "invert":
            kwargs[field] = not value
        else:
            kwargs[field] = value
    return kwargs


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


def build_plain(cls: type, typed: dict[str, Any], untyped: dict[str, Any]) -> Any:
    """The config of one command line, with no other source of settings."""
    return cls(**untyped, **typed)


def config_command(cls: type, run: Callable[[Any], None], *, doc: str, exclude: tuple[str, ...] = (),
                   fixed: dict[str, Any] | None = None,
                   settle: Callable[[type, dict[str, Any], dict[str, Any]], Any] = build_plain) -> Callable:
    """A typer command function whose options are `cls`'s fields; it builds `cls` and calls `run`.

    settle(cls, typed, untyped) builds the config from the values typed on the command line and
    the rest (defaults and `fixed`); the CLI's adds recipes, resumes and the workspace
    (sitctl/defaults.py: settled_config).
    """
    options = _options(cls, exclude)

    def command(ctx: typer.Context, **values: Any) -> None:
        sources = {name: ctx.get_parameter_source(name) for name in values}
        typed_names = frozenset(option["field"] for option in options  # --beta1 is typing betas, --no-fetch fetch_weights
                                if (source := sources[option["parameter"].name]) is not None and source.name in TYPED_SOURCES)
        kwargs = {**(fixed or {}), **_config_kwargs(options, values)}
        typed = {name: value for name, value in kwargs.items() if name in typed_names}
        run(settle(cls, typed, {name: value for name, value in kwargs.items() if name not in typed_names}))

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context] + [option["parameter"] for option in options])  # type: ignore[attr-defined]
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
