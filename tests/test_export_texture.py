"""Export textures: the CPU rasteriser, xatlas unwrapping, albedo baking, seam dilation, and the UV
conventions of the written GLB (read back with a hand-written glTF reader, not trimesh) and OBJ."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image

from carv3d.config import ExportConfig
from carv3d.export import bake_albedo, density_grid, export_mesh, extract_isosurface, unwrap, vertex_colors
from carv3d.export.analytic import sphere_field, split_colour
from carv3d.export.raster import coverage, rasterize
from carv3d.export.texture import dilate, uv_to_pixels

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def test_rasteriser_tiles_a_rectangle_exactly():
    # Two triangles splitting a 37×23 rectangle cover exactly its 37·23 pixel centres.
    rect = np.array([[3.0, 5.0], [40.0, 5.0], [40.0, 28.0], [3.0, 28.0]])
    tris = rect[np.array([[0, 1, 2], [0, 2, 3]])]
    mask = coverage(tris, 32, 48)
    assert mask.sum() == 37 * 23 and mask[5:28, 3:40].all()


def test_rasteriser_area_and_barycentrics():
    rng = np.random.default_rng(0)
    tris = rng.uniform(0, 200, size=(50, 3, 2))
    for pixel, tri, bary in rasterize(tris, 200, 200, max_candidates=5000):  # many chunks
        centres = np.stack([pixel % 200 + 0.5, pixel // 200 + 0.5], axis=1)
        np.testing.assert_allclose(np.einsum("mk,mkd->md", bary, tris[tri]), centres, atol=1e-3)
        assert (bary >= -1e-6).all()
    big = np.array([[[10.0, 10.0], [190.0, 30.0], [60.0, 180.0]]])
    area = 0.5 * abs(np.cross(big[0, 1] - big[0, 0], big[0, 2] - big[0, 0]))
    # Pixel centres inside a convex shape: area ± half its perimeter (one pixel-width strip).
    perimeter = sum(np.linalg.norm(big[0, i] - big[0, i - 1]) for i in range(3))
    assert abs(coverage(big, 200, 200).sum() - area) < perimeter / 2


def test_dilation_takes_the_nearest_covered_texel():
    image = np.zeros((4, 8, 3), dtype=np.float32)
    covered = np.zeros((4, 8), dtype=bool)
    image[:, 0], covered[:, 0] = RED, True
    image[:, 7], covered[:, 7] = BLUE, True
    out = dilate(image, covered)
    assert (out[:, :4] == RED).all() and (out[:, 4:] == BLUE).all()


@pytest.fixture(scope="module")
def baked():
    field = sphere_field(0.5, colour=split_colour(RED, BLUE))
    vertices, faces = extract_isosurface(density_grid(field, 40), field.surface_level, field.radius)
    uv_mesh, _ = unwrap(vertices, faces, 256)
    return field, vertices, faces, uv_mesh, bake_albedo(field, uv_mesh, 256)


def test_unwrap_keeps_faces_and_packs_charts_without_overlap(baked):
    _, vertices, faces, uv_mesh, _ = baked
    assert len(uv_mesh.faces) == len(faces)
    np.testing.assert_array_equal(uv_mesh.vertices, vertices[uv_mesh.source])
    np.testing.assert_array_equal(uv_mesh.source[uv_mesh.faces], faces)  # same faces, same order
    assert uv_mesh.uv.min() >= 0 and uv_mesh.uv.max() <= 1
    # No overlap: summed per-triangle texel hits exceed the covered texels only by shared-edge ties.
    tris = uv_to_pixels(uv_mesh.uv.astype(np.float64), 256)[uv_mesh.faces]
    hits = sum(len(p) for p, _, _ in rasterize(tris, 256, 256))
    covered = coverage(tris, 256, 256).sum()
    assert covered > 0.3 * 256**2 and hits <= covered * 1.01


def test_baked_texture_matches_field_at_every_vertex(baked):
    field, _, _, uv_mesh, texture = baked
    assert texture.shape == (256, 256, 3) and texture.dtype == np.uint8
    px = uv_to_pixels(uv_mesh.uv.astype(np.float64), 256)
    col = np.clip(px[:, 0].astype(int), 0, 255)
    row = np.clip(px[:, 1].astype(int), 0, 255)
    expected = vertex_colors(field, uv_mesh.vertices)[:, :3]
    away = np.abs(uv_mesh.vertices[:, 0]) > 0.03  # off the red/blue boundary plane x = 0
    np.testing.assert_array_equal(texture[row, col][away], expected[away])


def parse_glb(path):
    """The JSON and the binary chunk of a GLB (glTF 2.0 binary container)."""
    data = path.read_bytes()
    magic, version, _ = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2
    json_len, _ = struct.unpack_from("<II", data, 12)
    gltf = json.loads(data[20:20 + json_len])
    return gltf, data[20 + json_len + 8:]


def read_glb(path):
    """A minimal glTF 2.0 binary reader: positions, TEXCOORD_0 and the base-colour image."""
    gltf, binary = parse_glb(path)

    def view_bytes(index):
        view = gltf["bufferViews"][index]
        offset = view.get("byteOffset", 0)
        return binary[offset:offset + view["byteLength"]]

    def accessor(index, width):
        acc = gltf["accessors"][index]
        assert acc["componentType"] == 5126  # float32
        raw = view_bytes(acc["bufferView"])[acc.get("byteOffset", 0):]
        return np.frombuffer(raw, dtype="<f4", count=acc["count"] * width).reshape(-1, width)

    primitive = gltf["meshes"][0]["primitives"][0]
    positions = accessor(primitive["attributes"]["POSITION"], 3)
    texcoords = accessor(primitive["attributes"]["TEXCOORD_0"], 2)
    material = gltf["materials"][primitive["material"]]
    texture = gltf["textures"][material["pbrMetallicRoughness"]["baseColorTexture"]["index"]]
    image_info = gltf["images"][texture["source"]]
    assert image_info["mimeType"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(view_bytes(image_info["bufferView"]))).convert("RGB"))
    return positions, texcoords, image, material


def test_glb_texture_follows_gltf_uv_convention(tmp_path):
    # glTF: UV (0, 0) is the image's top-left corner, v grows downward.
    field = sphere_field(0.5, colour=split_colour(RED, BLUE))
    cfg = ExportConfig(resolution=40, threshold=field.surface_level, texture_size=256)
    files = export_mesh(field, tmp_path, cfg, formats=["glb"])
    positions, texcoords, image, material = read_glb(files["glb"])
    assert material["pbrMetallicRoughness"].get("metallicFactor") == 0.0
    size = image.shape[0]
    col = np.clip((texcoords[:, 0] * size).astype(int), 0, size - 1)
    row = np.clip((texcoords[:, 1] * size).astype(int), 0, size - 1)
    expected = vertex_colors(field, positions)[:, :3]
    away = np.abs(positions[:, 0]) > 0.03
    np.testing.assert_array_equal(image[row, col][away], expected[away])


def test_textured_obj_loads_back_with_material_and_colours(tmp_path):
    field = sphere_field(0.5, colour=split_colour(RED, BLUE))
    cfg = ExportConfig(resolution=32, threshold=field.surface_level, texture_size=128)
    files = export_mesh(field, tmp_path, cfg, formats=["obj", "ply"])
    assert set(files) == {"obj", "ply", "mtl", "texture"}
    assert f"map_Kd {files['texture'].name}" in files["mtl"].read_text()
    loaded = trimesh.load(files["obj"], process=False, force="mesh")
    text = files["obj"].read_text()
    # trimesh splits the welded OBJ where a position has several texture coordinates (at UV seams).
    assert len(loaded.vertices) >= text.count("\nv ") and len(loaded.faces) == text.count("\nf ")
    colors = loaded.visual.to_color().vertex_colors[:, :3]
    away = np.abs(loaded.vertices[:, 0]) > 0.03
    np.testing.assert_array_equal(colors[away], vertex_colors(field, loaded.vertices)[away, :3])
    ply = trimesh.load(files["ply"], process=False)
    assert ply.visual.kind == "vertex" and len(ply.faces) == len(loaded.faces)


def srgb_to_linear_reference(byte):
    """IEC 61966-2-1, written out independently of carv3d.export.colors."""
    c = byte / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def test_vertex_colour_glb_is_dielectric_with_linear_colour_0(tmp_path):
    """glTF: no material means metallic 1 (renders dark), and COLOR_0 is linear, not sRGB bytes."""
    field = sphere_field(0.5, colour=split_colour((0.9, 0.5, 0.1), (0.2, 0.04, 0.7)))
    cfg = ExportConfig(resolution=24, threshold=field.surface_level, texture_size=0)
    files = export_mesh(field, tmp_path, cfg, formats=["glb", "ply"])
    gltf, binary = parse_glb(files["glb"])
    primitive = gltf["meshes"][0]["primitives"][0]
    pbr = gltf["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == 1.0  # as the textured GLB's
    assert pbr.get("baseColorFactor", [1, 1, 1, 1]) == [1, 1, 1, 1]

    def accessor(index):
        acc = gltf["accessors"][index]
        view = gltf["bufferViews"][acc["bufferView"]]
        width = {"VEC3": 3, "VEC4": 4}[acc["type"]]
        dtype = {5126: "<f4", 5123: "<u2"}[acc["componentType"]]  # float or normalised uint16: no banding
        raw = binary[view.get("byteOffset", 0) + acc.get("byteOffset", 0):]
        values = np.frombuffer(raw, dtype=dtype, count=acc["count"] * width).reshape(-1, width)
        return values.astype(np.float64) / (65535.0 if dtype == "<u2" else 1.0)

    positions = accessor(primitive["attributes"]["POSITION"])
    colour = accessor(primitive["attributes"]["COLOR_0"])[:, :3]
    srgb = vertex_colors(field, positions.astype(np.float32))[:, :3]
    expected = np.vectorize(srgb_to_linear_reference)(srgb.astype(np.float64))
    np.testing.assert_allclose(colour, expected, atol=1e-3)
    assert colour.max() - 1 < 1e-6 and (np.abs(colour - srgb / 255.0) > 0.05).any()  # really converted
    ply = trimesh.load(files["ply"], process=False)  # PLY keeps sRGB bytes, as its viewers expect
    np.testing.assert_array_equal(np.asarray(ply.visual.vertex_colors)[:, :3],
                                  vertex_colors(field, np.asarray(ply.vertices, dtype=np.float32))[:, :3])
