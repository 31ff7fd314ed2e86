"""The encode benchmark recipe runs end to end on synthetic JPEGs (its numbers are not checked)."""

from __future__ import annotations

from sitctl.bench.encode import bench_encode


def test_bench_encode_reports_both_rates(tiny_vae_dir):
    result = bench_encode("synthetic", image_size=16, vae=str(tiny_vae_dir), images=3, batch=2, steps=1)
    assert result["decode_crop_images_per_s_per_core"] > 0 and result["vae_images_per_s"] > 0
    assert result["device"] == "cpu" and result["image_size"] == 16
