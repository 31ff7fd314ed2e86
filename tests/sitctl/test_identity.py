"""One rule for "same settings?": each config field declares its role once (sitctl/identity.py)."""

import dataclasses

import pytest

from sitctl import configs
from sitctl.errors import SitctlError
from sitctl.identity import EXTENDS, FREE, INPUT, SHAPES, check_continues, resumed, role, settings_of
from sitctl.options import setting
from sitctl.settings import build
from tests.sitctl.test_reliability import cli
from tests.sitctl.test_train import TINY, assert_same_files, tiny

STAGE_CONFIGS = (configs.EncodeConfig, configs.TrainConfig, configs.SampleConfig, configs.EvalConfig,
                 configs.ReferenceConfig, configs.SweepConfig, configs.DemoConfig, configs.StudyConfig)


@pytest.mark.parametrize("config_class", STAGE_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_known_role_and_out_is_free(config_class):
    roles = {field.name: role(field) for field in dataclasses.fields(config_class)}
    assert set(roles.values()) <= {SHAPES, EXTENDS, INPUT, FREE}
    assert roles["out"] == FREE


def test_a_new_field_shapes_the_output_unless_declared_otherwise_and_a_resume_refuses_a_change():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Grown(configs.TrainConfig):
        new_knob: float = 0.5
        """A setting added later, with no list anywhere to update."""
        new_pace: int = setting(1, role=FREE)
        """A setting that only paces the run."""

    recorded = settings_of(Grown(steps=10), (SHAPES, EXTENDS, INPUT, FREE))
    check_continues(recorded, Grown(steps=20, new_pace=4), "run r", "hint")  # steps extend, paces are free
    with pytest.raises(SitctlError, match=r"cannot continue run r: it was made with --new-knob 0.5, now 0.7; hint"):
        check_continues(recorded, Grown(new_knob=0.7, steps=10), "run r", "hint")


def test_resumed_takes_every_untyped_setting_from_the_record_and_keeps_the_typed_ones():
    recorded = settings_of(tiny("lat", "run", steps=10, seed=3, betas=(0.8, 0.9)))
    typed = {"resume": True, "steps": 20, "loader_workers": 2}
    config = build(configs.TrainConfig, [("run r", resumed(configs.TrainConfig, recorded, given=typed)),
                                         ("the command line", typed)])
    assert (config.steps, config.seed, config.betas, config.model) == (20, 3, (0.8, 0.9), TINY["model"])
    assert (config.loader_workers, config.latents, config.out) == (2, None, None)  # free and input fields stay


def test_train_resume_on_the_command_line_needs_no_setting_typed_again(digits_latents_dir, tmp_path, capsys):
    run = tmp_path / "run"
    typed = ["--model", "SiT-T/2", "--global-batch", "8", "--data-lanes", "2", "--shuffle-buffer", "16",
             "--loader-workers", "0", "--lr", "1e-3", "--preview-every", "0", "--seed", "4", "--device", "cpu"]
    assert cli("train", digits_latents_dir, "--out", run, "--steps", "2", *typed, capsys=capsys)[0] == 0
    assert cli("train", "--out", run, "--resume", "--steps", "4", capsys=capsys)[0] == 0  # model, lr, seed... from the run
    straight = tmp_path / "straight"
    assert cli("train", digits_latents_dir, "--out", straight, "--steps", "4", *typed, capsys=capsys)[0] == 0
    assert_same_files(run / "step-0000004", straight / "step-0000004")
    status, stderr = cli("train", "--out", run, "--resume", "--steps", "6", "--seed", "5", capsys=capsys)
    assert status == 2 and stderr.strip().splitlines() == [
        f"error: cannot continue run {run}/step-0000004: it was made with --seed 4, now 5; "
        "drop that option (a resume takes the run's settings) or choose a new --out"]


def test_a_record_made_before_a_field_existed_counts_as_its_default():
    recorded = settings_of(tiny("lat", "run", steps=10))
    del recorded["seed"]  # as if `seed` had been added to TrainConfig after this run was made
    check_continues(recorded, tiny("lat", "run", steps=10), "run r", "hint")  # the default, 0: the same run
    with pytest.raises(SitctlError, match="--seed 0, now 3"):
        check_continues(recorded, tiny("lat", "run", steps=10, seed=3), "run r", "hint")


# The role of every field of every stage config, written out rather than read back: a shaping setting
# re-declared free would let a resume change it without a word (check_continues no longer looks at
# it), so a change of role, a new field or a new stage config is an edit here that a reviewer sees.
ENCODE_ROLES = {
    SHAPES: {"src", "image_size", "vae", "shard_size", "batch_size", "limit", "order_seed", "precision",
             "encoder_targets"},
    FREE: {"out", "workers", "device"},
}
TRAIN_ROLES = {
    SHAPES: {"model", "qk_norm", "interp", "pred", "loss_weight", "train_eps", "discrete_steps", "time_dist",
             "time_mean", "time_std", "global_batch", "lr", "weight_decay", "betas", "ema_decay", "label_dropout",
             "flip", "grad_clip", "precision", "seed", "data_lanes", "shuffle_buffer", "repa_encoder", "repa_depth",
             "repa_coeff", "repa_projector_width", "repa_image_size"},
    EXTENDS: {"steps"},
    INPUT: {"latents"},
    FREE: {"out", "micro_batch", "compile", "loader_workers", "ckpt_every", "keep_last", "keep_every", "log_every",
           "preview_every", "preview_images", "preview_steps", "preview_cfg", "tracker", "log_dir", "eval_every",
           "eval_num", "eval_mode", "eval_steps", "eval_cfg", "eval_batch", "eval_ref", "resume", "recipe", "device"},
}
SAMPLE_ROLES = {
    SHAPES: {"mode", "method", "steps", "atol", "rtol", "w", "diffusion", "last_step", "last_step_size", "sample_eps",
             "time_shift", "cfg_scale", "guidance_interval", "guided_channels", "reference_steps", "num", "seed",
             "labels", "ema", "model", "vae", "published", "npz", "preview", "precision", "tf32"},
    INPUT: {"checkpoint"},
    FREE: {"out", "batch_size", "device", "compile", "cuda_graphs", "recipe"},
}
INCEPTION_FREE = {"batch_size", "device", "fetch_weights"}  # InceptionSettings, shared by the three below
EVAL_ROLES = {
    SHAPES: {"inception_weights", "metrics", "is_splits", "kid_subsets", "kid_subset_size", "prc_neighborhood", "seed"},
    INPUT: {"samples", "ref"},
    FREE: INCEPTION_FREE | {"out", "results", "num_expected", "allow_fewer"},
}
REFERENCE_ROLES = {
    SHAPES: {"inception_weights", "source", "image_size", "max_images", "sample_of"},
    FREE: INCEPTION_FREE | {"out"},
}
SWEEP_ROLES = {
    SHAPES: {"inception_weights", "w_values", "cfg_values", "mode", "num", "metric"},
    INPUT: {"run", "ref"},
    FREE: INCEPTION_FREE | {"out"},
}
DEMO_ROLES = {
    SHAPES: {"image_size", "model", "steps", "num_samples", "sample_steps", "cfg_scale", "seed", "reference_images"},
    FREE: {"out"},
}
STUDY_ROLES = {
    SHAPES: {"train_source", "reference_source", "image_size", "train_images", "reference_images", "model",
             "train_steps", "global_batch", "lr", "ema_decay", "num_samples", "ode_steps", "sde_steps", "bootstrap",
             "seed", "convergence_ema_decay", "repa_projector_width", "encoder_epochs"},
    FREE: {"out", "sample_batch", "w_values", "diffusions", "cfg_values", "sde_step_values", "ode_step_values",
           "train_seeds", "sample_seeds", "ablations", "convergence_steps", "shift_values", "grid_ode_steps",
           "grid_sde_steps", "models", "max_minutes", "device", "report_only"},
}
DOCTOR_ROLES = {SHAPES: {"as_json", "device", "measure", "compile_on_cpu"}}
DECLARED_ROLES = {configs.EncodeConfig: ENCODE_ROLES, configs.TrainConfig: TRAIN_ROLES,
                  configs.SampleConfig: SAMPLE_ROLES, configs.EvalConfig: EVAL_ROLES,
                  configs.ReferenceConfig: REFERENCE_ROLES, configs.SweepConfig: SWEEP_ROLES,
                  configs.DemoConfig: DEMO_ROLES, configs.StudyConfig: STUDY_ROLES, configs.DoctorConfig: DOCTOR_ROLES}


@pytest.mark.parametrize("config_class", DECLARED_ROLES, ids=lambda c: c.__name__)
def test_each_fields_role_is_the_reviewed_one_and_a_new_field_fails_until_it_is_listed(config_class):
    table = DECLARED_ROLES[config_class]
    listed = {name: listed_role for listed_role, names in table.items() for name in names}
    assert len(listed) == sum(map(len, table.values())), "a field is listed under two roles"
    assert {field.name: role(field) for field in dataclasses.fields(config_class)} == listed


def test_the_role_table_covers_every_stage_config():
    stage_configs = {value for name, value in vars(configs).items() if name.endswith("Config")
                     and dataclasses.is_dataclass(value) and value.__module__ == configs.__name__}
    assert stage_configs == set(DECLARED_ROLES)


def test_a_finished_result_is_the_same_only_with_the_same_identity_settings_and_the_same_inputs_by_id():
    from pathlib import Path

    from sitctl.artifacts import Artifact
    from sitctl.identity import ROLES, made_otherwise

    made = configs.SampleConfig(checkpoint="runs/v1", mode="sde", num=8, seed=3)
    samples = Artifact(Path("samples/v1"), {"config": settings_of(made, ROLES), "inputs": [{"kind": "checkpoint", "id": "c1"}]})
    moved = dataclasses.replace(made, checkpoint="elsewhere/run", out="samples/v9", batch_size=4)  # input and free fields
    assert made_otherwise(samples, moved, ["c1"]) is None
    assert made_otherwise(samples, dataclasses.replace(made, mode="ode"), ["c1"]) == "it was made with --mode 'sde', now 'ode'"
    assert made_otherwise(samples, made, ["c2"]) == "it was made from c1, now c2"  # the same path, other weights
    assert made_otherwise(samples, made, []) == "it was made from c1, now no input"


def test_a_run_that_went_further_is_the_same_run_when_only_the_shaping_settings_are_compared():
    from pathlib import Path

    from sitctl.artifacts import Artifact
    from sitctl.identity import ROLES, made_otherwise

    run = tiny("lat", "run", steps=20)
    checkpoint = Artifact(Path("run/step-0000020"), {"config": settings_of(run, ROLES), "inputs": [{"kind": "latents", "id": "l1"}]})
    asked = dataclasses.replace(run, steps=10)
    assert made_otherwise(checkpoint, asked, ["l1"]) == "it was made with --steps 20, now 10"  # a finished result's identity
    assert made_otherwise(checkpoint, asked, ["l1"], (SHAPES,)) is None
    assert made_otherwise(checkpoint, dataclasses.replace(asked, lr=0.5), ["l1"], (SHAPES,)) == f"it was made with --lr {run.lr!r}, now 0.5"
