#!/usr/bin/env python
"""Benchmark mesh export: wall time per stage of `carv3d.export.export_mesh`, written as JSON.

Scenes:
  analytic  a box with a ball on it (soft analytic density, two colours): isolates the exporter's
            own cost, since the field costs almost nothing to evaluate.
  nerf      carv3d's hash-grid NeRF field (pure-torch backend) at initialisation, seed 0: the cost
            of evaluating a real field (a blob of radius 0.5) on the grid and for the texture.

Each scene is exported with the given resolution, texture size and face budget into a temporary
folder (GLB + PLY + OBJ), `--repeat` times; the JSON holds every run's stage timings, the best
total, counts, the automatic threshold and silhouette IoU, and the machine (CPU count, torch threads).

  bumpy     a cube with a bumpy surface (carv3d.export.analytic.bumpy_box_field): its decimation folds
            onto itself like a trained NeRF's, so it exercises the repair.
  run       a trained run's scene (--run RUN_DIR), exported as `carv3d export` does.

Every scene's JSON also holds the mesh check after each cleanup step, the repairs made, the UV
charts and texel use, the fitted light, and (with --blender) what Blender's importers make of the
files (carv3d/export/blender_check.py under a Python with bpy).

With --compare-decimators the script also decimates a 256³ marching-cubes sphere (ρ = 0.5) to 50k,
10k and 2k faces with fast-simplification and (when installed) pymeshlab, and records time, volume
error and the largest radial error: the comparison behind carv3d's choice of decimator.

With --compare-repair it decimates the marching-cubes meshes of the bumpy cube (and of --run) to
50k, 20k and 5k faces and compares, on the same meshes: fast-simplification at aggressiveness 7 and
3 as they are, each followed by carv3d's repair (tidy + MeshFix per component), MeshFix on the whole
mesh, manifold3d's tolerance-bounded simplify (ε bisected to the budget) and, when installed,
pymeshlab's topology-preserving quadric collapse: defects, faces, time, the distance of the result's
vertices from the original surface, and each library's install size.

Examples:
    python scripts/bench_export.py --output bench_export.json
    python scripts/bench_export.py --scene nerf --resolution 256 --texture-size 1024 --threads 2
    python scripts/bench_export.py --scene run --run runs/a_red_cube-... --blender --compare-repair
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", choices=["analytic", "nerf", "bumpy", "run", "all"], default="all",
                        help="all = analytic, nerf and bumpy (and run, with --run)")
    parser.add_argument("--run", type=Path, default=None, help="a trained run directory (scene 'run')")
    parser.add_argument("--blender", action="store_true", help="open the files in Blender (needs a bpy Python)")
    parser.add_argument("--compare-repair", action="store_true", help="compare decimation + repair libraries")
    parser.add_argument("--compare-delight", action="store_true",
                        help="also bake each scene's texture without de-lighting (front/back colours)")
    parser.add_argument("--compare-uv", action="store_true",
                        help="also unwrap each scene's final mesh with the previous chart settings")
    parser.add_argument("--resolution", type=int, default=256, help="grid nodes per axis (default 256)")
    parser.add_argument("--texture-size", type=int, default=1024, help="texture side, power of two; 0 = none")
    parser.add_argument("--faces", type=int, default=50000, help="face budget (default 50000)")
    parser.add_argument("--threshold", default="auto", help="'auto' or a density level")
    parser.add_argument("--refine-from", type=int, default=64, help="coarse grid for coarse-to-fine; 0 = dense")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scene; the best total is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--compare-decimators", action="store_true", help="also compare decimation libraries")
    parser.add_argument("--output", type=Path, default=Path("bench_export.json"), help="JSON file to write")
    return parser.parse_args(argv)


def make_scene(name: str, args: argparse.Namespace):
    import torch

    if name == "bumpy":
        from carv3d.export.analytic import bumpy_box_field

        return bumpy_box_field()
    if name == "run":
        from carv3d.saved_scene import load_scene

        return load_scene(args.run).scene.field
    if name == "analytic":
        from carv3d.export.analytic import AnalyticField, Shape, box_sdf, constant_colour, sphere_sdf, split_colour

        return AnalyticField([
            Shape(lambda x: box_sdf(x, (0.0, -0.1, 0.0), (0.35, 0.2, 0.3)),
                  split_colour((0.9, 0.2, 0.1), (0.1, 0.3, 0.9))),
            Shape(lambda x: sphere_sdf(x, (0.15, 0.25, 0.0), 0.2), constant_colour((0.2, 0.8, 0.3))),
        ], softness=0.02)
    from carv3d.config import NeRFSceneConfig
    from carv3d.scene.field import NeRFField

    return NeRFField(NeRFSceneConfig(), device="cpu", generator=torch.Generator().manual_seed(0)).eval()


def blender_reports(files: dict) -> object:
    """Blender's view of the GLB, OBJ and PLY (a list of reports), or why there is none."""
    from carv3d.export.blender_check import find_blender_python, run_blender_check

    if find_blender_python() is None:
        return {"skipped": "no Python with bpy (make test-blender builds .venv-blender)"}
    try:
        reports = run_blender_check([files[k] for k in ("glb", "obj", "ply") if k in files])
    except RuntimeError as err:
        return {"error": str(err)[:500]}
    keep = ("faces", "vertices", "pieces", "nonmanifold_edges", "nonmanifold_vertices", "smooth_faces",
            "custom_normals", "base_color_image", "color_attributes", "dimensions")
    return [{"file": Path(r["file"]).name, "merge_vertices": r["merge_vertices"], "objects": r["objects"],
             "blender": r["blender"], "meshes": [{k: m[k] for k in keep} for m in r["meshes"]]} for r in reports]


def bench_scene(name: str, args: argparse.Namespace) -> dict:
    import torch

    from carv3d.config import ExportConfig
    from carv3d.export.pipeline import build_mesh, check_options, write_mesh

    field = make_scene(name, args)
    threshold = args.threshold if args.threshold == "auto" else float(args.threshold)
    if name == "bumpy" and threshold == "auto":
        threshold = field.surface_level  # its soft step is thin: the surface is known
    cfg = ExportConfig(resolution=args.resolution, texture_size=args.texture_size, faces=args.faces,
                       threshold=threshold, refine_from=args.refine_from)
    formats = check_options(["glb", "ply", "obj"], args.texture_size)
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as out:
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.no_grad():
                mesh = build_mesh(field, cfg, textured=args.texture_size > 0)
            files = write_mesh(mesh, out, formats)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            sizes = {k: Path(p).stat().st_size for k, p in files.items()}
            blender = blender_reports(files) if args.blender else None
        # cpu_s: CPU time of this process (all threads). On a shared machine the wall time includes
        # waiting for the cores; the CPU time does not, and bounds the wall time on an idle machine.
        runs.append({"total_s": round(total, 3), "cpu_s": round(cpu, 3), "stages_s": dict(mesh.timings),
                     "file_bytes": sizes, "load_average": list(os.getloadavg())})
    best = min(runs, key=lambda r: r["total_s"])
    uv = mesh.uv_stats
    if args.compare_uv and uv is not None:
        from carv3d.export.texture import unwrap

        start = time.perf_counter()  # the settings before charts were grown on a smoothed proxy
        _, old = unwrap(mesh.vertices, mesh.faces, args.texture_size, faces_per_chart=200, smoothing_iterations=0,
                        normal_deviation_weight=2.0, max_cost=2.0)
        uv_previous = {"charts": old.charts, "atlas_utilization": round(old.atlas_utilization, 4),
                       "seconds": round(time.perf_counter() - start, 2),
                       "settings": "faces_per_chart 200, no smoothing, xatlas normal_deviation_weight 2, max_cost 2"}
    else:
        uv_previous = None
    sides = None
    if mesh.texture is not None:
        from carv3d.export.texture import colour_facing

        sides = {name: [round(float(c), 4) for c in colour_facing(mesh.uv_mesh, mesh.texture, axis)]
                 for name, axis in (("front +z", (0, 0, 1)), ("back -z", (0, 0, -1)), ("top +y", (0, 1, 0)),
                                    ("bottom -y", (0, -1, 0)), ("+x", (1, 0, 0)), ("-x", (-1, 0, 0)))}
        front, back = sides["front +z"][0], sides["back -z"][0]  # the red channel (the demo's red cube)
        sides["front_back_red_relative_difference"] = round(abs(front - back) / max(front, back, 1e-9), 4)
        if args.compare_delight:
            from carv3d.export.texture import bake_albedo

            lit = bake_albedo(field, mesh.uv_mesh, args.texture_size)  # the field's colours as they are
            front, back = (float(colour_facing(mesh.uv_mesh, lit, axis)[0]) for axis in ((0, 0, 1), (0, 0, -1)))
            sides["without_delighting"] = {"front_red": round(front, 4), "back_red": round(back, 4),
                                           "relative_difference": round(abs(front - back) / max(front, back, 1e-9), 4)}
    return {
        "texture_sides_rgb": sides,
        "uv_previous_settings": uv_previous,
        "checks": mesh.checks,
        "repairs": mesh.repairs,
        "uv": None if uv is None else {"charts": uv.charts, "atlas_utilization": round(uv.atlas_utilization, 4),
                                       "texel_use": round(uv.texel_use, 4)},
        "light": None if mesh.light is None else {"direction": [round(float(x), 4) for x in mesh.light.direction],
                                                  "ambient": round(mesh.light.ambient, 4),
                                                  "gain": round(mesh.light.gain, 4)},
        "blender": blender,
        "scene": name,
        "best_total_s": best["total_s"],
        "best_cpu_s": min(r["cpu_s"] for r in runs),
        "runs": runs,
        "vertices": int(len(mesh.vertices)),
        "faces": int(len(mesh.faces)),
        "threshold": mesh.threshold,
        "search_iou": None if mesh.search is None else round(mesh.search.iou, 4),
        "mesh_silhouette_iou": None if mesh.silhouette_iou is None else round(mesh.silhouette_iou, 4),
    }


def compare_decimators() -> list[dict]:
    import numpy as np

    from carv3d.export.analytic import sphere_field
    from carv3d.export.cleanup import decimate, make_mesh
    from carv3d.export.isosurface import density_grid, extract_isosurface, signed_volume

    field = sphere_field(0.5)
    vertices, faces = extract_isosurface(density_grid(field, 256), field.surface_level, field.radius)
    exact = 4 / 3 * math.pi * 0.5**3
    rows = []

    def record(library, budget, fn):
        start = time.perf_counter()
        v, f = fn()
        seconds = time.perf_counter() - start
        rows.append({"library": library, "input_faces": int(len(faces)), "target_faces": budget,
                     "faces": int(len(f)), "seconds": round(seconds, 3),
                     "volume_rel_error": float(signed_volume(v, f) / exact - 1),
                     "max_radial_error": float(np.abs(np.linalg.norm(v, axis=1) - 0.5).max()),
                     "watertight": bool(make_mesh(v, f).is_watertight)})

    for budget in (50000, 10000, 2000):
        def fast(budget=budget):
            m = decimate(make_mesh(vertices, faces), budget)
            return np.asarray(m.vertices), np.asarray(m.faces)
        record("fast-simplification", budget, fast)
        try:
            import pymeshlab
        except ImportError:
            rows.append({"library": "pymeshlab", "target_faces": budget, "skipped": "not installed"})
            continue

        def meshlab(budget=budget):
            ms = pymeshlab.MeshSet()
            ms.add_mesh(pymeshlab.Mesh(vertices.astype(np.float64), faces.astype(np.int32)))
            ms.meshing_decimation_quadric_edge_collapse(targetfacenum=budget, preservenormal=True,
                                                        preservetopology=True)
            return ms.current_mesh().vertex_matrix(), ms.current_mesh().face_matrix()
        record("pymeshlab", budget, meshlab)
    return rows


def install_size_mb(distribution: str) -> object:
    """Installed size of a distribution's files (MB), or None when it is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    total = 0
    for f in dist.files or []:
        try:
            total += Path(dist.locate_file(f)).stat().st_size
        except OSError:
            pass
    return round(total / 1e6, 2)


def surface_error(vertices, reference_vertices, reference_faces) -> dict:
    """Distance of ``vertices`` from the reference surface, by the tangent plane of the nearest
    reference vertex: d = |n_i · (p − v_i)| (the reference is a fine marching-cubes mesh)."""
    import numpy as np
    import scipy.spatial

    from carv3d.export.normals import vertex_normals

    normals = vertex_normals(reference_vertices, reference_faces)
    _, nearest = scipy.spatial.cKDTree(reference_vertices).query(np.asarray(vertices, dtype=np.float64))
    d = np.abs(np.einsum("ij,ij->i", np.asarray(vertices) - reference_vertices[nearest], normals[nearest]))
    return {"mean": float(d.mean()), "max": float(d.max())}


def repair_meshes(args: argparse.Namespace) -> dict:
    """The marching-cubes meshes the repair comparison runs on: the bumpy cube at 256³ (and --run's)."""
    import torch

    from carv3d.export.analytic import bumpy_box_field
    from carv3d.export.isosurface import density_grid, extract_isosurface
    from carv3d.export.sparse_grid import refine_grid
    from carv3d.export.threshold import auto_threshold

    field = bumpy_box_field()
    meshes = {"bumpy cube 256": extract_isosurface(density_grid(field, 256), field.surface_level, field.radius)}
    if args.run is not None:
        run_field = make_scene("run", args)
        with torch.no_grad():
            coarse = density_grid(run_field, 64)
            level = auto_threshold(run_field, None, grid=coarse).threshold
            for resolution in (256, 384):
                grid, _ = refine_grid(run_field, coarse, resolution, level)
                meshes[f"{args.run.name} {resolution}"] = extract_isosurface(grid, level, run_field.radius)
    return meshes


def compare_repair(meshes: dict) -> list[dict]:
    """Decimation + repair alternatives on the same marching-cubes meshes (see the module docstring)."""
    import numpy as np

    from carv3d.export.cleanup import decimate, make_mesh, remove_small_components
    from carv3d.export.defects import inspect_mesh
    from carv3d.export.isosurface import signed_volume
    from carv3d.export.repair import CleanupLog, compact, remove_inner_shells, repaired_decimation

    rows = []
    for name, (vertices, faces) in meshes.items():
        # The cleanup before decimation, as the pipeline does it (junk and inner shells).
        mesh = remove_small_components(make_mesh(vertices, faces), 0.05)
        kept, _ = remove_inner_shells(np.asarray(mesh.vertices), np.asarray(mesh.faces))
        v0, f0, _ = compact(np.asarray(mesh.vertices, dtype=np.float32), kept)
        volume0 = signed_volume(v0, f0)

        def record(method, budget, fn):
            start = time.perf_counter()
            try:
                v, f = fn()
            except Exception as err:  # noqa: BLE001 - a library refusing the mesh is a result
                rows.append({"mesh": name, "method": method, "target_faces": budget, "error": f"{type(err).__name__}: {err}"[:300]})
                return
            seconds = time.perf_counter() - start
            report = inspect_mesh(v, f)
            rows.append({"mesh": name, "input_faces": int(len(f0)), "method": method, "target_faces": budget,
                         "faces": int(len(f)), "seconds": round(seconds, 3), **report.as_dict(),
                         "volume_rel_change": float(signed_volume(v, f) / volume0 - 1),
                         "surface_error": surface_error(v, v0, f0)})

        for budget in (50000, 20000, 5000):
            for agg in (7.0, 3.0):
                def raw(agg=agg, budget=budget):
                    m = decimate(make_mesh(v0, f0), budget, agg)
                    return np.asarray(m.vertices), np.asarray(m.faces)

                def repaired(agg=agg, budget=budget):
                    v, f, _ = repaired_decimation(v0, f0, budget, agg, CleanupLog())
                    return v, f
                record(f"fast-simplification agg {agg:g}", budget, raw)
                record(f"fast-simplification agg {agg:g} + carv3d repair (MeshFix per component)", budget, repaired)

            def meshfix_whole(budget=budget):
                import pymeshfix

                m = decimate(make_mesh(v0, f0), budget, 7.0)
                fixer = pymeshfix.MeshFix(np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int32))
                fixer.repair()  # its default: keeps the largest component only
                return fixer.points, fixer.faces
            record("fast-simplification agg 7 + MeshFix on the whole mesh", budget, meshfix_whole)

            def manifold(budget=budget):
                import manifold3d

                solid = manifold3d.Manifold(manifold3d.Mesh(vert_properties=v0, tri_verts=f0.astype(np.uint32)))
                if solid.status() != manifold3d.Error.NoError:
                    raise ValueError(f"manifold3d refuses the input: {solid.status()}")
                lo, hi = 1e-5, 0.1
                best = solid
                for _ in range(8):  # geometric bisection of the tolerance ε towards the budget
                    eps = float(np.sqrt(lo * hi))
                    simplified = solid.simplify(eps)
                    if simplified.num_tri() <= budget:
                        best, hi = simplified, eps
                    else:
                        best, lo = (simplified if best is solid else best), eps
                out = best.to_mesh()
                return np.asarray(out.vert_properties)[:, :3], np.asarray(out.tri_verts, dtype=np.int64)
            record("manifold3d simplify (tolerance bisected; max ε 0.1)", budget, manifold)

            def meshlab(budget=budget):
                import pymeshlab  # optional: only for this comparison

                ms = pymeshlab.MeshSet()
                ms.add_mesh(pymeshlab.Mesh(v0.astype(np.float64), f0.astype(np.int32)))
                ms.meshing_decimation_quadric_edge_collapse(targetfacenum=budget, preservenormal=True,
                                                            preservetopology=True)
                return ms.current_mesh().vertex_matrix(), ms.current_mesh().face_matrix()
            record("pymeshlab quadric edge collapse (preserve topology)", budget, meshlab)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from carv3d.log import setup_logging

    setup_logging()
    scenes = ["analytic", "nerf", "bumpy"] + (["run"] if args.run else []) if args.scene == "all" else [args.scene]
    result = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "settings": {"resolution": args.resolution, "texture_size": args.texture_size, "faces": args.faces,
                     "threshold": args.threshold, "refine_from": args.refine_from, "repeat": args.repeat},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "scenes": [bench_scene(name, args) for name in scenes],
    }
    if args.compare_decimators:
        result["decimators"] = compare_decimators()
    if args.compare_repair:
        result["repair"] = {"install_mb": {d: install_size_mb(d) for d in ("fast_simplification", "pymeshfix",
                                                                             "manifold3d", "pymeshlab")},
                            "rows": compare_repair(repair_meshes(args))}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for scene in result["scenes"]:
        final = scene["checks"].get("decimation + repair") or scene["checks"].get("cleanup", {})
        print(f"{scene['scene']}: {scene['best_total_s']:.2f} s ({scene['best_cpu_s']:.2f} s CPU), {scene['faces']} faces, "
              f"threshold {scene['threshold']:.4g}, silhouette IoU {scene['mesh_silhouette_iou']}, "
              f"clean {final.get('clean')}, UV {scene['uv']}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
