"""Every numeric config key rejects out-of-range values with a clean error (issue 21, items 6 and 8).

The ranges are stated once, as field metadata next to each default (carv3d.config_ranges). The
generated test walks every numeric key of every seam type's schema and tries 0, -1, NaN, ±inf, an
absurd value and the ends of the key's range (just inside and just outside) through
``load_config(overrides=[...])``, the way a user or a sweep file sets them. Expectations come from two
places, so that a wrong range fails: the metadata (a value it rejects must be rejected with a
ConfigError naming the key; a value it accepts must load unchanged, unless a listed cross-key check
refuses it) and rules written by hand here (NaN, ±inf and the absurd value are rejected by every key,
and the issue's cases below are rejected whatever the metadata says).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Union

import pytest
from omegaconf import OmegaConf

from carv3d.cli import main
from carv3d.config import Config, SEAMS, load_config, numeric_keys
from carv3d.config_ranges import KeySpec, check_value
from carv3d.errors import ConfigError

ABSURD_INT = 10**23  # OmegaConf holds Python ints of any size: only a range can refuse it
ABSURD_FLOAT = 1e30

# The issue's cases (items 6 and 8) and the obvious ones next to them: each must be rejected with a
# ConfigError naming the key, whatever the metadata says.
MUST_REJECT = [
    "train.log_every=0",  # was ZeroDivisionError
    "train.val_resolution=0",  # was ValueError from range()
    "train.steps=99999999999999999999999",
    "train.steps=-1",
    "optim.lr_grid=nan",
    "optim.lr_grid=-1",
    "optim.lr_grid=1e30",
    "optim.lr_mlp=inf",
    "train.checkpoint_every=-3",
    "train.turntable_frames=-5",
    "train.max_nonfinite_steps=0",
    "train.seed=-1",
    "render.width=0",
    "render.height=-1",
    "render.samples_per_ray=0",
    "train.turntable_fps=0",
    "export.resolution=0",
    "export.resolution=100000",
    "export.texture_size=100",
    "export.texture_size=-1",
    "export.faces=2",
    "export.faces=-1",
    "export.silhouette_views=0",
    "export.threshold=nan",
    "export.threshold=-1",
    "teacher.max_batch=0",
    "teacher.resolution=-1",
    "estimator.noise_draws=0",
    "estimator.noise_draws=99999999999999999999999",
    "estimator.upstream_samples=0",
    "estimator.min_noise_draws=0",
    "estimator.min_noise_draws=17",  # above max_noise_draws (16)
    "estimator.max_noise_draws=1",  # below min_noise_draws (2)
    "estimator.t_min=-0.1",
    "estimator.t_max=1.5",
    "estimator.t_max_schedule=[[0,nan]]",
    "estimator.t_max_schedule=[[100,0.5],[0,0.9]]",  # steps out of order
    "estimator.auto_smoothing=1",
    "estimator.adaptive_defensive_mixture=0",
    "estimator.adaptive_bins=0",
    "render.albedo_probability=1.5",
    "render.albedo_probability=-0.1",
    "render.near=-1",
    "optim.betas=[0.9,1.0]",
    "optim.betas=[0.9]",
    "optim.eps=0",
    "camera.fovy_range=[0,50]",
    "camera.fovy_range=[50,180]",
    "camera.elevation_range=[10,0]",
    "camera.distance_range=[0,1]",
    "scene.radius=0",
    "scene.normal_epsilon=0",
    "scene.grid.log2_hashmap_size=31",
    "scene.grid.per_level_scale=0.5",
]

# Keys whose in-range value may still be refused by a check across keys (t_min < t_max,
# min_noise_draws <= max_noise_draws, each scheduled t_max above t_min, VSD's lora_t_min < lora_t_max).
CROSS_KEY = {"estimator.t_min", "estimator.t_max", "estimator.min_noise_draws", "estimator.max_noise_draws",
             "estimator.t_max_schedule", "guidance.lora_t_min", "guidance.lora_t_max"}


def _seam_choices() -> list[dict[str, str]]:
    """The default types, then each other implementation of each seam in turn."""
    return [{}] + [{seam: name} for seam, known in SEAMS.items() for name in list(known)[1:]]


def _type_overrides(types: dict[str, str]) -> list[str]:
    return [f"{seam}.type={name}" for seam, name in types.items()]


def _is_numeric(hint: Any) -> bool:
    """int, float, a list (of lists) of them, or a Union holding one — never bool."""
    if hint in (int, float):
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        return any(a in (int, float) for a in args)
    if origin in (list, typing.List):
        return _is_numeric(args[0])
    return False


def _numeric_fields(cls: type, prefix: str, types: dict[str, str]) -> set[str]:
    """The numeric leaves of the schema, found from the type hints alone (not the metadata)."""
    hints = typing.get_type_hints(cls)
    found = set()
    for f in dataclasses.fields(cls):
        key, hint = prefix + f.name, hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if key in SEAMS:
                hint = SEAMS[key][types.get(key, next(iter(SEAMS[key])))]
            found |= _numeric_fields(hint, key + ".", types)
        elif _is_numeric(hint):
            found.add(key)
    return found


@pytest.mark.parametrize("types", _seam_choices(), ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()) or "defaults")
def test_every_numeric_key_states_its_range(types):
    by_hints = _numeric_fields(Config, "", types)
    with_ranges = set(numeric_keys(**types))
    assert by_hints == with_ranges, f"numeric keys without a range: {sorted(by_hints - with_ranges)}"
    for item in numeric_keys(**types).values():  # every default lies in its own range
        check_value(item.key, item.default, item.spec)


# ------------------------------------------------------------------------------------ the probes


def _literal(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_literal(x) for x in v) + "]"
    return str(v)


def _scalars(item: KeySpec, integer: bool) -> list[Any]:
    """0, -1, NaN, ±inf, the absurd value, and each end of the range and one step past it."""
    rng = item.spec.range if item.spec.kind != "rows" else None
    values: list[Any] = [0, -1, ABSURD_INT if integer else ABSURD_FLOAT]
    if not integer:
        values += [math.nan, math.inf, -math.inf, 0.0, -1.0]
    if rng is not None:
        step = 1 if integer else max(1e-6, 1e-6 * abs(rng.high))
        for end in (rng.low, rng.high):
            end = int(end) if integer else float(end)
            values += [end, end - step, end + step]
    return values


def _is_int_key(item: KeySpec) -> bool:
    sample = item.default[0] if isinstance(item.default, list) and item.default else item.default
    return item.spec.range.integer or isinstance(sample, int) and not isinstance(sample, bool)


def _probes(item: KeySpec) -> list[tuple[Any, bool]]:
    """(value to set, whether the metadata accepts it) for one key."""
    spec, default = item.spec, item.default
    probes: list[tuple[Any, bool]] = []
    if spec.kind == "scalar":
        integer = _is_int_key(item)
        for v in _scalars(item, integer):
            probes.append((v, v in spec.range))
        if spec.words:
            probes += [(w, True) for w in spec.words]
        if integer:  # an int key refuses NaN and inf by type
            probes += [(math.nan, False), (math.inf, False)]
        return probes
    if spec.kind in ("pair", "list"):
        for i in range(len(default)):
            for v in _scalars(item, False):
                value = list(default)
                value[i] = float(v)
                ok = all(x in spec.range for x in value) and (spec.kind != "pair" or value[0] <= value[1])
                probes.append((value, ok))
        probes.append((list(default)[:1], spec.length is None))  # one value short
        return probes
    assert spec.kind == "rows"
    inside = [c.low if not c.low_open else c.high for c in spec.columns]
    for j, column in enumerate(spec.columns):
        for v in [0.0, -1.0, math.nan, math.inf, ABSURD_FLOAT, float(column.low), float(column.high)]:
            row = list(map(float, inside))
            row[j] = v
            probes.append(([row], all(x in c for x, c in zip(row, spec.columns))))
    return probes


def _cases() -> list[tuple[dict[str, str], str]]:
    """Every key of the default schema, then the keys of each other seam type's section."""
    cases = []
    for types in _seam_choices():
        cases += [(types, key) for key in numeric_keys(**types)
                  if not types or key.split(".")[0] in types]
    return cases


def _flat(value: Any) -> list[float]:
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]


def _names_key(err: ConfigError, key: str) -> bool:
    return key in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("types, key", _cases(),
                         ids=[f"{','.join(f'{s}={n}' for s, n in t.items()) or 'defaults'}:{k}" for t, k in _cases()])
def test_numeric_key_rejects_out_of_range(types, key):
    item = numeric_keys(**types)[key]
    for value, metadata_ok in _probes(item):
        override = f"{key}={_literal(value)}"
        hand_reject = (  # the rules written here, independent of the metadata
            isinstance(value, float) and not math.isfinite(value)
            or value in (ABSURD_INT, ABSURD_FLOAT)
            or isinstance(value, list) and any(not math.isfinite(x) or x == ABSURD_FLOAT
                                               for x in (value[0] if value and isinstance(value[0], list) else value))
        )
        try:
            cfg = load_config(overrides=_type_overrides(types) + [override])
        except ConfigError as err:
            assert _names_key(err, key), f"{override}: the message must name the key on one line: {err}"
            assert metadata_ok is False or key in CROSS_KEY, f"{override} is in the stated range but was refused: {err}"
            continue
        assert metadata_ok, f"{override} is outside the stated range ({item.spec.describe()}) but was accepted"
        assert not hand_reject, f"{override} is non-finite or absurd but was accepted"
        loaded = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"]
        if isinstance(value, str):
            assert loaded == value
        else:
            assert _flat(loaded) == pytest.approx(_flat(value)), f"{override} loaded as {loaded}"


@pytest.mark.parametrize("override", MUST_REJECT)
def test_issue_cases_are_rejected(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert key in message and "\n" not in message
    if key not in CROSS_KEY and "t_max_schedule" not in key:  # the range and what to do
        assert "expected" in message or "low <= high" in message


def test_message_says_value_range_and_what_to_do():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.log_every=0"])
    assert str(err.value) == ("config key 'train.log_every' is 0; expected an integer in [1, 100000000]. "
                              "Set it to a value in that range (the default is 10).")
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["export.texture_size=100"])
    assert "0 (off) or a power of two in [16, 8192]" in str(err.value)


def test_in_range_edges_and_off_values_load():
    cfg = load_config(overrides=["train.steps=0", "train.steps=100000000", "train.checkpoint_every=0",
                                 "train.turntable_frames=0", "export.faces=0", "export.texture_size=0",
                                 "export.refine_from=0", "teacher.resolution=0", "optim.lr_background=0",
                                 "optim.betas=[0,0.999]", "camera.fovy_range=[10,170]", "estimator.noise_draws=10000",
                                 "estimator.t_max_schedule=[[0,0.98],[5000,0.98],[5000,0.5]]"])
    assert cfg.train.steps == 10**8 and cfg.export.faces == 0 and cfg.estimator.noise_draws == 10**4


def test_numeric_strings_become_numbers():
    """"8" from a sweep file or the command line is the number 8; "auto" stays a word."""
    assert load_config(overrides=["estimator.noise_draws='8'"]).estimator.noise_draws == 8
    assert load_config(overrides=["export.threshold='2.5'"]).export.threshold == 2.5
    assert load_config(overrides=["export.threshold=auto"]).export.threshold == "auto"
    with pytest.raises(ConfigError, match="noise_draws"):
        load_config(overrides=["estimator.noise_draws='8.5'"])


def test_resumed_config_is_checked_too():
    base = load_config()
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(base=base, overrides=["train.steps=-1"])


def test_a_hand_built_scene_section_is_checked_against_the_same_ranges():
    """NeRFField is handed a dataclass that never went through load_config: it checks it against
    the config's metadata, with the same message."""
    import torch

    from carv3d.config import HashGridConfig, NeRFSceneConfig
    from carv3d.scene.field import NeRFField

    grid = HashGridConfig(backend="torch", n_levels=2, log2_hashmap_size=10, base_resolution=8)
    for bad, key in [(dict(radius=0.0), "scene.radius"), (dict(normal_epsilon=math.nan), "scene.normal_epsilon"),
                     (dict(blob_radius=-1.0), "scene.blob_radius"), (dict(mlp_width=0), "scene.mlp_width"),
                     (dict(density_activation="relu"), "scene.density_activation")]:
        with pytest.raises(ConfigError) as err:
            NeRFField(NeRFSceneConfig(grid=grid, **bad), generator=torch.Generator().manual_seed(0))
        assert key in str(err.value)
    NeRFField(NeRFSceneConfig(grid=grid), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ through the CLI


@pytest.mark.parametrize("override, key", [("train.log_every=0", "train.log_every"),
                                           ("train.val_resolution=0", "train.val_resolution"),
                                           ("optim.lr_grid=nan", "optim.lr_grid")])
def test_cli_refuses_out_of_range_with_one_line(capsys, tmp_path, override, key):
    code = main(["train", "--prompt", "a red cube", f"train.output_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and key in lines[0], err
    assert "Traceback" not in err
    if key == "train.log_every":
        assert lines == ["carv3d train: error: config key 'train.log_every' is 0; expected an integer in "
                         "[1, 100000000]. Set it to a value in that range (the default is 10)."], err
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad config"
