"""A stage's settings as data until they are built, once.

A setting can come from four places: the dataclass default, a recipe, the record of the run or
interrupted artifact being continued, and the command line. Each source is a *layer*, a plain
mapping of field name to value with a name saying where it came from; `merge` lays them over each
other (later layers win) and passes every value through the same `convert`, so a recipe's
`lr = "fast"` is refused in one line exactly as a typed `--lr fast` is. `build` then constructs
the frozen config once; its `__post_init__` only checks.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Iterable, Mapping

from sitctl.errors import SitctlError
from sitctl.options import flag_of, spelling

Layer = tuple[str, Mapping[str, Any]]  # (where the values come from, e.g. "recipe sit-xl2"; field -> value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(cls) if field.init}


def _described(hint: Any) -> str:
    """How a type reads in a message: 'a number', 'true or false', 'a list of numbers'."""
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    if hint in names:
        return names[hint]
    arguments = [argument for argument in typing.get_args(hint) if argument is not type(None)]
    if typing.get_origin(hint) is tuple:
        items = ", ".join(_described(argument) for argument in arguments if argument is not Ellipsis)
        return f"a list of {items}" if Ellipsis in typing.get_args(hint) else f"a list of {len(arguments)}: {items}"
    return " or ".join(_described(argument) for argument in arguments)


def _as_type(value: Any, hint: Any) -> Any:
    """`value` as `hint` holds it; raises ValueError when it is not one."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        for argument in (argument for argument in arguments if argument is not type(None)):
            try:
                return _as_type(value, argument)
            except ValueError:
                continue
        raise ValueError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        items = [arguments[0]] * len(value) if arguments[-1] is Ellipsis else list(arguments)
        if len(items) != len(value):
            raise ValueError
        return tuple(_as_type(item, item_hint) for item, item_hint in zip(value, items))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, str) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise ValueError


def convert(cls: type, name: str, value: Any, origin: str) -> Any:
    """A value from any source as field `name` of `cls` holds it, or one line saying why not.

    Text given for a field the command line parses from text (`--guidance-interval 0,1`, a
    comma list) goes through that same parser.
    """
    field = _fields(cls)[name]
    parse = spelling(field)["parse"]
    if isinstance(value, str) and parse is not None:
        value = parse(value)
    hint = _hints(cls)[name]
    try:
        return _as_type(value, hint)
    except ValueError:
        raise SitctlError(f"{flag_of(field)} must be {_described(hint)}, got {value!r} ({origin})") from None


def merge(cls: type, layers: Iterable[Layer]) -> dict[str, Any]:
    """The layers laid over each other (later ones win), each value converted; unknown names refused."""
    fields, merged = _fields(cls), {}
    for origin, values in layers:
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SitctlError(f"{origin} sets unknown setting(s): {', '.join(unknown)}")
        merged.update({name: convert(cls, name, value, origin) for name, value in values.items()})
    return merged


def build(cls: type, layers: Iterable[Layer]) -> Any:
    """The frozen config of the merged layers: constructed once, checked by its `__post_init__`."""
    return cls(**merge(cls, layers))
