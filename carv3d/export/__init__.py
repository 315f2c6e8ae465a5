"""Mesh export: density grid → isosurface → cleanup → colours/texture → GLB, PLY, OBJ.

The field protocol: ``field.radius`` (scene box [−r, r]³), ``field.density(x: (N, 3)) -> (N,)`` and
``field(x) -> (density (N,), albedo (N, 3) in [0, 1])``. Meshes keep the scene's frame: +Y up, the
front facing +Z, centred at the origin, in scene units (GLB, OBJ); PLY is written +Z up.
"""

from carv3d.export.cleanup import (decimate, fill_small_holes, make_mesh, orient_outward,
                                   remove_small_components)
from carv3d.export.colors import vertex_colors
from carv3d.export.defects import MeshReport, inspect_mesh
from carv3d.export.isosurface import EmptyMeshError, density_grid, extract_isosurface
from carv3d.export.pipeline import ExportedMesh, build_mesh, export_mesh, write_mesh
from carv3d.export.repair import clean_mesh
from carv3d.export.texture import UVMesh, UVStats, bake_albedo, unwrap
from carv3d.export.threshold import ThresholdSearch, auto_threshold, mesh_iou
from carv3d.export.validate import ValidatorUnavailableError, validate_gltf

__all__ = [
    "EmptyMeshError", "ExportedMesh", "MeshReport", "ThresholdSearch", "UVMesh", "UVStats",
    "ValidatorUnavailableError", "auto_threshold", "bake_albedo", "build_mesh", "clean_mesh", "decimate",
    "density_grid", "export_mesh", "extract_isosurface", "fill_small_holes", "inspect_mesh", "make_mesh",
    "mesh_iou", "orient_outward",
    "remove_small_components", "unwrap", "validate_gltf", "vertex_colors", "write_mesh",
]
