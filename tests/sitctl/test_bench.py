"""`sitctl.bench all` at tiny sizes: a bench artifact with every stage's figures, and BENCHMARKS.md
sections rewritten per device. No timing assertions: only that each figure was measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sitctl.artifacts import open_artifact, verify_artifact
from sitctl.bench import BenchConfig, BenchError, bench_all, device_label, replace_section
from sitctl.errors import ArtifactError

REPO = Path(__file__).resolve().parents[2]

TINY = BenchConfig(
    device="cpu", models=(("SiT-T/4", 2, "fp32"),), model_steps=1, model_warmup=0,
    loader_images=16, loader_batch=8, loader_seconds=0.2,
    encode_image_size=32, encode_images=2, encode_batch=2,
    sampling_model="SiT-T/4", sampling_batch=2, sampling_steps=(2,), sampling_cfg_scales=(1.0, 2.0),
    sampling_samplers=(("ode", "euler"), ("sde", "euler")),
    inception_batch=2, inception_images=2, inception_image_size=64,
)

OTHER_DEVICE = "## NVIDIA H100 80GB HBM3\n\nMeasured 2026-01-01.\n\n| Benchmark | Setting | Figures |\n| --- | --- | --- |\n| x | y | z |\n"


def test_replace_section_replaces_only_its_own_device():
    text = "# Benchmarks\n\nintro\n\n## A\n\nold a\n\n## B\n\nold b\n"
    assert replace_section(text, "A", "## A\n\nnew a\n") == "# Benchmarks\n\nintro\n\n## A\n\nnew a\n\n## B\n\nold b\n"
    assert replace_section(text, "B", "## B\n\nnew b\n") == "# Benchmarks\n\nintro\n\n## A\n\nold a\n\n## B\n\nnew b\n"
    assert replace_section(text, "C", "## C\n\nc\n") == text + "\n## C\n\nc\n"


def test_bench_all_writes_the_artifact_and_rewrites_this_device_section(tmp_path):
    device = device_label("cpu")
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\nintro\n\n## {device}\n\nstale figures\n\n{OTHER_DEVICE}")
    artifact = bench_all(TINY, tmp_path / "bench", markdown)

    verify_artifact(artifact.path)
    assert open_artifact(tmp_path / "bench", "bench").config["models"] == [["SiT-T/4", 2, "fp32"]]
    results = json.loads((artifact.path / "results.json").read_text())
    assert results["device"] == device == artifact.extra["device"]
    figures = results["results"]
    assert [run["model"] for run in figures["model"]] == ["SiT-T/4"] and figures["model"][0]["train_step_ms"] > 0
    assert figures["loader"]["num_samples"] == 16 and figures["loader"]["latents_per_s"] > 0
    assert figures["encode"]["decode_crop_images_per_s_per_core"] > 0
    # Two samplers x two guidance scales; guidance doubles the network batch, not the NFE.
    rows = figures["sampling"]["rows"]
    assert [(row["mode"], row["cfg_scale"], row["nfe"]) for row in rows] == [
        ("ode", 1.0, 2), ("ode", 2.0, 2), ("sde", 1.0, 2), ("sde", 2.0, 2)]
    assert figures["inception"]["images"] == 2 and figures["inception"]["images_per_s"] > 0

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n") and text.endswith(OTHER_DEVICE)  # others kept verbatim
    assert text.count(f"## {device}\n") == 1 and "stale figures" not in text
    section = text.split(f"## {device}\n")[1].split("## NVIDIA")[0]
    assert f"Measured {results['date']}" in section and artifact.id in section
    table = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 1 + 1 + 2 + 4 + 1  # header, model, loader, encode x2, sampling x4, Inception

    with pytest.raises(ArtifactError, match="already exists"):
        bench_all(TINY, tmp_path / "bench", markdown)


def test_bad_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(BenchError, match="precision"):
        BenchConfig(models=(("SiT-S/2", 8, "fp8"),))
    result = subprocess.run([sys.executable, "-m", "sitctl.bench", "loader", "--latents", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no such artifact" in result.stderr


def test_compiled_models_run_with_torch_compile_and_are_labelled(monkeypatch):
    import dataclasses

    import sitctl.bench.report
    from sitctl.bench.report import figure_rows, run_benchmarks, sizes_for

    assert ("SiT-XL/2", 256, "bf16") in sizes_for("cuda").compiled_models  # the XL/2 bf16 + compile row
    calls = []

    def fake_bench_model(model, *, batch, precision, compile, **_):
        calls.append((model, compile))
        return {"model": model, "batch": batch, "precision": precision, "compile": compile, "device": "cpu", "mfu": None,
                "train_step_ms": 1.0, "train_images_per_s": 1.0, "forward_ms": 1.0, "train_tflops": 1.0}

    monkeypatch.setattr(sitctl.bench.report, "bench_model", fake_bench_model)
    results = run_benchmarks(dataclasses.replace(TINY, compiled_models=(("SiT-B/2", 4, "bf16"),)))
    assert calls == [("SiT-T/4", False), ("SiT-B/2", True)]
    settings = [setting for name, setting, _ in figure_rows(results) if name == "model step"]
    assert settings == ["SiT-T/4, batch 2, fp32", "SiT-B/2, batch 4, bf16, compile"]


def test_the_loader_bench_reads_kept_photo_crops_when_asked():
    from sitctl.bench.loader import bench_loader_rate

    figures = bench_loader_rate(images=16, batch=8, lanes=2, buffer=8, seconds=0.2, encoder_targets="png")
    assert figures["encoder_targets"] == "png" and figures["latents_per_s"] > 0
    assert figures["bytes_per_sample"] > 256 * 256  # a 256-px photo crop beside each 4x32x32 latent


def test_a_model_row_that_does_not_fit_trains_in_the_planned_micro_batches_and_says_so(monkeypatch):
    import sitctl.measure
    from sitctl.bench.report import model_step_row
    from sitctl.measure import bench_model

    sizes = dict(batch=4, steps=1, warmup=0, device="cpu", input_size=8)
    whole = bench_model("SiT-T/4", **sizes)
    assert whole["micro_batch"] == 4  # a CPU plans nothing: the whole batch, as before
    assert model_step_row(whole)[1] == "SiT-T/4, batch 4, fp32"
    # A device that holds 2 samples a forward, as the planner (sitctl.memory) would find it.
    monkeypatch.setattr(sitctl.measure, "_micro_batch", lambda config, precision, batch, device: 2)
    split = bench_model("SiT-T/4", **sizes)
    assert split["micro_batch"] == 2 and split["train_step_ms"] > 0
    assert model_step_row(split)[1] == "SiT-T/4, batch 4 in micro-batches of 2, fp32"
