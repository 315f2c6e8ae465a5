"""Export a field as mesh files: grid → threshold → marching cubes → cleanup → colours/texture → files.

    density_grid (coarse) ─► auto_threshold (or a fixed level) ─► refine_grid near the level
      ─► extract_isosurface (outward faces)
      ─► clean_mesh: weld, degenerate/duplicate faces, junk, inner shells, holes, decimate + repair
         (checked and logged after every step: carv3d.export.repair)
      ─► corner_normals (smooth, hard at creases) ─► fit the baked-in light (de-lighting)
      ─► vertex_colors (PLY, and GLB/OBJ without texture) ─► unwrap + bake_albedo (GLB/OBJ)
      ─► mesh.glb, mesh.ply, mesh.obj (+ mesh.mtl, mesh_albedo.png)

Everything that can be checked before the (slow) work is checked first: the formats, the texture
size, the grid resolution, the face budget, the threshold and whether the output folder can be
written without replacing anything. The files are written as a set: a failure leaves none of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from carv3d.config import (EXPORT_MAX_RESOLUTION, EXPORT_MAX_TEXTURE_SIZE, EXPORT_MIN_FACES, EXPORT_MIN_RESOLUTION,
                           EXPORT_MIN_TEXTURE_SIZE, ExportConfig)
from carv3d.errors import ConfigError, OutputPathError
from carv3d.export.colors import field_albedo, to_rgba8
from carv3d.export.delight import Light, delight_colors, estimate_light
from carv3d.export.formats import obj_sidecars, split_vertices, write_glb, write_obj, write_ply
from carv3d.export.normals import corner_normals, vertex_normals
from carv3d.export.repair import clean_mesh
from carv3d.export.isosurface import EmptyMeshError, density_grid, extract_isosurface
from carv3d.export.sparse_grid import refine_grid
from carv3d.export.texture import UVMesh, UVStats, bake_albedo, is_power_of_two, unwrap
from carv3d.export.threshold import OpacityFn, ThresholdSearch, auto_threshold, mesh_iou
from carv3d.io import make_writable_folder, reporting_full_disk
from carv3d.log import logger
from carv3d.cameras import Cameras

FORMATS = ("glb", "ply", "obj")
TEXTURED_FORMATS = ("glb", "obj")
# Bounds stated once, in the typed config (see ExportConfig there for why they are what they are).
MIN_RESOLUTION, MAX_RESOLUTION = EXPORT_MIN_RESOLUTION, EXPORT_MAX_RESOLUTION
MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE = EXPORT_MIN_TEXTURE_SIZE, EXPORT_MAX_TEXTURE_SIZE
MIN_FACES = EXPORT_MIN_FACES


@dataclass
class ExportedMesh:
    """A finished mesh, before it is written.

    Attributes:
        vertices: (V, 3) float32 positions (scene units, +Y up, front +Z).
        faces: (F, 3) int64, counter-clockwise seen from outside.
        colors: (V, 4) uint8 vertex colours sampled from the field.
        threshold: the density level used.
        search: the automatic threshold search, when the threshold was "auto".
        silhouette_iou: mean IoU of the final mesh's silhouettes against the NeRF's (auto only).
        uv_mesh: the mesh split along UV seams (same faces), when a texture was baked.
        texture: (S, S, 3) uint8 albedo texture, row 0 at the top.
        timings: seconds per stage.
        normals: (N, 3) float32 shading normals, one per smoothing group.
        corner_normal: (F, 3) int64 index into ``normals`` of every face corner.
        vertex_normal: (V, 3) float32 one smooth normal per vertex (PLY).
        checks: the mesh check (:class:`carv3d.export.defects.MeshReport` as a dict) after each step.
        repairs: what the cleanup did, in order.
        light: the light divided out of the colours (None: colours as the field has them).
        uv_stats: charts and texel use of the texture atlas.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    threshold: float
    search: Optional[ThresholdSearch] = None
    silhouette_iou: Optional[float] = None
    uv_mesh: Optional[UVMesh] = None
    texture: Optional[np.ndarray] = None
    timings: dict = dataclass_field(default_factory=dict)
    normals: Optional[np.ndarray] = None
    corner_normal: Optional[np.ndarray] = None
    vertex_normal: Optional[np.ndarray] = None
    checks: dict = dataclass_field(default_factory=dict)
    repairs: list = dataclass_field(default_factory=list)
    light: Optional[Light] = None
    uv_stats: Optional[UVStats] = None


def parse_threshold(value: Union[str, float, int]) -> Union[str, float]:
    """``"auto"`` or a finite number (numbers given as strings are accepted)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"export.threshold is '{value}'; expected 'auto' or a density level "
                              f"(a number, e.g. 10).") from None
    value = float(value)
    if not np.isfinite(value):
        raise ConfigError(f"export.threshold is {value}; expected 'auto' or a finite number.")
    return value


def check_options(formats: Sequence[str], texture_size: int, resolution: Optional[int] = None,
                  faces: Optional[int] = None) -> list[str]:
    """Validate the formats, the texture size and (when given) the resolution and face budget.

    Returns the formats in canonical order. Called before any slow work (loading the scene,
    sampling the grid), so a typo costs nothing.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or '(none given)'}; expected some of: "
                          f"{', '.join(FORMATS)} (e.g. --format glb,obj).")
    if texture_size != 0 and not (is_power_of_two(texture_size) and MIN_TEXTURE_SIZE <= texture_size <= MAX_TEXTURE_SIZE):
        raise ConfigError(f"texture size {texture_size} is not a power of two between {MIN_TEXTURE_SIZE} and {MAX_TEXTURE_SIZE}; "
                          f"use e.g. 512, 1024 or 2048 (0 for vertex colours only).")
    if resolution is not None and not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ConfigError(f"export resolution {resolution} is out of range; use {MIN_RESOLUTION} to "
                          f"{MAX_RESOLUTION} (128 or 256 for a detailed mesh; a {MAX_RESOLUTION}³ grid "
                          f"already needs over 8 GiB of memory).")
    if faces is not None and faces != 0 and faces < MIN_FACES:
        raise ConfigError(f"face budget {faces} is too small: a closed mesh needs at least {MIN_FACES} faces; "
                          f"use e.g. 5000 or 50000 (0 keeps every face).")
    return [f for f in FORMATS if f in formats]


def planned_files(out_dir: Path, formats: Sequence[str], textured: bool) -> dict[str, Path]:
    """The files an export writes: keys are the formats, plus ``mtl`` and ``texture`` for a textured OBJ."""
    out_dir = Path(out_dir)
    files = {fmt: out_dir / f"mesh.{fmt}" for fmt in formats}
    if textured and "obj" in formats:
        files["mtl"], files["texture"] = obj_sidecars(files["obj"])
    return files


@contextlib.contextmanager
def removing_new_empty_folders(out_dir: Union[str, Path]) -> Iterator[None]:
    """On an error inside the block (an empty mesh, Ctrl-C), remove the folders up to ``out_dir`` that
    did not exist before it and are still empty: :func:`check_targets` makes the folder before the slow
    work, and a failed export left it behind empty."""
    created = [folder for folder in (Path(out_dir), *Path(out_dir).parents) if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in created:  # deepest first; rmdir removes only empty folders
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def check_targets(files: dict[str, Path], overwrite: bool) -> None:
    """Raise :class:`OutputPathError` when a target exists (and ``overwrite`` is False) or is not writable.

    The folder is created here (if missing) and a file written in it, before the slow work
    (:func:`carv3d.io.make_writable_folder`).
    """
    out_dir = next(iter(files.values())).parent
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"the export folder '{out_dir}' is a file; choose another output folder (--out DIR).")
    try:
        make_writable_folder(out_dir)
    except OSError as err:
        raise OutputPathError(f"cannot create the export folder '{out_dir}' or write in it ({err.strerror or err}); "
                              f"choose another output folder with --out DIR.") from None
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not overwrite:
        raise OutputPathError(f"export would overwrite {', '.join(existing)}; pass --overwrite "
                              f"(overwrite=True) to replace them, or choose another folder with --out DIR.")
    clash = [str(p) for p in files.values() if p.is_dir()]
    if clash:
        raise OutputPathError(f"cannot write {', '.join(clash)}: a folder of that name exists; "
                              f"remove it or use --out DIR.")


def build_mesh(field: Any, export_cfg: Any = None, *, textured: bool = True, nerf_opacity: Optional[OpacityFn] = None,
               cameras: Optional[Cameras] = None, grid: Optional[np.ndarray] = None) -> ExportedMesh:
    """Run the export pipeline up to (not including) writing files.

    Args:
        field: ``radius``, ``density(x)``, ``field(x) -> (density, albedo)``.
        export_cfg: an ``ExportConfig`` (or DictConfig of it); None for the defaults.
        textured: bake a texture (when ``texture_size > 0``).
        nerf_opacity: the NeRF opacity renderer for the automatic threshold (see :func:`auto_threshold`).
        cameras: views for the automatic threshold.
        grid: a precomputed density grid at ``export_cfg.resolution`` (then no coarse-to-fine).

    With ``0 < refine_from < resolution`` the field is sampled on a ``refine_from``³ grid, the
    threshold is chosen on it, and only the nodes near that level are evaluated at ``resolution``
    (:func:`carv3d.export.sparse_grid.refine_grid`).
    """
    export_cfg = export_cfg if export_cfg is not None else ExportConfig()  # its defaults, stated once
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    def stage(text: str) -> None:  # each stage says what it does as it starts (export can take minutes)
        logger.info("export: %s ...", text)

    threshold = parse_threshold(export_cfg.threshold)
    texture_size = int(export_cfg.texture_size) if textured else 0
    resolution = int(export_cfg.resolution)
    coarse_resolution = int(export_cfg.refine_from)
    sparse = grid is None and 2 <= coarse_resolution < resolution
    if grid is None:
        stage(f"sampling the density on a {coarse_resolution if sparse else resolution}³ grid")
        grid = density_grid(field, coarse_resolution if sparse else resolution)
    lap("density_grid")
    search = None
    if threshold == "auto":
        stage(f"choosing the threshold from {int(export_cfg.silhouette_views)} silhouettes")
        search = auto_threshold(field, nerf_opacity, grid=grid, cameras=cameras,
                                n_views=int(export_cfg.silhouette_views),
                                image_size=int(export_cfg.silhouette_size))
        threshold = search.threshold
    lap("threshold")
    if sparse:
        stage(f"refining near the surface to {resolution}³")
        grid, fraction = refine_grid(field, grid, resolution, float(threshold))
        logger.info("export: %d³ grid from a %d³ one, the field evaluated at %.1f%% of the nodes",
                    resolution, coarse_resolution, 100 * fraction)
        lap("refine_grid")
    stage("marching cubes")
    vertices, faces = extract_isosurface(grid, float(threshold), float(field.radius))
    lap("marching_cubes")
    stage("cleanup (small components, inner shells, holes, decimation, repair)")
    vertices, faces, cleanup = clean_mesh(vertices, faces, float(export_cfg.min_component_fraction),
                                          int(export_cfg.max_hole_edges), int(export_cfg.faces))
    if len(faces) < MIN_FACES:  # nothing a UV unwrap or a file writer can use
        raise EmptyMeshError(f"the mesh has {len(faces)} faces after cleanup (at threshold {float(threshold):.4g}); "
                             f"a closed mesh needs at least {MIN_FACES}. Raise the face budget (--faces), or "
                             f"lower the threshold or raise the resolution to catch more of the surface.")
    lap("cleanup")
    stage("normals and vertex colours")
    normals, corner_normal = corner_normals(vertices, faces, float(export_cfg.crease_angle))
    vertex_normal = vertex_normals(vertices, faces)
    albedo = field_albedo(field, vertices)
    light = estimate_light(albedo, vertex_normal) if export_cfg.delight else None
    colors = to_rgba8(delight_colors(albedo, vertex_normal, light))
    lap("vertex_colors")
    result = ExportedMesh(vertices, faces, colors, float(threshold), search=search, timings=timings, normals=normals,
                          corner_normal=corner_normal, vertex_normal=vertex_normal, checks=cleanup.checks,
                          repairs=cleanup.actions, light=light)
    if search is not None:
        result.silhouette_iou = mesh_iou(vertices, faces, search)
        logger.info("export: threshold %.4g, mesh silhouette IoU %.3f against the NeRF's opacity",
                    result.threshold, result.silhouette_iou)
        lap("silhouette_check")
    if texture_size:
        stage(f"UV unwrap and {texture_size}² texture bake")
        result.uv_mesh, result.uv_stats = unwrap(vertices, faces, texture_size)
        lap("uv_unwrap")
        result.texture = bake_albedo(field, result.uv_mesh, texture_size, normals, corner_normal, light,
                                     result.uv_stats)
        lap("texture_bake")
        logger.info("export: %d UV charts, %.0f%% of the texture's texels used", result.uv_stats.charts,
                    100 * result.uv_stats.texel_use)
    logger.info("export: %d vertices, %d faces, threshold %.4g", len(vertices), len(faces), result.threshold)
    return result


def write_mesh(mesh: ExportedMesh, out_dir: Union[str, Path], formats: Sequence[str] = FORMATS,
               overwrite: bool = False) -> dict[str, Path]:
    """Write an :class:`ExportedMesh` as ``mesh.<format>`` files (atomically, as a set) in ``out_dir``.

    GLB and OBJ carry the texture when the mesh has one, vertex colours otherwise; PLY always has
    vertex colours.

    Every file is first written into a hidden staging folder inside ``out_dir`` under its final
    name (the OBJ names its MTL and PNG by name, so they cannot be written under temporary names),
    then all are renamed into place. If any writer fails, the staging folder is removed and
    ``out_dir`` is as it was: never a partial or mixed set, which a rerun would then refuse to
    overwrite.

    Raises:
        DiskFullError: the disk filled up while writing; the message names the file, the free
            space, and says that nothing was replaced (the staging folder is removed).
    """
    formats = check_options(formats, 0)
    textured = mesh.texture is not None and mesh.uv_mesh is not None
    files = planned_files(Path(out_dir), formats, textured)
    check_targets(files, overwrite)
    clock = time.perf_counter()
    logger.info("export: writing %s ...", ", ".join(formats))
    staging = Path(tempfile.mkdtemp(prefix=".mesh.tmp-", dir=Path(out_dir)))
    try:
        staged = planned_files(staging, formats, textured)
        for fmt in formats:
            with reporting_full_disk(files[fmt], _nothing_replaced(Path(out_dir))):
                _write_one(fmt, staged[fmt], mesh, textured)
        for key, path in files.items():
            os.replace(staged[key], path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    mesh.timings["write"] = round(time.perf_counter() - clock, 4)
    logger.info("export: wrote %s", ", ".join(str(p) for p in files.values()))
    return files


def _write_one(fmt: str, path: Path, mesh: ExportedMesh, textured: bool) -> None:
    """One format of a mesh: PLY welded with vertex normals; OBJ welded with v/vt/vn; GLB split where
    a corner's UV or normal differs (glTF has one index per vertex)."""
    normals, corner_normal = mesh.normals, mesh.corner_normal
    if normals is None or corner_normal is None:  # a mesh built by hand: smooth normals of its own
        normals, corner_normal = corner_normals(mesh.vertices, mesh.faces, 180.0)
    if fmt == "ply":
        vertex_normal = mesh.vertex_normal if mesh.vertex_normal is not None else vertex_normals(mesh.vertices, mesh.faces)
        write_ply(path, mesh.vertices, mesh.faces, mesh.colors, vertex_normal)
    elif fmt == "obj":
        if textured:
            write_obj(path, mesh.vertices, mesh.faces, uv=mesh.uv_mesh.uv, uv_faces=mesh.uv_mesh.faces,
                      texture=mesh.texture, normals=normals, normal_faces=corner_normal)
        else:
            write_obj(path, mesh.vertices, mesh.faces, colors=mesh.colors, normals=normals, normal_faces=corner_normal)
    elif textured:
        uvm = mesh.uv_mesh
        first, faces = split_vertices(uvm.faces, corner_normal)
        uv_vertex = uvm.faces.reshape(-1)[first]
        write_glb(path, uvm.vertices[uv_vertex], faces, uv=uvm.uv[uv_vertex], texture=mesh.texture,
                  normals=normals[corner_normal.reshape(-1)[first]])
    else:
        first, faces = split_vertices(mesh.faces, corner_normal)
        vertex = mesh.faces.reshape(-1)[first]
        write_glb(path, mesh.vertices[vertex], faces, colors=mesh.colors[vertex],
                  normals=normals[corner_normal.reshape(-1)[first]])


def _nothing_replaced(out_dir: Path) -> str:
    """What a full disk during :func:`write_mesh` costs: nothing but this export."""
    return (f"Nothing was replaced in {out_dir} (the files are written as a set, and the partial ones were "
            f"removed), and a run's checkpoints are untouched. Free some space, then export again "
            f"(`carv3d export RUN_DIR`).")


def export_mesh(field: Any, out_dir: Union[str, Path], export_cfg: Any = None, formats: Optional[Sequence[str]] = None,
                overwrite: bool = False, *, nerf_opacity: Optional[OpacityFn] = None,
                cameras: Optional[Cameras] = None) -> dict[str, Path]:
    """Export a field as mesh files in ``out_dir``.

    Args:
        field: ``radius``, ``density(x)``, ``field(x) -> (density, albedo)``.
        out_dir: the folder (created if missing).
        export_cfg: an ``ExportConfig`` (resolution, threshold, cleanup, faces, texture_size, …);
            None for the defaults.
        formats: some of ``glb``, ``ply``, ``obj``; default ``export_cfg.formats``.
        overwrite: replace existing files; otherwise an existing target is an error, raised before
            any work is done.
        nerf_opacity: ``cameras -> (B, H, W)`` NeRF opacity for ``threshold: auto`` (default: the
            density grid's own opacity).
        cameras: views for ``threshold: auto``.

    Returns:
        ``{"glb": …/mesh.glb, "ply": …/mesh.ply, "obj": …/mesh.obj}`` plus ``"mtl"`` and ``"texture"``
        for a textured OBJ.

    Raises:
        ConfigError: unknown format, texture size not a power of two, resolution outside
            [8, 1024], face budget below 4, invalid threshold.
        OutputPathError: a target exists and ``overwrite`` is False, or the folder cannot be written.
        EmptyMeshError: no surface at the threshold (the message gives the largest density), or
            fewer than 4 faces left after cleanup.
    """
    export_cfg = export_cfg if export_cfg is not None else ExportConfig()  # its defaults, stated once
    formats = check_options(list(formats or export_cfg.formats), int(export_cfg.texture_size),
                            resolution=int(export_cfg.resolution), faces=int(export_cfg.faces))
    parse_threshold(export_cfg.threshold)
    textured = int(export_cfg.texture_size) > 0 and any(f in TEXTURED_FORMATS for f in formats)
    with removing_new_empty_folders(out_dir):
        check_targets(planned_files(Path(out_dir), formats, textured), overwrite)
        mesh = build_mesh(field, export_cfg, textured=textured, nerf_opacity=nerf_opacity, cameras=cameras)
        files = write_mesh(mesh, out_dir, formats, overwrite=overwrite)
    logger.info("export timings (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in mesh.timings.items()))
    return files
