"""Named recipes (sitctl/recipes/): each parses into valid configs, holds the papers' numbers, and yields to the command line."""

import re

import pytest
from typer.testing import CliRunner

from sitctl.artifacts import open_artifact
from sitctl.cli import app, recipes, run_app
from sitctl.configs import SampleConfig, TrainConfig, resolve_sample
from sitctl.errors import SitctlError
from sitctl.recipes import load_recipe, recipe_layers, recipe_names
from sitctl.settings import build
from tests.sitctl.test_sample import randomised_sit, write_checkpoint


def apply_recipe(config_class, name, typed=None):
    """The config of `name`'s settings under those typed, as the command line builds it."""
    typed = {"recipe": name, **(typed or {})}
    config = build(config_class, [*recipe_layers(config_class, name, typed), ("the command line", typed)])
    return resolve_sample(config) if config_class is SampleConfig else config

# The published numbers each recipe must carry (SiT: Ma et al. 2024; REPA: Yu et al. 2024).
PAPERS = {
    "sit-xl2": {"train": {"model": "SiT-XL/2", "interp": "linear", "pred": "velocity", "global_batch": 256, "lr": 1e-4,
                          "ema_decay": 0.9999, "steps": 7_000_000},
                "sample": {"mode": "sde", "steps": 250, "cfg_scale": 1.5, "guided_channels": 3, "w": 1.0}},
    "sit-xl2-sde": {"sample": {"mode": "sde", "steps": 250, "cfg_scale": 1.0}},
    "repa-xl2": {"train": {"model": "SiT-XL/2", "interp": "linear", "pred": "velocity", "global_batch": 256, "lr": 1e-4,
                           "steps": 4_000_000, "repa_encoder": "dinov2-vitb14", "repa_depth": 8, "repa_coeff": 0.5,
                           "repa_projector_width": 2048, "grad_clip": 1.0},
                 "sample": {"mode": "sde", "steps": 250, "cfg_scale": 1.8, "guidance_interval": (0.3, 1.0),
                            "published": "repa"}},
}


def test_every_shipped_recipe_names_its_paper_and_builds_valid_configs():
    assert set(recipe_names()) == set(PAPERS)
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe["paper"] and recipe["reproduces"]
        for stage, config_class in (("train", TrainConfig), ("sample", SampleConfig)):
            if stage in recipe:
                config = apply_recipe(config_class, name)
                for key, value in PAPERS[name].get(stage, {}).items():
                    assert getattr(config, key) == value, (name, stage, key)


def test_the_command_line_wins_over_the_recipe():
    config = apply_recipe(SampleConfig, "sit-xl2", {"cfg_scale": 4.0, "steps": 20})
    assert (config.cfg_scale, config.steps, config.guided_channels) == (4.0, 20, 3)


def test_a_users_own_recipe_file_and_bad_recipes_are_one_line(tmp_path):
    own = tmp_path / "mine.toml"
    own.write_text('description = "x"\n[train]\nlr = 3e-4\ntime_dist = "logit-normal"\n')
    config = apply_recipe(TrainConfig, str(own))
    assert (config.lr, config.time_dist) == (3e-4, "logit-normal")
    (tmp_path / "bad.toml").write_text('[train]\nlearning_rate = 1\n')
    with pytest.raises(SitctlError, match=r"recipe '.*bad.toml' \[train\] sets unknown setting\(s\): learning_rate$"):
        apply_recipe(TrainConfig, str(tmp_path / "bad.toml"))
    with pytest.raises(SitctlError, match="no recipe 'nope'"):
        apply_recipe(TrainConfig, "nope")
    (tmp_path / "sampler.toml").write_text('[sample]\ncfg_scale = 2.0\n')
    with pytest.raises(SitctlError, match="has no \\[train\\] settings"):
        apply_recipe(TrainConfig, str(tmp_path / "sampler.toml"))


def test_sitctl_recipes_lists_each_with_what_it_reproduces(capsys):
    recipes()
    listing = capsys.readouterr().out
    assert all(name in listing for name in PAPERS) and "1.42" in listing and "2.06" in listing


def test_a_recipe_value_of_the_wrong_type_is_the_one_line_a_typed_one_gets(tmp_path, capsys):
    own = tmp_path / "fast.toml"
    own.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(SystemExit) as exit_status:
        run_app(app, ["train", "--recipe", str(own), "--out", str(tmp_path / "run")])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --lr must be a number, got 'fast' (recipe '{own}' [train])"
    for text, expected in (('steps = 1.5', "--steps must be a whole number, got 1.5"),
                           ('flip = "yes"', "--flip must be true or false, got 'yes'"),
                           ('betas = [0.9]', "--betas must be a list of 2: a number, a number, got [0.9]")):
        own.write_text(f"[train]\n{text}\n")
        with pytest.raises(SitctlError, match=f"^{re.escape(expected)} "):
            apply_recipe(TrainConfig, str(own))


def test_a_recipe_that_picks_the_ode_samples_with_the_odes_own_solver_and_steps(digits_latents_dir, tmp_path):
    net, config = randomised_sit(input_size=8, in_channels=3)
    run_dir = write_checkpoint(tmp_path / "run", digits_latents_dir, net, config)
    own = tmp_path / "ode.toml"
    own.write_text('[sample]\nmode = "ode"\n')
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", str(run_dir), "--recipe", str(own), "--out", str(out), "--num-samples", "2",
                                      "--device", "cpu", "--preview", "0"])
    assert result.exit_code == 0, result.output
    recorded = open_artifact(out, "samples").config
    assert (recorded["mode"], recorded["method"], recorded["steps"]) == ("ode", "dopri5", 50)
