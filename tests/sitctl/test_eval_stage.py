"""The eval stage with the real FID Inception network, offline, on upscaled scikit-learn digits.

The Inception forward is slow on CPU (~5 images/s on 2 cores), so every image set is small and
each evaluation runs once per module (about 120 forwards in all).
"""

from unittest import mock

import h5py
import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image
from rich.console import Console
from sklearn.datasets import load_digits

from sitctl import sample_store
from sitctl.artifacts import ancestor, begin_artifact, finish_artifact, open_artifact
from pipelines.images import center_crop_arr
from pipelines.sources import open_source
from sitctl.evaluate.reference import ReferenceConfig, build_reference, cropped_batches, load_reference, write_adm_npz
from sitctl.evaluate.results import read_results, results_table
from sitctl.evaluate.stage import EvalConfig, EvalError, evaluate_stage
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # its module world runs the FID Inception on real digits

SIZE = 32  # 8x8 digits upscaled by center_crop_arr, as the encode stage would crop them
N_REAL = 32


def make_artifact(path, kind, *, inputs=(), images=None, config=None, extra=None):
    staging = begin_artifact(path)
    if images is None:
        (staging / "payload.txt").write_text(kind)
    else:
        writer = sample_store.SampleWriter(sample_store.rank_file(staging, 0), images.shape[1:])
        writer.append(images, np.full(len(images), -1), np.arange(len(images)))
        writer.close()
    return finish_artifact(staging, path, kind=kind, config=config or {}, inputs=inputs, extra=extra or {})


def evaluate(root, samples, ref, name, metrics=("fid",)):
    return evaluate_stage(EvalConfig(
        samples=str(samples.path), ref=str(ref), metrics=metrics, out=str(root / name),
        num_expected=N_REAL, allow_fewer=True, fetch_weights=False,
    ))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A reference from a class-folder of PNG digits, samples chained to a checkpoint and latents, and their evaluations."""
    root = tmp_path_factory.mktemp("eval")
    digits = load_digits()
    for index in range(N_REAL):  # the first N_REAL digits as 8x8 grayscale PNGs in class folders
        folder = root / "digits" / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    reference = build_reference(ReferenceConfig(source=str(root / "digits"), out=str(root / "ref"), image_size=SIZE, fetch_weights=False))

    latents = make_artifact(root / "latents", "latents")
    checkpoint = make_artifact(root / "run" / "step-0000100", "checkpoint", inputs=[latents], extra={"step": 100})
    first_digits = open_source("digits").subset(slice(0, 2 * N_REAL))
    crops = np.concatenate([images for images, _ in cropped_batches(first_digits, SIZE, 64, [])])
    noise = np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    sampler = {"mode": "sde", "w": 1.0}
    same = make_artifact(root / "same", "samples", inputs=[checkpoint], images=crops[:N_REAL], config=sampler)
    other = make_artifact(root / "other", "samples", inputs=[checkpoint], images=crops[N_REAL:], config=sampler)
    static = make_artifact(root / "noise", "samples", inputs=[checkpoint], images=noise, config=sampler)
    scored = {
        "same": evaluate(root, same, reference.path, "metrics-same"),
        "other": evaluate(root, other, reference.path, "metrics-other", ("fid", "kid", "prc")),
        "noise": evaluate(root, static, reference.path, "metrics-noise", ("fid", "kid", "prc")),
    }
    # The papers' row through the command line, offline: an empty torch hub cache, so no class head for IS.
    paper = run_cli("eval", "paper", str(static.path), "--ref", str(reference.path), "--out", str(root / "metrics-paper"),
                    "--num-expected", str(N_REAL), "--allow-fewer", "--no-fetch", env={"TORCH_HOME": str(root / "torch-home")})
    return {"root": root, "reference": reference, "samples": {"same": same, "other": other, "noise": static}, "scored": scored,
            "paper": paper}


def test_reference_reads_a_flat_folder_and_lists_unreadable_files(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):  # no class subfolders: an ImageNet-val-like dump
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    errors = []
    batches = list(cropped_batches(open_source(str(tmp_path)), 8, 2, errors))
    assert [len(images) for images, _ in batches] == [2, 1]  # the bad file is skipped, not a hole
    expected = np.stack([center_crop_arr(Image.fromarray(image), 8) for image in pixels])
    np.testing.assert_array_equal(np.concatenate([images for images, _ in batches]), expected)
    assert np.concatenate([labels for _, labels in batches]).tolist() == [0, 0, 0]
    assert errors == ["broken.jpg: not an image PIL can identify"]


def test_fid_of_real_images_against_themselves_is_about_zero(world):
    # The reference crops PNG files, the samples path reads HDF5: identical features prove identical preprocessing.
    assert abs(world["scored"]["same"].extra["values"]["fid"]) < 1e-2


def test_fid_orders_disjoint_real_digits_far_below_noise(world):
    other, noise = (world["scored"][name].extra["values"] for name in ("other", "noise"))
    assert 1.0 < other["fid"] < 0.3 * noise["fid"]
    assert other["kid_mean"] < 0.1 * noise["kid_mean"]
    assert other["precision"] > 0.5 and noise["precision"] == 0.0


def test_metrics_lineage_reaches_the_latents_and_the_reference(world):
    metrics = open_artifact(world["scored"]["other"].path, "metrics")
    input_kinds = {ref["kind"] for ref in metrics.inputs}
    assert input_kinds == {"samples", "reference"}
    assert ancestor(metrics, "latents") is not None
    assert [entry["kind"] for entry in metrics.extra["lineage"]] == ["samples", "checkpoint", "latents"]
    assert metrics.extra["reference"]["id"] == world["reference"].id
    assert metrics.extra["num_samples"] == N_REAL


def test_adm_npz_reference_round_trip_gives_the_same_fid(world):
    npz = write_adm_npz(world["reference"], world["root"] / "ref.npz")
    with np.load(npz) as data:
        assert data["arr_0"].shape == (N_REAL, SIZE, SIZE, 3) and data["arr_0"].dtype == np.uint8
        stored = list(sample_store.iter_batches(world["reference"].path, N_REAL))
        assert np.array_equal(data["arr_0"], np.concatenate([images for images, _ in stored]))
        assert np.array_equal(data["arr_1"], np.concatenate([labels for _, labels in stored]))
    from_npz, from_artifact = load_reference(npz), load_reference(world["reference"].path)
    assert (from_npz.image_size, from_npz.num_images) == (SIZE, N_REAL)
    np.testing.assert_array_equal(from_npz.statistics.sigma, from_artifact.statistics.sigma)
    scored = evaluate(world["root"], world["samples"]["noise"], npz, "metrics-noise-npz")
    assert scored.extra["reference"]["format"] == "adm-npz"
    assert scored.extra["values"]["fid"] == pytest.approx(world["scored"]["noise"].extra["values"]["fid"], rel=1e-9)


def test_results_table_lists_every_evaluation(world):
    rows = read_results(world["root"])
    assert {row["metrics_id"] for row in rows} >= {a.id for a in world["scored"].values()}
    assert all(row["step"] == 100 and row["sampler"]["w"] == 1.0 for row in rows)
    console = Console(record=True, width=200)
    console.print(results_table(rows))
    text = console.export_text()
    assert "other" in text and f"{world['scored']['other'].extra['values']['fid']:.4g}" in text
    paper = open_artifact(world["root"] / "metrics-paper", "metrics").extra["values"]
    assert "sFID" in text and f"{paper['sfid']:.4g}" in text and f"{paper['adm_precision']:.4g}" in text
    assert "n/a" in text and "IS adm n/a: default_1.pt is a TorchScript export without the 1008-class head" in text


def test_rerun_reuses_the_finished_metrics_artifact(world):
    again = evaluate(world["root"], world["samples"]["same"], world["reference"].path, "metrics-same")
    assert again.id == world["scored"]["same"].id


def test_reference_of_another_resolution_is_refused(world, tmp_path):
    big = make_artifact(tmp_path / "big", "samples", images=np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(EvalError, match="32x32 but the samples are 64x64"):
        evaluate(tmp_path, big, world["reference"].path, "metrics")


def test_samples_of_another_dtype_are_refused(world, tmp_path):
    staging = begin_artifact(tmp_path / "float")
    with h5py.File(sample_store.rank_file(staging, 0), "w") as handle:
        handle["images"] = np.zeros((4, SIZE, SIZE, 3), np.float32)
        handle["labels"] = handle["indices"] = np.arange(4)
    floats = finish_artifact(staging, tmp_path / "float", kind="samples", config={})
    with pytest.raises(EvalError, match="float32"):
        evaluate(tmp_path, floats, world["reference"].path, "metrics")


def test_cli_refuses_fewer_samples_than_promised(world):
    result = run_cli("eval", "fid", str(world["samples"]["other"].path), "--ref", str(world["reference"].path), "--no-fetch")
    assert result.returncode == 2
    assert f"has {N_REAL} samples, fewer than --num-expected 50000" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_inception_score_without_the_class_head_is_an_error(world, tmp_path):
    # An empty torch hub cache and no download: only the TorchScript pool_3 network is left.
    result = run_cli("eval", "is", str(world["samples"]["noise"].path), "--allow-fewer", "--no-fetch", env={"TORCH_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "needs the 1008-class head" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inception_score_runs_on_weights_with_the_class_head(tmp_path):
    # A torch-fidelity-format weights file (its real class, random weights: the real ones cannot be downloaded here).
    torch.manual_seed(0)  # the random weights: a run must not depend on what ran before it
    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        state = tf_inception.FeatureExtractorInceptionV3("random", ["2048"]).state_dict()
    torch.save(state, tmp_path / "inception.pth")
    images = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    samples = make_artifact(tmp_path / "samples", "samples", images=images)
    scored = evaluate_stage(EvalConfig(samples=str(samples.path), metrics=("is",), is_splits=2, allow_fewer=True,
                                       inception_weights=str(tmp_path / "inception.pth"), fetch_weights=False))
    # IS = exp(mean KL) is at least 1; random weights can put it at 1 up to float rounding.
    assert 1.0 - 1e-9 <= scored.extra["values"]["is_mean"] <= 1008.0
    assert scored.extra["inception"]["kind"] == "torch-fidelity"


def frechet_distance_low_rank(generated: np.ndarray, real: np.ndarray) -> float:
    """FID of two feature sets in float64, with tr (S1 S2)^(1/2) from an N x N symmetric eigenproblem.

    S1 = A^T A / (n - 1) for the centred generated features A (n x D), so S1 S2 has the nonzero
    eigenvalues of A S2 A^T / (n - 1), which is symmetric positive semi-definite: its square roots
    summed are the trace of the matrix square root, without the D x D non-symmetric eigenproblem.
    """
    generated, real = generated.astype(np.float64), real.astype(np.float64)
    centred = generated - generated.mean(0)
    real_sigma = np.cov(real, rowvar=False)
    small = centred @ real_sigma @ centred.T / (len(generated) - 1)  # (n, n)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    mean_term = np.sum((generated.mean(0) - real.mean(0)) ** 2)
    return float(mean_term + np.trace(np.cov(generated, rowvar=False)) + np.trace(real_sigma) - 2 * trace_sqrt)


def test_fid_on_real_digits_equals_an_independent_numpy_computation_on_the_same_features(world):
    from sitctl.evaluate.inception import POOL_FEATURES, create_extractor, extract_features, resolve_weights

    reference = world["reference"]
    real = np.load(reference.file("features.npy"))  # (N_REAL, 2048), as `eval ref` extracted them
    with np.load(reference.file("statistics.npz")) as stored:  # what FID reads: numpy's mean and covariance
        np.testing.assert_allclose(stored["mu"], real.astype(np.float64).mean(0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(stored["sigma"], np.cov(real.astype(np.float64), rowvar=False), rtol=0, atol=1e-9)
    extractor = create_extractor(resolve_weights(None, fetch=False), [POOL_FEATURES], torch.device("cpu"))
    # The 12 noise images (not the 32 digits): the Inception forward is the slow part on a CPU.
    images = np.concatenate([images for images, _ in sample_store.iter_batches(world["samples"]["noise"].path, N_REAL)])
    generated = extract_features(extractor, [images], device=torch.device("cpu"))[POOL_FEATURES].numpy()
    expected = frechet_distance_low_rank(generated, real)
    assert expected > 1.0  # noise against digits: a distance well away from zero
    assert world["scored"]["noise"].extra["values"]["fid"] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The papers' row (ADM's evaluator) and sFID
# ---------------------------------------------------------------------------------------------


def test_cli_paper_prints_fid_sfid_is_precision_recall_and_n_with_is_marked_unavailable_offline(world):
    result = world["paper"]
    assert result.returncode == 0, result.stderr
    titles, cells, why, *_ = result.stdout.splitlines()
    assert titles.split() == ["FID", "sFID", "IS", "precision", "recall", "n"]
    values = open_artifact(world["root"] / "metrics-paper", "metrics").extra
    expected = [f"{values['values'][key]:.4f}" for key in ("fid", "sfid")] + ["n/a"]
    expected += [f"{values['values'][key]:.4f}" for key in ("adm_precision", "adm_recall")] + ["12"]
    assert cells.split() == expected
    assert why.startswith("IS n/a: default_1.pt is a TorchScript export without the 1008-class head; for IS, download")
    assert values["unavailable"] == {"adm_is": why.removeprefix("IS n/a: ")} and "adm_is" not in values["values"]


def test_paper_row_fid_is_eval_fids_own_value(world):
    # Pool features from the pass that also keeps mixed_6/conv are the pool-only pass's (bit for bit,
    # test_eval_adm.py); here up to float rounding in the last digits.
    paper = open_artifact(world["root"] / "metrics-paper", "metrics").extra["values"]
    assert paper["fid"] == pytest.approx(world["scored"]["noise"].extra["values"]["fid"], rel=1e-7)
    assert paper["adm_precision"] == 0.0  # noise is inside no real digit's ball


def old_style_reference(new, path):
    """`new` as a reference made before sFID: the same images and pool features, statistics without mu_s/sigma_s."""
    import shutil

    staging = begin_artifact(path)
    for image_file in new.path.glob("images-rank*.h5"):
        shutil.copy(image_file, staging / image_file.name)
    shutil.copy(new.file("features.npy"), staging / "features.npy")
    with np.load(new.file("statistics.npz")) as stats:
        np.savez(staging / "statistics.npz", mu=stats["mu"], sigma=stats["sigma"])
    return finish_artifact(staging, path, kind="reference", config=new.config, extra=new.extra)


def test_sfid_on_real_digits_equals_an_independent_numpy_computation_on_the_same_features(world, tmp_path):
    """Also: a reference made before sFID stays readable and gives its spatial statistics from its stored images."""
    from sitctl.evaluate.inception import POOL_FEATURES, SPATIAL_FEATURES, create_extractor, extract_features, resolve_weights
    from sitctl.evaluate.stage import _RealFeatures

    old = load_reference(old_style_reference(world["reference"], tmp_path / "old").path)
    current = load_reference(world["reference"].path)
    assert old.spatial_statistics is None
    np.testing.assert_array_equal(old.statistics.sigma, current.statistics.sigma)
    extractor = create_extractor(resolve_weights(None, fetch=False), [POOL_FEATURES, SPATIAL_FEATURES], torch.device("cpu"))
    from_images = _RealFeatures(old, extractor, torch.device("cpu"), 64)
    rebuilt = from_images.spatial_statistics()
    real = from_images.extracted[SPATIAL_FEATURES].numpy().astype(np.float64)  # (N_REAL, 2023), extracted just now
    for statistics in (rebuilt, current.spatial_statistics):  # stored by `eval ref`, and remade: numpy's mean and covariance
        np.testing.assert_allclose(statistics.mu, real.mean(0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(statistics.sigma, np.cov(real, rowvar=False), rtol=0, atol=1e-9)
    noise = np.concatenate([images for images, _ in sample_store.iter_batches(world["samples"]["noise"].path, N_REAL)])
    generated = extract_features(extractor, [noise], device=torch.device("cpu"))[SPATIAL_FEATURES].numpy()
    assert real.shape == (N_REAL, 2023) and generated.shape == (12, 2023)
    expected = frechet_distance_low_rank(generated, real)
    assert expected > 1.0
    paper = open_artifact(world["root"] / "metrics-paper", "metrics").extra["values"]
    assert paper["sfid"] == pytest.approx(expected, rel=1e-6)


def test_adm_npz_export_carries_the_spatial_statistics(world):
    npz = write_adm_npz(world["reference"], world["root"] / "ref-spatial.npz")
    with np.load(npz) as data:
        assert {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s"} <= set(data.files)
    np.testing.assert_array_equal(load_reference(npz).spatial_statistics.sigma,
                                  load_reference(world["reference"].path).spatial_statistics.sigma)


class PrecisionSpy:
    """A stand-in extractor that records the matmul and cuDNN TF32 settings its forward runs under."""

    def __init__(self):
        self.seen = []

    def get_requested_features_list(self):
        return ["2048"]

    def __call__(self, x):
        self.seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return (torch.zeros(len(x), 2048),)

    def convert_features_tuple_to_dict(self, features):
        return {"2048": features[0]}


def test_the_inception_runs_without_tf32_inside_a_tf32_stage_and_its_batches_keep_the_stages_setting():
    from sitctl.evaluate.inception import extract_features
    from sitctl.hardware import matmul_precision

    spy, fed = PrecisionSpy(), []

    def batches():  # what training's FID passes: a sampler, drawing in the stage's precision
        for _ in range(2):
            fed.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
            yield np.zeros((3, 8, 8, 3), np.uint8)

    with matmul_precision("tf32", "cpu"):
        extract_features(spy, batches(), device=torch.device("cpu"))
        after = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    assert spy.seen == [("highest", False)] * 2
    assert fed == [("high", True)] * 2 and after == ("high", True)


def test_the_metrics_artifact_records_the_inceptions_precision(world):
    assert world["scored"]["other"].extra["inception"]["precision"] == "fp32"
