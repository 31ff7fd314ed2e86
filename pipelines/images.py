"""Image preprocessing exactly as ADM and DiT do it, shared by encode and the FID reference."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, CMYK, RGBA, I;16, ...) to RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit grayscale: rescale to 8 bits before converting.
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.max() > 0 else 1.0
        image = Image.fromarray((array / top * 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center_crop_arr: BOX-halve while the short side >= 2x target, BICUBIC-resize, center crop.

    Returns an (image_size, image_size, 3) uint8 array.
    """
    image = to_rgb(image)
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


# ---------------------------------------------------------------------------------------------
# Crops kept in latents shards for an alignment encoder (encode --encoder-targets images)
# ---------------------------------------------------------------------------------------------

PNG_COMPRESS_LEVEL = 1  # zlib level: on 256-px photos level 6 saves 9% of disk but encodes 3x slower (BENCHMARKS.md)


def png_bytes(crop: np.ndarray) -> bytes:
    """An (S, S, 3) uint8 crop as PNG bytes: lossless, and the same bytes on every run (no metadata)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_png(data, out: np.ndarray) -> None:
    """Decode PNG bytes (bytes or a uint8 buffer) of an RGB crop into `out` (S, S, 3) uint8."""
    import io

    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB" or image.size != (out.shape[1], out.shape[0]):
            raise ValueError(f"a {image.mode} {image.size[0]}x{image.size[1]} image, expected RGB {out.shape[1]}x{out.shape[0]}")
        out[...] = np.asarray(image)
