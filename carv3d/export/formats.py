"""File writers: GLB (binary glTF 2.0), PLY, OBJ (+ MTL + PNG). Every file is written atomically.

Orientation and scale: positions are written as they are in the scene — +Y up, the object's front
facing +Z, centred at the origin, 1 scene unit = 1 glTF unit (a metre, by glTF's convention); with
the default scene radius 1 the object fits in a 2 m cube. Faces wind counter-clockwise seen from
outside (glTF's front face).

- GLB: with a texture, a PBR metallic-roughness material whose baseColorTexture is the embedded PNG
  (metallic 0, roughness 1: the baked albedo, unlit-looking); otherwise per-vertex ``COLOR_0``
  (float, linear: converted from the sRGB albedo) with the same material minus the texture. Without
  a material glTF's default one applies (metallic 1), which renders nearly black.
- PLY: binary, per-vertex RGBA (uchar, sRGB as viewers expect).
- OBJ: with a texture, ``mtllib`` → ``<stem>.mtl`` whose ``map_Kd`` is ``<stem>_albedo.png`` and
  ``f v/vt`` faces; otherwise ``v x y z r g b`` vertex colours (floats in [0, 1]).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import trimesh
from PIL import Image

from carv3d.export.cleanup import make_mesh
from carv3d.export.colors import srgb_to_linear
from carv3d.io import atomic_path, atomic_write_bytes, atomic_write_text

HEADER = "carv3d mesh: +Y up, front faces +Z, centred at the origin, 1 unit = 1 scene unit"


def obj_sidecars(obj_path: Path) -> tuple[Path, Path]:
    """The MTL and PNG files that go with a textured OBJ: ``<stem>.mtl``, ``<stem>_albedo.png``."""
    return obj_path.with_suffix(".mtl"), obj_path.with_name(obj_path.stem + "_albedo.png")


def textured_mesh(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray) -> trimesh.Trimesh:
    """A trimesh with UVs and a PBR material whose base colour is ``texture`` ((S, S, 3) uint8)."""
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=np.asarray(uv, dtype=np.float64), material=material)
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


def _label_asset(tree: dict) -> None:
    tree.setdefault("asset", {})["generator"] = "carv3d"
    tree["asset"]["extras"] = {"carv3d": HEADER}


MATERIAL = {"name": "albedo", "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                                                      "metallicFactor": 0.0, "roughnessFactor": 1.0},
            "doubleSided": False}  # the textured GLB's material (see textured_mesh), without the texture


def vertex_color_glb(vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray] = None) -> bytes:
    """A GLB of one primitive with float32 linear ``COLOR_0`` and :data:`MATERIAL`.

    Written by hand because trimesh stores ``COLOR_0`` as the sRGB bytes and adds no material;
    linear colours in 8 bits would band in the darks, so they are float32 (VEC3: the mesh is opaque).
    """
    arrays = [(np.asarray(faces, dtype="<u4").reshape(-1), "SCALAR", 5125, 34963),  # uint32 indices
              (np.asarray(vertices, dtype="<f4").reshape(-1, 3), "VEC3", 5126, 34962)]
    if colors is not None:
        arrays.append((srgb_to_linear(np.asarray(colors)[:, :3]).astype("<f4"), "VEC3", 5126, 34962))
    accessors, views, chunks, offset = [], [], [], 0
    for data, kind, component, target in arrays:
        raw = data.tobytes() + b"\0" * (-data.nbytes % 4)
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": data.nbytes, "target": target})
        flat = data.reshape(len(data), -1)
        accessors.append({"bufferView": len(views) - 1, "componentType": component, "count": len(data),
                          "type": kind, "min": flat.min(axis=0).tolist(), "max": flat.max(axis=0).tolist()})
        chunks.append(raw)
        offset += len(raw)
    attributes = {"POSITION": 1, **({"COLOR_0": 2} if colors is not None else {})}
    tree = {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"name": "mesh", "mesh": 0}],
            "meshes": [{"name": "mesh", "primitives": [{"attributes": attributes, "indices": 0, "mode": 4,
                                                         "material": 0}]}],
            "materials": [MATERIAL], "accessors": accessors, "bufferViews": views, "buffers": [{"byteLength": offset}]}
    _label_asset(tree)
    text = json.dumps(tree, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)  # the JSON chunk is padded with spaces, the BIN chunk with zeros
    binary = b"".join(chunks)
    return b"".join([struct.pack("<4sII", b"glTF", 2, 28 + len(text) + len(binary)),
                     struct.pack("<I4s", len(text), b"JSON"), text, struct.pack("<I4s", len(binary), b"BIN\0"), binary])


def write_glb(path: Path, vertices: np.ndarray, faces: np.ndarray, *, colors: Optional[np.ndarray] = None,
              uv: Optional[np.ndarray] = None, texture: Optional[np.ndarray] = None) -> Path:
    """Write a binary glTF with either a texture (``uv`` + ``texture``) or vertex ``colors`` (V, 4) uint8 sRGB."""
    if texture is not None and uv is not None:
        mesh = textured_mesh(vertices, faces, uv, texture)
        data = trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), tree_postprocessor=_label_asset)
    else:
        data = vertex_color_glb(vertices, faces, colors)
    atomic_write_bytes(path, data)
    return Path(path)


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray] = None) -> Path:
    """Write a binary PLY with per-vertex RGBA colours."""
    mesh = make_mesh(vertices, faces, colors)
    atomic_write_bytes(path, trimesh.exchange.ply.export_ply(mesh, encoding="binary"))
    return Path(path)


def _rows(fmt: str, array: np.ndarray) -> str:
    buffer = io.StringIO()
    np.savetxt(buffer, array, fmt=fmt)
    return buffer.getvalue()


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, *, colors: Optional[np.ndarray] = None,
              uv: Optional[np.ndarray] = None, texture: Optional[np.ndarray] = None) -> list[Path]:
    """Write an OBJ; textured (+ MTL + PNG, written first) or with vertex colours.

    Returns:
        The files written: ``[obj]`` or ``[png, mtl, obj]``.
    """
    path = Path(path)
    lines = [f"# {HEADER}\n"]
    written: list[Path] = []
    one_based = np.asarray(faces, dtype=np.int64) + 1
    if texture is not None and uv is not None:
        mtl_path, png_path = obj_sidecars(path)
        with atomic_path(png_path) as tmp:
            Image.fromarray(texture).save(tmp, format="PNG")
        atomic_write_text(mtl_path, "# carv3d material: baked albedo\nnewmtl albedo\nKa 0 0 0\n"
                                    "Kd 1 1 1\nKs 0 0 0\nd 1\nillum 1\n" f"map_Kd {png_path.name}\n")
        written += [png_path, mtl_path]
        lines += [f"mtllib {mtl_path.name}\n", _rows("v %.7g %.7g %.7g", vertices),
                  _rows("vt %.7g %.7g", uv), "usemtl albedo\n",
                  _rows("f %d/%d %d/%d %d/%d", np.repeat(one_based, 2, axis=1))]
    else:
        if colors is not None:
            rgb = np.asarray(colors)[:, :3].astype(np.float64) / 255.0
            lines.append(_rows("v %.7g %.7g %.7g %.6f %.6f %.6f", np.concatenate([vertices, rgb], axis=1)))
        else:
            lines.append(_rows("v %.7g %.7g %.7g", vertices))
        lines.append(_rows("f %d %d %d", one_based))
    atomic_write_text(path, "".join(lines))
    return written + [path]
