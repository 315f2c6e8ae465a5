"""UV unwrapping (xatlas) and albedo baking into a texture on the CPU, with seam dilation.

UV convention (OBJ's and trimesh's): u to the right, v **up**, origin at the bottom-left of the image.
Texel (row i, column j) of an S×S texture covers the UV square around

    u = (j + ½) / S,   v = 1 − (i + ½) / S.

(glTF flips v; trimesh's GLB writer does that, see :mod:`carv3d.export.formats`.)

Charts: few and large, so that the texture can be painted in 2-D (see :func:`unwrap`).

Baking: every texel whose centre falls inside a UV triangle gets the field's albedo at the 3-D
point with the same barycentric coordinates, ``x = λ_a·p_a + λ_b·p_b + λ_c·p_c``. Texels that no
triangle covers (gutters between charts) take the colour of the nearest covered texel (Euclidean
distance transform), so bilinear filtering and mipmaps never blend in a background colour at seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import scipy.ndimage

from carv3d.export.colors import field_albedo
from carv3d.export.delight import Light, delight_colors
from carv3d.export.defects import face_areas
from carv3d.export.normals import unit
from carv3d.export.raster import rasterize
from carv3d.log import logger


@dataclass
class UVMesh:
    """A mesh split along UV seams: vertex k is ``source[k]`` of the unsplit mesh.

    Attributes:
        vertices: (V', 3) float32 positions.
        faces: (F, 3) int64, same faces (same order) as the unsplit mesh.
        uv: (V', 2) float32 in [0, 1], v up.
        source: (V',) int64 index of each vertex in the unsplit mesh.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    source: np.ndarray


def chart_proxy(vertices: np.ndarray, faces: np.ndarray, iterations: int) -> np.ndarray:
    """Positions of a Taubin-smoothed copy of the mesh (same faces) for chart segmentation.

    A marching-cubes surface has staircase noise in its face normals, and xatlas starts a new chart
    wherever normals deviate: hundreds of small charts. Taubin's λ|μ smoothing (trimesh) removes the
    noise without shrinking the shape; the charts and their UVs come from the smooth copy and are
    used on the real positions (same faces, so the UV layout stays valid and non-overlapping).
    """
    if iterations <= 0:
        return np.ascontiguousarray(vertices, dtype=np.float32)
    import trimesh

    proxy = trimesh.Trimesh(np.array(vertices, dtype=np.float64), np.asarray(faces), process=False)
    trimesh.smoothing.filter_taubin(proxy, iterations=iterations)
    return np.ascontiguousarray(proxy.vertices, dtype=np.float32)


@dataclass
class UVStats:
    """How well a texture atlas uses its image.

    Attributes:
        charts: number of UV charts (islands).
        atlas_utilization: fraction of the atlas' texels inside a chart, as xatlas packed it.
        texel_use: fraction of the final S² texels that baking wrote (set by :func:`bake_albedo`).
    """

    charts: int
    atlas_utilization: float
    texel_use: float = 0.0


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int = 2,
           faces_per_chart: int = 1000, fill_ratio: float = 0.6, smoothing_iterations: int = 50,
           normal_deviation_weight: float = 0.5, max_cost: float = 4.0) -> Tuple[UVMesh, UVStats]:
    """UV-unwrap a mesh with xatlas into one square atlas of few, large charts.

    Charts are grown on a smoothed copy of the mesh (:func:`chart_proxy`), with xatlas' normal
    deviation weight lowered from 2 to ``normal_deviation_weight`` and its chart cost limit raised
    from 2 to ``max_cost``: both let a chart run over a gently curved region. xatlas' chart growing
    is superlinear in chart size (a 50k-face mesh took 105 s with no limit), so the chart area is
    capped at ``A_total · faces_per_chart / F``. The packing scale is
    ``texels_per_unit = sqrt(fill_ratio · S² / A_total)``, so that at the typical packing
    efficiency the atlas is about S texels wide; UVs are then divided by the atlas' larger side
    (square texels, one atlas, never more).

    Args:
        vertices: (V, 3) positions.
        faces: (F, 3) indices.
        texture_size: S, the texture side in texels.
        padding: texels between charts (before the final rescale to S).
        faces_per_chart: the chart-area cap in units of the mean face area.
        fill_ratio: expected fraction of the atlas covered by charts.
        smoothing_iterations: Taubin iterations of the chart proxy (0: the mesh itself).
        normal_deviation_weight, max_cost: xatlas ChartOptions (see above).

    Returns:
        The split mesh with UVs, and the atlas' :class:`UVStats`.
    """
    import xatlas

    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.uint32)
    area = float(face_areas(vertices, faces).sum())
    chart_options = xatlas.ChartOptions()
    chart_options.max_chart_area = area * faces_per_chart / max(len(faces), 1)
    chart_options.normal_deviation_weight = float(normal_deviation_weight)
    chart_options.max_cost = float(max_cost)
    pack_options = xatlas.PackOptions()
    pack_options.padding = int(padding)
    pack_options.bilinear = True
    pack_options.texels_per_unit = float(np.sqrt(fill_ratio * texture_size**2 / max(area, 1e-12)))
    atlas = xatlas.Atlas()
    atlas.add_mesh(chart_proxy(vertices, faces, smoothing_iterations), faces)
    atlas.generate(chart_options, pack_options)
    source, new_faces, uv = atlas[0]
    side = float(max(atlas.width, atlas.height))
    uv = uv.astype(np.float64) * np.array([atlas.width, atlas.height]) / side  # square texels
    stats = UVStats(int(atlas.chart_count), float(atlas.utilization))
    logger.info("texture: %d charts, atlas %dx%d texels rescaled to %d², %.0f%% used",
                atlas.chart_count, atlas.width, atlas.height, texture_size, 100 * atlas.utilization)
    source = source.astype(np.int64)
    return UVMesh(vertices[source], new_faces.astype(np.int64), uv.astype(np.float32), source), stats


def uv_to_pixels(uv: np.ndarray, texture_size: int) -> np.ndarray:
    """(…, 2) UV (v up) -> (…, 2) texel coordinates (x = column, y = row; row 0 at the top)."""
    return np.stack([uv[..., 0] * texture_size, (1.0 - uv[..., 1]) * texture_size], axis=-1)


def dilate(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Fill texels outside ``covered`` with the colour of the nearest covered texel.

    Args:
        image: (S, S, C) texture.
        covered: (S, S) bool, the texels written by baking.
    """
    if covered.all() or not covered.any():
        return image
    _, (rows, cols) = scipy.ndimage.distance_transform_edt(~covered, return_indices=True)
    return image[rows, cols]


def bake_albedo(field: Any, uv_mesh: UVMesh, texture_size: int, normals: Optional[np.ndarray] = None,
                corner_normal: Optional[np.ndarray] = None, light: Optional[Light] = None,
                stats: Optional[UVStats] = None) -> np.ndarray:
    """Bake the field's albedo into an S×S texture by rasterising the UV triangles.

    With a ``light`` (:mod:`carv3d.export.delight`) every texel is de-lit, a = c / L(n), n the
    shading normal interpolated with the texel's barycentric coordinates from the face's corner
    normals (``normals[corner_normal[f, k]]``).

    Args:
        field: the colour field (``field(x) -> (density, albedo)``).
        uv_mesh: the unwrapped mesh.
        texture_size: S.
        normals, corner_normal: shading normals (N, 3) and each face corner's index (F, 3).
        light: the light to divide out, or None.
        stats: when given, its ``texel_use`` is set to the fraction of texels baked.

    Returns:
        (S, S, 3) uint8 texture, row 0 at the top (v = 1), seams dilated.
    """
    size = texture_size
    triangles = uv_to_pixels(uv_mesh.uv.astype(np.float64), size)[uv_mesh.faces]  # (F, 3, 2)
    image = np.zeros((size * size, 3), dtype=np.float32)
    covered = np.zeros(size * size, dtype=bool)
    corners = uv_mesh.vertices.astype(np.float32)[uv_mesh.faces]  # (F, 3, 3)
    delight = light is not None and normals is not None and corner_normal is not None
    for pixel, tri, bary in rasterize(triangles, size, size):
        points = np.einsum("mk,mkd->md", bary, corners[tri])  # (M, 3) surface points
        colour = field_albedo(field, points)
        if delight:
            shading_normals = unit(np.einsum("mk,mkd->md", bary, normals[corner_normal[tri]]))
            colour = delight_colors(colour, shading_normals, light)
        image[pixel] = colour
        covered[pixel] = True
    image = dilate(image.reshape(size, size, 3), covered.reshape(size, size))
    logger.info("texture: baked %d texels (%.0f%% of %d²)", int(covered.sum()), 100 * covered.mean(), size)
    if stats is not None:
        stats.texel_use = float(covered.mean())
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, …"""
    return n > 0 and n & (n - 1) == 0


def colour_facing(uv_mesh: UVMesh, texture: np.ndarray, axis, max_angle: float = 25.0) -> np.ndarray:
    """Mean texture colour (3,) in [0, 1] of the faces whose normal is within ``max_angle`` degrees of ``axis``.

    Each face contributes the texel under its UV centroid; used to compare the sides of an object
    (e.g. the front +Z and the back −Z of the demo cube). NaN when no face faces that way.
    """
    corners = uv_mesh.vertices.astype(np.float64)[uv_mesh.faces]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-20)
    faces = np.flatnonzero(normal @ np.asarray(axis, dtype=np.float64) > np.cos(np.radians(max_angle)))
    if len(faces) == 0:
        return np.full(3, np.nan)
    size = texture.shape[0]
    px = uv_to_pixels(uv_mesh.uv[uv_mesh.faces[faces]].mean(axis=1).astype(np.float64), size)
    texels = texture[np.clip(px[:, 1].astype(int), 0, size - 1), np.clip(px[:, 0].astype(int), 0, size - 1)]
    return texels.astype(np.float64).mean(axis=0) / 255.0
