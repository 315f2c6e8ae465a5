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

With --compare-decimators the script also decimates a 256³ marching-cubes sphere (ρ = 0.5) to 50k,
10k and 2k faces with fast-simplification and (when installed) pymeshlab, and records time, volume
error and the largest radial error: the comparison behind carv3d's choice of decimator.

Examples:
    python scripts/bench_export.py --output bench_export.json
    python scripts/bench_export.py --scene nerf --resolution 256 --texture-size 1024 --threads 2
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
    parser.add_argument("--scene", choices=["analytic", "nerf", "all"], default="all")
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


def make_scene(name: str):
    import torch

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


def bench_scene(name: str, args: argparse.Namespace) -> dict:
    from carv3d.config import ExportConfig
    from carv3d.export.pipeline import build_mesh, check_options, write_mesh

    field = make_scene(name)
    threshold = args.threshold if args.threshold == "auto" else float(args.threshold)
    cfg = ExportConfig(resolution=args.resolution, texture_size=args.texture_size, faces=args.faces,
                       threshold=threshold, refine_from=args.refine_from)
    formats = check_options(["glb", "ply", "obj"], args.texture_size)
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            mesh = build_mesh(field, cfg, textured=args.texture_size > 0)
            files = write_mesh(mesh, out, formats)
            total = time.perf_counter() - start
            sizes = {k: Path(p).stat().st_size for k, p in files.items()}
        runs.append({"total_s": round(total, 3), "stages_s": dict(mesh.timings), "file_bytes": sizes})
    best = min(runs, key=lambda r: r["total_s"])
    return {
        "scene": name,
        "best_total_s": best["total_s"],
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


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from carv3d.log import setup_logging

    setup_logging()
    scenes = ["analytic", "nerf"] if args.scene == "all" else [args.scene]
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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for scene in result["scenes"]:
        print(f"{scene['scene']}: {scene['best_total_s']:.2f} s, {scene['faces']} faces, "
              f"threshold {scene['threshold']:.4g}, silhouette IoU {scene['mesh_silhouette_iou']}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
