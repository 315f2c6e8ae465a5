"""Mesh repair: duplicate and degenerate faces, inner shells, non-manifold edges, manifold decimation.

Marching cubes on a grid gives a closed 2-manifold, but two later steps can break it:

- **the NeRF's density**: a hollow or doubled surface becomes a closed *inner shell* inside the outer
  one (invisible, but it doubles a 3D print's walls and breaks booleans), and noise becomes
  floating junk (removed by :func:`carv3d.export.cleanup.remove_small_components`);
- **decimation**: quadric edge collapse (fast-simplification) folds thin parts onto themselves,
  leaving duplicate faces, edges shared by three or four faces and "bow-tie" vertices.

The repairs, each its own function so that the pipeline can log what it did:

- :func:`remove_bad_faces` drops degenerate faces and duplicated faces. Two copies of a face with
  opposite windings are a zero-volume fin: both go; same-winding copies keep one.
- :func:`remove_inner_shells` drops components that lie inside another component. Containment is
  the generalised winding number (Jacobson et al. 2013) of a component's points with respect to a
  closed, outward mesh M,

      w(p) = (1 / 4π) Σ_f Ω_f(p),   tan(Ω_f / 2) = a·(b×c) / (|a||b||c| + (a·b)|c| + (b·c)|a| + (c·a)|b|)

  (a, b, c the triangle's corners relative to p; Van Oosterom & Strackee 1983), which is 1 inside
  and 0 outside, and degrades gracefully for meshes with small holes.
- :func:`repair_components` hands each component that is not a clean 2-manifold to MeshFix
  (pymeshfix: removes non-manifold elements and self-intersections, fills the holes left behind).
- :func:`clean_mesh` runs them after every geometric step (marching cubes, cleanup, decimation),
  checks the result (:func:`carv3d.export.defects.inspect_mesh`) and logs what was done. When a
  decimated mesh cannot be repaired it decimates again less aggressively, and as a last resort keeps
  the clean mesh from before decimation (over the face budget, with a warning).

MeshFix was chosen over manifold3d and pymeshlab by measurement (``python scripts/bench_export.py
--compare-repair``, docs/BENCHMARKS.md): manifold3d refuses non-manifold input and its
tolerance-based ``simplify`` cannot meet a face budget; pymeshlab is a 280 MB install.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Tuple

import numpy as np

from carv3d.export.cleanup import decimate, fill_small_holes, make_mesh, remove_small_components
from carv3d.export.defects import component_labels, degenerate_mask, inspect_mesh, row_keys
from carv3d.export.isosurface import signed_volume
from carv3d.log import logger


def compact(vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop unreferenced vertices. Returns (vertices, faces, kept) with ``kept`` the old indices."""
    kept, inverse = np.unique(np.asarray(faces, dtype=np.int64), return_inverse=True)
    return np.asarray(vertices)[kept], inverse.reshape(-1, 3), kept


def remove_bad_faces(vertices: np.ndarray, faces: np.ndarray, area_eps: float = 0.0) -> Tuple[np.ndarray, dict]:
    """Drop degenerate faces (repeated index or area ≤ ``area_eps``) and duplicated faces.

    Returns:
        faces: (F', 3) the kept faces, in their original order.
        counts: ``{"degenerate": n, "duplicate": n, "fins": n}`` (fins: opposite-winding pairs, both removed).
    """
    faces = np.asarray(faces, dtype=np.int64)
    bad = degenerate_mask(vertices, faces, area_eps)
    good = np.flatnonzero(~bad)
    key = row_keys(np.sort(faces[good], axis=1))
    _, group, size = np.unique(key, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    keep = np.ones(len(good), dtype=bool)
    fins = 0
    for g in np.flatnonzero(size > 1):  # few groups: a handful per decimated mesh
        members = np.flatnonzero(group == g)
        # A face's winding is its cyclic order: rotate each so the smallest index comes first.
        rolled = [tuple(np.roll(faces[good[m]], -int(np.argmin(faces[good[m]])))) for m in members]
        if len(set(rolled)) > 1:  # both windings present: a zero-volume fin, nothing of it is surface
            keep[members] = False
            fins += 1
        else:
            keep[members[1:]] = False
    counts = {"degenerate": int(bad.sum()), "duplicate": int(len(good) - keep.sum()), "fins": fins}
    return faces[good[keep]], counts


def solid_angles(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(P,) Σ over triangles of the signed solid angle Ω_f(p) (Van Oosterom–Strackee, module docstring).

    Args:
        points: (P, 3) query points.
        triangles: (F, 3, 3) triangle corners, wound counter-clockwise seen from outside.
    """
    out = np.zeros(len(points))
    for i, p in enumerate(np.asarray(points, dtype=np.float64)):
        a, b, c = (triangles[:, k].astype(np.float64) - p for k in range(3))
        la, lb, lc = (np.linalg.norm(x, axis=1) for x in (a, b, c))
        numerator = np.einsum("ij,ij->i", a, np.cross(b, c))
        denominator = (la * lb * lc + np.einsum("ij,ij->i", a, b) * lc + np.einsum("ij,ij->i", b, c) * la
                       + np.einsum("ij,ij->i", c, a) * lb)
        out[i] = 2.0 * np.arctan2(numerator, denominator).sum()
    return out


def winding_numbers(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(P,) generalised winding number w(p) = Σ_f Ω_f(p) / 4π of a mesh at points."""
    return solid_angles(points, np.asarray(vertices)[np.asarray(faces)]) / (4.0 * np.pi)


def remove_inner_shells(vertices: np.ndarray, faces: np.ndarray, samples: int = 5) -> Tuple[np.ndarray, int]:
    """Drop the components that lie inside another component.

    Component c is inside component d when the majority of ``samples`` of c's vertices has
    |w_d(p)| > ½ (the absolute value: an inward-wound cavity counts as enclosing too). Only larger
    components (by face count) are tested as enclosures, so two shells never remove each other.

    Returns:
        faces: the kept faces (same vertex indexing), and the number of shells removed.
    """
    faces = np.asarray(faces, dtype=np.int64)
    n, labels = component_labels(faces, len(vertices))
    if n <= 1:
        return faces, 0
    sizes = np.bincount(labels, minlength=n)
    order = np.argsort(-sizes)
    inner = np.zeros(n, dtype=bool)
    for rank, c in enumerate(order[1:], start=1):
        ids = np.unique(faces[labels == c])
        pick = ids[np.linspace(0, len(ids) - 1, min(samples, len(ids))).astype(np.int64)]
        for d in order[:rank]:
            if inner[d]:
                continue
            w = winding_numbers(np.asarray(vertices)[pick], vertices, faces[labels == d])
            if (np.abs(w) > 0.5).sum() * 2 > len(pick):
                inner[c] = True
                break
    return faces[~inner[labels]], int(inner.sum())


def repair_components(vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    """MeshFix (pymeshfix) on every component that is not a clean closed 2-manifold.

    MeshFix keeps one component of what it is given, so components are repaired one at a time and
    the clean ones pass through untouched.

    Returns:
        vertices, faces of the repaired mesh and the number of components that were repaired.
    """
    import pymeshfix

    faces = np.asarray(faces, dtype=np.int64)
    n, labels = component_labels(faces, len(vertices))
    out_v, out_f, offset, repaired = [], [], 0, 0
    for c in range(n):
        v, f, _ = compact(vertices, faces[labels == c])
        if not inspect_mesh(v, f).clean:
            fixer = pymeshfix.MeshFix(v.astype(np.float64), f.astype(np.int32))
            fixer.repair(remove_smallest_components=False)
            v, f = np.asarray(fixer.points), np.asarray(fixer.faces, dtype=np.int64)
            repaired += 1
            if len(f) == 0:
                continue
        out_v.append(np.asarray(v, dtype=np.float32))
        out_f.append(f + offset)
        offset += len(v)
    if not out_f:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), repaired
    return np.concatenate(out_v), np.concatenate(out_f), repaired


def log_report(stage: str, vertices: np.ndarray, faces: np.ndarray) -> dict:
    """Inspect a mesh, log one line for ``stage`` and return the report as a dict."""
    report = inspect_mesh(vertices, faces)
    logger.info("mesh check after %s: %s", stage, report.summary())
    return report.as_dict()


def weld(vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    """Merge vertices at identical positions (marching cubes emits one where a surface passes through a
    grid node); faces that become degenerate are left for :func:`remove_bad_faces`.

    Returns:
        vertices, faces and the number of vertices merged away.
    """
    vertices = np.asarray(vertices)
    order = np.lexsort(vertices.T[::-1])  # rows sorted by (x, y, z): equal positions become neighbours
    ordered = vertices[order]
    new_run = np.ones(len(vertices), dtype=bool)
    new_run[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    if new_run.all():
        return vertices, np.asarray(faces, dtype=np.int64), 0
    representative = np.empty(len(vertices), dtype=np.int64)  # each vertex → the first of its run
    run_start = order[np.flatnonzero(new_run)]
    representative[order] = np.repeat(run_start, np.diff(np.append(np.flatnonzero(new_run), len(vertices))))
    kept, inverse = np.unique(representative, return_inverse=True)  # sorted: keeps the original order
    return vertices[kept], inverse[np.asarray(faces)], len(vertices) - len(kept)


def orient_components(vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, int]:
    """Reverse each closed component whose signed volume is negative (MeshFix may return one inside out).

    Inner shells are removed before this runs, so every component is an outside surface.
    """
    faces = np.asarray(faces, dtype=np.int64).copy()
    n, labels = component_labels(faces, len(vertices))
    flipped = 0
    for c in range(n):
        mask = labels == c
        if signed_volume(np.asarray(vertices), faces[mask]) < 0:
            faces[mask] = faces[mask][:, ::-1]
            flipped += 1
    return faces, flipped


@dataclass
class CleanupLog:
    """What :func:`clean_mesh` did: the check after each step and the repairs, in order."""

    checks: dict = dataclass_field(default_factory=dict)
    actions: list = dataclass_field(default_factory=list)

    def note(self, text: str) -> None:
        self.actions.append(text)
        logger.info("cleanup: %s", text)

    def check(self, stage: str, vertices: np.ndarray, faces: np.ndarray) -> bool:
        self.checks[stage] = log_report(stage, vertices, faces)
        return bool(self.checks[stage]["clean"])


def tidy(vertices: np.ndarray, faces: np.ndarray, log: CleanupLog, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Weld coincident vertices, drop degenerate and duplicate faces, drop unused vertices (logged)."""
    vertices, faces, merged = weld(vertices, faces)
    faces, counts = remove_bad_faces(vertices, faces)
    if merged:
        log.note(f"{what}: merged {merged} coincident vertices")
    if counts["degenerate"] or counts["duplicate"]:
        log.note(f"{what}: removed {counts['degenerate']} degenerate and {counts['duplicate']} duplicate faces "
                 f"({counts['fins']} back-to-back pairs)")
    vertices, faces, _ = compact(vertices, faces)
    return vertices, faces


def repaired_decimation(vertices: np.ndarray, faces: np.ndarray, target_faces: int, aggressiveness: float,
                        log: CleanupLog, min_component_fraction: float = 0.05) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Quadric decimation, then :func:`tidy` and MeshFix where a component is still not clean; pieces
    that the repair cut off (under ``min_component_fraction`` of the largest area) are dropped."""
    mesh = decimate(make_mesh(vertices, faces), target_faces, aggressiveness)
    v, f = np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64)
    log.check(f"decimation (aggressiveness {aggressiveness:g})", v, f)
    v, f = tidy(v, f, log, "decimation")
    if not inspect_mesh(v, f).clean:
        v, f, repaired = repair_components(v, f)
        log.note(f"decimation: MeshFix repaired {repaired} component(s)")
        kept = remove_small_components(make_mesh(v, f), min_component_fraction)
        if len(kept.faces) < len(f):
            log.note(f"decimation: dropped {len(f) - len(kept.faces)} faces of pieces the repair cut off")
            v, f = np.asarray(kept.vertices, dtype=np.float32), np.asarray(kept.faces, dtype=np.int64)
    f, flipped = orient_components(v, f)
    if flipped:
        log.note(f"decimation: turned {flipped} inside-out component(s) outward")
    return v, f, inspect_mesh(v, f).clean


def clean_mesh(vertices: np.ndarray, faces: np.ndarray, min_component_fraction: float, max_hole_edges: int,
               target_faces: int, aggressiveness: Tuple[float, ...] = (3.0, 7.0),
               budget_slack: float = 1.02) -> Tuple[np.ndarray, np.ndarray, CleanupLog]:
    """Marching-cubes output → a clean closed 2-manifold within the face budget (module docstring).

    Steps, each followed by a check recorded in the log: tidy (weld, degenerate and duplicate
    faces); junk (components under ``min_component_fraction`` of the largest area); inner shells;
    holes up to ``max_hole_edges`` edges (only when the check finds any); decimation to
    ``target_faces`` (0: none) with repair, trying each ``aggressiveness`` in turn. fast-simplification
    at 3 is the more accurate and breaks less (docs/BENCHMARKS.md) but may stop short of a small
    budget; a result is taken when it is clean and within ``budget_slack`` × the budget, else the
    next setting is tried; then the first clean result over the budget; then the undecimated mesh.

    Returns:
        vertices (V, 3) float32, faces (F, 3) int64 (outward), and the :class:`CleanupLog`.
    """
    log = CleanupLog()
    log.check("marching cubes", vertices, faces)
    vertices, faces = tidy(vertices, faces, log, "marching cubes")
    mesh = remove_small_components(make_mesh(vertices, faces), min_component_fraction)
    if len(mesh.faces) < len(faces):
        log.note(f"removed {len(faces) - len(mesh.faces)} faces of small floating pieces")
    inner_faces, shells = remove_inner_shells(np.asarray(mesh.vertices), np.asarray(mesh.faces))
    if shells:
        log.note(f"removed {shells} inner shell(s) ({len(mesh.faces) - len(inner_faces)} faces) enclosed by the surface")
    vertices, faces, _ = compact(np.asarray(mesh.vertices, dtype=np.float32), inner_faces)
    faces, flipped = orient_components(vertices, faces)
    if flipped:
        log.note(f"turned {flipped} inside-out component(s) outward")
    log.check("cleanup", vertices, faces)
    if log.checks["cleanup"]["boundary_edges"]:  # marching cubes closes every surface; a hole is rare
        mesh, holes = fill_small_holes(make_mesh(vertices, faces), max_hole_edges)
        if holes:
            log.note(f"closed {holes} small holes")
            vertices, faces = np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64)
            log.check("holes", vertices, faces)
    if target_faces <= 0 or len(faces) <= target_faces:
        return vertices, faces, log
    over_budget = None
    for agg in aggressiveness:
        v, f, clean = repaired_decimation(vertices, faces, target_faces, agg, log, min_component_fraction)
        if clean and len(f) <= budget_slack * target_faces:
            log.check("decimation + repair", v, f)
            return v, f, log
        if clean:
            log.note(f"decimation at aggressiveness {agg:g} stopped at {len(f)} faces; trying the next setting")
            over_budget = over_budget or (v, f)
        else:
            log.note(f"decimation at aggressiveness {agg:g} could not be repaired; trying the next setting")
    if over_budget is not None:
        log.note(f"kept a clean decimation over the budget ({len(over_budget[1])} faces)")
        log.check("decimation + repair", *over_budget)
        return over_budget[0], over_budget[1], log
    logger.warning("cleanup: no decimation could be repaired; keeping all %d faces (over the budget of %d)",
                   len(faces), target_faces)
    log.note(f"kept the undecimated mesh ({len(faces)} faces) because no decimation could be repaired")
    return vertices, faces, log
