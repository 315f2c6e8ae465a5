"""The CLI explains itself: a description for every config key, the resolved config, --version."""

from __future__ import annotations

import configparser
import itertools
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import carv3d
from carv3d.cli import main
from carv3d.config import SEAMS, all_keys, load_config
from carv3d.config_help import commented_yaml, key_help

ROOT = Path(__file__).resolve().parents[1]
SEAM_CHOICES = [dict(zip(SEAMS, names)) for names in itertools.product(*(list(t) for t in SEAMS.values()))]


@pytest.mark.parametrize("types", SEAM_CHOICES, ids=lambda t: "-".join(t.values()))
def test_every_key_and_section_has_a_one_line_description(types: dict) -> None:
    cfg = load_config(overrides=[f"{seam}.type={name}" for seam, name in types.items()])
    descriptions = key_help(cfg)
    keys = all_keys(cfg)
    assert set(descriptions) == set(keys)
    for key in keys:
        text = descriptions[key]
        assert text and "\n" not in text, f"{key} has no one-line description"
        assert not text.startswith(type(cfg).__name__) and "Config(" not in text, f"{key}: {text}"


def test_descriptions_carry_the_range_or_the_choices() -> None:
    descriptions = key_help()
    assert descriptions["train.log_every"] == "log metrics every this many steps (an integer in [1, 100000000])"
    assert descriptions["render.sampler"].startswith("ray sampler")
    assert "one of: auto, torch, triton, tcnn" in descriptions["scene.grid.backend"]
    assert "one of: sds, csd" in descriptions["guidance.type"]


def test_the_commented_yaml_is_the_config_itself() -> None:
    cfg = load_config(overrides=["train.steps=7", "estimator.t_max_schedule=[[0,0.9],[10,0.5]]"], prompt="a red cube")
    text = commented_yaml(cfg)
    assert yaml.safe_load(text) == OmegaConf.to_container(cfg, resolve=True)
    leaves = [line for line in text.splitlines() if not line.strip().startswith("#") and not line.endswith(":")]
    assert len(leaves) == len([k for k in all_keys(cfg) if not isinstance(OmegaConf.select(cfg, k), dict)
                               and not OmegaConf.is_dict(OmegaConf.select(cfg, k))])
    assert all("  # " in line for line in leaves)


def test_help_config_applies_the_config_file_and_overrides(capsys, tmp_path: Path) -> None:
    assert main(["train", "--help-config"]) == 0
    default = capsys.readouterr().out
    assert "  steps: 1000  # optimisation steps" in default
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  steps: 7\nrender:\n  width: 32\n")
    assert main(["train", "--help-config", "--config", str(config), "render.height=48"]) == 0
    out = capsys.readouterr().out
    assert "  steps: 7  # optimisation steps" in out and "  width: 32  #" in out and "  height: 48  #" in out


def test_config_show_prints_the_resolved_yaml(capsys) -> None:
    assert main(["config", "show", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), "train.steps=11",
                 "--prompt", "a blue cone"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = OmegaConf.to_container(load_config(ROOT / "configs" / "demo_cpu.yaml", ["train.steps=11"], "a blue cone"))
    assert shown == expected and shown["train"]["steps"] == 11 and shown["prompt"] == "a blue cone"
    assert main(["config", "show", "--describe", "train.steps=11"]) == 0
    assert "  steps: 11  # optimisation steps" in capsys.readouterr().out


def test_config_show_applies_the_cpu_sizing_a_run_would(capsys) -> None:
    """Without --config on a CPU: the values the trainer would size, listed at the top, the
    explicit key kept; the output is still YAML that `--config` reads back unchanged."""
    from carv3d.sizing import size_for_device

    assert main(["config", "show", "--prompt", "a red cube", "render.width=48", "train.device=cpu"]) == 0
    out = capsys.readouterr().out
    expected = load_config(None, ["render.width=48", "train.device=cpu"], "a red cube")
    changes = size_for_device(expected, "cpu")
    assert "render.samples_per_ray" in changes and "render.width" not in changes
    assert out.startswith("# sized for this machine (cpu)")
    assert "#   render.samples_per_ray: 64 → 32" in out
    assert yaml.safe_load(out) == OmegaConf.to_container(expected)
    assert yaml.safe_load(out)["render"]["width"] == 48


def test_config_show_speaks_like_train_on_a_bad_key(capsys) -> None:
    assert main(["config", "show", "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_version(capsys) -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert carv3d.__version__ == cfg.get("metadata", "version")
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"carv3d {carv3d.__version__}"


@pytest.mark.parametrize("option, expected", [("train.device", "use train.device=cpu or train.device=auto"),
                                              ("--device", "use --device cpu or --device auto")])
def test_device_errors_speak_the_syntax_the_user_types(option: str, expected: str) -> None:
    import torch

    from carv3d.devices import resolve_device
    from carv3d.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda", option=option)
    assert expected in str(err.value)


def test_every_flag_and_argument_of_every_command_has_help() -> None:
    import argparse

    from carv3d.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "carv3d")
    assert missing == []


def test_resume_says_what_it_replaces_and_deletes(monkeypatch, capsys, tmp_path: Path) -> None:
    import carv3d.train

    calls = []
    monkeypatch.setattr(carv3d.train, "resume", lambda run_dir, overrides: calls.append((run_dir, overrides)) or run_dir)
    (tmp_path / "config.yaml").write_text("prompt: a red cube\n")  # a run directory, as far as the note cares
    assert main(["train", "--resume", str(tmp_path), "train.steps=20"]) == 0
    assert calls == [(str(tmp_path), ["train.steps=20"])]
    note = [line for line in capsys.readouterr().err.splitlines() if "--resume " in line]
    assert len(note) == 1 and str(tmp_path) in note[0]
    for words in ("turntable.mp4, mesh/", "replaced", "only the newest 3 checkpoints are kept", "deleted"):
        assert words in note[0]


def test_overrides_may_follow_options_and_keep_their_order(capsys) -> None:
    """`carv3d train --config F a=1 --prompt P b=2`, as README lines are written: both apply, and a
    key given twice takes its last value; a stray non-override is still refused."""
    assert main(["config", "show", "train.steps=11", "--prompt", "a blue cone", "train.seed=5", "train.steps=12"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["train"]["steps"], shown["train"]["seed"], shown["prompt"]) == (12, 5, "a blue cone")
    with pytest.raises(SystemExit) as exit_:
        main(["config", "show", "train.seed=5", "--prompt", "a blue cone", "stray"])
    assert exit_.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
