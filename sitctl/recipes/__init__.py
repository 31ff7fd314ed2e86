"""Named recipes: a published setup as one word (`sitctl train --recipe sit-xl2`).

A recipe is a TOML file: `description`, `paper`, `reproduces` (the table and number it is meant
to reproduce), then a `[train]` and/or `[sample]` table whose keys are the fields of TrainConfig
and SampleConfig. The shipped ones live beside this module; `--recipe PATH.toml` takes a user's
own. A recipe only fills settings: anything typed on the command line wins, and the artifact
records every resolved setting plus the recipe's name, so a recipe is never needed to read it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from sitctl.errors import SitctlError

SHIPPED = Path(__file__).parent
STAGES = {"TrainConfig": "train", "SampleConfig": "sample"}


def recipe_names() -> list[str]:
    return sorted(path.stem for path in SHIPPED.glob("*.toml"))


def load_recipe(name: str) -> dict[str, Any]:
    """The recipe called `name` (shipped) or at path `name` (a .toml file), as a dict."""
    path = Path(name) if name.endswith(".toml") else SHIPPED / f"{name}.toml"
    if not path.is_file():
        raise SitctlError(f"no recipe {name!r}; shipped: {', '.join(recipe_names())} (or give a .toml file)")
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SitctlError(f"recipe {path} cannot be read: {error}") from None


def apply_recipe(config: Any, given: frozenset[str]) -> Any:
    """`config` with its recipe's settings for this stage, except those typed on the command line."""
    if getattr(config, "recipe", None) is None:
        return config
    stage = STAGES[type(config).__name__]
    values = load_recipe(config.recipe).get(stage)
    if values is None:
        raise SitctlError(f"recipe {config.recipe!r} has no [{stage}] settings")
    fields = {field.name: field for field in dataclasses.fields(config) if field.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SitctlError(f"recipe {config.recipe!r} sets unknown {stage} setting(s): {', '.join(unknown)}")
    taken = {name: tuple(value) if isinstance(value, list) else value
             for name, value in values.items() if name not in given}
    return dataclasses.replace(config, **taken)


def describe(name: str) -> dict[str, str]:
    recipe = load_recipe(name)
    stages = "+".join(stage for stage in ("train", "sample") if stage in recipe)
    return {"name": name, "stages": stages, "description": recipe.get("description", ""),
            "reproduces": recipe.get("reproduces", ""), "paper": recipe.get("paper", "")}
