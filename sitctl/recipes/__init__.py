"""Named recipes: a published setup as one word (`sitctl train --recipe sit-xl2`).

A recipe is a TOML file: `description`, `paper`, `reproduces` (the table and number it is meant
to reproduce), then a `[train]` and/or `[sample]` table whose keys are the fields of TrainConfig
and SampleConfig. The shipped ones live beside this module; `--recipe PATH.toml` takes a user's
own. A recipe only fills settings: anything typed on the command line wins, and the artifact
records every resolved setting plus the recipe's name, so a recipe is never needed to read it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

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


def recipe_layers(config_class: type, name: str | None, typed: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The layer of settings (sitctl/settings.py) that recipe `name` gives this stage, less those
    typed on the command line; none without a recipe. Its values are converted and checked as typed ones are."""
    if name is None:
        return []
    stage = STAGES[config_class.__name__]
    values = load_recipe(name).get(stage)
    if values is None:
        raise SitctlError(f"recipe {name!r} has no [{stage}] settings")
    return [(f"recipe {name!r} [{stage}]", {key: value for key, value in values.items() if key not in typed})]


def describe(name: str) -> dict[str, str]:
    recipe = load_recipe(name)
    stages = "+".join(stage for stage in ("train", "sample") if stage in recipe)
    return {"name": name, "stages": stages, "description": recipe.get("description", ""),
            "reproduces": recipe.get("reproduces", ""), "paper": recipe.get("paper", "")}
