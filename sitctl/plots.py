"""Small PNG writers shared by the stages: an image grid and a training loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into rows of `nrow` with `pad` white pixels between them."""
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)  # ceil
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for index, image in enumerate(images):
        top, left = pad + (index // ncol) * (h + pad), pad + (index % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, upscale: int | None = None) -> Path:
    """Write uint8 NHWC images as one grid PNG.

    nrow None: a square-ish grid; upscale None: tiny images are enlarged (nearest neighbour) to
    about 64 pixels, so small pixel-space samples (digits) stay visible.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
    nrow = math.ceil(math.sqrt(len(images))) if nrow is None else nrow
    upscale = max(1, 64 // images.shape[1]) if upscale is None else upscale
    grid = image_grid(images, nrow)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def save_loss_curve(metrics_jsonl: str | Path, path: str | Path) -> Path:
    """Plot loss against step from metrics.jsonl, plus the loss per t bucket when logged."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    rows = [row for row in read_metrics(metrics_jsonl) if "loss" in row]
    figure, (overall, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    overall.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="black")
    overall.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    buckets = [r for r in rows if r.get("loss_by_t")]
    if buckets:
        count = len(buckets[-1]["loss_by_t"])
        colors = plt.get_cmap("viridis")(np.linspace(0, 1, count))
        for bucket in range(count):
            values = np.array([r["loss_by_t"][bucket] for r in buckets], dtype=float)  # null (empty) -> nan
            label = f"t in [{bucket / count:.1f}, {(bucket + 1) / count:.1f})"
            by_time.plot([r["step"] for r in buckets], values, color=colors[bucket], label=label)
        by_time.legend(fontsize=6, ncol=2)
    by_time.set(xlabel="step", ylabel="loss", title="loss by time t", yscale="log")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_metric_curve(metrics_jsonl: str | Path, path: str | Path, *, key: str, title: str) -> Path:
    """Plot one value (e.g. the FID during training) against step, from the metrics.jsonl rows that hold it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in read_metrics(metrics_jsonl) if row.get(key) is not None]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["step"] for r in rows], [r[key] for r in rows], color="black", marker="o")
    axes.set(xlabel="step", ylabel=key, title=title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
