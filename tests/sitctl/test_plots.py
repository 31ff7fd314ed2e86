"""The shared grid PNG writer used by the sample stage and the train previews."""

import numpy as np
from PIL import Image

from sitctl.plots import save_image_grid


def test_grid_is_square_ish_and_tiny_images_are_enlarged_to_about_64_pixels(tmp_path):
    images = np.zeros((5, 8, 8, 3), np.uint8)  # 5 images -> 3 per row, 2 rows; 64 // 8 = 8x enlarged
    path = save_image_grid(images, tmp_path / "sub" / "grid.png")
    # width: 3 images of 8 px + 4 pads of 2 px = 32, height: 2 * 8 + 3 * 2 = 22; each x8
    assert Image.open(path).size == (32 * 8, 22 * 8)


def test_explicit_layout_is_kept_and_single_channel_is_written_as_grey(tmp_path):
    images = np.full((4, 64, 64, 1), 7, np.uint8)
    path = save_image_grid(images, tmp_path / "grid.png", nrow=4, upscale=1)
    grid = Image.open(path)
    assert grid.mode == "L" and grid.size == (4 * 66 + 2, 66 + 2)
    assert np.asarray(grid)[2, 2] == 7 and np.asarray(grid)[0, 0] == 255  # image, then white padding
