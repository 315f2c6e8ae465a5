#!/usr/bin/env python
"""GPU check of mesh export on a world run: train "a red cube" with the embedded teacher on the GPU,
export it at the README's settings and at 384³ / 20k faces, and check the issue's bars; JSON out.

    python scripts/gpu_check_export.py OUT_DIR              # on a CUDA machine (≤ 4 minutes)
    python scripts/gpu_check_export.py OUT_DIR --cpu-smoke  # tiny, on the CPU: checks that it runs

Sections (each in its own try/except; an error is recorded in the JSON and the rest still runs):

- ``train``: the run (steps, seconds, device).
- ``export_<resolution>_<faces>``: export of the run's scene with the renderer's opacity for the
  automatic threshold (as `carv3d export` does on CUDA): seconds per stage, the mesh check after each
  step (``checks``; bars: final ``clean`` true, ``nonmanifold_edges`` 0, ``duplicate_faces`` 0,
  ``components`` 1), ``repairs``, UV ``charts`` and ``texel_use``, the fitted ``light``, the
  texture's front/back red (``front_back``; bar: ``relative_difference`` < 0.1), normals present in
  the GLB (``glb_normal``), the OBJ welded (``obj_pieces`` 1), the glTF validator's counts where node
  and the npm package are installed (``validator``; bar 0 / 0), and Blender's view where a Python with
  bpy is found (``blender``).

On a CUDA machine: ``python scripts/gpu_check_export.py $OUT``; read
``$OUT/gpu_check_export.json``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder for gpu_check_export.json (and the run)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny settings on the CPU (a smoke test)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps on the GPU (default 1000)")
    return parser.parse_args(argv)


def section(result: dict, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as err:  # noqa: BLE001 - every failure is recorded; the other sections still run
        result[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(result[name], dict):
        result[name]["section_seconds"] = round(time.perf_counter() - start, 2)


def train_run(out_dir: Path, smoke: bool, steps: int) -> Path:
    from carv3d.config import load_config
    from carv3d.train import train

    overrides = ["train.output_dir=" + str(out_dir), "train.run_name=red_cube", "train.turntable_frames=0",
                 "train.val_every=0", "export.at_end=false", "train.progress=false", "train.tensorboard=false"]
    if smoke:
        overrides += ["train.steps=3", "train.device=cpu"]
        cfg = load_config(REPO_ROOT / "configs" / "demo_cpu.yaml", overrides, prompt="a red cube")
    else:
        # stratified sampler: no nerfacc JIT build (~65 s on a fresh machine) inside the 4-minute budget
        overrides += [f"train.steps={steps}", "train.device=cuda", "render.sampler=stratified"]
        cfg = load_config(None, overrides, prompt="a red cube")
    return train(cfg)


def export_and_check(run_dir: Path, resolution: int, faces: int, texture: int) -> dict:
    import numpy as np
    import torch

    from carv3d.config import ExportConfig
    from carv3d.export.blender_check import find_blender_python, run_blender_check
    from carv3d.export.defects import component_labels
    from carv3d.export.from_scene import scene_opacity_fn
    from carv3d.export.pipeline import build_mesh, write_mesh
    from carv3d.export.validate import validate_gltf, validator_available
    from carv3d.saved_scene import load_scene

    device = "cuda" if torch.cuda.is_available() else "cpu"
    saved = load_scene(run_dir, device=device)
    cfg = ExportConfig(resolution=resolution, faces=faces, texture_size=texture)
    opacity = scene_opacity_fn(saved.scene, int(cfg.silhouette_size)) if device == "cuda" else None
    start = time.perf_counter()
    with torch.no_grad():
        mesh = build_mesh(saved.scene.field, cfg, nerf_opacity=opacity)
    out = {"device": device, "build_seconds": round(time.perf_counter() - start, 2), "timings": mesh.timings,
           "faces": int(len(mesh.faces)), "checks": mesh.checks, "repairs": mesh.repairs,
           "uv": None if mesh.uv_stats is None else vars(mesh.uv_stats),
           "light": None if mesh.light is None else {"direction": mesh.light.direction.tolist(),
                                                     "ambient": mesh.light.ambient, "gain": mesh.light.gain}}
    if mesh.texture is not None:
        from carv3d.export.texture import colour_facing

        front = float(colour_facing(mesh.uv_mesh, mesh.texture, (0, 0, 1))[0])
        back = float(colour_facing(mesh.uv_mesh, mesh.texture, (0, 0, -1))[0])
        out["front_back"] = {"front_red": front, "back_red": back,
                             "relative_difference": abs(front - back) / max(front, back, 1e-9)}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_mesh(mesh, tmp)
        data = files["glb"].read_bytes()  # the GLB's JSON chunk: which attributes the primitive has
        (json_length,) = struct.unpack_from("<I", data, 12)
        primitive = json.loads(data[20:20 + json_length])["meshes"][0]["primitives"][0]
        out["glb_attributes"] = sorted(primitive["attributes"])
        out["glb_normal"] = "NORMAL" in primitive["attributes"]
        corners = [line.split()[1:] for line in files["obj"].read_text().splitlines() if line.startswith("f ")]
        pos = np.array([[int(c.split("/")[0]) - 1 for c in row] for row in corners])
        out["obj_pieces"] = int(component_labels(pos, int(pos.max()) + 1)[0])
        out["obj_has_vn"] = "\nvn " in files["obj"].read_text()
        if validator_available():
            issues = validate_gltf(files["glb"])["issues"]
            out["validator"] = {"errors": issues["numErrors"], "warnings": issues["numWarnings"]}
        else:
            out["validator"] = "skipped: node or the gltf-validator npm package is missing"
        if find_blender_python() is not None:
            out["blender"] = run_blender_check([files["glb"], files["obj"], files["ply"]])
        else:
            out["blender"] = "skipped: no Python with bpy"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": " ".join(["gpu_check_export.py"] + (argv if argv is not None else sys.argv[1:])),
                    "cpu_smoke": args.cpu_smoke}
    try:
        import torch

        result["machine"] = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
                             "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    except Exception as err:  # noqa: BLE001
        result["machine"] = {"error": str(err)}
    run_holder: dict = {}

    def train_section():
        start = time.perf_counter()
        run_holder["run"] = train_run(args.out_dir / "runs", args.cpu_smoke, args.steps)
        return {"run_dir": str(run_holder["run"]), "seconds": round(time.perf_counter() - start, 1)}

    section(result, "train", train_section)
    settings = [(32, 2000, 64)] if args.cpu_smoke else [(256, 50000, 1024), (384, 20000, 1024)]
    for resolution, faces, texture in settings:
        if "run" in run_holder:
            section(result, f"export_{resolution}_{faces}",
                    lambda r=resolution, f=faces, t=texture: export_and_check(run_holder["run"], r, f, t))
    path = args.out_dir / "gpu_check_export.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
