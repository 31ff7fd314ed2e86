"""Benchmark of FID Inception feature extraction: images/s of the 2048-d pool features, as `sitctl eval` extracts them."""

from __future__ import annotations

import time

import numpy as np
import torch

from sitctl.evaluate.inception import POOL_FEATURES, create_extractor, extract_features, pick_device, resolve_weights

def bench_inception(batch: int = 64, n: int = 256, *, device: str | None = None, weights: str | None = None,
                    image_size: int = 256) -> dict[str, object]:
    """Feature-extraction throughput (images/s) of the FID Inception on random 256x256 uint8 images."""
    torch_device = pick_device(device)
    resolved = resolve_weights(weights, fetch=False)
    extractor = create_extractor(resolved, [POOL_FEATURES], torch_device)
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    batches = max(1, n // batch)
    extract_features(extractor, [images], device=torch_device)  # warm-up (cudnn autotune, allocator)
    _synchronize(torch_device)
    start = time.perf_counter()
    extract_features(extractor, (images for _ in range(batches)), device=torch_device)
    _synchronize(torch_device)
    seconds = time.perf_counter() - start
    return {
        "device": str(torch_device), "batch": batch, "images": batches * batch, "image_size": image_size,
        "weights": resolved.kind, "seconds": seconds, "images_per_s": batches * batch / seconds,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
