"""Sweep files: a base config plus axes of overrides, expanded into one :class:`RunSpec` per run.

A sweep file is YAML::

    name: presets-vs-seeds           # the sweep directory's name (default: the file's stem)
    base: ../sd15.yaml               # a config file, relative to the sweep file (optional)
    overrides: {train.steps: 300}    # applied to every run
    grid:                            # cartesian product of the lists
      estimator.preset: [sds, carv]
      train.seed: [0, 1, 2]
    zip:                             # lists of one length, taken together, crossed with the grid
      prompt: [a red cube, a blue cone]
      teacher.guidance_scale: [7.5, 10.0]
    output_dir: runs/sweeps          # parent of the sweep directory, relative to the working directory

The runs are ``product(grid) × rows(zip)``: here 2 × 3 × 2 = 12. Keys are dotted config keys
(``carv3d train --help-config`` lists them) or nested mappings; an axis value may be a mapping,
which sets several keys at once (``estimator: [{preset: sds}, {preset: carv, noise_draws: 4}]``).

Each run's config is layered exactly like ``carv3d train``::

    defaults ← estimator preset ← base ← train.progress=false ← overrides ← axis values
             ← train.output_dir=<sweep dir>/runs, train.run_name=<run name>

Everything is checked here, before any run starts: the YAML (errors name the line), the keys of
every section, every axis (non-empty, no repeated values, zip lists of one length) and every run's
full config through :func:`carv3d.config.load_config`, so unknown keys and wrong types are caught
with the line they come from and the nearest valid keys; then every prompt against a
closed-vocabulary teacher's words (:mod:`carv3d.sweep.checks`). Resolving a config costs about
7 ms, so a sweep with more than ``max_runs`` runs (default 1000) is refused before any of that, in
well under a second, and a big one shows a progress bar while it is checked.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from carv3d.config import load_config
from carv3d.errors import ConfigError
from carv3d.run_dir import check_plain_name, slugify
from carv3d.sweep.checks import MAX_RUNS, check_prompts, check_size
from carv3d.sweep.errors import SweepError
from carv3d.sweep.yaml_lines import Located, read_yaml_with_lines

SECTIONS = ("name", "base", "overrides", "grid", "zip", "output_dir")
DEFAULT_OUTPUT_DIR = "runs/sweeps"
# Set by the sweep for every run; a sweep file that sets them would fight the runner.
RESERVED_KEYS = ("train.output_dir", "train.run_name")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep.

    Attributes:
        name: stable directory name, made from the axis values (readable part + hash), so that
            re-running the sweep finds the same directory even when axes gain values.
        axes: axis key → this run's value, as written in the sweep file.
        overrides: the ``key=value`` layer this run adds on top of the base config (common
            overrides first, then the axis values), values JSON-encoded (valid YAML for OmegaConf).
    """

    name: str
    axes: dict[str, Any]
    overrides: tuple[str, ...]


@dataclass
class SweepSpec:
    """A parsed and validated sweep file. ``configs[run.name]`` is each run's resolved config."""

    name: str
    file: Path
    base: Optional[Path]
    overrides: dict[str, Any]
    grid: dict[str, list[Any]]
    zipped: dict[str, list[Any]]
    output_dir: Path
    runs: list[RunSpec]
    configs: dict[str, DictConfig] = field(default_factory=dict, repr=False)

    @property
    def directory(self) -> Path:
        """The sweep directory: ``<output_dir>/<name>``."""
        return self.output_dir / self.name

    @property
    def runs_dir(self) -> Path:
        return self.directory / "runs"

    def run_dir(self, run: RunSpec) -> Path:
        return self.runs_dir / run.name

    @property
    def axis_keys(self) -> list[str]:
        return [*self.grid, *self.zipped]


# ---------------------------------------------------------------------------------------- helpers
def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 3}, "render.width": 8}`` → ``{"train.steps": 3, "render.width": 8}``.

    Config leaves are never mappings, so every mapping is a branch of the config tree.
    """
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def _dotlist(values: dict[str, Any]) -> list[str]:
    """``{"prompt": "a cube, front view"}`` → ``['prompt="a cube, front view"']``.

    JSON is a subset of YAML and OmegaConf parses each override's value as YAML, so JSON-encoding
    keeps strings with commas or colons, lists and numbers exactly as written.
    """
    return [f"{key}={json.dumps(value)}" for key, value in _flatten(values).items()]


def _value_slug(value: Any) -> str:
    if isinstance(value, dict):
        text = "_".join(f"{k.rsplit('.', 1)[-1]}_{v}" for k, v in _flatten(value).items())
    elif isinstance(value, (list, tuple)):
        text = "_".join(str(v) for v in value)
    else:
        text = str(value)
    return slugify(text, max_length=24)


def run_name(axes: dict[str, Any]) -> str:
    """A stable, readable directory name for one combination of axis values.

    ``{"prompt": "a red cube", "train.seed": 0}`` → ``a_red_cube-seed_0-<8 hex>``: the prompt's
    slug, ``<last key part>_<value>`` for other keys, then a hash of the exact values so two runs
    never share a name even when their slugs do. The name depends only on this run's values, not
    on its position in the sweep.
    """
    if not axes:
        return "run"
    parts = [_value_slug(v) if key == "prompt" else f"{key.rsplit('.', 1)[-1]}_{_value_slug(v)}"
             for key, v in axes.items()]
    readable = "-".join(parts)[:80].rstrip("-_")
    digest = hashlib.sha1(json.dumps(axes, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


# ---------------------------------------------------------------------------------------- sections
def _section_mapping(data: dict[str, Any], section: str, loc: Located) -> dict[str, Any]:
    value = data.get(section)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise loc.error((section,), f"'{section}' must be a mapping of config keys, not {type(value).__name__}.")
    return value


def _axes(data: dict[str, Any], section: str, loc: Located) -> dict[str, list[Any]]:
    """Read ``grid:`` or ``zip:``: each key names one axis and holds a non-empty list of values."""
    axes: dict[str, list[Any]] = {}
    for key, values in _section_mapping(data, section, loc).items():
        key = str(key)
        if not isinstance(values, list):
            raise loc.error((section, key), f"{section} axis '{key}' must be a list of values, e.g. "
                            f"'{key}: [{json.dumps(values)}]', not a single {type(values).__name__}.")
        if not values:
            raise loc.error((section, key), f"{section} axis '{key}' is empty; give it at least one value "
                            "or remove it.")
        if section == "grid":  # a zip axis may repeat a value: its rows (below) must differ instead
            seen: list[str] = []
            for i, value in enumerate(values):
                canonical = json.dumps(value, sort_keys=True, default=str)
                if canonical in seen:
                    raise loc.error((section, key, i), f"{section} axis '{key}' lists {canonical} twice; "
                                    "each value would be the same run.")
                seen.append(canonical)
        axes[key] = values
    if section == "zip" and len({len(values) for values in axes.values()}) == 1:
        rows: list[str] = []
        for i, row in enumerate(zip(*axes.values())):
            canonical = json.dumps(dict(zip(axes, row)), sort_keys=True, default=str)
            if canonical in rows:
                raise loc.error((section, next(iter(axes)), i), f"zip row {i + 1} ({canonical}) repeats row "
                                f"{rows.index(canonical) + 1}; each row would be the same run.")
            rows.append(canonical)
    return axes


def _check_keys(spec_keys: dict[str, tuple[Any, ...]], loc: Located) -> None:
    """Keys the sweep sets itself must not appear in the file."""
    for flat_key, doc_path in spec_keys.items():
        if flat_key in RESERVED_KEYS:
            raise loc.error(doc_path, f"'{flat_key}' is set by the sweep for every run (runs go to "
                            "<output_dir>/<name>/runs/<run name>); use the sweep file's top-level "
                            "'output_dir:' and 'name:' instead.")


def _keys_of(section: str, mapping: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """(flat config key, its document path) for every key a section sets, for line numbers."""
    keys: list[tuple[str, tuple[Any, ...]]] = []

    def walk(m: dict[str, Any], prefix: str, doc_path: tuple[Any, ...]) -> None:
        for key, value in m.items():
            full = f"{prefix}{key}"
            if isinstance(value, dict) and section == "overrides":
                walk(value, full + ".", doc_path + (key,))
            else:
                keys.append((full, doc_path + (key,)))
                subs = {sub for item in (value if isinstance(value, list) and section != "overrides" else [])
                        if isinstance(item, dict) for sub in _flatten(item)}  # axis values that set several keys
                keys.extend((f"{full}.{sub}", doc_path + (key,)) for sub in sorted(subs))

    walk(mapping, "", (section,))
    return keys


# ---------------------------------------------------------------------------------------- load + validate
def load_sweep(path: str | Path, validate: bool = True, max_runs: Optional[int] = MAX_RUNS) -> SweepSpec:
    """Parse a sweep file and expand it into runs; with ``validate``, resolve every run's config.

    Args:
        path: the sweep file.
        validate: resolve every run's config and check the prompts against a closed-vocabulary
            teacher (the embedded one); without it only the file's structure is checked.
        max_runs: refuse a sweep with more runs than this (None: no limit), before expanding it
            (see :mod:`carv3d.sweep.checks`).

    Raises:
        SweepError: malformed YAML, an unknown section, an empty axis, zip lists of different
            lengths, a repeated value, a reserved key, an unknown config key or a wrong type, a
            prompt the embedded teacher does not know, more runs than ``max_runs`` — each with the
            file and line, before any run starts.
    """
    path = Path(path).expanduser().resolve()
    data, lines = read_yaml_with_lines(path)
    loc = Located(path, lines)
    if data is None:
        raise SweepError(f"{path}: the sweep file is empty; it needs at least a 'grid:' or 'zip:' section.")
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with sections {', '.join(SECTIONS)}; "
                         f"this one holds a {type(data).__name__}.")
    for key in data:
        if key not in SECTIONS:
            import difflib

            near = difflib.get_close_matches(str(key), SECTIONS, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise loc.error((key,), f"unknown sweep section '{key}'; sections are {', '.join(SECTIONS)}.{hint}")

    name = str(data.get("name") or path.stem)
    try:
        check_plain_name(name, "sweep name")
    except ConfigError as err:
        raise loc.error(("name",), str(err).replace("set train.output_dir", "set the sweep's 'output_dir:'")) from None
    base: Optional[Path] = None
    if data.get("base") is not None:
        base = (path.parent / str(data["base"])).resolve()
        if not base.is_file():
            raise loc.error(("base",), f"base config '{data['base']}' resolves to '{base}', which does not "
                            "exist. 'base:' is relative to the sweep file.")
    overrides = _section_mapping(data, "overrides", loc)
    grid = _axes(data, "grid", loc)
    zipped = _axes(data, "zip", loc)
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise loc.error(("zip",), f"zip lists must all have the same length; they have {listing}.")
    output_dir = Path(str(data.get("output_dir") or DEFAULT_OUTPUT_DIR)).expanduser().resolve()

    key_paths: dict[str, tuple[Any, ...]] = {}
    for section, mapping in (("overrides", overrides), ("grid", grid), ("zip", zipped)):
        for flat_key, doc_path in _keys_of(section, mapping):
            if flat_key in key_paths:
                raise loc.error(doc_path, f"'{flat_key}' is set twice (also at {loc.at(*key_paths[flat_key])}); "
                                "keep it in one section.")
            key_paths[flat_key] = doc_path
    _check_keys(key_paths, loc)

    check_size(grid, zipped, max_runs, loc.at("grid") if grid else loc.at("zip"))
    runs = _expand(grid, zipped, overrides)
    spec = SweepSpec(name=name, file=path, base=base, overrides=overrides, grid=grid, zipped=zipped,
                     output_dir=output_dir, runs=runs)
    if validate:
        for run in _progress(runs, "checking run configs"):
            spec.configs[run.name] = _resolve(spec, run, key_paths, loc)
        by_name = {run.name: run for run in runs}
        check_prompts(((run.name, spec.configs[run.name]) for run in runs),
                      lambda run_name, key: _where(spec, by_name[run_name], key, key_paths, loc))
    return spec


def _progress(runs: list[RunSpec], what: str) -> Any:
    """A progress bar on stderr for sweeps big enough to take seconds; the plain list otherwise."""
    if len(runs) < 200:
        return runs
    from tqdm.auto import tqdm

    return tqdm(runs, desc=what, unit="run", leave=False, dynamic_ncols=True)


def _expand(grid: dict[str, list[Any]], zipped: dict[str, list[Any]], overrides: dict[str, Any]) -> list[RunSpec]:
    """``product(grid values) × zip rows`` → runs, grid keys first, in file order."""
    zip_rows = list(zip(*zipped.values())) if zipped else [()]
    runs: list[RunSpec] = []
    names: set[str] = set()
    for grid_values in itertools.product(*grid.values()):
        for zip_values in zip_rows:
            axes = {**dict(zip(grid, grid_values)), **dict(zip(zipped, zip_values))}
            name = run_name(axes)
            if name in names:  # distinct values hash differently; a repeat means a repeated zip row
                raise SweepError(f"two runs of the sweep have the same values {json.dumps(axes, default=str)}; "
                                 "remove the repeated zip row.")
            names.add(name)
            runs.append(RunSpec(name=name, axes=axes, overrides=tuple(_dotlist(overrides) + _dotlist(axes))))
    return runs


def run_config(spec: SweepSpec, run: RunSpec) -> DictConfig:
    """The resolved config of one run (the same layers ``carv3d train`` uses, see the module doc)."""
    layers = ["train.progress=false", *run.overrides, *_placement(spec, run)]
    return _absolute_teacher(load_config(config_file=spec.base, overrides=layers))


def _placement(spec: SweepSpec, run: RunSpec) -> list[str]:
    return [f"train.output_dir={json.dumps(str(spec.runs_dir))}", f"train.run_name={json.dumps(run.name)}"]


def _absolute_teacher(cfg: DictConfig) -> DictConfig:
    pretrained = Path(str(cfg.teacher.pretrained)).expanduser()
    if not pretrained.is_absolute() and pretrained.exists():  # workers may run in another directory
        cfg.teacher.pretrained = str(pretrained.resolve())
    return cfg


def _where(spec: SweepSpec, run: RunSpec, key: str, key_paths: dict[str, tuple[Any, ...]], loc: Located) -> str:
    """``FILE:LINE`` where the sweep sets config ``key`` for ``run`` (the axis value's own line for an
    axis), or the base config / sweep file when the sweep does not set it."""
    for set_key, doc_path in key_paths.items():
        if set_key == key or set_key.startswith(key + ".") or key.startswith(set_key + "."):
            axis = doc_path[1] if doc_path[0] in ("grid", "zip") else None
            if axis in run.axes:  # point at this run's value of the axis
                values = spec.grid.get(axis) or spec.zipped.get(axis) or []
                doc_path = doc_path + (values.index(run.axes[axis]),)
            return loc.at(*doc_path)
    return str(spec.base) if spec.base else str(spec.file)


def _resolve(spec: SweepSpec, run: RunSpec, key_paths: dict[str, tuple[Any, ...]], loc: Located) -> DictConfig:
    """:func:`run_config`, with a config error traced back to the sweep file line that caused it."""
    try:
        cfg = run_config(spec, run)
    except ConfigError as err:
        message = str(err).replace(" (in command-line overrides)", "")
        bad = re.search(r"'([A-Za-z0-9_.]+)'", message)
        where = _where(spec, run, bad.group(1), key_paths, loc) if bad else (str(spec.base) if spec.base else str(spec.file))
        if spec.base is not None and message.startswith(f"{spec.base}:"):  # already FILE:LINE in the base config
            raise SweepError(message) from None
        raise SweepError(f"{where}: {message} (run '{run.name}': {json.dumps(run.axes, default=str)})") from None
    if not str(cfg.prompt).strip():
        raise SweepError(f"{spec.file}: run '{run.name}' has an empty prompt; set 'prompt' in the base config, "
                         "in 'overrides:' or as an axis (e.g. zip: {prompt: [a red cube, a blue cone]}).")
    return cfg
