"""Open exported meshes in Blender itself (``bpy``, Blender as a Python module) and report what an artist sees.

Run as a script with a Python that has ``bpy`` (``pip install carv3d[blender]``, or the separate
environment ``make test-blender`` builds, since bpy 5 pins numpy < 2)::

    python carv3d/export/blender_check.py --json report.json mesh.glb mesh.obj mesh.ply

It imports nothing from carv3d (so it runs in an environment with bpy alone). For each file, in a
fresh empty Blender scene, it imports the file with Blender's own importer and default options
(GLB additionally once more with "Merge Vertices", the importer's option that joins the vertices
glTF had to split at UV seams and creases) and reports, per file:

- ``objects``: mesh objects created; ``faces``, ``vertices``;
- ``pieces``: connected pieces (vertices joined by edges) — an OBJ whose UV seams tore the surface
  apart imports as many pieces;
- ``nonmanifold_edges``: edges without exactly two faces (Blender's "Select Non-Manifold": holes and
  fins), ``nonmanifold_vertices``;
- ``smooth_faces``: fraction of faces shaded smooth; ``custom_normals``: the file's normals were kept;
- ``base_color_image``: the image whose texture node feeds the Principled BSDF's Base Color (None
  when nothing does), ``color_attributes``: vertex-colour layers;
- ``dimensions``: the object's world-space size along Blender's X, Y, Z (Z is up in Blender): a mesh
  that opens upright has the scene's height (its +Y extent) along Blender's Z.

The importers are called through ``bpy.ops`` (``import_scene.gltf``, ``wm.obj_import``,
``wm.ply_import``), as the File > Import menu does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

ENV = "CARV3D_BLENDER_PYTHON"  # a Python interpreter with bpy installed


def _reset(bpy) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)


def _import(bpy, path: Path, merge_vertices: bool = False) -> None:
    suffix = path.suffix.lower()
    if suffix in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=str(path), merge_vertices=merge_vertices)
    elif suffix == ".obj":
        bpy.ops.wm.obj_import(filepath=str(path))
    elif suffix == ".ply":
        bpy.ops.wm.ply_import(filepath=str(path))
    else:
        raise ValueError(f"cannot import {path}: expected .glb, .gltf, .obj or .ply")


def _pieces(n_vertices: int, edges: list) -> int:
    """Connected components of the vertex graph (union-find with path halving)."""
    parent = list(range(n_vertices))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    return len({find(v) for v in range(n_vertices)})


def _base_color_image(material) -> object:
    """The image of the texture node linked (directly or through other nodes) to Base Color, or None."""
    if material is None or material.node_tree is None:
        return None
    for node in material.node_tree.nodes:
        if node.type != "BSDF_PRINCIPLED":
            continue
        socket = node.inputs.get("Base Color")
        stack = [link.from_node for link in socket.links] if socket is not None else []
        seen = set()
        while stack:
            upstream = stack.pop()
            if upstream.name in seen:
                continue
            seen.add(upstream.name)
            if upstream.type == "TEX_IMAGE" and upstream.image is not None:
                return upstream.image
            for socket_in in upstream.inputs:
                stack += [link.from_node for link in socket_in.links]
    return None


def inspect_object(bpy, obj) -> dict:
    """The report of one imported mesh object (module docstring)."""
    import bmesh

    mesh = obj.data
    bm = bmesh.new()
    bm.from_mesh(mesh)
    nonmanifold_edges = sum(1 for e in bm.edges if not e.is_manifold)
    nonmanifold_vertices = sum(1 for v in bm.verts if not v.is_manifold)
    bm.free()
    edges = [tuple(e.vertices) for e in mesh.edges]
    material = obj.active_material
    image = _base_color_image(material)
    smooth = sum(1 for p in mesh.polygons if p.use_smooth)
    return {
        "name": obj.name,
        "faces": len(mesh.polygons),
        "vertices": len(mesh.vertices),
        "pieces": _pieces(len(mesh.vertices), edges),
        "nonmanifold_edges": nonmanifold_edges,
        "nonmanifold_vertices": nonmanifold_vertices,
        "smooth_faces": smooth / max(len(mesh.polygons), 1),
        "custom_normals": bool(getattr(mesh, "has_custom_normals", False)),
        "material": None if material is None else material.name,
        "base_color_image": None if image is None else {"name": image.name, "size": list(image.size)},
        "color_attributes": [a.name for a in mesh.color_attributes],
        "dimensions": _world_size(obj),
    }


def _world_size(obj) -> list:
    """Extent of the object's bounding box in world space (importers may rotate the object, not the data)."""
    from mathutils import Vector

    corners = [obj.matrix_world @ Vector(corner) for corner in obj.bound_box]
    return [round(max(c[i] for c in corners) - min(c[i] for c in corners), 6) for i in range(3)]


def check_file(path: Path, merge_vertices: bool = False) -> dict:
    """Import one file into an empty scene and report its mesh objects."""
    import bpy

    _reset(bpy)
    _import(bpy, path, merge_vertices)
    objects = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    return {"file": str(path), "merge_vertices": merge_vertices, "objects": len(objects),
            "meshes": [inspect_object(bpy, o) for o in objects], "blender": bpy.app.version_string}


def find_blender_python() -> Optional[str]:
    """A Python that can ``import bpy``: ``$CARV3D_BLENDER_PYTHON``, then the checkout's ``.venv-blender``
    (``make test-blender``), then this interpreter; None when there is none."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    local = Path(__file__).resolve().parents[2] / ".venv-blender" / "bin" / "python"
    if local.is_file():
        return str(local)
    if importlib.util.find_spec("bpy") is not None:
        return sys.executable
    return None


def run_blender_check(files: Sequence[Path], python: Optional[str] = None, timeout_s: float = 600.0) -> list:
    """Run this file as a script under a bpy Python (:func:`find_blender_python`) and return its reports.

    Raises:
        RuntimeError: no Python with bpy was found, or the check failed (its stderr is in the message).
    """
    python = python or find_blender_python()
    if python is None:
        raise RuntimeError(f"no Python with bpy: run `make test-blender` (builds .venv-blender) or set {ENV}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        done = subprocess.run([python, str(Path(__file__).resolve()), "--json", str(out), *map(str, files)],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the Blender check failed: {done.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    out = None
    if argv[0] == "--json":  # Blender's importers print to stdout: the report goes to a file
        out, argv = Path(argv[1]), argv[2:]
    reports = []
    for name in argv:
        path = Path(name)
        reports.append(check_file(path))
        if path.suffix.lower() in (".glb", ".gltf"):
            reports.append(check_file(path, merge_vertices=True))
    text = json.dumps(reports, indent=1) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
