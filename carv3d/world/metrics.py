"""Quality metrics of a 3D result against the embedded world's ground truth (images and surfaces).

Images (all ``(B, C, H, W)`` tensors, masks boolean):

- silhouette IoU of view b: ``IoU_b = |M_b ∩ G_b| / |M_b ∪ G_b|`` (1 when both masks are empty);
- masked colour error: the mean absolute difference over the pixels inside *both* silhouettes,
  pooled over views, ``E = Σ_b Σ_{p ∈ M_b ∩ G_b} mean_c |x_bcp − y_bcp| / Σ_b |M_b ∩ G_b|``;
- PSNR of view b over the whole image (peak 1): ``PSNR_b = −10 log10(mean_{c,p} (x_bcp − y_bcp)²)``;
- the front/back check (:func:`front_back_check`), which compares views with the truth's opposite views.

Surfaces: the symmetric Chamfer distance of two triangle meshes A and B is the mean of the two mean
point-to-surface distances,

    CD(A, B) = ½ (mean_{a ∈ P_A} d(a, B) + mean_{b ∈ P_B} d(b, A)),

in scene units, where P_A are points drawn uniformly by area on A (:func:`sample_surface`) and
d(p, B) is the distance from p to the surface of B, its nearest triangle (:func:`surface_distance`),
not to B's samples: a mesh scores 0 against itself, whatever its area or the number of samples. The
ground-truth surface is the zero level set of the object's SDF, extracted by marching cubes
(:func:`world_surface`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from scipy.spatial import cKDTree

from carv3d.world.objects import OBJECT_RADIUS, OBJECTS

Tensor = torch.Tensor
MeshLike = Union[None, str, Path, tuple[np.ndarray, np.ndarray], Any]  # a path, (vertices, faces) or a trimesh


# ------------------------------------------------------------------------------------------- images
def silhouette_iou(mask: Tensor, reference: Tensor) -> Tensor:
    """Per-view IoU of boolean masks ``(B, 1, H, W)`` → ``(B,)``; 1 where both masks are empty."""
    inter = (mask & reference).flatten(1).sum(1).double()
    union = (mask | reference).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union)).float()


def masked_colour_error(rgb: Tensor, reference_rgb: Tensor, mask: Tensor, reference_mask: Tensor) -> Optional[float]:
    """Pooled mean ``|rgb − reference|`` over the pixels inside both masks (formula in the module
    docstring); None when the masks never overlap.

    Args:
        rgb, reference_rgb: (B, 3, H, W) in [0, 1].
        mask, reference_mask: (B, 1, H, W) bool.
    """
    both = (mask & reference_mask)[:, 0]  # (B, H, W)
    count = int(both.sum())
    if count == 0:
        return None
    per_pixel = (rgb - reference_rgb).abs().mean(dim=1)  # (B, H, W)
    return float(per_pixel[both].double().sum() / count)


def psnr(rgb: Tensor, reference_rgb: Tensor) -> Tensor:
    """Per-view PSNR in dB with peak 1: ``−10 log10 MSE_b`` (MSE floored at 1e-10 → at most 100 dB)."""
    mse = (rgb - reference_rgb).double().pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10.0 * torch.log10(mse)).float()


def image_set_distance(rgb: Tensor, mask: Tensor, truth_rgb: Tensor, truth_mask: Tensor) -> dict[str, float]:
    """``D = (1 − mean IoU) + masked colour error`` of two image sets (colour error 1 when the
    silhouettes never overlap), with its two parts."""
    iou = float(silhouette_iou(mask, truth_mask).mean())
    colour = masked_colour_error(rgb, truth_rgb, mask, truth_mask)
    colour = 1.0 if colour is None else colour
    return {"iou": iou, "colour_error": colour, "distance": (1.0 - iou) + colour}


def front_back_check(rgb: Tensor, mask: Tensor, truth_rgb: Tensor, truth_mask: Tensor, azimuth_deg: Tensor,
                     opposite: Tensor, front_window: float = 30.0) -> dict[str, Any]:
    """Do the result's front views look like the truth's front, and its back views like the back?

    Front views F: ``|azimuth| ≤ front_window``; back views B: their opposites (azimuth + 180°).
    With D of :func:`image_set_distance`,

        front_views_match_front:  D(result@F, truth@F) < D(result@F, truth@B)
        back_views_match_back:    D(result@B, truth@B) < D(result@B, truth@F)

    and ``passed`` when both hold. A result turned around fails both; a two-faced one (a front on
    both sides) passes the first and fails the second.

    Args:
        rgb, mask: the result's views (B, 3, H, W), (B, 1, H, W) bool.
        truth_rgb, truth_mask: the truth from the same cameras.
        azimuth_deg: (B,) camera azimuths in (−180, 180].
        opposite: (B,) long, the row of each camera's opposite view.
        front_window: half-width of the front, degrees.
    """
    azimuth = azimuth_deg.cpu()
    front = (azimuth.abs() <= front_window + 1e-4).nonzero().squeeze(-1)
    back = opposite.cpu()[front]
    result: dict[str, Any] = {"front_azimuths": azimuth[front].tolist(), "back_azimuths": azimuth[back].tolist()}
    front, back = front.to(rgb.device), back.to(rgb.device)
    for name, own, other in (("front_views", front, back), ("back_views", back, front)):
        result[name] = {
            "vs_same_side": image_set_distance(rgb[own], mask[own], truth_rgb[own], truth_mask[own]),
            "vs_opposite_side": image_set_distance(rgb[own], mask[own], truth_rgb[other], truth_mask[other]),
        }
    for key, name in (("front_views_match_front", "front_views"), ("back_views_match_back", "back_views")):
        result[key] = result[name]["vs_same_side"]["distance"] < result[name]["vs_opposite_side"]["distance"]
    result["passed"] = result["front_views_match_front"] and result["back_views_match_back"]
    return result


# ----------------------------------------------------------------------------------------- surfaces
def rotate_about_y(points: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (N, 3) points by ``degrees`` about +Y, increasing their azimuth ``atan2(x, z)``:
    ``x' = x cos θ + z sin θ``, ``z' = −x sin θ + z cos θ``."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    return np.stack([c * x + s * z, y, -s * x + c * z], axis=1)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform by area on a triangle mesh: a face with probability ∝ its area, then
    barycentric ``(1 − √u, √u (1 − v), √u v)`` with u, v ~ U[0, 1] (uniform on the triangle).

    Args:
        vertices: (V, 3); faces: (F, 3) int.
        n: number of points.
        rng: numpy generator (the draws are reproducible from its seed).

    Returns:
        (n, 3) float64 points.
    """
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if len(area) == 0 or area.sum() <= 0:
        raise ValueError("the mesh has no area to sample")
    face = rng.choice(len(area), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    su = np.sqrt(u)
    w = np.stack([1.0 - su, su * (1.0 - v), su * v], axis=1)  # (n, 3)
    return np.einsum("nk,nkc->nc", w, tri[face])


@torch.no_grad()
def world_surface(object_name: str, resolution: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth surface ``{f = 0}`` of a world object by marching cubes on a ``resolution³``
    grid over ``[−b, b]³`` (b = OBJECT_RADIUS + 0.05); the grid spacing is ``2b / (resolution − 1)``
    (0.0087 at 128), and the linear interpolation of f along edges puts vertices on the surface up to
    O(spacing²) on smooth parts.

    Returns:
        vertices (V, 3) float64 and faces (F, 3) int64.
    """
    from skimage import measure

    bound = OBJECT_RADIUS + 0.05
    axis = torch.linspace(-bound, bound, resolution, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    sdf = OBJECTS[object_name].sdf
    values = torch.cat([sdf(chunk)[0] for chunk in grid.split(2**18)]).reshape(resolution, resolution, resolution)
    spacing = 2.0 * bound / (resolution - 1)
    vertices, faces, _, _ = measure.marching_cubes(values.numpy(), level=0.0, spacing=(spacing,) * 3)
    return vertices.astype(np.float64) - bound, faces.astype(np.int64)


def surface_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, candidates: int = 16,
                     max_edge: float = 0.02) -> np.ndarray:
    """Distance from each point to the surface of a triangle mesh.

    Edges longer than h are split first (the surface is unchanged), so every triangle lies within h of
    its centroid; then each point's distance is the least exact point-to-triangle distance over the
    ``candidates`` triangles with the nearest centroids. That is exact when the closest triangle is
    among them (measured on exported meshes: all but ≤ 0.1 % of the points, off by ≤ 1e-3) and never
    more than h above the exact distance. h is ``max_edge`` for meshes of the scene's size, larger
    for huge ones (≥ 2 √(area / 10⁵) and ≥ longest edge / 64, which bounds the number of triangles).

    Args:
        points: (N, 3); vertices: (V, 3) finite; faces: (F, 3) int, F ≥ 1.

    Returns:
        (N,) float64 distances.
    """
    import trimesh

    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    longest = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max()
    h = max(max_edge, 2.0 * math.sqrt(area / 1e5), longest / 64.0)
    vertices, faces = trimesh.remesh.subdivide_to_size(vertices, faces, h, max_iter=8)
    tri = vertices[faces]
    k = min(candidates, len(tri))
    nearest = cKDTree(tri.mean(axis=1)).query(points, k)[1].reshape(len(points), k)
    repeated = np.repeat(np.asarray(points, dtype=np.float64), k, axis=0)
    closest = trimesh.triangles.closest_point(tri[nearest.ravel()], repeated)
    return np.linalg.norm(closest - repeated, axis=1).reshape(len(points), k).min(axis=1)


def chamfer_distance(mesh: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray], n_points: int,
                     rng: np.random.Generator) -> dict[str, float]:
    """Symmetric Chamfer distance of two triangle meshes (module docstring).

    Args:
        mesh: (vertices, faces) of the result's surface.
        reference: (vertices, faces) of the ground-truth surface.
        n_points: surface samples per mesh; rng: their generator.

    Returns:
        ``chamfer`` (the symmetric mean), ``result_to_truth`` (accuracy: how far the result's surface
        is from the truth) and ``truth_to_result`` (completeness: how much of the truth it misses).
    """
    to_truth = surface_distance(sample_surface(*mesh, n_points, rng), *reference)
    to_result = surface_distance(sample_surface(*reference, n_points, rng), *mesh)
    return {
        "chamfer": 0.5 * (float(to_truth.mean()) + float(to_result.mean())),
        "result_to_truth": float(to_truth.mean()),
        "truth_to_result": float(to_result.mean()),
    }


def _mesh_problem(vertices: np.ndarray, faces: np.ndarray) -> Optional[str]:
    """Why a mesh cannot be measured, or None."""
    if faces.ndim != 2 or faces.shape[1] != 3 or vertices.ndim != 2 or vertices.shape[1] != 3:
        return f"is not a triangle mesh (vertices {vertices.shape}, faces {faces.shape})"
    if len(faces) == 0:
        return "has no faces"
    if faces.min() < 0 or faces.max() >= len(vertices):
        return "has faces that refer to missing vertices"
    tri = vertices[faces]
    if not np.isfinite(tri).all():
        return "has non-finite (NaN or infinite) vertex coordinates"
    if not np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum() > 0:
        return "has no area (every face is degenerate)"
    return None


def _load_mesh(mesh: MeshLike) -> tuple[Optional[tuple[np.ndarray, np.ndarray]], str]:
    """(vertices float64, faces int64) and where they came from, or None and why there is no usable mesh."""
    if mesh is None:
        return None, "no mesh given"
    advice = ""
    if isinstance(mesh, (str, Path)):
        path = Path(mesh)
        if not path.is_file():
            return None, f"{path} not found; run `carv3d export RUN_DIR` first"
        import trimesh

        from carv3d.export.formats import scene_frame_vertices

        source, advice = str(path), "; re-run `carv3d export RUN_DIR` to write it again"
        try:
            loaded = trimesh.load(path, force="mesh", process=False)
            vertices, faces = scene_frame_vertices(path, loaded.vertices), loaded.faces  # carv3d's PLY is +Z up
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in many ways inside trimesh
            return None, f"{path} could not be read as a mesh ({type(err).__name__}: {err}){advice}"
    elif isinstance(mesh, tuple):
        (vertices, faces), source = mesh, "(vertices, faces)"
    else:
        vertices, faces, source = mesh.vertices, mesh.faces, type(mesh).__name__
    vertices, faces = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    problem = _mesh_problem(vertices, faces)
    return (None, f"{source} {problem}{advice}") if problem else ((vertices, faces), source)


def chamfer_to_world(mesh: MeshLike, object_name: str, azimuth_offset_deg: float = 0.0, n_points: int = 20000,
                     seed: int = 0) -> dict[str, Any]:
    """Chamfer distance between a mesh and the object's surface turned by ``−δ`` (the image alignment).

    Returns:
        ``chamfer``, ``result_to_truth``, ``truth_to_result`` (None when there is no usable mesh: missing,
        unreadable, without faces or area, or with non-finite vertices), ``mesh`` (where it came from or
        why it is missing or unusable) and ``points`` per surface.
    """
    loaded, source = _load_mesh(mesh)
    if loaded is None:
        return {"chamfer": None, "result_to_truth": None, "truth_to_result": None, "mesh": source, "points": n_points}
    truth_vertices, truth_faces = world_surface(object_name)
    truth = (rotate_about_y(truth_vertices, -azimuth_offset_deg), truth_faces)
    rng = np.random.default_rng(seed)
    return {**chamfer_distance(loaded, truth, n_points, rng), "mesh": source, "points": n_points}
