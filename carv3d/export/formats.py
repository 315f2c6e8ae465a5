"""File writers: GLB (binary glTF 2.0), PLY, OBJ (+ MTL + PNG). Every file is written atomically.

Orientation and scale: positions are written as they are in the scene — +Y up, the object's front
facing +Z, centred at the origin, 1 scene unit = 1 glTF unit (a metre, by glTF's convention); with
the default scene radius 1 the object fits in a 2 m cube. Faces wind counter-clockwise seen from
outside (glTF's front face).

Normals are the shading normals of the welded mesh (:mod:`carv3d.export.normals`): one per smoothing
group, so the surface shades smooth and splits only at creases.

- GLB: ``POSITION``, ``NORMAL`` and, with a texture, ``TEXCOORD_0`` and a PBR metallic-roughness
  material whose baseColorTexture is the embedded PNG (metallic 0, roughness 1: the baked albedo);
  otherwise per-vertex ``COLOR_0`` (float, linear: converted from the sRGB albedo) with the same
  material minus the texture. Without a material glTF's default one applies (metallic 1), which
  renders nearly black. glTF has one index per vertex, so a vertex is split where its UV or its
  normal differs (UV seams, creases) and nowhere else.
- OBJ: welded. Positions (``v``), texture coordinates (``vt``) and normals (``vn``) are separate
  lists and every face corner indexes each (``f v/vt/vn``), so a vertex on a UV seam is one ``v``
  with two ``vt``: the mesh imports as one connected piece. With a texture, ``mtllib`` →
  ``<stem>.mtl`` whose ``map_Kd`` is ``<stem>_albedo.png``; without, ``v x y z r g b`` vertex colours.
- PLY: **+Z up** (the convention of Blender, slicers and most PLY tools; a PLY has no axis field):
  the scene's (x, y, z) is written as (x, −z, y), so the front faces −Y (Blender's front view).
  Binary, per vertex ``x y z nx ny nz red green blue`` (uchar sRGB colours, the standard names that
  Blender and MeshLab read as vertex colours).
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

from carv3d.export.colors import srgb_to_linear
from carv3d.io import atomic_path, atomic_write_bytes, atomic_write_text

HEADER = "carv3d mesh: +Y up, front faces +Z, centred at the origin, 1 unit = 1 scene unit"
PLY_HEADER = "carv3d mesh: +Z up, front faces -Y, centred at the origin, 1 unit = 1 scene unit"


def obj_sidecars(obj_path: Path) -> tuple[Path, Path]:
    """The MTL and PNG files that go with a textured OBJ: ``<stem>.mtl``, ``<stem>_albedo.png``."""
    return obj_path.with_suffix(".mtl"), obj_path.with_name(obj_path.stem + "_albedo.png")


def split_vertices(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One output vertex per distinct tuple of per-corner indices (glTF has one index per vertex).

    Args:
        keys: (F, 3) int arrays, e.g. the corner's position or UV vertex and its normal.

    Returns:
        first: (N,) flat corner index (3f + i) of one corner of each output vertex;
        faces: (F, 3) int64 faces over the output vertices.
    """
    stacked = np.stack([np.asarray(k, dtype=np.int64).reshape(-1) for k in keys], axis=1)
    _, first, inverse = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1, 3)


def textured_mesh(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, texture: np.ndarray,
                  normals: Optional[np.ndarray] = None) -> trimesh.Trimesh:
    """A trimesh with UVs, optional per-vertex normals and a PBR material whose base colour is ``texture``."""
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=np.asarray(uv, dtype=np.float64), material=material)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
    if normals is not None:
        mesh.vertex_normals = np.asarray(normals, dtype=np.float64)
    return mesh


def _label_asset(tree: dict) -> None:
    tree.setdefault("asset", {})["generator"] = "carv3d"
    tree["asset"]["extras"] = {"carv3d": HEADER}


MATERIAL = {"name": "albedo", "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                                                      "metallicFactor": 0.0, "roughnessFactor": 1.0},
            "doubleSided": False}  # the textured GLB's material (see textured_mesh), without the texture


def vertex_color_glb(vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray] = None,
                     normals: Optional[np.ndarray] = None) -> bytes:
    """A GLB of one primitive with float32 ``NORMAL``, linear ``COLOR_0`` and :data:`MATERIAL`.

    Written by hand because trimesh stores ``COLOR_0`` as the sRGB bytes and adds no material;
    linear colours in 8 bits would band in the darks, so they are float32 (VEC3: the mesh is opaque).
    """
    arrays = [(np.asarray(faces, dtype="<u4").reshape(-1), "SCALAR", 5125, 34963),  # uint32 indices
              (np.asarray(vertices, dtype="<f4").reshape(-1, 3), "VEC3", 5126, 34962)]
    names = ["POSITION"]
    if normals is not None:
        arrays.append((np.asarray(normals, dtype="<f4").reshape(-1, 3), "VEC3", 5126, 34962))
        names.append("NORMAL")
    if colors is not None:
        names.append("COLOR_0")
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
    attributes = {name: index for index, name in enumerate(names, start=1)}
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
              uv: Optional[np.ndarray] = None, texture: Optional[np.ndarray] = None,
              normals: Optional[np.ndarray] = None) -> Path:
    """Write a binary glTF with either a texture (``uv`` + ``texture``) or vertex ``colors`` (V, 4) uint8 sRGB.

    All per-vertex arrays (``uv``, ``normals``, ``colors``) index like ``vertices``; a caller splits
    vertices first where a corner's UV or normal differs (:func:`split_vertices`).
    """
    if texture is not None and uv is not None:
        mesh = textured_mesh(vertices, faces, uv, texture, normals)
        data = trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), include_normals=normals is not None,
                                                tree_postprocessor=_label_asset)
    else:
        data = vertex_color_glb(vertices, faces, colors, normals)
    atomic_write_bytes(path, data)
    return Path(path)


# Scene frame (+Y up, front +Z) → PLY frame (+Z up, front −Y): a rotation by +90° about x.
PLY_FROM_SCENE = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray, colors: Optional[np.ndarray] = None,
              normals: Optional[np.ndarray] = None) -> Path:
    """Write a binary little-endian PLY, +Z up (:data:`PLY_FROM_SCENE`), with normals and RGB colours.

    Args:
        vertices: (V, 3) scene positions (+Y up); rotated to +Z up here.
        faces: (F, 3) counter-clockwise faces (a rotation keeps the winding).
        colors: (V, 3 or 4) uint8 sRGB; written as ``red green blue``.
        normals: (V, 3) unit vertex normals in the scene frame; rotated with the positions.
    """
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rows = np.zeros(len(vertices), dtype=fields)
    xyz = np.asarray(vertices, dtype=np.float64) @ PLY_FROM_SCENE.T
    rows["x"], rows["y"], rows["z"] = xyz.T
    if normals is not None:
        rows["nx"], rows["ny"], rows["nz"] = (np.asarray(normals, dtype=np.float64) @ PLY_FROM_SCENE.T).T
    if colors is not None:
        rows["red"], rows["green"], rows["blue"] = np.asarray(colors)[:, :3].T
    face_rows = np.zeros(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face_rows["n"], face_rows["v"] = 3, faces
    names = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"comment {PLY_HEADER}",
              f"element vertex {len(vertices)}", *[f"property {names[t]} {n}" for n, t in fields],
              f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    atomic_write_bytes(path, ("\n".join(header) + "\n").encode() + rows.tobytes() + face_rows.tobytes())
    return Path(path)


def _rows(fmt: str, array: np.ndarray) -> str:
    buffer = io.StringIO()
    np.savetxt(buffer, array, fmt=fmt)
    return buffer.getvalue()


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, *, colors: Optional[np.ndarray] = None,
              uv: Optional[np.ndarray] = None, uv_faces: Optional[np.ndarray] = None,
              texture: Optional[np.ndarray] = None, normals: Optional[np.ndarray] = None,
              normal_faces: Optional[np.ndarray] = None) -> list[Path]:
    """Write a welded OBJ; textured (+ MTL + PNG, written first) or with vertex colours.

    Args:
        vertices: (V, 3) welded positions; ``faces`` (F, 3) index them.
        colors: (V, 3 or 4) uint8 vertex colours (without a texture).
        uv, uv_faces: (T, 2) texture coordinates (v up) and (F, 3) each corner's index into them.
        texture: (S, S, 3) uint8 albedo.
        normals, normal_faces: (N, 3) unit normals and (F, 3) each corner's index into them.

    Returns:
        The files written: ``[obj]`` or ``[png, mtl, obj]``.
    """
    path = Path(path)
    lines = [f"# {HEADER}\n"]
    written: list[Path] = []
    textured = texture is not None and uv is not None and uv_faces is not None
    corners = [np.asarray(faces, dtype=np.int64) + 1]
    if textured:
        mtl_path, png_path = obj_sidecars(path)
        with atomic_path(png_path) as tmp:
            Image.fromarray(texture).save(tmp, format="PNG")
        atomic_write_text(mtl_path, "# carv3d material: baked albedo\nnewmtl albedo\nKa 0 0 0\n"
                                    "Kd 1 1 1\nKs 0 0 0\nd 1\nillum 1\n" f"map_Kd {png_path.name}\n")
        written += [png_path, mtl_path]
        lines += [f"mtllib {mtl_path.name}\n", _rows("v %.7g %.7g %.7g", vertices)]
    elif colors is not None:
        rgb = np.asarray(colors)[:, :3].astype(np.float64) / 255.0
        lines.append(_rows("v %.7g %.7g %.7g %.6f %.6f %.6f", np.concatenate([vertices, rgb], axis=1)))
    else:
        lines.append(_rows("v %.7g %.7g %.7g", vertices))
    if textured:
        lines.append(_rows("vt %.7g %.7g", uv))
        corners.append(np.asarray(uv_faces, dtype=np.int64) + 1)
    with_normals = normals is not None and normal_faces is not None
    if with_normals:
        lines.append(_rows("vn %.6f %.6f %.6f", normals))
        corners.append(np.asarray(normal_faces, dtype=np.int64) + 1)
    if textured:
        lines.append("usemtl albedo\n")
    lines.append("s 1\n")  # smoothing on: readers without vn (or that ignore it) shade smooth too
    corner = {(False, False): "%d", (True, False): "%d/%d", (False, True): "%d//%d", (True, True): "%d/%d/%d"}
    fmt = corner[(textured, with_normals)]
    interleaved = np.stack(corners, axis=2).reshape(len(corners[0]), -1)  # (F, 3·k): v, vt, vn per corner
    lines.append(_rows("f " + " ".join([fmt] * 3), interleaved))
    atomic_write_text(path, "".join(lines))
    return written + [path]


def scene_frame_vertices(path: Path, vertices: np.ndarray) -> np.ndarray:
    """Vertices of a mesh file read by another library, in the scene frame (+Y up).

    carv3d's PLY is +Z up (its header comment says so, :data:`PLY_HEADER`): those vertices are turned
    back with the inverse rotation; every other file is in the scene frame already.
    """
    path = Path(path)
    if path.suffix.lower() == ".ply":
        with open(path, "rb") as handle:
            head = handle.read(512)
        if PLY_HEADER.encode() in head:
            return np.asarray(vertices, dtype=np.float64) @ PLY_FROM_SCENE  # R⁻¹ = Rᵀ: rows · R
    return np.asarray(vertices)
