"""Export, part 1: density grid, marching cubes, floaters, vertex colours, files and errors.

Geometry is checked against closed forms (a sphere's area and volume, a half-box's volume); colours
against the analytic colour field; files by loading them back with trimesh.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from carv3d.config import ExportConfig
from carv3d.export.formats import PLY_FROM_SCENE
from carv3d.errors import ConfigError, DiskFullError, OutputPathError, UserError
from carv3d.export import (EmptyMeshError, density_grid, export_mesh, extract_isosurface, make_mesh,
                           remove_small_components, vertex_colors)
from carv3d.export.analytic import AnalyticField, Shape, box_sdf, sphere_field, sphere_sdf, split_colour
from carv3d.export.cleanup import component_labels, face_areas
from carv3d.export.isosurface import signed_volume
from carv3d.export.pipeline import parse_threshold

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


class LinearField:
    """σ(x) = x + 2y + 3z: its node values are known exactly."""

    radius = 1.5

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] + 2 * x[:, 1] + 3 * x[:, 2]


def test_density_grid_samples_nodes_including_box_faces():
    field = LinearField()
    grid = density_grid(field, 9, chunk=50)  # chunk smaller than a slab: exercises batching
    axis = np.linspace(-1.5, 1.5, 9)
    expected = axis[:, None, None] + 2 * axis[None, :, None] + 3 * axis[None, None, :]
    assert grid.shape == (9, 9, 9) and grid.dtype == np.float32
    np.testing.assert_allclose(grid, expected, atol=1e-5)


def test_sphere_area_and_volume_match_closed_forms_at_resolution_64():
    # Marching cubes' chords cut the sphere by the sagitta h²/(8ρ) ≈ 2.5e-4 at h = 2/63, ρ = 0.5
    # (relative 5e-4), so area and volume are within ~0.3%; 1% leaves room for grid alignment.
    rho = 0.5
    field = sphere_field(rho)
    vertices, faces = extract_isosurface(density_grid(field, 64), field.surface_level, field.radius)
    area = face_areas(vertices, faces).sum()
    volume = signed_volume(vertices, faces)
    assert area == pytest.approx(4 * math.pi * rho**2, rel=0.01)
    assert volume == pytest.approx(4 / 3 * math.pi * rho**3, rel=0.01)
    assert make_mesh(vertices, faces).is_watertight


def test_faces_point_outward():
    field = sphere_field(0.5, centre=(0.1, -0.05, 0.0))
    vertices, faces = extract_isosurface(density_grid(field, 40), field.surface_level, field.radius)
    assert signed_volume(vertices, faces) > 0
    v = vertices[faces].astype(np.float64)
    normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    outward = v.mean(axis=1) - np.array([0.1, -0.05, 0.0])
    assert (np.einsum("fi,fi->f", normals, outward) > 0).all()  # every face, not just on average


def test_surface_leaving_the_box_is_closed_at_the_box():
    # The solid x < 0.2 fills the box up to its faces: the mesh is the box part, closed, volume 1.2·2·2.
    field = AnalyticField([Shape(lambda x: x[:, 0] - 0.2)], radius=1.0, softness=0.05)
    vertices, faces = extract_isosurface(density_grid(field, 33), field.surface_level, field.radius)
    mesh = make_mesh(vertices, faces)
    assert mesh.is_watertight
    assert np.abs(vertices).max() <= 1.0 + 1e-6
    assert signed_volume(vertices, faces) == pytest.approx(1.2 * 2 * 2, rel=0.01)


def test_small_floater_is_removed_and_main_component_kept():
    main = Shape(lambda x: sphere_sdf(x, (0.0, 0.0, 0.0), 0.5))
    floater = Shape(lambda x: sphere_sdf(x, (0.75, 0.75, 0.75), 0.08))  # area ratio (0.08/0.5)² = 2.6%
    field = AnalyticField([main, floater], softness=0.02)
    vertices, faces = extract_isosurface(density_grid(field, 64), field.surface_level, field.radius)
    mesh = make_mesh(vertices, faces)
    assert component_labels(faces, len(vertices))[0] == 2
    cleaned = remove_small_components(mesh, min_fraction=0.05)
    assert component_labels(np.asarray(cleaned.faces), len(cleaned.vertices))[0] == 1
    assert cleaned.volume == pytest.approx(4 / 3 * math.pi * 0.5**3, rel=0.01)
    assert np.linalg.norm(cleaned.vertices, axis=1).max() < 0.52  # nothing left near the floater
    kept_all = remove_small_components(mesh, min_fraction=0.01)  # 2.6% > 1%: the floater stays
    assert component_labels(np.asarray(kept_all.faces), len(kept_all.vertices))[0] == 2


def test_vertex_colors_of_two_colour_field():
    field = sphere_field(0.5, colour=split_colour(RED, BLUE))
    vertices, faces = extract_isosurface(density_grid(field, 48), field.surface_level, field.radius)
    colors = vertex_colors(field, vertices)
    assert colors.shape == (len(vertices), 4) and colors.dtype == np.uint8
    left, right = vertices[:, 0] < 0, vertices[:, 0] >= 0
    assert left.sum() > 100 and right.sum() > 100
    assert (colors[left] == [255, 0, 0, 255]).all()
    assert (colors[right] == [0, 0, 255, 255]).all()


def test_glb_ply_obj_load_back_with_same_counts_and_colours(tmp_path):
    field = sphere_field(0.5, colour=split_colour(RED, BLUE))
    cfg = ExportConfig(resolution=32, threshold=field.surface_level, texture_size=0, faces=0)
    files = export_mesh(field, tmp_path, cfg)
    assert set(files) == {"glb", "ply", "obj"}
    reference = make_mesh(*extract_isosurface(density_grid(field, 32), field.surface_level, field.radius))
    expected_colors = vertex_colors(field, np.asarray(reference.vertices))
    for fmt, path in files.items():
        # The GLB has a material besides COLOR_0; trimesh then drops the colours unless told to skip it.
        loaded = trimesh.load(path, process=False, force="mesh", **({"skip_materials": True} if fmt == "glb" else {}))
        assert (len(loaded.vertices), len(loaded.faces)) == (len(reference.vertices), len(reference.faces)), fmt
        # PLY is written +Z up: the scene's (x, y, z) is (x, −z, y) there.
        expected = reference.vertices @ PLY_FROM_SCENE.T if fmt == "ply" else reference.vertices
        np.testing.assert_allclose(loaded.vertices, expected, atol=1e-5, err_msg=fmt)
        np.testing.assert_array_equal(loaded.faces, reference.faces, err_msg=fmt)
        assert loaded.visual.kind == "vertex", fmt
        np.testing.assert_array_equal(np.asarray(loaded.visual.vertex_colors), expected_colors, err_msg=fmt)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_threshold_above_every_density_is_a_clear_error(tmp_path):
    field = sphere_field(0.5, max_density=80.0)
    with pytest.raises(EmptyMeshError) as info:
        export_mesh(field, tmp_path, ExportConfig(resolution=16, threshold=500.0, texture_size=0))
    message = str(info.value)
    assert "500" in message and "80" in message and "auto" in message  # the level, the max found, a fix
    assert isinstance(info.value, UserError)
    assert not list(tmp_path.iterdir())


def test_existing_target_is_not_overwritten_without_overwrite(tmp_path):
    field = sphere_field(0.5)
    (tmp_path / "mesh.ply").write_text("keep me")
    cfg = ExportConfig(resolution=16, threshold=field.surface_level, texture_size=0)
    with pytest.raises(OutputPathError, match="overwrite"):
        export_mesh(field, tmp_path, cfg)
    assert (tmp_path / "mesh.ply").read_text() == "keep me"
    assert not (tmp_path / "mesh.glb").exists()  # checked before anything was written
    files = export_mesh(field, tmp_path, cfg, overwrite=True)
    assert len(trimesh.load(files["ply"], process=False).faces) > 0


@pytest.mark.parametrize("formats, texture_size, pattern", [
    (["glb", "fbx"], 0, "fbx"),
    (["glb"], 1000, "power of two"),
])
def test_bad_options_are_config_errors(tmp_path, formats, texture_size, pattern):
    cfg = ExportConfig(resolution=16, texture_size=texture_size)
    with pytest.raises(ConfigError, match=pattern):
        export_mesh(sphere_field(0.5), tmp_path, cfg, formats=formats)
    assert not list(tmp_path.iterdir())


def test_threshold_parsing():
    assert parse_threshold("auto") == "auto" and parse_threshold("AUTO ") == "auto"
    assert parse_threshold("12.5") == 12.5 and parse_threshold(7) == 7.0
    with pytest.raises(ConfigError, match="auto"):
        parse_threshold("high")


def test_coarse_to_fine_grid_gives_the_dense_grids_mesh():
    from carv3d.export.sparse_grid import refine_grid

    shapes = [Shape(lambda x: box_sdf(x, (0.0, -0.1, 0.0), (0.35, 0.2, 0.3))),
              Shape(lambda x: sphere_sdf(x, (0.15, 0.25, 0.0), 0.2))]
    field = AnalyticField(shapes, softness=0.02)
    level = 20.0
    dense = density_grid(field, 97)
    fine, fraction = refine_grid(field, density_grid(field, 25), 97, level)
    assert fraction < 0.25  # only a shell around the surface was evaluated
    v_dense, f_dense = extract_isosurface(dense, level, field.radius)
    v_fine, f_fine = extract_isosurface(fine, level, field.radius)
    np.testing.assert_array_equal(f_fine, f_dense)
    np.testing.assert_allclose(v_fine, v_dense, atol=1e-6)


def test_export_with_coarse_to_fine_matches_sphere_volume(tmp_path):
    field = sphere_field(0.5)
    cfg = ExportConfig(resolution=96, refine_from=32, threshold=field.surface_level, texture_size=0, faces=0,
                       formats=["ply"])
    mesh = trimesh.load(export_mesh(field, tmp_path, cfg)["ply"], process=False)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.5**3, rel=0.005)


class MustNotBeSampled:
    """A field that fails the test if the exporter starts the slow work before its checks."""

    radius = 1.0

    def density(self, x):
        raise AssertionError("the field was sampled before the options/targets were checked")

    __call__ = density


@pytest.mark.parametrize("faces", [1, 2, 3, -5])
def test_face_budget_below_a_closed_mesh_is_a_config_error(tmp_path, faces):
    # Old: 1 crashed in xatlas/the PLY writer (after writing mesh.glb), 2 and 3 wrote a flat sliver.
    cfg = ExportConfig(resolution=16, threshold=1.0, texture_size=0, faces=faces)
    with pytest.raises(ConfigError, match="at least 4 faces"):
        export_mesh(MustNotBeSampled(), tmp_path, cfg)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("resolution", [100000, 1025, 4])
def test_resolution_out_of_range_is_a_config_error_naming_the_limit(tmp_path, resolution):
    # Old: 100000 tried to allocate 4·10¹⁵ bytes after sampling the coarse grid.
    cfg = ExportConfig(resolution=resolution, threshold=1.0, texture_size=0)
    with pytest.raises(ConfigError, match="use 8 to 1024") as info:
        export_mesh(MustNotBeSampled(), tmp_path, cfg)
    assert str(resolution) in str(info.value)
    assert not list(tmp_path.iterdir())


def test_unusable_output_folder_is_an_output_path_error_before_any_work(tmp_path):
    blocker = tmp_path / "config.yaml"
    blocker.write_text("a file")
    cfg = ExportConfig(resolution=16, threshold=1.0, texture_size=0)
    with pytest.raises(OutputPathError, match="cannot create the export folder") as info:
        export_mesh(MustNotBeSampled(), blocker / "sub", cfg)  # old: NotADirectoryError after the work
    assert "--out" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_cleanup_leaving_too_few_faces_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    import carv3d.export.pipeline as pipeline

    empty = (np.zeros((0, 3), dtype=np.float32), np.zeros((0, 3), dtype=np.int64), None)
    monkeypatch.setattr(pipeline, "clean_mesh", lambda *args, **kwargs: empty)
    field = sphere_field(0.5)
    with pytest.raises(EmptyMeshError, match="0 faces after cleanup") as info:
        export_mesh(field, tmp_path, ExportConfig(resolution=16, threshold=field.surface_level, texture_size=0))
    assert "at least 4" in str(info.value) and "--faces" in str(info.value)
    assert not list(tmp_path.iterdir())  # old: mesh.glb written, then a ValueError in the PLY writer


def test_a_failing_writer_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    import carv3d.export.pipeline as pipeline

    field = sphere_field(0.5)
    cfg = ExportConfig(resolution=16, threshold=field.surface_level, texture_size=0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_obj", disk_full)  # obj is written last, after glb and ply
    with pytest.raises(DiskFullError, match=r"could not write .*mesh\.obj: the disk is full"):  # not a traceback
        export_mesh(field, tmp_path / "new", cfg)
    assert not (tmp_path / "new").exists(), "no partial set, no temporaries, not even the folder made for them"
    monkeypatch.undo()
    files = export_mesh(field, tmp_path / "old", cfg)
    before = {p.name: p.read_bytes() for p in files.values()}
    monkeypatch.setattr(pipeline, "write_obj", disk_full)
    with pytest.raises(DiskFullError):  # an --overwrite export that fails keeps the previous set intact
        export_mesh(field, tmp_path / "old", ExportConfig(resolution=24, threshold=field.surface_level,
                                                          texture_size=0), overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_export_command_checks_sizes_and_output_folder_before_loading_the_scene(tmp_path, monkeypatch, capsys):
    """`carv3d export`: clear errors (exit 2, no traceback) for every bad flag, before the scene loads."""
    import carv3d.saved_scene
    from carv3d.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("prompt: a cube\n")

    def no_load(*args, **kwargs):
        raise AssertionError("the scene was loaded before the export options were checked")

    monkeypatch.setattr(carv3d.saved_scene, "load_scene", no_load)
    cases = [(["--faces", "1"], "at least 4 faces"), (["--resolution", "100000"], "use 8 to 1024"),
             (["--out", str(run / "config.yaml" / "sub")], "cannot create the export folder")]
    for flags, fragment in cases:
        code = main(["export", str(run), *flags])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and fragment in err, (flags, err)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_export_says_each_stage_as_it_starts(tmp_path, caplog):
    field = sphere_field(0.5)
    cfg = ExportConfig(resolution=32, refine_from=16, threshold=field.surface_level, texture_size=0, faces=0,
                       formats=["ply"])
    with caplog.at_level("INFO", logger="carv3d"):
        export_mesh(field, tmp_path, cfg)
    stages = [r.getMessage() for r in caplog.records if r.getMessage().endswith("...")]
    assert stages == ["export: sampling the density on a 16³ grid ...", "export: refining near the surface to 32³ ...",
                      "export: marching cubes ...",
                      "export: cleanup (small components, inner shells, holes, decimation, repair) ...",
                      "export: normals and vertex colours ...", "export: writing ply ..."]
