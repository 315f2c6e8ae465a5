"""`carv3d evaluate RUN_DIR`: a trained scene against the embedded world's ground truth.

For a run whose prompt is a world prompt ("a red cube") the result and the ground truth are
rendered from a fixed set of held-out cameras (:func:`held_out_cameras`: 8 azimuths half a step
off the front, ``(k + ½) · 45°``, at elevations 5° and 40°, distance 1.55 and fovy 50° — the middle of
the world's training cameras, and unlike the validation orbit at azimuths 0/90/180/270, elevation 15°,
distance 2). Both are *unlit albedo* images over white: the NeRF with ``shading="albedo"`` and no
generator (deterministic), the world by sphere tracing with ambient 1 (so its light factor is 1 and
each pixel shows the material colour). Silhouettes are ``opacity > ½`` and ``coverage > ½`` at pixel
centres (no supersampling on either side). Metrics are in :mod:`carv3d.world.metrics`.

Alignment. An object with a front (``front_differs_from_back``: house, chair, snowman, mushroom,
duck) is compared as is: its front must face +Z. An object without one is compared at its best
rotation about +Y: for solids of revolution (``symmetric_about_y``) every rotation gives the same
images, so none is searched; for the cube and the pyramid (4-fold symmetric, no front the teacher could
tell apart) the ground truth is rendered on a ring of ``N = n_az · m ≥ 36`` azimuths and the offset
``δ_j = j · 360°/N`` maximising the mean IoU is kept, i.e. the result is compared with the truth
rotated by ``−δ`` (the same rotation is applied to the truth's surface for the Chamfer distance). The
ring shares its renders between offsets; its step (9° for 16 views) bounds the error of δ by half a step.

Quality bar. IoU alone flatters blobs (on these views carv3d's untrained blob scores 0.82 against the
cube, and 0.91 against the sphere), so the result's silhouettes are also compared with every object of the world
(``ranking``, ``best_match_is_prompted``), and for objects with a front the front/back check asks
whether the result's front views (|azimuth| ≤ 30°) look more like the truth's front than like its back
(the truth seen from ``azimuth + 180°``), and its back views more like the back: a result turned
around fails both, a two-faced (multi-face) one fails the back views. The distance of two image sets
is ``D = (1 − mean IoU) + masked colour error``.
"""

from __future__ import annotations

import json
import math
import re
import time
from functools import lru_cache
from typing import Any, Optional, Union

import torch
from torch import nn

from carv3d.errors import PromptError, UserError
from carv3d.cameras import Cameras, make_cameras
from carv3d.world.metrics import MeshLike, chamfer_to_world, front_back_check, masked_colour_error, psnr, silhouette_iou
from carv3d.world.objects import COLOURS, OBJECT_NAMES, OBJECTS, material_albedo
from carv3d.world.prompts import WorldPrompt, parse_prompt
from carv3d.world.raytrace import AMBIENT as WORLD_AMBIENT
from carv3d.world.raytrace import MaterialRender, WorldCameraRanges, compose_rgb, render_materials, sdf_normals

Tensor = torch.Tensor

ELEVATIONS = (5.0, 40.0)  # degrees
DISTANCE = 0.5 * sum(WorldCameraRanges().distance)  # 1.55, the middle of the world's training cameras
FOVY = 50.0  # degrees
MASK_LEVEL = 0.5
FRONT_WINDOW = 30.0  # |azimuth| ≤ this counts as a front view in the front/back check
ALIGNMENT_ANGLES = 36  # at least this many candidate azimuth offsets
EVALUATION_FILE = "evaluation.json"
COLOUR_COMPARISON = {
    "unlit": "the result rendered with shading=albedo (deterministic) against the world's material colours "
             "traced with ambient 1",
    "world": "the result rendered with shading=albedo (deterministic) against the world as the teacher saw it: "
             "material colours under the world's fixed light (ambient 0.4)",
}
TRUTH_LIGHTINGS = tuple(COLOUR_COMPARISON)


def truth_lighting_for(shading: str) -> str:
    """Which truth a run's colours should match: a run trained with ``render.shading=albedo`` learns
    the colours the teacher was shown, the world's lighting baked in ("world"); a run trained with
    lit shading (lambertian, textureless, random) learns albedo, the light separate ("unlit")."""
    return "world" if shading == "albedo" else "unlit"


class NotAWorldPromptError(PromptError):
    """The run's prompt is not a prompt of the embedded world, so there is no ground truth."""


class EvaluationOptionError(UserError):
    """A bad --views, --resolution or --device."""


# ------------------------------------------------------------------------------------------ inputs
def world_prompt(prompt: str) -> WorldPrompt:
    """Parse a prompt for evaluation; a prompt outside the world is a :class:`NotAWorldPromptError`."""
    try:
        return parse_prompt(prompt)
    except PromptError as err:
        raise NotAWorldPromptError(f"evaluate works only for prompts of the embedded world (it needs their ground "
                                   f"truth), and {err}") from None


def check_options(views: int, resolution: int = 64) -> None:
    """``views``: a multiple of 4, at least 12 (two elevations × an even number ≥ 6 of azimuths, so that
    there are front views within 30° of the front and a back view opposite each); 16 ≤ resolution ≤ 1024."""
    if views < 12 or views % 4:
        raise EvaluationOptionError(f"--views {views}: use a multiple of 4, at least 12 (two elevations times an even "
                                    f"number of azimuths, e.g. 16).")
    if not 16 <= resolution <= 1024:
        raise EvaluationOptionError(f"--resolution {resolution}: use 16 to 1024 pixels (e.g. 64).")


def evaluation_cameras(views: int = 16, ring_factor: int = 1, device: Union[str, torch.device] = "cpu") -> Cameras:
    """Cameras on rings at :data:`ELEVATIONS`: with ``n_az = views / 2`` and ``N = n_az · ring_factor``
    azimuths per ring, camera ``e · N + j`` sits at elevation ``ELEVATIONS[e]`` and azimuth
    ``180°/n_az + j · 360°/N``. ``ring_factor = 1`` gives :func:`held_out_cameras`."""
    n_az = views // 2
    n_ring = n_az * ring_factor
    azimuth = 180.0 / n_az + torch.arange(n_ring, dtype=torch.float32) * (360.0 / n_ring)
    elevation = torch.tensor(ELEVATIONS, dtype=torch.float32).repeat_interleave(n_ring)
    full = torch.full((len(ELEVATIONS) * n_ring,), 1.0)
    return make_cameras(elevation, azimuth.repeat(len(ELEVATIONS)), DISTANCE * full, FOVY * full).to(device)


def held_out_cameras(views: int = 16, device: Union[str, torch.device] = "cpu") -> Cameras:
    """The fixed evaluation views (module docstring): ``views / 2`` azimuths × 2 elevations."""
    check_options(views)
    return evaluation_cameras(views, 1, device)


def _ring_rows(views: int, ring_factor: int, shift: int) -> Tensor:
    """Rows of the ring cameras that show held-out camera ``(e, k)`` turned by ``shift`` ring steps:
    ``e · N + (k · m + shift) mod N``."""
    n_az, n_ring = views // 2, views // 2 * ring_factor
    e, k = torch.arange(len(ELEVATIONS)).repeat_interleave(n_az), torch.arange(n_az).repeat(len(ELEVATIONS))
    return e * n_ring + (k * ring_factor + shift) % n_ring


# ------------------------------------------------------------------------------------ ground truth
class WorldField(nn.Module):
    """A world object as a NeRF-like field (the field protocol of :mod:`carv3d.render.renderer`): the
    result a perfect run would give, for tests and as a benchmark's upper bound.

        σ(x) = σ_max · sigmoid(−f(R_y(−θ) x) / ε),    albedo(x) = material colour at R_y(−θ) x,

    with f the object's SDF, so ``σ = σ_max / 2`` (:attr:`surface_level`) on the surface of the
    object turned by θ about +Y. Override :meth:`object_frame` for other deformations. Rendered, the
    silhouette of a surface with radius of curvature R grows by about ``ε · ln(σ_max √(2π R ε) / ln 2)``
    (where a grazing ray's optical depth reaches ln 2): 0.002 scene units with the defaults.
    """

    def __init__(self, object_name: str, colour: Union[str, Tensor] = "red", radius: float = 1.0,
                 rotation_deg: float = 0.0, max_density: float = 1e6, softness: float = 2e-4):
        super().__init__()
        self.object_name = object_name
        self.kind = OBJECTS[object_name]
        self.radius = float(radius)
        self.rotation_deg = float(rotation_deg)
        self.max_density, self.softness = float(max_density), float(softness)
        rgb = torch.tensor(COLOURS[colour]) if isinstance(colour, str) else torch.as_tensor(colour, dtype=torch.float32)
        self.register_buffer("body_rgb", rgb.float())

    @property
    def surface_level(self) -> float:
        return self.max_density / 2.0

    def object_frame(self, x: Tensor) -> Tensor:
        """World points (N, 3) → the object's canonical frame: ``R_y(−θ) x``."""
        theta = math.radians(self.rotation_deg)
        c, s = math.cos(theta), math.sin(theta)
        return torch.stack([c * x[:, 0] - s * x[:, 2], x[:, 1], s * x[:, 0] + c * x[:, 2]], dim=-1)

    def sdf(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.kind.sdf(self.object_frame(x))

    def _density(self, x: Tensor, distance: Tensor) -> Tensor:
        inside = (x.abs() <= self.radius).all(dim=-1)
        density = self.max_density * torch.sigmoid(-distance / self.softness)
        return torch.where(inside, density, torch.zeros_like(density))

    def density(self, x: Tensor) -> Tensor:
        return self._density(x, self.sdf(x)[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        distance, material = self.sdf(x)
        return self._density(x, distance), material_albedo(material, self.body_rgb.to(x.dtype))

    def normals(self, x: Tensor) -> Tensor:
        return sdf_normals(self.sdf, x)


def _truth_materials(object_name: str, cameras: Cameras, resolution: int,
                     max_rays: int = 2**20, ambient: float = 1.0) -> list[MaterialRender]:
    """Material renders of an object (ambient 1: unlit; AMBIENT: the world's light), in chunks of at
    most ``max_rays`` rays so that large rings at high resolution fit in memory."""
    per_chunk = max(1, max_rays // (resolution * resolution))
    return [render_materials(object_name, cameras[i:i + per_chunk], resolution, resolution, supersample=1,
                             ambient=ambient) for i in range(0, len(cameras), per_chunk)]


@lru_cache(maxsize=32)
def _truth_masks(object_name: str, views: int, resolution: int, ring_factor: int, device: str) -> Tensor:
    """(R, 1, H, W) bool silhouettes ``coverage > ½`` of an object on the evaluation rings (cached:
    deterministic; treat as read-only)."""
    cameras = evaluation_cameras(views, ring_factor, device)
    return torch.cat([part.coverage > MASK_LEVEL for part in _truth_materials(object_name, cameras, resolution)])


def alignment_rule(object_name: str) -> str:
    """``fixed`` (has a front), ``invariant`` (solid of revolution) or ``search`` (module docstring)."""
    kind = OBJECTS[object_name]
    if kind.front_differs_from_back:
        return "fixed"
    return "invariant" if kind.symmetric_about_y else "search"


def _ring_factor(object_name: str, views: int) -> int:
    return math.ceil(ALIGNMENT_ANGLES / (views // 2)) if alignment_rule(object_name) == "search" else 1


def match_object(mask: Tensor, object_name: str, views: int, resolution: int) -> dict[str, Any]:
    """Silhouette IoU of the result's masks ``(views, 1, H, W)`` against one object, at the best
    azimuth offset when the object's rule is ``search``.

    Returns:
        ``object``, ``iou`` (mean over views), ``azimuth_offset_deg`` (δ), ``per_view`` (B,) IoU and
        ``rows`` (the ring rows of the truth at δ, for :func:`truth_images`).
    """
    factor = _ring_factor(object_name, views)
    truth = _truth_masks(object_name, views, resolution, factor, str(mask.device))
    shifts = factor * views // 2 if factor > 1 else 1
    # every candidate offset in one batched IoU and one read to the host (a read per offset was a GPU
    # sync each: slow where many runs share the card)
    rows = torch.stack([_ring_rows(views, factor, shift) for shift in range(shifts)]).to(mask.device)  # (S, B)
    batch = mask.shape[0]
    per_view = silhouette_iou(mask.repeat(shifts, 1, 1, 1), truth[rows.reshape(-1)]).reshape(shifts, batch)
    means = per_view.mean(1).tolist()
    best = 0
    for shift, value in enumerate(means):  # the first offset that beats every earlier one by over 1e-9
        if value > means[best] + 1e-9:
            best = shift
    offset = best * 360.0 / (factor * views // 2)
    return {"object": object_name, "iou": means[best], "per_view": per_view[best], "rows": rows[best],
            "azimuth_offset_deg": offset - 360.0 if offset > 180.0 else offset}


def truth_images(object_name: str, colour: str, views: int, resolution: int, rows: Tensor,
                 lighting: str = "unlit") -> tuple[Tensor, Tensor]:
    """Truth from the ring cameras ``rows`` (see :func:`match_object`), unlit or under the world's
    light (``lighting``): rgb (B, 3, H, W) over white (:func:`carv3d.world.raytrace.compose_rgb`) and
    mask (B, 1, H, W) bool. Cached (deterministic; treat as read-only): a benchmark evaluates the same
    prompt at every checkpoint, and tracing the object's SDF is most of an evaluation's time."""
    return _truth_images(object_name, colour, views, resolution, tuple(int(r) for r in rows.tolist()), lighting,
                         str(rows.device))


@lru_cache(maxsize=32)  # 32 entries of 16 views: 27 MB at 64², 0.4 GB at 256²
def _truth_images(object_name: str, colour: str, views: int, resolution: int, rows: tuple[int, ...],
                  lighting: str, device: str) -> tuple[Tensor, Tensor]:
    index = torch.tensor(rows, device=device)
    cameras = evaluation_cameras(views, _ring_factor(object_name, views), device)[index]
    parts = _truth_materials(object_name, cameras, resolution, ambient=1.0 if lighting == "unlit" else WORLD_AMBIENT)
    weights, coverage = torch.cat([p.weights for p in parts]), torch.cat([p.coverage for p in parts])
    rgb = compose_rgb(weights, coverage, torch.tensor(COLOURS[colour], device=device).expand(len(rows), 3))
    return rgb, coverage > MASK_LEVEL


# ------------------------------------------------------------------------------------- the result
@torch.no_grad()
def render_result(scene: Any, cameras: Cameras, resolution: int,
                  chunk_rays: int = 16384) -> tuple[Tensor, Tensor]:
    """The result's unlit albedo over white, ``rgb + (1 − A)(1 − b)`` (whatever the renderer's own
    background b), and its silhouette ``A > ½``: (B, 3, H, W), (B, 1, H, W) bool."""
    out = scene.render(cameras, generator=None, shading="albedo", height=resolution, width=resolution,
                       chunk_rays=chunk_rays)
    rgb = (out.rgb + (1.0 - out.opacity) * (1.0 - out.background)).clamp(0.0, 1.0).float()
    return rgb, out.opacity > MASK_LEVEL


def opposite_views(views: int) -> Tensor:
    """(views,) index of each held-out camera's opposite (same elevation, azimuth + 180°): with
    ``n_az = views / 2`` (even), camera ``e · n_az + k`` ↔ ``e · n_az + (k + n_az/2) mod n_az``."""
    n_az = views // 2
    index = torch.arange(views)
    return (index // n_az) * n_az + (index % n_az + n_az // 2) % n_az


# ---------------------------------------------------------------------------------------- evaluate
def _round(value: Any, digits: int = 5) -> Any:
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    return value


def to_json(result: dict[str, Any]) -> str:
    """Indented JSON with lists of numbers kept on one line each."""
    text = json.dumps(result, indent=2)
    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def evaluate_scene(scene: Any, prompt: str, *, mesh: MeshLike = None, views: int = 16,
                   resolution: int = 64, compare_all_objects: bool = True, chamfer_points: int = 20000,
                   seed: int = 0, chunk_rays: int = 16384, truth_lighting: str = "unlit") -> dict[str, Any]:
    """Evaluate a scene against the world's ground truth of a world prompt (module docstring).

    Args:
        scene: the result (:class:`carv3d.scene.Scene`), rendered as ``scene.render(cameras,
            generator=None, shading="albedo", …)`` on its own device.
        prompt: a world prompt (``"a red cube"``, a view suffix is ignored).
        mesh: the exported mesh for the Chamfer distance: a path, ``(vertices, faces)``, a trimesh, or
            None (then, or when it is unusable, ``chamfer`` is None and ``surface.mesh`` says why).
        views: held-out cameras (a multiple of 4, ≥ 12); resolution: their size in pixels.
        compare_all_objects: rank the result against every world object (else only the prompted one).
        chamfer_points: surface samples per mesh; seed: their generator's seed.
        chunk_rays: rays per renderer call.
        truth_lighting: the colours compared with: "unlit" (material albedo) or "world" (as the teacher
            saw them, the world's fixed light baked in); :func:`truth_lighting_for` picks by the
            run's ``render.shading``. Silhouettes do not depend on it.

    Returns:
        A JSON-ready dict: headline numbers ``silhouette_iou``, ``masked_colour_error``, ``psnr``,
        ``chamfer``, ``best_match``, ``best_match_is_prompted``, ``front_matches_front`` (front views
        match the truth's front and back views its back; None for objects without a front), and the
        details in ``views``, ``alignment``, ``per_view``, ``surface``, ``ranking`` and ``front_back``.
    """
    start = time.perf_counter()
    parsed = world_prompt(prompt)
    check_options(views, resolution)
    if truth_lighting not in TRUTH_LIGHTINGS:
        raise EvaluationOptionError(f"truth lighting '{truth_lighting}' is unknown; expected one of {TRUTH_LIGHTINGS}.")
    cameras = evaluation_cameras(views, 1, scene.device)
    rgb, mask = render_result(scene, cameras, resolution, chunk_rays)
    names = OBJECT_NAMES if compare_all_objects else (parsed.object,)
    matches = {name: match_object(mask, name, views, resolution) for name in names}
    own = matches[parsed.object]
    truth_rgb, truth_mask = truth_images(parsed.object, parsed.colour, views, resolution, own["rows"], truth_lighting)
    colour_error = masked_colour_error(rgb, truth_rgb, mask, truth_mask)
    per_view_psnr = psnr(rgb, truth_rgb)
    ranking = sorted(({"object": m["object"], "iou": m["iou"], "azimuth_offset_deg": m["azimuth_offset_deg"]}
                      for m in matches.values()), key=lambda m: -m["iou"])
    front_back: dict[str, Any] = {"applicable": False,
                                  "reason": f"a {parsed.object} looks the same from the front and the back"}
    if OBJECTS[parsed.object].front_differs_from_back:
        check = front_back_check(rgb, mask, truth_rgb, truth_mask, cameras.azimuth, opposite_views(views), FRONT_WINDOW)
        front_back = {"applicable": True, **check}
    surface = chamfer_to_world(mesh, parsed.object, own["azimuth_offset_deg"], chamfer_points, seed)
    rule = alignment_rule(parsed.object)
    result = {
        "prompt": prompt,
        "object": parsed.object,
        "colour": parsed.colour,
        "silhouette_iou": own["iou"],
        "masked_colour_error": colour_error,
        "psnr": float(per_view_psnr.mean()),
        "chamfer": surface["chamfer"],
        "best_match": ranking[0]["object"] if compare_all_objects else None,
        "best_match_is_prompted": ranking[0]["object"] == parsed.object if compare_all_objects else None,
        "front_matches_front": front_back.get("passed"),
        "views": {"count": views, "resolution": resolution, "elevations_deg": list(ELEVATIONS),
                  "azimuths_deg": cameras.azimuth[: views // 2].tolist(), "distance": DISTANCE, "fovy_deg": FOVY,
                  "mask_level": MASK_LEVEL, "colour_comparison": COLOUR_COMPARISON[truth_lighting],
                  "truth_lighting": truth_lighting},
        "alignment": {"rule": rule, "azimuth_offset_deg": own["azimuth_offset_deg"],
                      "candidates": _ring_factor(parsed.object, views) * views // 2 if rule == "search" else 1},
        "per_view": {"azimuth_deg": cameras.azimuth.tolist(), "elevation_deg": cameras.elevation.tolist(),
                     "silhouette_iou": own["per_view"].tolist(), "psnr": per_view_psnr.tolist()},
        "surface": surface,
        "ranking": ranking if compare_all_objects else None,
        "front_back": front_back,
        "seconds": time.perf_counter() - start,
    }
    return _round(result)


def format_summary(result: dict[str, Any]) -> str:
    """A short table of the headline numbers of :func:`evaluate_scene`'s result."""
    def number(value: Optional[float], fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    align = result["alignment"]
    # The result is compared with the truth turned by −δ (δ = azimuth_offset_deg; module docstring).
    turned = -align["azimuth_offset_deg"] + 0.0  # + 0.0: no "-0"
    aligned = f" (truth turned {turned:+.0f}° about +Y)" if align["rule"] == "search" else ""
    views = result["views"]
    rows = [f"{result['prompt']!r} against the world's {result['colour']} {result['object']}, "
            f"{views['count']} held-out views at {views['resolution']} px",
            f"  silhouette IoU       {number(result['silhouette_iou'], '.3f')}{aligned}",
            f"  masked colour error  {number(result['masked_colour_error'], '.3f')}",
            f"  PSNR                 {number(result['psnr'], '.2f')} dB",
            f"  Chamfer distance     {number(result['chamfer'], '.4f')}"
            + ("" if result["chamfer"] is not None else f" ({result['surface']['mesh']})")]
    if result["ranking"]:
        top = ", ".join(f"{m['object']} {m['iou']:.3f}" for m in result["ranking"][:4])
        verdict = "the prompted object" if result["best_match_is_prompted"] else "NOT the prompted object"
        rows.append(f"  best match           {result['best_match']} ({verdict}); IoU {top}, …")
    fb = result["front_back"]
    if fb["applicable"]:
        side = lambda views, which: fb[views][which]["distance"]  # noqa: E731
        f_same, f_other = side("front_views", "vs_same_side"), side("front_views", "vs_opposite_side")
        b_same, b_other = side("back_views", "vs_same_side"), side("back_views", "vs_opposite_side")
        rows.append(f"  front/back           {'passed' if fb['passed'] else 'FAILED'}: front views {f_same:.3f} from "
                    f"the front vs {f_other:.3f} from the back; back views {b_same:.3f} from the back vs "
                    f"{b_other:.3f} from the front (D = 1 − IoU + colour error)")
    else:
        rows.append(f"  front/back           n/a ({fb['reason']})")
    return "\n".join(rows)
