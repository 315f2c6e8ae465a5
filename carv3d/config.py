"""Typed configuration: one OmegaConf structured tree with strict keys.

Layers, later wins::

    dataclass defaults ← estimator preset ← --config FILE ← key=value overrides ← --prompt

The estimator preset (``estimator.preset``: ``carv`` or ``sds``) is a layer of its own so that a
user's explicit ``estimator.*`` and ``camera.stratified`` keys always win over the preset's values.

Errors are :class:`carv3d.errors.ConfigError` with the offending key, the nearest valid keys and
the expected type.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from carv3d.errors import ConfigError


@dataclass
class HashGridConfig:
    """Multiresolution hash encoding (threestudio's `implicit-volume` defaults)."""

    backend: str = "auto"  # auto | torch | tcnn
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269


@dataclass
class SceneConfig:
    """Keys every scene type has; ``type`` picks the implementation (``SCENE_TYPES``)."""

    type: str = "nerf"
    radius: float = 1.0  # the scene is the box [-radius, radius]^3


@dataclass
class NeRFSceneConfig(SceneConfig):
    """``scene.type: nerf`` — hash-grid NeRF (carv3d.scene.nerf); rendered with the ``render`` section."""

    grid: HashGridConfig = field(default_factory=HashGridConfig)
    mlp_width: int = 64
    mlp_hidden_layers: int = 1
    density_activation: str = "softplus"  # softplus | exp
    density_bias: str = "blob"  # blob | none
    blob_density: float = 10.0  # blob bias: blob_density * (1 - |x| / blob_radius)
    blob_radius: float = 0.5
    normal_epsilon: float = 0.01  # finite-difference step for density normals, in scene units


@dataclass
class CameraConfig:
    elevation_range: List[float] = field(default_factory=lambda: [-10.0, 90.0])  # degrees
    azimuth_range: List[float] = field(default_factory=lambda: [-180.0, 180.0])  # degrees; 0 = front (+Z)
    # Defaults match the embedded teacher's training cameras; the SD presets use threestudio's
    # [1.0, 1.5] and [40, 70].
    # The embedded teacher's camera (carv3d.world.WorldCameraRanges); SD configs set their own ranges.
    distance_range: List[float] = field(default_factory=lambda: [1.55, 1.55])
    fovy_range: List[float] = field(default_factory=lambda: [50.0, 50.0])  # degrees
    stratified: bool = False  # stratify azimuth across the renders of a step and consecutive steps
    front_half_angle: float = 45.0  # |azimuth| < this is "front"; > 180 - this is "back"
    overhead_elevation: float = 60.0  # elevation above this is "overhead"


@dataclass
class RenderConfig:
    width: int = 64
    height: int = 64
    samples_per_ray: int = 64
    sampler: str = "auto"  # auto | stratified | occupancy_grid (CUDA only)
    occupancy_resolution: int = 64
    occupancy_update_every: int = 16
    occupancy_threshold: float = 0.01
    shading: str = "albedo"  # albedo | lambertian | textureless | random (DreamFusion-style; SD presets)
    albedo_probability: float = 0.5  # with shading=random: albedo, else lambertian/textureless 50/50
    ambient: float = 0.1
    light_jitter: float = 0.5  # std of the random offset added to the unit camera direction for the light
    background: str = "white"  # white | random | learned
    near: float = 0.05


@dataclass
class TeacherConfig:
    """Keys every teacher type has; ``type`` picks the implementation (``TEACHER_TYPES``)."""

    type: str = "diffusers"
    guidance_scale: float = 7.5  # classifier-free guidance s: ε_u + s·(ε_c − ε_u)
    negative_prompt: str = ""
    view_dependent_prompting: bool = True


@dataclass
class DiffusersTeacherConfig(TeacherConfig):
    """``teacher.type: diffusers`` — a diffusers folder: latent (with vae/, Stable Diffusion) or pixel space."""

    pretrained: str = "embedded"  # embedded | a diffusers folder | a Hugging Face repo id in the local cache
    resolution: int = 0  # image size fed to encode(); 0 = the teacher's native size
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    max_batch: int = 32  # largest U-Net batch per call (CFG doubles it)
    # Fast paths (carv3d/teacher/fast.py). CUDA only: on other devices they are skipped and logged.
    cuda_graph: str = "auto"  # auto (on for CUDA) | on | off: replay the guided U-Net call as a CUDA graph per batch shape
    # NHWC for the U-Net and VAE: off by default, measured slower on the H200 at SD 2.1 scale (GroupNorm
    # has no fast NHWC kernel: U-Net at K = 8 48.5 ms vs 44.5 ms, VAE encode 13.6 vs 11.3; docs/BENCHMARKS.md)
    channels_last: str = "off"  # auto (on for CUDA) | on | off
    compile: bool = False  # torch.compile the U-Net and VAE encoder (2-2.5 min of compiling at SD scale, then per K)


@dataclass
class GuidanceConfig:
    """The residual each draw contributes; ``type`` picks it (``GUIDANCE_TYPES``, carv3d.estimator.guidance)."""

    type: str = "sds"


@dataclass
class SDSGuidanceConfig(GuidanceConfig):
    """``guidance.type: sds`` — ε̂_guided − ε (DreamFusion)."""

    type: str = "sds"


@dataclass
class CSDGuidanceConfig(GuidanceConfig):
    """``guidance.type: csd`` — ε̂_cond − ε̂_uncond (Classifier Score Distillation, Yu et al. 2023)."""

    type: str = "csd"


@dataclass
class EstimatorConfig:
    """Score-distillation gradient estimator; see carv3d.estimator for the formulas."""

    preset: str = "carv"  # carv | sds | none (none: only the keys below)
    upstream_samples: int = 1  # R: renders per step (the carv preset sets 2)
    noise_draws: Union[int, str] = 1  # K per render, or "auto"
    proposal: str = "uniform"  # uniform | teacher-weight | adaptive
    stratified: bool = False
    weighting: str = "sds"  # sds | uniform | fantasia3d
    t_min: float = 0.02  # fraction of the teacher's timesteps
    t_max: float = 0.98
    t_max_schedule: List[List[float]] = field(default_factory=list)  # [[step, t_max], ...] piecewise linear
    gradient_clip: float = 0.0  # clip the latent gradient elementwise to ±value; 0 = off
    min_noise_draws: int = 2  # auto-K bounds; auto needs K >= 2 to measure the within-render variance
    max_noise_draws: int = 16
    auto_every: int = 50  # auto-K changes K at most every this many steps
    auto_smoothing: float = 0.9  # exponential smoothing of the ANOVA variances
    adaptive_bins: int = 20
    adaptive_refresh_every: int = 50
    adaptive_defensive_mixture: float = 0.3  # weight of the teacher-weight proposal in the mixture


@dataclass
class OptimConfig:
    lr_grid: float = 0.01
    lr_mlp: float = 0.001
    lr_background: float = 0.001
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    sparsity_weight: float = 0.0  # mean opacity penalty
    orientation_weight: float = 0.0  # normals facing away from the camera (DreamFusion)
    opacity_entropy_weight: float = 0.0


@dataclass
class ExportConfig:
    formats: List[str] = field(default_factory=lambda: ["glb", "ply", "obj"])
    resolution: int = 128  # density grid nodes per axis
    threshold: Union[float, int, str] = "auto"  # density isosurface level, or "auto" (best silhouette IoU vs the NeRF)
    min_component_fraction: float = 0.05  # drop components below this fraction of the largest (by area)
    max_hole_edges: int = 32  # close boundary loops of at most this many edges; 0 = off
    faces: int = 50000  # face budget (quadric decimation); 0 = keep every face
    texture_size: int = 1024  # baked albedo texture for glb/obj, a power of two; 0 = vertex colours only
    silhouette_views: int = 8  # views of the automatic threshold search
    silhouette_size: int = 96  # image size of the threshold search when the grid's own opacity is used
    refine_from: int = 64  # coarse grid for coarse-to-fine sampling near the surface; 0 = sample every node
    at_end: bool = True


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (on for CUDA) | on | off. On: a step never waits for the GPU — a non-finite step is skipped
    # on the device (fused Adam's found_inf) and the skip counters are read on log/checkpoint steps.
    sync_free: str = "auto"
    log_every: int = 10
    val_every: int = 250
    checkpoint_every: int = 250
    turntable_frames: int = 60  # 0 = no turntable video
    turntable_fps: int = 24
    val_resolution: int = 128
    max_nonfinite_steps: int = 20
    output_dir: str = "runs"
    run_name: str = ""  # default: prompt slug + timestamp
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    prompt: str = ""
    scene: SceneConfig = field(default_factory=NeRFSceneConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    teacher: TeacherConfig = field(default_factory=DiffusersTeacherConfig)
    guidance: GuidanceConfig = field(default_factory=SDSGuidanceConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The three seams: `<section>.type` → that implementation's config dataclass. A new scene, teacher or
# guidance adds its dataclass here and its class to the seam's factory (carv3d.scene.SCENES,
# carv3d.teacher.TEACHERS, carv3d.estimator.guidance.GUIDANCES).
SCENE_TYPES: dict[str, type] = {"nerf": NeRFSceneConfig}
TEACHER_TYPES: dict[str, type] = {"diffusers": DiffusersTeacherConfig}
GUIDANCE_TYPES: dict[str, type] = {"sds": SDSGuidanceConfig, "csd": CSDGuidanceConfig}
SEAMS: dict[str, dict[str, type]] = {"scene": SCENE_TYPES, "teacher": TEACHER_TYPES, "guidance": GUIDANCE_TYPES}
DEFAULT_TYPES: dict[str, str] = {"scene": "nerf", "teacher": "diffusers", "guidance": "sds"}


# Presets are partial configs of the estimator and of the camera stratification that feeds it (the
# between-render half of the variance). `carv` is the default; `sds` is threestudio's plain SDS.
# carv renders R = 2 views per step on antithetic azimuth strata: with the embedded teacher on a GPU
# a step is launch-bound, so the second render is free and halves the between-render variance
# (docs/variance_h200_r2.json, docs/quality_h200_r2_camera.json). Where a render is not free (a CPU,
# or Stable Diffusion's VAE encode) the configs set upstream_samples: 1.
ESTIMATOR_PRESETS: dict[str, dict[str, Any]] = {
    "sds": {"estimator": dict(upstream_samples=1, noise_draws=1, proposal="uniform", stratified=False, weighting="sds"),
            "camera": dict(stratified=False)},
    "carv": {"estimator": dict(upstream_samples=2, noise_draws="auto", proposal="adaptive", stratified=True,
                               weighting="sds"),
             "camera": dict(stratified=True)},
    "none": {},
}

CHOICES: dict[str, tuple[str, ...]] = {
    "scene.grid.backend": ("auto", "torch", "tcnn"),
    "scene.density_activation": ("softplus", "exp"),
    "scene.density_bias": ("blob", "none"),
    "render.sampler": ("auto", "stratified", "occupancy_grid"),
    "render.shading": ("albedo", "lambertian", "textureless", "random"),
    "render.background": ("white", "random", "learned"),
    "teacher.dtype": ("auto", "float32", "float16", "bfloat16"),
    "teacher.cuda_graph": ("auto", "on", "off"),
    "teacher.channels_last": ("auto", "on", "off"),
    "train.sync_free": ("auto", "on", "off"),
    "estimator.preset": tuple(ESTIMATOR_PRESETS),
    "estimator.proposal": ("uniform", "teacher-weight", "adaptive"),
    "estimator.weighting": ("sds", "uniform", "fantasia3d"),
}

ALLOWED_EXPORT_FORMATS = ("glb", "ply", "obj")

# auto | on | off keys. YAML (and so OmegaConf's key=value parsing) reads a bare on/off as a boolean,
# which a str field then holds as "True"/"False": those are folded back to on/off.
SWITCH_KEYS = ("teacher.cuda_graph", "teacher.channels_last", "train.sync_free")
_SWITCH_SPELLINGS = {"true": "on", "false": "off", "yes": "on", "no": "off", "1": "on", "0": "off"}


def _normalise_switches(cfg: DictConfig) -> None:
    for key in SWITCH_KEYS:
        value = str(OmegaConf.select(cfg, key)).lower()
        OmegaConf.update(cfg, key, _SWITCH_SPELLINGS.get(value, value))


Types = tuple[tuple[str, str], ...]  # ((seam, type), ...) in SEAMS order


def _types(**chosen: str) -> Types:
    return tuple((seam, chosen.get(seam) or DEFAULT_TYPES[seam]) for seam in SEAMS)


@functools.lru_cache(maxsize=8)
def _schema(types: Optional[Types] = None) -> DictConfig:
    """The defaults tree with each seam's chosen implementation, built once per choice (building a
    structured config is the slow part of loading)."""
    chosen = dict(types or _types())
    return OmegaConf.structured(Config(**{seam: SEAMS[seam][name]() for seam, name in chosen.items()}))


def defaults(**types: str) -> DictConfig:
    """A fresh, mutable copy of the default config (``defaults(guidance="csd")`` for another seam type)."""
    return _schema(_types(**types)).copy()


def _seam_types(layers: Sequence[tuple[Any, str]]) -> Types:
    """Each seam's ``type`` as the layers set it (later wins), checked against the known types."""
    chosen: dict[str, str] = {}
    for layer, source in layers:
        for seam, known in SEAMS.items():
            try:
                value = OmegaConf.select(layer, f"{seam}.type", default=None)
            except OmegaConfBaseException:
                value = None
            if value is None:
                continue
            if str(value) not in known:
                raise ConfigError(f"{seam}.type is '{value}' (in {source}); expected one of: {', '.join(known)}.")
            chosen[seam] = str(value)
    return _types(**chosen)


def all_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config schema, e.g. ``render.samples_per_ray``."""
    node = _schema() if node is None else node
    keys: list[str] = []
    for key in node.keys():
        full = f"{prefix}{key}"
        value = node._get_node(key)
        if isinstance(value, DictConfig):
            keys.append(full)
            keys.extend(all_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


def _nearest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if not close:  # compare the last component too: `estimator.noise_draw` vs `noise_draws`
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if difflib.SequenceMatcher(None, leaf, c.rsplit(".", 1)[-1]).ratio() > 0.75][:3]
    return ", ".join(close) if close else "none close; run `carv3d train --help-config` for all keys"


def _expected_type(key: str) -> str:
    node = _schema()
    try:
        leaf = OmegaConf.select(node, key, throw_on_missing=False)
    except OmegaConfBaseException:
        return "see the schema"
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(node, parent_key) if parent_key else node
    try:
        ref = parent._get_node(name)._metadata.ref_type  # type: ignore[union-attr]
        return getattr(ref, "__name__", None) or str(ref).replace("typing.", "")
    except Exception:
        return type(leaf).__name__


def _translate(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    where = f" (in {source})" if source else ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        return ConfigError(
            f"unknown config key '{key}'{where}. Nearest valid keys: {_nearest(key, all_keys())}."
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(
            f"wrong type for config key '{key}'{where}: expected {_expected_type(key)}. ({msg})"
        )
    return ConfigError(f"invalid config{where}: {str(err).splitlines()[0]}")


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _translate(err, source) from None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist. Presets live in configs/.")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:  # a malformed file
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(raw).__name__}.")
    data = OmegaConf.create(raw)
    return data


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """Turn ``["render.width=128", "estimator.noise_draws=auto"]`` into a config layer."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=500).")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"could not parse overrides {list(overrides)}: {err}") from None


_ABSENT = object()


def _validate(cfg: DictConfig) -> None:
    _normalise_switches(cfg)
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:  # a key of another seam type (scene.grid.* when scene.type is not nerf)
            continue
        if value not in choices:
            raise ConfigError(f"config key '{key}' is '{value}'; expected one of: {', '.join(choices)}.")
    k = cfg.estimator.noise_draws
    if isinstance(k, str) and k.strip().isdigit():  # "8" from a sweep file or the command line
        cfg.estimator.noise_draws = k = int(k)
    if isinstance(k, str) and k != "auto" or isinstance(k, int) and k < 1:
        raise ConfigError(f"estimator.noise_draws is '{k}'; expected a positive integer or 'auto'.")
    if cfg.estimator.upstream_samples < 1:
        raise ConfigError("estimator.upstream_samples must be at least 1.")
    if not 0.0 <= cfg.estimator.t_min < cfg.estimator.t_max <= 1.0:
        raise ConfigError("estimator.t_min and t_max must satisfy 0 <= t_min < t_max <= 1 (fractions of the teacher's timesteps).")
    for fmt in cfg.export.formats:
        if fmt not in ALLOWED_EXPORT_FORMATS:
            raise ConfigError(f"export.formats has '{fmt}'; expected some of: {', '.join(ALLOWED_EXPORT_FORMATS)}.")
    for key in ("camera.elevation_range", "camera.azimuth_range", "camera.distance_range", "camera.fovy_range"):
        lo_hi = OmegaConf.select(cfg, key)
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            raise ConfigError(f"config key '{key}' must be [low, high] with low <= high, not {list(lo_hi)}.")
    if cfg.train.steps < 0:
        raise ConfigError("train.steps must be non-negative.")
    for key in ("render.width", "render.height", "render.samples_per_ray", "export.resolution"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be a positive integer.")


def load_config(
    config_file: Optional[Union[str, Path]] = None,
    overrides: Sequence[str] = (),
    prompt: Optional[str] = None,
    base: Optional[DictConfig] = None,
) -> DictConfig:
    """Build the resolved configuration from its layers.

    Args:
        config_file: a YAML file (a partial config tree), or None.
        overrides: ``key=value`` strings (OmegaConf dotlist syntax).
        prompt: the prompt; wins over any prompt in the layers above.
        base: a resolved config to start from instead of the defaults (``--resume``).

    Returns:
        A structured DictConfig; unknown keys and wrong types raise ConfigError.
    """
    layers: list[tuple[Any, str]] = []
    if base is not None:  # as plain data: its sections' dataclasses need not be this schema's
        layers.append((OmegaConf.create(OmegaConf.to_container(base, resolve=True)), "the run's config"))
    if config_file is not None:
        layers.append((_read_yaml(Path(config_file)), str(config_file)))
    if overrides:
        layers.append((parse_overrides(overrides), "command-line overrides"))
    if prompt is not None:
        layers.append((OmegaConf.create({"prompt": prompt}), "--prompt"))

    types = _seam_types(layers)
    cfg = _schema(types).copy()
    for layer, source in layers:  # first pass: find the preset the user asked for, check keys/types
        cfg = _merge(cfg, layer, source)
    if base is None:
        preset = cfg.estimator.preset
        if preset not in ESTIMATOR_PRESETS:
            raise ConfigError(f"estimator.preset is '{preset}'; expected one of: {', '.join(ESTIMATOR_PRESETS)}.")
        cfg = _merge(_schema(types).copy(), ESTIMATOR_PRESETS[preset], f"preset {preset}")
        for layer, source in layers:
            cfg = _merge(cfg, layer, source)
    _validate(cfg)
    return cfg


def check_prompt(prompt: Any) -> str:
    """The one check of a prompt: a non-empty string, returned stripped."""
    from carv3d.errors import PromptError

    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError('the prompt is empty; pass one with --prompt "a red cube" or prompt: ... in a config.')
    return prompt.strip()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
