"""The results table: one JSON line per evaluation, appended by `eval`, printed by `eval table`."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from sitctl.artifacts import Artifact, ancestor
from sitctl.errors import SitctlError
from sitctl.evaluate.registry import PAPER_COLUMNS
from sitctl.records import MetricsInfo
from sitctl.workspace import find_root, name_of

RESULTS_FILE = "results.jsonl"
# Sampler settings worth a column, when the samples stage recorded them in its config.
SAMPLER_KEYS = ("mode", "method", "steps", "w", "diffusion", "cfg_scale")
VALUE_KEYS = ("fid", "sfid", "is_mean", "adm_is", "kid_mean", "precision", "recall", "adm_precision", "adm_recall")


def result_row(metrics: Artifact, samples: Artifact) -> dict[str, Any]:
    """The row for one metrics artifact: values, count, reference, sampler settings, checkpoint step."""
    checkpoint = ancestor(samples, "checkpoint")
    info = MetricsInfo.from_artifact(metrics)
    sampler = {key: samples.config[key] for key in SAMPLER_KEYS if key in samples.config}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": str(metrics.path.resolve()),
        "metrics_id": metrics.id,
        "samples": str(samples.path.resolve()),
        "samples_id": samples.id,
        "reference_id": (info.reference or {}).get("id"),
        "num_samples": info.num_samples,
        "step": checkpoint.extra.get("step") if checkpoint is not None else None,  # shown only: any checkpoint
        "sampler": sampler,
        "values": info.values,
        "unavailable": info.unavailable,
    }


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one line; a single O_APPEND write keeps concurrent evaluations from interleaving."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=False) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a results file (or of results.jsonl inside a directory); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise SitctlError(f"{path}: no results table here (eval commands append to results.jsonl)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write
    return rows


def results_table(rows: list[dict[str, Any]], root: Path | None = None):
    """A rich Table, one row per evaluation, that reads at 80 columns.

    Samples and metrics go by their workspace names (`samples/v2`) where they have one; the
    sampler settings share one wrapped column (`sde euler 250 w1 cfg1.5`) instead of six
    truncated ones; a column per metric that appears. ADM's IS, precision and recall (`eval
    paper`) have columns of their own, apart from torch-fidelity's. A value a run could not give
    reads `n/a` and the caption says why; `n` is every row's sample count (FID-10K is not FID-50K).
    """
    root = root or find_root()
    values = [key for key in (*VALUE_KEYS, "kid_std", "is_std", "f_score")
              if any(key in r["values"] or key in r.get("unavailable", {}) for r in rows)]
    table = Table(title=f"{len(rows)} evaluation(s)", title_justify="left")
    table.add_column("samples", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("sampler", overflow="fold", min_width=12)
    for key in values:
        table.add_column(SHORT_NAMES.get(key, key), justify="right", no_wrap=True)
    table.add_column("metrics", no_wrap=True)
    for row in rows:
        cells = [_name(row["samples"], root, name_of), _cell(row.get("step")), str(row["num_samples"]),
                 sampler_text(row.get("sampler", {}))]
        cells += ["n/a" if key in row.get("unavailable", {}) else _cell(row["values"].get(key)) for key in values]
        table.add_row(*cells, _name(row.get("metrics", "-"), root, name_of))
    reasons = sorted({f"{SHORT_NAMES.get(key, key)} n/a: {why}" for row in rows for key, why in row.get("unavailable", {}).items()})
    table.caption, table.caption_justify = "\n".join(reasons) or None, "left"
    return table


# Column titles short enough for 80 columns.
SHORT_NAMES = {"is_mean": "IS", "is_std": "IS std", "kid_mean": "KID", "kid_std": "KID std", "precision": "prec",
               "f_score": "F", "sfid": "sFID", "adm_is": "IS adm", "adm_precision": "P adm", "adm_recall": "R adm"}


def sampler_text(sampler: dict[str, Any]) -> str:
    """`sde euler 250 w1 sigma cfg1.5`: the settings that differ between rows, in one short phrase."""
    words = [str(sampler[key]) for key in ("mode", "method", "steps") if key in sampler]
    if sampler.get("mode") == "sde":
        words += [f"w{_cell(sampler.get('w'))}", str(sampler.get("diffusion", ""))]
    if sampler.get("cfg_scale") not in (None, 1.0):
        words.append(f"cfg{_cell(sampler['cfg_scale'])}")
    return " ".join(word for word in words if word) or "-"


def _name(path: str, root: Path, name_of) -> str:
    """The workspace name of an artifact path, else its folder name."""
    name = name_of(path, root)
    return name if name != path else Path(path).name


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def paper_row(values: dict[str, float], unavailable: dict[str, str], count: int) -> list[str]:
    """The papers' five columns and n as two aligned lines, plus one line per unavailable value saying why."""
    titles = [title for _, title in PAPER_COLUMNS] + ["n"]
    cells = ["n/a" if key in unavailable else f"{values[key]:.4f}" for key, _ in PAPER_COLUMNS] + [str(count)]
    widths = [max(len(title), len(cell)) + 2 for title, cell in zip(titles, cells)]
    lines = ["".join(title.rjust(width) for title, width in zip(titles, widths)),
             "".join(cell.rjust(width) for cell, width in zip(cells, widths))]
    titled = dict(PAPER_COLUMNS)
    return lines + [f"{titled.get(key, key)} n/a: {why}" for key, why in unavailable.items()]
