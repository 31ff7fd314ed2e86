"""The study's own alignment encoder for REPA: no pretrained vision encoder can be downloaded here.

A small timm ViT is trained as a classifier on the study's training images and labels
(Fashion-MNIST's train split), at the study's image size, with the preprocessing the REPA path
applies (sitctl/encoders.prepare_images). Its final patch tokens are average-pooled into the class
head, so every patch token is trained, not only a class token. It is saved as timm saves hub
models (config.json + model.safetensors in a Hugging Face cache layout), and REPA runs load it by
`--repa-encoder hf-hub:sitctl-study/fashion-vit` through exactly the code that loads DINOv2.

The FID Inception network is never the alignment target: the metric would then be graded by the
network the model was trained towards. Quality (accuracy on the reference split, never trained
on) is kept beside the weights in quality.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from model.configs import model_config
from pipelines.images import center_crop_arr
from pipelines.sources import open_source
from sitctl.configs import StudyConfig
from sitctl.encoders import HUB_PREFIX, normalisation, prepare_images

ENCODER_REPO = "sitctl-study/fashion-vit"
ENCODER_NAME = HUB_PREFIX + ENCODER_REPO  # what the REPA runs pass as --repa-encoder
ENCODER_DIR = "encoder"  # OUT/encoder: hub/ (the cache) and quality.json
QUALITY_FILE = "quality.json"
REVISION = "0" * 40  # the one snapshot refs/main names
WIDTH, DEPTH, HEADS = 64, 4, 4  # about 0.2M parameters: about a minute per epoch of 60K images on 2 cores


def encoder_args(config: StudyConfig) -> dict[str, Any]:
    """timm ViT arguments: one patch per SiT token at the study's image size (pixel space: no VAE)."""
    patch = model_config(config.model).patch_size
    return dict(img_size=config.image_size, patch_size=patch, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                class_token=False, global_pool="avg")


def labelled_crops(source_spec: str, image_size: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 3) uint8, labels (N,)) of a source's first `limit` items, cropped as encode crops them."""
    source = open_source(source_spec)
    if limit is not None:
        source = source.subset(slice(0, limit))
    images = np.stack([center_crop_arr(source.load(i), image_size) for i in range(len(source))])
    return images, np.asarray(source.labels, dtype=np.int64)


def read_quality(out: Path) -> dict[str, Any] | None:
    path = out / ENCODER_DIR / QUALITY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_encoder(config: StudyConfig, out: Path) -> dict[str, Any]:
    """Train and save the encoder once (a finished OUT/encoder is reused); returns its quality record."""
    found = read_quality(out)
    if found is not None:
        return found
    staging = out / (ENCODER_DIR + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a half-trained encoder is retrained from the start
    started = time.perf_counter()
    network, quality = train_encoder(config)
    save_encoder(network, encoder_args(config), staging / "hub")
    quality["seconds"] = round(time.perf_counter() - started, 1)
    (staging / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
    staging.rename(out / ENCODER_DIR)  # published whole, or not at all
    return quality


def train_encoder(config: StudyConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """AdamW on cross-entropy, batch 256, constant lr 1e-3, horizontal flips; seeded by --seed."""
    import timm

    images, labels = labelled_crops(config.train_source, config.image_size, config.train_images)
    torch.manual_seed(config.seed)
    classes = int(labels.max()) + 1
    network = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=classes, **encoder_args(config))
    mean, std = normalisation(network)  # what load_encoder will read back from the saved config
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(config.seed)
    pixels, targets = torch.from_numpy(images), torch.from_numpy(labels)
    network.train()
    for _ in range(config.encoder_epochs):
        for batch in torch.randperm(len(pixels), generator=generator).split(256):
            x = prepare_images(pixels[batch], config.image_size, mean, std)  # (n, 3, S, S)
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(network(x), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    network.eval()
    test_images, test_labels = labelled_crops(config.reference_source, config.image_size, None)
    quality = {"train_accuracy": accuracy(network, images, labels, mean, std, config.image_size),
               "test_accuracy": accuracy(network, test_images, test_labels, mean, std, config.image_size),
               "train_images": len(images), "test_images": len(test_images), "epochs": config.encoder_epochs,
               "parameters": sum(p.numel() for p in network.parameters()), "architecture": encoder_args(config)}
    return network, quality


@torch.no_grad()
def accuracy(network: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean, std, side: int) -> float:
    pixels = torch.from_numpy(images)
    predicted = torch.cat([network(prepare_images(pixels[i : i + 1000], side, mean, std)).argmax(-1)
                           for i in range(0, len(pixels), 1000)])
    return float((predicted.numpy() == labels).mean())


def save_encoder(network: torch.nn.Module, args: dict[str, Any], hub: Path) -> None:
    """The Hugging Face cache layout timm reads hub models from: snapshots/REV and refs/main naming REV."""
    from timm.models import save_for_hf

    repo = hub / ("models--" + ENCODER_REPO.replace("/", "--"))
    save_for_hf(network, repo / "snapshots" / REVISION, model_args=args, safe_serialization=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)


@contextmanager
def encoder_hub(out: Path) -> Iterator[None]:
    """Point the Hugging Face hub at the study's cache, offline, for the REPA runs; restored after."""
    from huggingface_hub import constants

    hub = str(out / ENCODER_DIR / "hub")
    saved_env = {name: os.environ.get(name) for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_CACHE=hub, HF_HUB_OFFLINE="1")
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = hub, True
    try:
        yield
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
