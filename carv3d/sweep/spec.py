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
with the line they come from and the nearest valid keys.
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
from carv3d.errors import ConfigError, UserError
from carv3d.run_dir import slugify

SECTIONS = ("name", "base", "overrides", "grid", "zip", "output_dir")
DEFAULT_OUTPUT_DIR = "runs/sweeps"
# Set by the sweep for every run; a sweep file that sets them would fight the runner.
RESERVED_KEYS = ("train.output_dir", "train.run_name")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepError(UserError):
    """A sweep file that cannot be run as written, or a sweep backend that cannot start."""


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


# ---------------------------------------------------------------------------------------- YAML with lines
def _read_yaml_with_lines(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse ``path`` once; return the data and the 1-based line of every mapping key and list item.

    Lines are keyed by their path in the document: ``("grid", "train.seed")`` is the line of that
    key, ``("grid", "train.seed", 2)`` the line of its third value.
    """
    import yaml

    if not path.is_file():
        raise SweepError(f"sweep file '{path}' does not exist. Examples live in configs/sweeps/.")
    text = path.read_text()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = ""
        if err.context and err.context_mark is not None:  # where the unclosed thing began
            context = f"{err.context} started at line {err.context_mark.line + 1}: "
        raise SweepError(f"{where}: the sweep file is not valid YAML ({context}{err.problem}). "
                         "Check the indentation, brackets and quoting there.") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: the sweep file is not valid YAML ({str(err).splitlines()[0]}).") from None
    finally:
        loader.dispose()

    lines: dict[tuple[Any, ...], int] = {}

    def walk(n: Any, prefix: tuple[Any, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (prefix + (key_node.value,))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[prefix + (i,)] = item.start_mark.line + 1
                walk(item, prefix + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


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


class _Located:
    """Formats messages as ``FILE:LINE: ...`` from the document paths of :func:`_read_yaml_with_lines`."""

    def __init__(self, path: Path, lines: dict[tuple[Any, ...], int]):
        self.path = path
        self.lines = lines

    def at(self, *doc_path: Any) -> str:
        while doc_path and doc_path not in self.lines:
            doc_path = doc_path[:-1]
        line = self.lines.get(doc_path)
        return f"{self.path}:{line}" if line else str(self.path)

    def error(self, doc_path: tuple[Any, ...], message: str) -> SweepError:
        return SweepError(f"{self.at(*doc_path)}: {message}")


# ---------------------------------------------------------------------------------------- sections
def _section_mapping(data: dict[str, Any], section: str, loc: _Located) -> dict[str, Any]:
    value = data.get(section)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise loc.error((section,), f"'{section}' must be a mapping of config keys, not {type(value).__name__}.")
    return value


def _axes(data: dict[str, Any], section: str, loc: _Located) -> dict[str, list[Any]]:
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
        seen: list[str] = []
        for i, value in enumerate(values):
            canonical = json.dumps(value, sort_keys=True, default=str)
            if canonical in seen:
                raise loc.error((section, key, i), f"{section} axis '{key}' lists {canonical} twice; "
                                "each value would be the same run.")
            seen.append(canonical)
        axes[key] = values
    return axes


def _check_keys(spec_keys: dict[str, tuple[Any, ...]], loc: _Located) -> None:
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
def load_sweep(path: str | Path, validate: bool = True) -> SweepSpec:
    """Parse a sweep file and expand it into runs; with ``validate``, resolve every run's config.

    Raises:
        SweepError: malformed YAML, an unknown section, an empty axis, zip lists of different
            lengths, a repeated value, a reserved key, an unknown config key or a wrong type — each
            with the file and line, before any run starts.
    """
    path = Path(path).expanduser().resolve()
    data, lines = _read_yaml_with_lines(path)
    loc = _Located(path, lines)
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
    if not NAME_PATTERN.match(name):
        raise loc.error(("name",), f"sweep name '{name}' must be a plain directory name "
                        "(letters, digits, '.', '_', '-').")
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

    runs = _expand(grid, zipped, overrides)
    spec = SweepSpec(name=name, file=path, base=base, overrides=overrides, grid=grid, zipped=zipped,
                     output_dir=output_dir, runs=runs)
    if validate:
        for run in runs:
            spec.configs[run.name] = _resolve(spec, run, key_paths, loc)
    return spec


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
    layers = ["train.progress=false", *run.overrides,
              f"train.output_dir={json.dumps(str(spec.runs_dir))}", f"train.run_name={json.dumps(run.name)}"]
    cfg = load_config(config_file=spec.base, overrides=layers)
    pretrained = Path(str(cfg.teacher.pretrained)).expanduser()
    if not pretrained.is_absolute() and pretrained.exists():  # workers may run in another directory
        cfg.teacher.pretrained = str(pretrained.resolve())
    return cfg


def _resolve(spec: SweepSpec, run: RunSpec, key_paths: dict[str, tuple[Any, ...]], loc: _Located) -> DictConfig:
    """:func:`run_config`, with a config error traced back to the sweep file line that caused it."""
    try:
        cfg = run_config(spec, run)
    except ConfigError as err:
        message = str(err).replace(" (in command-line overrides)", "")
        bad = re.search(r"'([A-Za-z0-9_.]+)'", message)
        doc_path = None
        if bad:
            reported = bad.group(1)
            for key, path in key_paths.items():
                if key == reported or key.startswith(reported + ".") or reported.startswith(key + "."):
                    doc_path = path
                    axis = path[1] if path[0] in ("grid", "zip") else None
                    if axis in run.axes:  # point at this run's value of the axis
                        values = spec.grid.get(axis) or spec.zipped.get(axis) or []
                        doc_path = path + (values.index(run.axes[axis]),)
                    break
        where = loc.at(*doc_path) if doc_path else (str(spec.base) if spec.base else str(spec.file))
        raise SweepError(f"{where}: {message} (run '{run.name}': {json.dumps(run.axes, default=str)})") from None
    if not str(cfg.prompt).strip():
        raise SweepError(f"{spec.file}: run '{run.name}' has an empty prompt; set 'prompt' in the base config, "
                         "in 'overrides:' or as an axis (e.g. zip: {prompt: [a red cube, a blue cone]}).")
    return cfg
