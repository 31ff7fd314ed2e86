"""Named recipes (sitctl/recipes/): each parses into valid configs, holds the papers' numbers, and yields to the command line."""

import pytest

from sitctl.cli import recipes
from sitctl.configs import SampleConfig, TrainConfig
from sitctl.errors import SitctlError
from sitctl.recipes import apply_recipe, load_recipe, recipe_names

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
                config = apply_recipe(config_class(recipe=name), frozenset())
                for key, value in PAPERS[name].get(stage, {}).items():
                    assert getattr(config, key) == value, (name, stage, key)


def test_the_command_line_wins_over_the_recipe():
    config = apply_recipe(SampleConfig(recipe="sit-xl2", cfg_scale=4.0, steps=20), frozenset({"cfg_scale", "steps"}))
    assert (config.cfg_scale, config.steps, config.guided_channels) == (4.0, 20, 3)


def test_a_users_own_recipe_file_and_bad_recipes_are_one_line(tmp_path):
    own = tmp_path / "mine.toml"
    own.write_text('description = "x"\n[train]\nlr = 3e-4\ntime_dist = "logit-normal"\n')
    config = apply_recipe(TrainConfig(recipe=str(own)), frozenset())
    assert (config.lr, config.time_dist) == (3e-4, "logit-normal")
    (tmp_path / "bad.toml").write_text('[train]\nlearning_rate = 1\n')
    with pytest.raises(SitctlError, match="sets unknown train setting.*learning_rate"):
        apply_recipe(TrainConfig(recipe=str(tmp_path / "bad.toml")), frozenset())
    with pytest.raises(SitctlError, match="no recipe 'nope'"):
        apply_recipe(TrainConfig(recipe="nope"), frozenset())
    (tmp_path / "sampler.toml").write_text('[sample]\ncfg_scale = 2.0\n')
    with pytest.raises(SitctlError, match="has no \\[train\\] settings"):
        apply_recipe(TrainConfig(recipe=str(tmp_path / "sampler.toml")), frozenset())


def test_sitctl_recipes_lists_each_with_what_it_reproduces(capsys):
    recipes()
    listing = capsys.readouterr().out
    assert all(name in listing for name in PAPERS) and "1.42" in listing and "2.06" in listing
