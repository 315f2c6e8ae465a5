"""Config layering, strict keys and typed errors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from carv3d.config import ESTIMATOR_PRESETS, all_keys, load_config
from carv3d.errors import ConfigError


def test_layers_later_wins(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("prompt: from file\ntrain:\n  steps: 7\nrender:\n  width: 32\n")
    cfg = load_config(config_file, ["train.steps=9"], prompt="from flag")
    assert cfg.prompt == "from flag"  # --prompt beats the file
    assert cfg.train.steps == 9  # override beats the file
    assert cfg.render.width == 32  # file beats the defaults
    assert cfg.render.height == 64  # default kept


def test_preset_is_a_layer_under_user_keys(tmp_path):
    cfg = load_config(overrides=["estimator.preset=sds"])
    for section, values in ESTIMATOR_PRESETS["sds"].items():
        for key, value in values.items():
            assert cfg[section][key] == value
    assert cfg.camera.stratified is False and cfg.estimator.upstream_samples == 1
    cfg = load_config(overrides=["camera.stratified=false"])  # the user's camera key beats the carv preset
    assert cfg.camera.stratified is False and cfg.estimator.upstream_samples == 2
    cfg = load_config(overrides=["estimator.preset=sds", "estimator.noise_draws=4"])
    assert cfg.estimator.noise_draws == 4  # the user's key beats the preset, whatever the order
    config_file = tmp_path / "c.yaml"
    config_file.write_text("estimator:\n  noise_draws: 3\n")
    cfg = load_config(config_file, ["estimator.preset=sds"])
    assert cfg.estimator.noise_draws == 3
    assert cfg.estimator.proposal == "uniform"


def test_default_estimator_is_carv():
    cfg = load_config()
    for section, values in ESTIMATOR_PRESETS["carv"].items():
        for key, value in values.items():
            assert cfg[section][key] == value


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["estimator.noise_draw=3"])
    assert "estimator.noise_draw" in str(err.value) and "estimator.noise_draws" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["trian.steps=3"])
    assert "train" in str(err.value)


@pytest.mark.parametrize("overrides, suggested", [
    (["guidance.type=vsd", "guidance.lora_rnk=3"], "guidance.lora_rank"),
    (["scene.type=gaussians", "scene.density.max_gausians=3"], "scene.density.max_gaussians"),
])
def test_a_typo_in_a_seam_implementation_key_names_that_implementation_key(overrides, suggested):
    """The suggestions come from the schema of the chosen seam types, not the default ones."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert f"Nearest valid keys: {suggested}" in str(err.value)


def test_a_key_of_another_implementation_says_whose_it_is(tmp_path):
    """A NeRF config file with scene.type=gaussians on the command line: the NeRF's scene.grid is
    unknown to the Gaussians, and the message says why, not only which keys are near."""
    config_file = tmp_path / "nerf.yaml"
    config_file.write_text("scene:\n  grid:\n    n_levels: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(config_file, overrides=["scene.type=gaussians"])
    message = str(err.value)
    assert "'scene.grid'" in message and "a key of scene.type=nerf" in message
    assert "this config's scene.type is gaussians" in message
    # a plain typo gets no such sentence
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["scene.type=gaussians", "scene.density.max_gausians=3"])
    assert "a key of scene.type" not in str(err.value)
    with pytest.raises(ConfigError) as err:  # the other way round, and on another seam
        load_config(overrides=["guidance.lora_rank=4"])
    assert "a key of guidance.type=vsd" in str(err.value) and "guidance.type is sds" in str(err.value)


def test_unknown_key_in_file(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("render:\n  widht: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(config_file)
    assert "render.widht" in str(err.value) and "render.width" in str(err.value) and str(config_file) in str(err.value)


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["render.width=wide"])
    assert "render.width" in str(err.value) and "int" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.progress=maybe"])
    assert "train.progress" in str(err.value) and "bool" in str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("render.shading=glossy", "render.shading"),
    ("estimator.noise_draws=many", "noise_draws"),
    ("estimator.noise_draws=0", "noise_draws"),
    ("estimator.t_min=0.99", "t_min"),
    ("export.formats=[fbx]", "fbx"),
    ("camera.elevation_range=[10,0]", "elevation_range"),
    ("estimator.preset=fast", "preset"),
])
def test_invalid_values(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


@pytest.mark.parametrize("text, fragments", [
    # Only the parser's first line ("while scanning for the next token") was shown: no line, no cause.
    ("train:\n\tsteps: 5\n", ["bad.yaml:2:1:", "not valid YAML", "'\\t'", "spaces, not tabs"]),
    ("render:\n  width: [32\n", ["bad.yaml:3:1:", "started at line 2", "expected ',' or ']'"]),
    # PyYAML kept the last of two equal keys: the first `train:` section's steps were silently lost.
    ("train:\n  steps: 5\nrender:\n  width: 32\ntrain:\n  seed: 3\n", ["bad.yaml:5:", "'train' is set twice", "line 1"]),
    ("train:\n  steps: 5\n  steps: 6\n", ["bad.yaml:3:", "'train.steps' is set twice"]),
    # A section given a value: "wrong type for config key '' ... int is not a subclass of TrainConfig".
    ("train: 5\n", ["'train'", "is a section of keys", "train.steps"]),
    ("scene:\n  grid: 3\n", ["'scene.grid'", "is a section of keys", "scene.grid.n_levels"]),
    ("train:\n", ["'train'", "but it is empty"]),
    ("export:\n  formats: glb\n", ["export.formats", "formats: [glb, ply]"]),
])
def test_malformed_config_files_say_where_and_what(tmp_path, text, fragments):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    assert "key ''" not in str(err.value) and "AnyNode" not in str(err.value)


def test_a_key_over_a_yaml_merge_is_no_repeat_and_a_repeat_inside_an_anchor_is(tmp_path):
    """``<<: *anchor`` then a key of the anchor: YAML's merge, where the explicit key wins. PyYAML
    flattens the merge into the mapping when it constructs it, after which the two look like a repeat."""
    merged = tmp_path / "merged.yaml"
    merged.write_text("train:\n  <<: &fast {steps: 5, seed: 1}\n  seed: 2\n")
    cfg = load_config(merged)
    assert (cfg.train.steps, cfg.train.seed) == (5, 2)
    merged.write_text("train:\n  <<: &fast {steps: 5, seed: 1, steps: 6}\n  seed: 2\n")
    with pytest.raises(ConfigError, match="'train.steps' is set twice"):
        load_config(merged)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes("train:\n  steps: 5\n".encode("utf-16")), "not UTF-8 text"),  # was a UnicodeDecodeError
    (lambda p: p.mkdir(), "is a directory"),  # was "does not exist"
])
def test_unreadable_config_files_are_config_errors(tmp_path, make, fragment):
    path = tmp_path / "config.yaml"
    make(path)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_a_list_key_given_a_plain_value_shows_the_list_syntax():
    """`export.formats=glb,obj` (the spelling of `carv3d export --format`) said "AnyNode is not a ListConfig"."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["export.formats=glb,obj"])
    assert "'export.formats=[glb,ply]'" in str(err.value) and "AnyNode" not in str(err.value)
    assert load_config(overrides=["export.formats=[glb,obj]"]).export.formats == ["glb", "obj"]


def test_noise_draws_accepts_int_and_auto():
    assert load_config(overrides=["estimator.noise_draws=8"]).estimator.noise_draws == 8
    assert load_config(overrides=["estimator.noise_draws=auto"]).estimator.noise_draws == "auto"


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(p for p in root.glob("*.yaml"))
    assert files, "configs/ should ship presets"
    for path in files:
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["train.steps=3", "estimator.noise_draws=auto"], prompt="a red cube")
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    again = load_config(path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_all_keys_lists_leaves():
    keys = all_keys()
    assert "estimator.noise_draws" in keys and "scene.grid.log2_hashmap_size" in keys
