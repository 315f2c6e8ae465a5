"""A vectorised CPU triangle rasteriser (numpy): which pixel centres fall in which triangle.

Used for mesh silhouettes (triangles projected into a camera) and for texture baking (triangles in
UV space). There is no depth test: callers need coverage (silhouettes) or draw triangles that do
not overlap (a UV atlas).

Pixel (row i, column j) has its centre at p = (j + ½, i + ½) in the triangle's 2-D coordinates
(x to the right, y down). A centre is inside triangle (a, b, c) when its barycentric coordinates

    λ_a = E(b, c, p) / E(b, c, a),   λ_b = E(c, a, p) / E(b, c, a),   λ_c = 1 − λ_a − λ_b,
    E(u, v, p) = (v − u) × (p − u)   (the 2-D cross product)

are all ≥ 0 (either winding). Centres exactly on an edge shared by two triangles are reported for
both, which is harmless for coverage and for baking (the same surface point).
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np


def rasterize(triangles: np.ndarray, height: int, width: int,
              max_candidates: int = 1 << 22) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield, chunk by chunk, the pixel centres covered by each triangle.

    Args:
        triangles: (F, 3, 2) vertex positions in pixel units (x = column, y = row).
        height, width: the image size.
        max_candidates: bound on the bounding-box pixels tested per chunk (memory ∝ this).

    Yields:
        pixel: (M,) int64 flat pixel index ``row · width + column``;
        triangle: (M,) int64 index into ``triangles``;
        bary: (M, 3) float32 barycentric coordinates (λ_a, λ_b, λ_c) of the pixel centre.
    """
    tri = np.asarray(triangles, dtype=np.float64)
    if tri.size == 0:
        return
    # Centres j + ½ inside [min, max]  ⇔  ceil(min − ½) ≤ j ≤ floor(max − ½), clipped to the image.
    lo = np.maximum(np.ceil(tri.min(axis=1) - 0.5), 0).astype(np.int64)  # (F, 2) first column, row
    hi = np.minimum(np.floor(tri.max(axis=1) - 0.5), [width - 1, height - 1]).astype(np.int64)
    nx = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0)
    ny = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    counts = nx * ny
    counts[np.abs(area2) < 1e-12] = 0  # degenerate: covers nothing
    ends = np.cumsum(counts)
    start_tri = 0
    while start_tri < len(tri):
        base = ends[start_tri - 1] if start_tri else 0
        stop_tri = int(np.searchsorted(ends, base + max_candidates, side="right"))
        stop_tri = max(stop_tri, start_tri + 1)
        sel = np.arange(start_tri, stop_tri)
        start_tri = stop_tri
        n = counts[sel]
        total = int(n.sum())
        if total == 0:
            continue
        t = np.repeat(sel, n)  # (M,) triangle of each candidate
        offset = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
        px = lo[t, 0] + offset % nx[t]
        py = lo[t, 1] + offset // nx[t]
        cx, cy = px + 0.5, py + 0.5
        inv = 1.0 / area2[t]
        la = ((c[t, 0] - b[t, 0]) * (cy - b[t, 1]) - (c[t, 1] - b[t, 1]) * (cx - b[t, 0])) * inv
        lb = ((a[t, 0] - c[t, 0]) * (cy - c[t, 1]) - (a[t, 1] - c[t, 1]) * (cx - c[t, 0])) * inv
        lc = 1.0 - la - lb
        eps = -1e-9
        inside = (la >= eps) & (lb >= eps) & (lc >= eps)
        if not inside.any():
            continue
        bary = np.stack([la[inside], lb[inside], lc[inside]], axis=1).astype(np.float32)
        yield (py[inside] * width + px[inside]).astype(np.int64), t[inside], bary


def coverage(triangles: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: pixel centres covered by at least one triangle of (F, 3, 2)."""
    mask = np.zeros(height * width, dtype=bool)
    for pixel, _, _ in rasterize(triangles, height, width):
        mask[pixel] = True
    return mask.reshape(height, width)
