"""What a stage's settings make: the one rule for "same settings?", and resuming from a record.

Each config field declares its role once, in `setting(role=...)` (sitctl/options.py):

    shapes   the output depends on it (most fields); a resume must keep it
    extends  how far a run goes (train's --steps): part of a finished result's identity, but a
             resumed run may go further
    input    the artifact a stage reads, by path; stages check inputs by content id themselves
    free     where the result goes or how fast it is made (--out, workers, logging, device)

Every guard is derived from that declaration: the workspace's request note (which interrupted
version a rerun continues), train's resume check, sample's resume check, the eval stage's reuse,
the study's sittings, and the reuse of a finished result by the sweep, the study and the demo
(`made_otherwise`). A new field shapes the output unless it says otherwise, so forgetting to
classify it makes a resume stricter, never silently mixed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipelines.files import write_json_atomic
from sitctl.artifacts import REQUEST_FILE, Artifact
from sitctl.errors import SitctlError
from sitctl.options import flag_of

SHAPES, EXTENDS, INPUT, FREE = "shapes", "extends", "input", "free"
ROLES = (SHAPES, EXTENDS, INPUT, FREE)
IDENTITY = (SHAPES, EXTENDS)  # what makes two finished results the same, wherever they were placed
REQUEST = (SHAPES, EXTENDS, INPUT)  # what a rerun must repeat to continue an interrupted one


def role(field: dataclasses.Field) -> str:
    return (field.metadata.get("sitctl") or {}).get("role", SHAPES)


def fields_with(config_class: type, roles: Iterable[str]) -> list[dataclasses.Field]:
    roles = tuple(roles)
    return [field for field in dataclasses.fields(config_class) if field.init and role(field) in roles]


def as_json(value: Any) -> Any:
    """A value as a manifest records it (tuples become lists), so records and configs compare equal."""
    return json.loads(json.dumps(value, default=str))


def settings_of(config: Any, roles: Iterable[str] = IDENTITY) -> dict[str, Any]:
    """The fields of `config` with these roles, as JSON values."""
    return {field.name: as_json(getattr(config, field.name)) for field in fields_with(type(config), roles)}


def recorded_value(recorded: Mapping[str, Any], field: dataclasses.Field) -> Any:
    """The record's value of `field`; a record made before the field existed had its default."""
    if field.name in recorded or field.default is dataclasses.MISSING:
        return recorded.get(field.name)
    return as_json(field.default)


def same_settings(recorded: Mapping[str, Any], config: Any, roles: Iterable[str] = IDENTITY) -> bool:
    """Whether a record (a manifest's config, a note) holds exactly `config`'s settings of these roles."""
    return changed_setting(recorded, config, roles) is None


def changed_setting(recorded: Mapping[str, Any], config: Any, roles: Iterable[str] = (SHAPES,)) -> str | None:
    """'--flag OLD, now NEW' for the first field of these roles that differs from the record, else None."""
    for field in fields_with(type(config), roles):
        ours, theirs = as_json(getattr(config, field.name)), recorded_value(recorded, field)
        if theirs != ours:
            return f"{flag_of(field)} {theirs!r}, now {ours!r}"
    return None


def made_otherwise(artifact: Artifact, config: Any, inputs: Iterable[str], roles: Iterable[str] = IDENTITY) -> str | None:
    """Why the finished `artifact` is not what `config` makes from `inputs` (content ids); None when it is.

    The reuse rule of every stage that looks for an earlier result: the same identity settings,
    and exactly the same inputs by id (a path says where an input was, not what it held). A run
    that may have gone further than asked compares only the settings that shape it (SHAPES).
    """
    change = changed_setting(artifact.config, config, roles)
    if change is not None:
        return f"it was made with {change}"
    made_from, wanted = sorted(ref["id"] for ref in artifact.inputs), sorted(inputs)
    if made_from != wanted:
        return f"it was made from {', '.join(made_from) or 'no input'}, now {', '.join(wanted) or 'no input'}"
    return None


def check_continues(recorded: Mapping[str, Any], config: Any, what: str, hint: str,
                    error: type[SitctlError] = SitctlError) -> None:
    """Refuse to continue `what` with a shaping setting other than the one it was made with."""
    change = changed_setting(recorded, config)
    if change is not None:
        raise error(f"cannot continue {what}: it was made with {change}; {hint}")


def resumed(config_class: type, recorded: Mapping[str, Any], given: Iterable[str],
            roles: Iterable[str] = IDENTITY) -> dict[str, Any]:
    """The record's settings of these roles that were not typed (`given`): the layer of settings
    (sitctl/settings.py) that what a command continues contributes.

    What a resume continues decides its settings; the command line changes only what it names,
    and a change to a shaping setting is then refused by `check_continues`.
    """
    given = set(given)
    return {field.name: recorded[field.name] for field in fields_with(config_class, roles)
            if field.name not in given and field.name in recorded}


# ---------------------------------------------------------------------------------------------
# The request note: a staging dir remembers the settings it is being made with
# ---------------------------------------------------------------------------------------------


def record_request(staging: Path, config: Any, **inputs: Any) -> None:
    """Note in `staging` the request it is being made with (one writer: rank 0); `inputs` adds
    what the config names only by path (sample: the identity of the weights)."""
    write_json_atomic(staging / REQUEST_FILE, {**settings_of(config, REQUEST), **inputs})


def read_request(staging: Path) -> dict[str, Any] | None:
    """The request note of `staging`, or None when there is none (or it cannot be read)."""
    try:
        note = json.loads((staging / REQUEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def made_for(staging: Path, config: Any) -> bool:
    """Whether `staging` was begun by this same request (a missing or unreadable note is no match)."""
    note = read_request(staging)
    return note is not None and same_settings(note, config, REQUEST)
