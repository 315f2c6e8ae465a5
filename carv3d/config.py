"""Typed configuration: one OmegaConf structured tree with strict keys.

Layers, later wins::

    dataclass defaults ← estimator preset ← --config FILE ← key=value overrides ← --prompt

The estimator preset (``estimator.preset``: ``carv`` or ``sds``) is a layer of its own so that a
user's explicit ``estimator.*`` and ``camera.stratified`` keys always win over the preset's values.

Errors are :class:`carv3d.errors.ConfigError` with the offending key, the nearest valid keys and
the expected type. Every numeric key states its valid range next to its default, as field metadata
(``between(1, MAX_STEPS, 10)``, see :mod:`carv3d.config_ranges`); :func:`load_config` checks every
value against it (NaN and ±inf are never valid) and the checks across keys follow in ``_validate``.
Library classes handed a section built by hand check it with :func:`check_section`, against the
same metadata.
"""

from __future__ import annotations

import copy
import difflib
import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from carv3d.config_ranges import KeySpec, Range, between, check_value, described, fraction, rows, walk_help, walk_specs
from carv3d.errors import ConfigError
from carv3d.yaml_file import read_yaml_file


# Bounds shared by several keys. Each exists to turn a typo into a clear error before any work is
# done, not to forbid a real experiment: every one is far above what a run of carv3d uses.
MAX_STEPS = 10**8  # 10^8 steps: months of training at 10 steps/s. Also caps every "every N steps" key.
MAX_IMAGE_SIZE = 4096  # pixels per side of a render, a validation sheet or a turntable frame
MAX_NOISE_DRAWS = 10**4  # K per render: 10^4 teacher evaluations per render is already a variance study
MAX_UPSTREAM_SAMPLES = 1024  # R: renders per step
MAX_SEED = 2**63 - 2  # seed + 1 seeds the device generator; torch takes seeds up to 2^63 - 1 as signed
# Export: the fine grid takes 4 bytes per node (4 GiB at 1024³); coarse-to-fine refinement and marching
# cubes add as much again, so a larger grid is a typo or a crash after minutes of work. A closed
# surface needs at least 4 triangles (a tetrahedron); a texture is a power of two up to 8192.
# carv3d.export.pipeline checks export options against these names.
EXPORT_MIN_RESOLUTION, EXPORT_MAX_RESOLUTION = 8, 1024
EXPORT_MIN_FACES = 4
EXPORT_MIN_TEXTURE_SIZE, EXPORT_MAX_TEXTURE_SIZE = 16, 8192


@dataclass
class HashGridConfig:
    """Multiresolution hash encoding (threestudio's `implicit-volume` defaults)."""

    backend: str = described("auto", "hash-grid implementation: auto picks tcnn on CUDA when installed, else triton "
                                      "(fused kernels) when installed, else torch")
    n_levels: int = between(1, 64, 16, help="resolution levels of the hash grid")
    # the tcnn backend takes 1, 2, 4 or 8 (checked there)
    n_features_per_level: int = between(1, 32, 2, help="features stored per level (tcnn: 1, 2, 4 or 8)")
    # 2^30 rows is 8 GiB of float32 features at F = 2
    log2_hashmap_size: int = between(3, 30, 19, help="log2 of the hash table's rows per level")
    base_resolution: int = between(2, 4096, 16, help="grid resolution of the coarsest level")
    per_level_scale: float = between(1.0, 16.0, 1.447269, help="resolution factor b between levels (each finer than the last)")


@dataclass
class SceneConfig:
    """Keys every scene type has; ``type`` picks the implementation (``SCENE_TYPES``)."""

    type: str = described("nerf", "scene implementation (nerf: hash-grid NeRF | gaussians: 3D Gaussian splats)")
    radius: float = between(0.0, 1000.0, 1.0, low_open=True, help="the scene is the box [-radius, radius]^3")


@dataclass
class NeRFSceneConfig(SceneConfig):
    """``scene.type: nerf`` — hash-grid NeRF (carv3d.scene.nerf); rendered with the ``render`` section."""

    grid: HashGridConfig = field(default_factory=HashGridConfig)
    mlp_width: int = between(1, 4096, 64, help="hidden width of the density/colour MLP")
    mlp_hidden_layers: int = between(0, 64, 1, help="hidden layers of the MLP")
    density_activation: str = described("softplus", "activation turning the raw density into σ >= 0")
    density_bias: str = described("blob", "initial density bias: blob (a dense ball at the centre) or none")
    # a negative density would carve the centre out
    blob_density: float = between(0.0, 1000.0, 10.0, help="blob bias: blob_density * (1 - |x| / blob_radius) at the centre")
    blob_radius: float = between(0.0, 1000.0, 0.5, low_open=True, help="radius of the blob bias, in scene units")
    normal_epsilon: float = between(0.0, 10.0, 0.01, low_open=True, help="finite-difference step for density normals, in scene units")
    # Fused kernels (issue 15): the hash grid's are scene.grid.backend=triton; this compiles what follows it.
    compile_head: bool = described(False, "torch.compile the field's MLP and activation on CUDA (off on CPU; "
                                          "compiles on first use)")


# --- Gaussian splats (scene.type: gaussians) ---------------------------------------------------
# Defaults are DreamGaussian's text-to-3D settings (Tang et al. 2023, configs/text.yaml and main.py);
# 3DGS's (Kerbl et al. 2023, arguments/__init__.py and train.py) are named in each help line.
@dataclass
class GaussianLearningRates:
    """Adam learning rate of each Gaussian parameter group (DreamGaussian configs/text.yaml)."""

    position: float = between(0.0, 10.0, 0.001, help="means, at step 0 (DreamGaussian position_lr_init; 3DGS 1.6e-4 x extent)")
    position_final: float = between(0.0, 10.0, 0.00002, help="means, from position_decay_steps on (log-linear decay; 3DGS 1.6e-6)")
    position_decay_steps: int = between(1, MAX_STEPS, 300, help="steps of the means' log-linear decay (DreamGaussian 300; 3DGS 30000)")
    colour: float = between(0.0, 10.0, 0.01, help="SH colour coefficients; degree > 0 ones take 1/20 of it (DreamGaussian 0.01; 3DGS 0.0025)")
    opacity: float = between(0.0, 10.0, 0.05, help="opacity logits (DreamGaussian and 3DGS 0.05)")
    scale: float = between(0.0, 10.0, 0.005, help="log scales (DreamGaussian and 3DGS 0.005)")
    rotation: float = between(0.0, 10.0, 0.005, help="quaternions (DreamGaussian 0.005; 3DGS 0.001)")


@dataclass
class GaussianDensityConfig:
    """Adaptive density control: clone, split, prune, opacity reset (3DGS; DreamGaussian's values)."""

    start: int = between(0, MAX_STEPS, 0, help="first step that records view-space gradients (DreamGaussian 0; 3DGS 500)")
    stop: int = between(0, MAX_STEPS, 3000, help="last step of densification and opacity resets (DreamGaussian 3000; 3DGS 15000)")
    every: int = between(1, MAX_STEPS, 50, help="clone/split/prune every this many steps (DreamGaussian 50; 3DGS 100)")
    grad_threshold: float = between(0.0, 1e6, 0.01, low_open=True,
                                    help="clone or split at this mean view-space gradient, NDC units (DreamGaussian 0.01; 3DGS 2e-4)")
    percent_dense: float = fraction(0.01, low_open=True, help="clone below, split above this fraction of extent in largest scale (both 0.01)")
    extent: float = between(0.0, 1000.0, 4.0, low_open=True, help="scene extent of the size tests, scene units (DreamGaussian 4; 3DGS the cameras' radius)")
    prune_opacity: float = fraction(0.01, help="prune below this opacity (DreamGaussian 0.01; 3DGS 0.005)")
    prune_scale: float = between(0.0, 1000.0, 0.1, help="prune where the largest scale exceeds this fraction of extent; 0 = off (both 0.1)")
    opacity_reset_every: int = between(0, MAX_STEPS, 700, help="clamp every opacity to opacity_reset_value this often; 0 = never (DreamGaussian 700; 3DGS 3000)")
    opacity_reset_value: float = fraction(0.01, low_open=True, high_open=True, help="opacity after a reset (both 0.01)")
    opacity_reset_margin: int = between(0, MAX_STEPS, 100,
                                        help="no reset in a run's last this-many steps: the render is nearly empty "
                                             "for ~20 steps after one, and an export then would be too; 0 = no margin")
    split_into: int = between(2, 16, 2, help="a split Gaussian becomes this many, each scaled by 1 / (0.8 N) (both 2)")
    max_gaussians: int = between(1, 10**8, 200000, help="no cloning or splitting past this many Gaussians (carv3d's memory guard)")


@dataclass
class GaussianSceneConfig(SceneConfig):
    """``scene.type: gaussians`` — 3D Gaussian splats (carv3d.scene.gaussians); rasterised with gsplat
    on CUDA or carv3d's torch rasteriser, with the ``render`` section's size, shading and background."""

    type: str = described("gaussians", "scene implementation (nerf: hash-grid NeRF | gaussians: 3D Gaussian splats)")
    rasterizer: str = described("auto", "auto (gsplat on CUDA when installed, else torch) | torch | gsplat")
    n_points: int = between(1, 10**7, 5000, help="Gaussians at step 0 (DreamGaussian num_pts)")
    init_radius: float = between(0.0, 1000.0, 0.5, low_open=True, help="initial Gaussians are uniform in a ball of this radius (DreamGaussian 0.5)")
    init_opacity: float = fraction(0.1, low_open=True, high_open=True, help="opacity of the initial Gaussians (both 0.1)")
    sh_degree: int = between(0, 3, 0, help="spherical-harmonics degree of the colours (DreamGaussian 0; 3DGS 3)")
    init_from: str = described("", "start from the Gaussians of a 3DGS splat .ply (e.g. a run's mesh/splats.ply) instead of the ball")
    lr: GaussianLearningRates = field(default_factory=GaussianLearningRates)
    density: GaussianDensityConfig = field(default_factory=GaussianDensityConfig)


@dataclass
class CameraConfig:
    """Random training cameras: where they look from and how views are labelled."""

    elevation_range: List[float] = between(-90.0, 90.0, [-10.0, 90.0], pair=True, help="camera elevation range, degrees")
    azimuth_range: List[float] = between(-360.0, 360.0, [-180.0, 180.0], pair=True, help="camera azimuth range, degrees; 0 = front (+Z)")
    # Defaults match the embedded teacher's training cameras (carv3d.world.WorldCameraRanges); the SD
    # presets use threestudio's [1.0, 1.5] and [40, 70].
    distance_range: List[float] = between(0.0, 1000.0, [1.55, 1.55], low_open=True, pair=True,
                                          help="camera distance from the centre, scene units")
    fovy_range: List[float] = between(0.0, 180.0, [50.0, 50.0], low_open=True, high_open=True, pair=True,
                                      help="vertical field of view, degrees")
    stratified: bool = described(False, "stratify azimuth across the renders of a step and consecutive steps")
    # above 90 the front and back regions would overlap
    front_half_angle: float = between(0.0, 90.0, 45.0, help="|azimuth| below this is 'front', above 180 minus it 'back', degrees")
    overhead_elevation: float = between(-90.0, 90.0, 60.0, help="elevation above this is 'overhead', degrees")


@dataclass
class RenderConfig:
    """Volume rendering of the training views (the NeRF's renderer)."""

    width: int = between(1, MAX_IMAGE_SIZE, 64, help="training render width, pixels")
    height: int = between(1, MAX_IMAGE_SIZE, 64, help="training render height, pixels")
    samples_per_ray: int = between(1, 4096, 64, help="samples along each ray")
    sampler: str = described("auto", "ray sampler: auto | stratified | occupancy_grid (CUDA only)")
    occupancy_resolution: int = between(1, 1024, 64, help="nerfacc occupancy grid: resolution^3 cells")
    occupancy_update_every: int = between(1, MAX_STEPS, 16, help="update the occupancy grid every this many steps")
    # on σ·Δt, an opacity-like number: above 1 every cell is empty
    occupancy_threshold: float = fraction(0.01, help="a cell is occupied above this opacity (σ·Δt)")
    shading: str = described("albedo", "albedo | lambertian | textureless | random (DreamFusion-style; SD presets)")
    albedo_probability: float = fraction(0.5, help="with shading=random: albedo, else lambertian/textureless 50/50")
    ambient: float = fraction(0.1, help="ambient k of the shading: light = k + (1 - k)·max(0, n·l)")
    light_jitter: float = between(0.0, 100.0, 0.5, help="std of the random offset added to the camera direction for the light")
    background: str = described("white", "background colour: white | random | learned")
    near: float = between(0.0, 1000.0, 0.05, help="near plane of the rays, scene units")


@dataclass
class TeacherConfig:
    """Keys every teacher type has; ``type`` picks the implementation (``TEACHER_TYPES``)."""

    type: str = described("diffusers", "teacher implementation (diffusers: a diffusers folder)")
    # DreamFusion uses 100; 1000 is far past any use.
    guidance_scale: float = between(0.0, 1000.0, 7.5, help="classifier-free guidance s: ε_u + s·(ε_c − ε_u)")
    negative_prompt: str = described("", "text of the unconditional branch of guidance (\"\" = unconditional)")
    view_dependent_prompting: bool = described(True, "append ', front view' / ', side view' / ... by camera")


@dataclass
class DiffusersTeacherConfig(TeacherConfig):
    """``teacher.type: diffusers`` — a diffusers folder: latent (with vae/, Stable Diffusion) or pixel space."""

    pretrained: str = described("embedded", "embedded | a diffusers folder | a Hugging Face repo id in the local cache")
    # a multiple of the VAE's factor: checked at load
    resolution: int = between(8, MAX_IMAGE_SIZE, 0, off=0, help="image size fed to the teacher; 0 = its native size")
    dtype: str = described("auto", "auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16")
    max_batch: int = between(1, 4096, 32, help="largest U-Net batch per call (CFG doubles it)")
    # Fast paths (carv3d/teacher/fast.py). CUDA only: on other devices they are skipped and logged.
    cuda_graph: str = described("auto", "replay the guided U-Net call as a CUDA graph per batch shape (auto: on for CUDA)")
    # With a compile only: eager NHWC measured slower on the H200 at SD 2.1 scale (GroupNorm has no fast
    # NHWC kernel: U-Net at K = 8 48.5 ms vs 44.5 ms, VAE encode 13.6 vs 11.3; docs/BENCHMARKS.md);
    # compiled, faster (K = 8 step 54.1 ms against 74.6 eager, docs/bench_speed_ab_h100.json), and
    # faster still with the VAE left NCHW (52.8-54.7 against 54.5-55.1 ms, docs/bench_speed_vae_layout_h100.json)
    channels_last: str = described("auto", "NHWC memory format: auto (the U-Net only when the teacher is compiled "
                                            "on CUDA, as unet; NCHW eager) | on (U-Net and VAE) | off | unet "
                                            "(the U-Net NHWC, the VAE NCHW)")
    compile: str = described("auto", "torch.compile the U-Net and VAE encoder, CUDA only: auto (full for U-Nets of "
                                      "≥ 100 M parameters in runs of ≥ 4,000 steps, off otherwise) | off | "
                                      "full (the U-Net as one graph) | regional (its repeated blocks; faster to "
                                      "compile); true = full")
    compile_cache: str = described("auto", "folder of the persistent compile caches (auto: ~/.cache/carv3d/torch_compile; "
                                           "\"\" = torch's /tmp default)")
    # auto-K passes through a few K early in a run (4, 8, 16 in a logged SD 2.1 run, ~50 steps each); a
    # compile costs 40-50 s per K (docs/compile_shapes_h100.json), so only the K it settles on is compiled
    compile_after: int = between(0, MAX_STEPS, 150, help="compile=full: a U-Net batch shape runs eagerly (CUDA "
                                 "graph) until it has been called this many times, then compiled; 0 = at once")


@dataclass
class GuidanceConfig:
    """The residual each draw contributes; ``type`` picks it (``GUIDANCE_TYPES``, carv3d.estimator.guidance)."""

    type: str = described("sds", "sds: ε̂_guided − ε (DreamFusion) | csd: ε̂_cond − ε̂_uncond | vsd: ε̂_guided − ε̂_LoRA")


@dataclass
class SDSGuidanceConfig(GuidanceConfig):
    """``guidance.type: sds`` — ε̂_guided − ε (DreamFusion)."""

    type: str = described("sds", "sds: ε̂_guided − ε (DreamFusion) | csd: ε̂_cond − ε̂_uncond | vsd: ε̂_guided − ε̂_LoRA")


@dataclass
class CSDGuidanceConfig(GuidanceConfig):
    """``guidance.type: csd`` — ε̂_cond − ε̂_uncond (Classifier Score Distillation, Yu et al. 2023)."""

    type: str = described("csd", "sds: ε̂_guided − ε (DreamFusion) | csd: ε̂_cond − ε̂_uncond | vsd: ε̂_guided − ε̂_LoRA")


@dataclass
class VSDGuidanceConfig(GuidanceConfig):
    """``guidance.type: vsd`` — ε̂_pretrained,guided − ε̂_φ (ProlificDreamer's variational score
    distillation): ε̂_φ is the teacher's U-Net with LoRA adapters (peft) and a camera embedding,
    trained on the renders alongside the scene (carv3d.teacher.lora). Defaults: threestudio's
    ``stable-diffusion-vsd-guidance`` and ``configs/prolificdreamer.yaml``."""

    type: str = described("vsd", "sds: ε̂_guided − ε (DreamFusion) | csd: ε̂_cond − ε̂_uncond | vsd: ε̂_guided − ε̂_LoRA")
    # diffusers' LoRAAttnProcessor default rank, which ProlificDreamer/threestudio use
    lora_rank: int = between(1, 1024, 4, help="rank of the LoRA adapters on the U-Net's attention projections")
    # peft's lora_alpha = lora_scale · rank; 1 is threestudio's unscaled adapters at any rank
    lora_scale: float = between(0.0, 100.0, 1.0, low_open=True, help="LoRA output scale alpha/rank")
    lora_lr: float = between(0.0, 10.0, 1e-4, help="AdamW learning rate of the LoRA and camera embedding (0 freezes them)")
    lora_betas: List[float] = between(0.0, 1.0, [0.9, 0.99], high_open=True, length=2, help="AdamW (β1, β2) of the LoRA, each in [0, 1)")
    lora_eps: float = between(0.0, 1.0, 1e-15, low_open=True, help="AdamW ε of the LoRA")
    lora_weight_decay: float = between(0.0, 10.0, 0.01, help="AdamW decoupled weight decay of the LoRA")
    lora_samples: int = between(1, 1024, 1, help="LoRA training draws (t, ε) per render per step")
    # threestudio trains the LoRA on t ~ U{0, ..., T − 1}: fractions 0 and 1; lora_t_min < lora_t_max
    lora_t_min: float = fraction(0.0, help="lowest LoRA training timestep, a fraction of the teacher's timesteps")
    lora_t_max: float = fraction(1.0, help="LoRA training timesteps are below lora_t_max · T")
    camera_condition: bool = described(True, "condition ε̂_φ on the camera pose (c2w through a small MLP)")
    camera_dropout: float = fraction(0.1, help="probability of training a LoRA draw with the null camera")
    # Off: on CUDA the teacher's and the copy's calls are two CUDA-graph replays, cheaper than one eager
    # mixed-batch call (peft indexes every adapted layer's rows from Python lists); on a CPU fused runs fewer ops
    fused_call: bool = described(False, "pretrained (CFG) and LoRA predictions in one eager mixed-batch U-Net call")


@dataclass
class EstimatorConfig:
    """Score-distillation gradient estimator; see carv3d.estimator for the formulas."""

    preset: str = described("carv", "carv | sds | none (none: only the keys below); explicit keys win over it")
    upstream_samples: int = between(1, MAX_UPSTREAM_SAMPLES, 1, help="R: renders per step (the carv preset sets 2)")
    noise_draws: Union[int, str] = between(1, MAX_NOISE_DRAWS, 1, words=("auto",), help="K: noise draws per render, or auto")
    proposal: str = described("uniform", "timestep proposal q(t): uniform | teacher-weight | adaptive")
    stratified: bool = described(False, "stratified timesteps (inverse CDF) across the K draws")
    weighting: str = described("sds", "timestep weighting w(t): sds | uniform | fantasia3d")
    t_min: float = fraction(0.02, help="lowest timestep, a fraction of the teacher's timesteps; t_min < t_max")
    t_max: float = fraction(0.98, help="highest timestep, a fraction of the teacher's timesteps (the presets set 0.75)")
    # steps non-decreasing, each t_max above t_min
    t_max_schedule: List[List[float]] = rows([], step=Range(0, MAX_STEPS), t_max=Range(0.0, 1.0),
                                             help="piecewise linear t_max over training, [[step, t_max], ...]")
    gradient_clip: float = between(0.0, 1e6, 0.0, help="clip the latent gradient elementwise to ±value; 0 = off")
    # auto needs K >= 2 to measure the within-render variance (a lower min_noise_draws is raised to 2
    # with a log line: K = 1 stays valid for a fixed K)
    min_noise_draws: int = between(1, MAX_NOISE_DRAWS, 2, help="auto-K: smallest K (min <= max)")
    max_noise_draws: int = between(1, MAX_NOISE_DRAWS, 16, help="auto-K: largest K")
    auto_every: int = between(1, MAX_STEPS, 50, help="auto-K changes K at most every this many steps")
    auto_smoothing: float = fraction(0.9, high_open=True, help="exponential smoothing of the ANOVA variances (auto-K)")
    # at most the teacher's timesteps (1000 for SD and the embedded one; checked there)
    adaptive_bins: int = between(1, 1000, 20, help="timestep bins of the adaptive proposal")
    adaptive_refresh_every: int = between(1, MAX_STEPS, 50, help="refit the adaptive proposal every this many steps")
    adaptive_defensive_mixture: float = fraction(0.3, low_open=True, help="weight of the teacher-weight proposal in the adaptive mixture")


@dataclass
class OptimConfig:
    """Adam on the scene's parameter groups, and the loss's regularisers."""

    # Learning rates of Adam, whose step per parameter is about lr: hash-grid features start near 1e-4
    # and MLP weights near 1, so lr = 1 already diverges and 10 is far past any sane run. The bound
    # turns a typo (1e3, 1e30) into an error instead of a run that "finishes" with garbage. 0 freezes
    # that group (e.g. a fixed background).
    lr_grid: float = between(0.0, 10.0, 0.01, help="Adam learning rate of the hash-grid features (0 freezes them; presets: carv 0.04, sds 0.08)")
    lr_mlp: float = between(0.0, 10.0, 0.001, help="Adam learning rate of the MLP weights (0 freezes them; presets: carv 0.004, sds 0.008)")
    lr_background: float = between(0.0, 10.0, 0.001, help="Adam learning rate of a learned background (0 freezes it)")
    betas: List[float] = between(0.0, 1.0, [0.9, 0.99], high_open=True, length=2, help="Adam's (β1, β2), each in [0, 1)")
    eps: float = between(0.0, 1.0, 1e-15, low_open=True, help="Adam's ε")
    # loss weights; 1e6 is far past threestudio's largest (lambda_orient up to 1e3)
    sparsity_weight: float = between(0.0, 1e6, 0.0, help="weight of the mean-opacity penalty")
    orientation_weight: float = between(0.0, 1e6, 0.0, help="weight of the penalty on normals facing away from the camera (DreamFusion)")
    opacity_entropy_weight: float = between(0.0, 1e6, 0.0, help="weight of the opacity entropy penalty (pushes opacity to 0 or 1)")


@dataclass
class ExportConfig:
    """Mesh export (carv3d export, and at the end of a run)."""

    formats: List[str] = field(default_factory=lambda: ["glb", "ply", "obj"],
                               metadata={"help": "mesh files to write: some of glb, ply, obj"})
    resolution: int = between(EXPORT_MIN_RESOLUTION, EXPORT_MAX_RESOLUTION, 128, help="density grid nodes per axis")
    # densities are >= 0
    threshold: Union[float, int, str] = between(0.0, 1e6, "auto", words=("auto",),
                                                help="density isosurface level, or auto (best silhouette IoU vs the NeRF)")
    min_component_fraction: float = fraction(0.05, help="drop components below this fraction of the largest (by area)")
    max_hole_edges: int = between(0, 10**6, 32, help="close boundary loops of at most this many edges; 0 = off")
    faces: int = between(EXPORT_MIN_FACES, MAX_STEPS, 50000, off=0, help="face budget (quadric decimation); 0 = keep every face")
    texture_size: int = between(EXPORT_MIN_TEXTURE_SIZE, EXPORT_MAX_TEXTURE_SIZE, 1024, off=0, power_of_two=True,
                                help="baked albedo texture for glb/obj, pixels per side; 0 = vertex colours only")
    silhouette_views: int = between(1, 1024, 8, help="views of the automatic threshold search")
    silhouette_size: int = between(8, MAX_IMAGE_SIZE, 96, help="image size of the threshold search (when the grid's own opacity is used)")
    refine_from: int = between(2, EXPORT_MAX_RESOLUTION, 64, off=0,
                               help="coarse grid for coarse-to-fine sampling near the surface; 0 = sample every node")
    at_end: bool = described(True, "export a mesh at the end of training")
    # Meshes for modelling tools (carv3d/export/repair.py, normals.py, delight.py)
    # 180 by default: a NeRF's isosurface has no true hard edges, and every hard edge splits the GLB's
    # vertices, which Blender's glTF importer cannot weld back (it imports them as open seams).
    crease_angle: float = between(0.0, 180.0, 180.0, help="faces meeting at more than this angle (degrees) get a hard edge; 180 = all smooth")
    delight: bool = described(True, "fit the light baked into the colours and divide it out of the texture and vertex colours")


@dataclass
class TrainConfig:
    """The training loop: steps, device, logs, validation, checkpoints, outputs."""

    steps: int = between(0, MAX_STEPS, 1000, help="optimisation steps (0: outputs of the initial scene)")
    seed: int = between(0, MAX_SEED, 0, help="seed of every random source of the run")
    device: str = described("auto", "auto | cpu | cuda | cuda:N")
    # On: a non-finite step is skipped on the device (fused Adam's found_inf) and the skip counters
    # are read on log/checkpoint steps.
    sync_free: str = described("auto", "never wait for the GPU in a step (auto: on for CUDA) | on | off")
    log_every: int = between(1, MAX_STEPS, 10, help="log metrics every this many steps")
    val_every: int = between(0, MAX_STEPS, 250, help="validation sheet every this many steps; 0 = none during the run")
    checkpoint_every: int = between(0, MAX_STEPS, 250, help="checkpoint every this many steps; 0 = at the end only")
    turntable_frames: int = between(0, 10**4, 60, help="frames of the final turntable video; 0 = no video")
    turntable_fps: int = between(1, 240, 24, help="frames per second of the turntable video")
    val_resolution: int = between(1, MAX_IMAGE_SIZE, 128, help="validation sheet and turntable frame size, pixels")
    # 0 would stop a healthy run
    max_nonfinite_steps: int = between(1, MAX_STEPS, 20, help="stop after this many non-finite steps in a row")
    output_dir: str = described("runs", "folder that holds the run directories")
    run_name: str = described("", "run directory name; default: prompt slug + timestamp")
    progress: bool = described(True, "show a progress bar while training")
    tensorboard: bool = described(True, "write TensorBoard event files into the run directory")
    # Early stopping without ground truth (carv3d/convergence.py): the change between probe renders.
    stop_when_converged: bool = described(False, "stop once the probe renders change by less than converge_tolerance "
                                                 "at converge_patience checks in a row (after converge_min_steps)")
    # Defaults from docs/bench_convergence_cpu.json (CPU demo config, a small sample): at 0.01 no run
    # stopped while its IoU still had more than 0.02 to gain; at 0.02 some did. The change between two
    # checks has a floor of ~0.01–0.02 from the estimator's noise, so a tolerance is tied to check_every.
    converge_check_every: int = between(1, MAX_STEPS, 50, help="render the convergence probes every this many steps")
    # a change is a fraction of the silhouette (or a colour difference per channel): 1 is everything moved
    converge_tolerance: float = between(0.0, 1.0, 0.01, low_open=True,
                                        help="a check is still when max(1 − soft IoU of the probe opacities, colour "
                                             "change) is below this")
    converge_patience: int = between(1, 10**4, 3, help="still checks in a row that mean converged")
    converge_min_steps: int = between(0, MAX_STEPS, 500, help="never stop before this many steps")


@dataclass
class Config:
    """The whole configuration of a run."""

    prompt: str = described("", "the text prompt, e.g. 'a red cube' (--prompt wins)")
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
SCENE_TYPES: dict[str, type] = {"nerf": NeRFSceneConfig, "gaussians": GaussianSceneConfig}
TEACHER_TYPES: dict[str, type] = {"diffusers": DiffusersTeacherConfig}
GUIDANCE_TYPES: dict[str, type] = {"sds": SDSGuidanceConfig, "csd": CSDGuidanceConfig,
                                  "vsd": VSDGuidanceConfig}
SEAMS: dict[str, dict[str, type]] = {"scene": SCENE_TYPES, "teacher": TEACHER_TYPES, "guidance": GUIDANCE_TYPES}
DEFAULT_TYPES: dict[str, str] = {"scene": "nerf", "teacher": "diffusers", "guidance": "sds"}


# Presets are partial configs of the estimator and of the camera stratification that feeds it (the
# between-render half of the variance). `carv` is the default; `sds` is threestudio's plain SDS.
# carv renders R = 2 views per step on antithetic azimuth strata: with the embedded teacher on a GPU
# a step is launch-bound, so the second render is free and halves the between-render variance
# (docs/variance_h200_r2.json, docs/quality_h200_r2_camera.json). Where a render is not free (a CPU,
# or Stable Diffusion's VAE encode) the configs set upstream_samples: 1.
# Each preset also carries its own tuned learning rates and t_max: a 20-arm grid (2 presets × 5 Adam
# learning-rate pairs × t_max ∈ {0.98, 0.75}) judged by final mean IoU at 60 s of training on three
# world prompts × two seeds (docs/tune_world_h100.json, configs/arms/tune_world.yaml). Lower
# variance tolerates larger steps only up to a point: carv's best is 4× the old learning rates (8× is
# worse); plain sds's best is 8×, the grid's edge, on a plateau from 2× (0.903–0.912).
ESTIMATOR_PRESETS: dict[str, dict[str, Any]] = {
    "sds": {"estimator": dict(upstream_samples=1, noise_draws=1, proposal="uniform", stratified=False, weighting="sds",
                              t_max=0.75),
            "camera": dict(stratified=False),
            "optim": dict(lr_grid=0.08, lr_mlp=0.008)},
    "carv": {"estimator": dict(upstream_samples=2, noise_draws="auto", proposal="adaptive", stratified=True,
                               weighting="sds", t_max=0.75),
             "camera": dict(stratified=True),
             "optim": dict(lr_grid=0.04, lr_mlp=0.004)},
    "none": {},
}

CHOICES: dict[str, tuple[str, ...]] = {
    "scene.grid.backend": ("auto", "torch", "triton", "tcnn"),
    "scene.density_activation": ("softplus", "exp"),
    "scene.density_bias": ("blob", "none"),
    "scene.rasterizer": ("auto", "torch", "gsplat"),
    "render.sampler": ("auto", "stratified", "occupancy_grid"),
    "render.shading": ("albedo", "lambertian", "textureless", "random"),
    "render.background": ("white", "random", "learned"),
    "teacher.dtype": ("auto", "float32", "float16", "bfloat16"),
    "teacher.cuda_graph": ("auto", "on", "off"),
    "teacher.channels_last": ("auto", "on", "off", "unet"),
    "teacher.compile": ("auto", "off", "full", "regional"),
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
    # teacher.compile was a boolean before it had modes: true/on still mean the whole U-Net.
    compile_value = OmegaConf.select(cfg, "teacher.compile", default=None)
    if compile_value is not None:
        value = str(compile_value).lower()
        OmegaConf.update(cfg, "teacher.compile", {"true": "full", "on": "full", "yes": "full", "1": "full",
                                                  "false": "off", "no": "off", "0": "off"}.get(value, value))


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


def _other_implementation_hint(key: str, schema: Optional[DictConfig]) -> str:
    """When ``key`` belongs to another implementation of its seam (``scene.grid`` is the NeRF's, and
    the config being built has ``scene.type: gaussians``), a sentence that says so; else "".

    The case it explains: a NeRF config file with ``scene.type=gaussians`` on the command line."""
    section, _, rest = key.partition(".")
    types = SEAMS.get(section)
    if not types or not rest or schema is None:
        return ""
    current = OmegaConf.select(schema, f"{section}.type", default=None)
    first = rest.split(".", 1)[0]
    owners = [name for name, cls in types.items()
              if name != current and first in {f.name for f in fields(cls)}]
    if not owners or current is None:
        return ""
    return (f" It is a key of {section}.type={' / '.join(owners)}, and this config's {section}.type is {current}: "
            f"remove it, or start from a config written for {current}.")


def _translate(err: OmegaConfBaseException, source: str, schema: Optional[DictConfig] = None) -> ConfigError:
    """One ConfigError for an OmegaConf error; ``schema``: the tree being merged into (its seam
    types' keys are the ones to suggest: ``guidance.lora_rnk`` → ``guidance.lora_rank`` under vsd)."""
    key = getattr(err, "full_key", None) or ""
    where = f" (in {source})" if source else ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        return ConfigError(
            f"unknown config key '{key}'{where}.{_other_implementation_hint(key, schema)} "
            f"Nearest valid keys: {_nearest(key, all_keys(schema))}."
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        expected = _expected_type(key)
        hint = ""
        if expected.startswith("List") and "ListConfig" in msg:  # `export.formats=glb,obj`, or a scalar in a file
            default = [str(v) for v in (OmegaConf.select(schema, key, default=None) or [])[:2]] if schema else []
            hint = (f"A list is written in brackets: '{key}=[{','.join(default) or '...'}]' on the command line, "
                    f"or {key.rsplit('.', 1)[-1]}: [{', '.join(default) or '...'}] in a YAML file.")
        return ConfigError(
            f"wrong type for config key '{key}'{where}: expected {expected}. {hint or f'({msg})'}"
        )
    return ConfigError(f"invalid config{where}: {str(err).splitlines()[0]}")


def _requested_preset(layers: Sequence[tuple[Any, str]]) -> str:
    """``estimator.preset`` as the layers set it (later wins), checked against the presets."""
    preset = EstimatorConfig.preset
    for layer, _ in layers:
        try:
            value = OmegaConf.select(layer, "estimator.preset", default=None)
        except OmegaConfBaseException:  # a malformed layer: the merge names the problem
            value = None
        if value is not None:
            preset = value
    if preset not in ESTIMATOR_PRESETS:
        raise ConfigError(f"estimator.preset is '{preset}'; expected one of: {', '.join(ESTIMATOR_PRESETS)}.")
    return str(preset)


@functools.lru_cache(maxsize=16)
def _preset_schema(types: Types, preset: Optional[str]) -> DictConfig:
    """The schema with the estimator preset's layer merged in (None: no preset, for ``--resume``);
    cached, so a load is one copy and the user's layers. Never mutate the result: copy it."""
    schema = _schema(types)
    return schema if preset is None else _merge(schema, ESTIMATOR_PRESETS[preset], f"preset {preset}")


def _section_given_a_value(cfg: DictConfig, layer: Any, prefix: str = "") -> Optional[str]:
    """The first key of ``layer`` that is a section of ``cfg`` (``train``, ``scene.grid``) but holds a
    plain value there (``train: 5``), or None. OmegaConf's merge error for it names no key."""
    if not isinstance(layer, DictConfig):
        return None
    for key in layer.keys():
        if key not in cfg or not isinstance(cfg._get_node(key), DictConfig):
            continue
        value = layer._get_node(key)
        if not isinstance(value, DictConfig):
            return f"{prefix}{key}"
        found = _section_given_a_value(cfg._get_node(key), value, f"{prefix}{key}.")
        if found:
            return found
    return None


def _merge_into(cfg: DictConfig, layer: Any, source: str) -> None:
    """Merge ``layer`` into ``cfg`` in place (``cfg`` is a fresh copy; the layer is not reused)."""
    try:
        OmegaConf.unsafe_merge(cfg, layer)
    except OmegaConfBaseException as err:
        section = _section_given_a_value(cfg, layer)
        if section:
            keys = [k for k in all_keys(OmegaConf.select(cfg, section), f"{section}.")][:3]
            empty = OmegaConf.select(layer, section) is None  # `train:` with every key under it commented out
            raise ConfigError(
                f"config key '{section}' (in {source}) is a section of keys ({', '.join(keys)}, ...), "
                f"{'but it is empty' if empty else 'not a value'}; set a key inside it, e.g. {keys[0]}=..., "
                f"or give it a mapping ({section.rsplit('.', 1)[-1]}: {{{keys[0].rsplit('.', 1)[-1]}: ...}})"
                f"{', or remove it' if empty else ''}."
            ) from None
        raise _translate(err, source, cfg) from None


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _translate(err, source) from None


def _read_yaml(path: Path) -> DictConfig:
    raw, _ = read_yaml_file(path, "config file", "presets live in configs/", ConfigError)
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


@functools.lru_cache(maxsize=8)
def _numeric_specs(types: Types) -> tuple[KeySpec, ...]:
    chosen = dict(types)

    def choose(key: str, declared: type) -> type:
        return SEAMS[key][chosen[key]] if key in SEAMS else declared

    return tuple(walk_specs(Config, choose=choose))


def numeric_keys(**types: str) -> dict[str, KeySpec]:
    """Every numeric key of the schema (for the given seam types) with its range and default,
    e.g. ``numeric_keys()["train.log_every"].spec.describe()`` → ``an integer in [1, 100000000]``."""
    return {item.key: item for item in _numeric_specs(_types(**types))}


def _check_ranges(cfg: Any, items: Sequence[KeySpec], prefix: str = "") -> None:
    """Each key's value against its range (the field metadata); a numeric string becomes its number.

    ``cfg`` is a DictConfig (read as plain data: attribute access on OmegaConf nodes is slow) or a
    config dataclass.
    """
    data = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    for item in items:
        key = item.key[len(prefix):]
        value: Any = data
        for part in key.split("."):
            value = value.get(part, _ABSENT) if isinstance(value, dict) else getattr(value, part, _ABSENT)
            if value is _ABSENT:  # a key of another seam type
                break
        if value is _ABSENT:
            continue
        checked = check_value(item.key, value, item.spec, item.default)
        if checked is not value and isinstance(value, str):  # "8" from a sweep file or the command line → 8
            if isinstance(cfg, DictConfig):
                OmegaConf.update(cfg, key, checked)
            else:
                parent_key, _, name = key.rpartition(".")
                parent = cfg
                for part in parent_key.split(".") if parent_key else ():
                    parent = getattr(parent, part)
                setattr(parent, name, checked)


def check_section(section: Any, prefix: str) -> None:
    """Check one section (a DictConfig node or a config dataclass, e.g. ``scene_cfg`` with
    ``prefix="scene"``) against the schema's choices and ranges, for a library class handed a
    section that did not come from :func:`load_config`.

    Raises:
        ConfigError: the same one-line message as :func:`load_config`.
    """
    seam_type = getattr(section, "type", None) if prefix in SEAMS else None
    types = _types(**{prefix: str(seam_type)}) if seam_type in SEAMS.get(prefix, {}) else _types()
    items = [item for item in _numeric_specs(types) if item.key.startswith(prefix + ".")]
    for key, choices in CHOICES.items():
        if key.startswith(prefix + "."):
            value = section
            for part in key[len(prefix) + 1:].split("."):
                value = getattr(value, part, _ABSENT)
            if value is not _ABSENT and value not in choices:
                raise ConfigError(f"config key '{key}' is '{value}'; expected one of: {', '.join(choices)}.")
    _check_ranges(section, items, prefix + ".")


def _validate(cfg: DictConfig, types: Optional[Types] = None) -> None:
    _normalise_switches(cfg)
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:  # a key of another seam type (scene.grid.* when scene.type is not nerf)
            continue
        if value not in choices:
            raise ConfigError(f"config key '{key}' is '{value}'; expected one of: {', '.join(choices)}.")
    for fmt in cfg.export.formats:
        if fmt not in ALLOWED_EXPORT_FORMATS:
            raise ConfigError(f"export.formats has '{fmt}'; expected some of: {', '.join(ALLOWED_EXPORT_FORMATS)}.")
    if types is None:
        types = _types(**{seam: str(cfg[seam].type) for seam in SEAMS})
    _check_ranges(cfg, _numeric_specs(types))  # every numeric key: its range, stated next to its default
    # Checks across keys (each key's own range is checked above).
    est = cfg.estimator
    if not est.t_min < est.t_max:
        raise ConfigError(f"estimator.t_min and t_max must satisfy 0 <= t_min < t_max <= 1 (fractions of the teacher's "
                          f"timesteps), not estimator.t_min = {est.t_min}, estimator.t_max = {est.t_max}.")
    if est.min_noise_draws > est.max_noise_draws:
        raise ConfigError(f"estimator.min_noise_draws ({est.min_noise_draws}) is above estimator.max_noise_draws "
                          f"({est.max_noise_draws}); the auto-K bounds need min <= max.")
    guidance = cfg.guidance
    if guidance.type == "vsd" and not guidance.lora_t_min < guidance.lora_t_max:
        raise ConfigError(f"guidance.lora_t_min and lora_t_max must satisfy 0 <= lora_t_min < lora_t_max <= 1, not "
                          f"guidance.lora_t_min = {guidance.lora_t_min}, guidance.lora_t_max = {guidance.lora_t_max}.")
    schedule = [list(point) for point in est.t_max_schedule]
    for i, (step, t_max) in enumerate(schedule):
        if i and step < schedule[i - 1][0]:
            raise ConfigError(f"estimator.t_max_schedule is {schedule}; its steps must be non-decreasing "
                              f"([[step, t_max], ...] in step order).")
        if not t_max > est.t_min:
            raise ConfigError(f"estimator.t_max_schedule is {schedule}; each t_max must be above estimator.t_min "
                              f"({est.t_min}).")


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
    preset = None if base is not None else _requested_preset(layers)
    cfg = copy.deepcopy(_preset_schema(types, preset))
    for layer, source in layers:
        _merge_into(cfg, layer, source)
    _validate(cfg, types)
    # Which keys the user set (every layer but the defaults and the preset), for the automatic
    # choices made once the device is known (carv3d.sizing: CPU-sized settings never override them).
    from carv3d.sizing import record_explicit

    record_explicit(cfg, [layer for layer, _ in layers])
    return cfg


def check_prompt(prompt: Any) -> str:
    """The one check of a prompt: a non-empty string, returned stripped."""
    from carv3d.errors import PromptError

    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError('the prompt is empty; pass one with --prompt "a red cube" or prompt: ... in a config.')
    return prompt.strip()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
