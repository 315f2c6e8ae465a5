"""`carv3d evaluate`: metrics against hand-computed values, and the ground truth scored as a result.

The "result" of most tests is :class:`carv3d.world.evaluate.WorldField` — the world object as a
density field, ``σ = σ_max · sigmoid(−f / ε)`` with ε = 2e-4 and σ_max = 1e6 — rendered by the real
:class:`~carv3d.render.renderer.VolumeRenderer`. Its silhouettes grow by about
``ε · ln(σ_max √(2π R ε) / ln 2) ≈ 0.002`` scene units (0.1 px at 64 px), and the ground truth's
sphere tracer counts rays within half a pixel of the surface as hits, so its IoU against its own
object is not exactly 1: at 64 px we require ≥ 0.95 (measured: 0.98 for the house).

Torch runs on one thread here: the machine has 2 shared cores, and the many small tensor ops of
sphere tracing are ~10× slower when torch's threads oversubscribe them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from carv3d.cli import main
from carv3d.errors import OutputPathError, UserError
from carv3d.cameras import orbit_cameras
from carv3d.render.renderer import VolumeRenderer
from carv3d.world.evaluate import (DISTANCE, EvaluationOptionError, NotAWorldPromptError, WorldField, _truth_masks,
                                   evaluate_scene, format_summary, held_out_cameras, match_object, render_result,
                                   truth_images, world_prompt)
from carv3d.world.metrics import (chamfer_distance, chamfer_to_world, masked_colour_error, psnr, rotate_about_y,
                                  sample_surface, silhouette_iou, surface_distance, world_surface)
from carv3d.scene.nerf import NeRFScene

RESOLUTION = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def renderer() -> VolumeRenderer:
    return VolumeRenderer(1.0, sampler="stratified", samples_per_ray=64, background="white")


def export_ply(field: WorldField, out_dir) -> str:
    """The field's isosurface at its surface level through carv3d's exporter, as mesh.ply."""
    from carv3d.config import ExportConfig
    from carv3d.export.pipeline import export_mesh

    cfg = ExportConfig(threshold=field.surface_level, resolution=128, refine_from=64, texture_size=0,
                       formats=["ply"])
    return str(export_mesh(field, out_dir, cfg)["ply"])


# ------------------------------------------------------------------------------------------ metrics
def test_image_metrics_match_hand_computed_values():
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    truth = torch.zeros_like(mask)
    mask[0, 0, :2, :2] = True  # 4 pixels
    truth[0, 0, :2, :3] = True  # 6 pixels, 4 shared → IoU 4/6
    # view 1: both empty → 1 by definition
    assert silhouette_iou(mask, truth).tolist() == pytest.approx([4 / 6, 1.0])

    rgb = torch.full((2, 3, 4, 4), 0.5)
    ref = rgb.clone()
    ref[0, 0, 0, 0] = 0.8  # one channel of one shared pixel differs by 0.3
    ref[0, :, 3, 3] = 0.0  # outside both masks: not in the masked error
    # masked error: mean over 4 shared pixels of the channel mean: (0.3 / 3) / 4
    assert masked_colour_error(rgb, ref, mask, truth) == pytest.approx(0.1 / 4)
    assert masked_colour_error(rgb, ref, mask, ~truth & ~mask) is None

    # PSNR: a constant error of 0.1 on every value is −10 log10(0.01) = 20 dB; equal images hit the 100 dB cap.
    assert psnr(rgb + 0.1, rgb).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(rgb, rgb).tolist() == pytest.approx([100.0, 100.0])


def test_chamfer_of_concentric_spheres_is_the_radius_gap():
    import trimesh

    rng = np.random.default_rng(0)
    inner, outer = trimesh.creation.icosphere(5, radius=0.40), trimesh.creation.icosphere(5, radius=0.45)
    inner, outer = (inner.vertices, inner.faces), (outer.vertices, outer.faces)
    # Every point of one sphere is 0.05 from the other; the facets (edges ≈ 0.01) sag by < 1e-4.
    cd = chamfer_distance(inner, outer, 5000, rng)
    assert cd["chamfer"] == pytest.approx(0.05, abs=2e-4)
    assert cd["result_to_truth"] == pytest.approx(0.05, abs=2e-4)
    # Distances to the surface, not to the other side's samples: a mesh is at 0 from itself (sampled
    # point to point, 20k samples of this sphere were ≈ 0.002 apart).
    assert chamfer_distance(inner, inner, 5000, rng)["chamfer"] < 1e-6
    # A big flat triangle: distances to its inside, edge and corner, and to a second triangle far away.
    vertices = np.array([[-1.0, 0, -1], [1, 0, -1], [0, 0, 1], [5, 5, 5], [5.1, 5, 5], [5, 5.1, 5]])
    points = np.array([[0.0, 0.3, 0.0], [0.0, -0.2, -1.5], [3.0, 0.0, -1.0]])
    assert surface_distance(points, vertices, np.array([[0, 1, 2], [3, 4, 5]])) == pytest.approx(
        [0.3, math.hypot(0.2, 0.5), 2.0])


def test_the_truth_is_at_chamfer_zero_from_itself_turned_as_aligned():
    vertices, faces = world_surface("cube")
    turned = (rotate_about_y(vertices, -30.0), faces)  # the truth turned by −δ for δ = 30°
    same = chamfer_to_world(turned, "cube", azimuth_offset_deg=30.0, n_points=5000)
    # Sampled point to point it was ≈ 0.005 with the default 20k samples (about half their spacing).
    assert same["chamfer"] < 1e-5 and same["points"] == 5000
    wrong_way = chamfer_to_world(turned, "cube", azimuth_offset_deg=-30.0, n_points=5000)
    assert wrong_way["chamfer"] > 0.01


def test_an_unusable_mesh_gives_no_chamfer_and_says_what_to_do(tmp_path):
    def surface(mesh):
        result = chamfer_to_world(mesh, "cube", n_points=1000)
        assert result["chamfer"] is None and result["result_to_truth"] is None and result["truth_to_result"] is None
        return result["mesh"]

    assert "not found; run `carv3d export RUN_DIR` first" in surface(tmp_path / "mesh.ply")
    (tmp_path / "mesh.ply").write_text("garbage\n")
    note = surface(tmp_path / "mesh.ply")
    assert "could not be read as a mesh" in note and "re-run `carv3d export RUN_DIR`" in note
    triangle = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    assert "has no area" in surface((np.zeros((3, 3)), np.array([[0, 1, 2]])))
    assert "has no faces" in surface((triangle, np.zeros((0, 3), dtype=np.int64)))
    assert "missing vertices" in surface((triangle, np.array([[0, 1, 3]])))
    for bad in (np.nan, np.inf):
        assert "non-finite" in surface((np.vstack([triangle, [bad, 0, 0]]), np.array([[0, 1, 2], [0, 1, 3]])))


def test_surface_samples_are_uniform_and_world_surface_is_the_sdf_zero_set():
    rng = np.random.default_rng(1)
    vertices = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 0, 2]])
    faces = np.array([[0, 1, 2], [3, 4, 5]])  # areas 0.5 and 1.5
    points = sample_surface(vertices, faces, 40000, rng)
    on_second = points[:, 2] > 0.5
    # P(second) = 0.75; binomial std √(0.75·0.25/40000) = 0.0022, 5σ = 0.011.
    assert on_second.mean() == pytest.approx(0.75, abs=0.011)
    # Uniform on a triangle ⇒ the sample mean is the centroid (std of a coordinate ≤ 0.25/√30000 = 0.0015).
    assert points[~on_second].mean(0) == pytest.approx([1 / 3, 1 / 3, 0.0], abs=0.008)

    v, f = world_surface("sphere", resolution=96)
    radii = np.linalg.norm(v, axis=1)
    assert radii.min() > 0.42 - 2e-3 and radii.max() < 0.42 + 2e-3  # ball of radius 0.42 (objects.sphere)
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()
    assert area == pytest.approx(4 * math.pi * 0.42 ** 2, rel=0.01)

    # rotate_about_y raises the azimuth atan2(x, z): the front (+Z) turned by 90° faces +X.
    assert rotate_about_y(np.array([[0.0, 0.5, 1.0]]), 90.0) == pytest.approx(np.array([[1.0, 0.5, 0.0]]))


def test_held_out_cameras_are_fixed_and_not_the_validation_orbit():
    cameras = held_out_cameras(16)
    assert len(cameras) == 16
    azimuths = [-157.5, -112.5, -67.5, -22.5, 22.5, 67.5, 112.5, 157.5]
    assert sorted(set(cameras.azimuth.tolist())) == pytest.approx(azimuths)
    assert sorted(set(cameras.elevation.tolist())) == [5.0, 40.0]
    assert cameras.distance.tolist() == pytest.approx([1.55] * 16) and DISTANCE == pytest.approx(1.55)
    assert torch.equal(cameras.c2w, held_out_cameras(16).c2w)
    validation = orbit_cameras(4, elevation_deg=15.0, distance=2.0, fovy_deg=45.0)  # carv3d.outputs.validation_sheet
    gaps = torch.cdist(cameras.positions, validation.positions)
    assert gaps.min() > 0.3
    for bad in (8, 14, 18):
        with pytest.raises(EvaluationOptionError, match="multiple of 4"):
            held_out_cameras(bad)


def test_a_prompt_outside_the_world_names_the_unknown_words():
    assert world_prompt("A red cube, front view").object == "cube"
    with pytest.raises(NotAWorldPromptError) as info:
        world_prompt("a shiny dragon")
    message = str(info.value)
    assert "shiny, dragon" in message and "only for prompts of the embedded world" in message
    assert isinstance(info.value, UserError)


# --------------------------------------------------------------------------- the truth as a result
def test_ground_truth_scores_itself_near_one_and_ranks_itself_first(renderer, tmp_path):
    field = WorldField("house", "red")
    result = evaluate_scene(NeRFScene.from_parts(field, renderer), "a red house", mesh=export_ply(field, tmp_path), resolution=RESOLUTION)
    assert result["silhouette_iou"] >= 0.95
    assert min(result["per_view"]["silhouette_iou"]) >= 0.9
    assert result["masked_colour_error"] <= 0.02  # same albedo; only edge pixels differ
    assert result["psnr"] >= 20.0
    assert result["alignment"] == {"rule": "fixed", "azimuth_offset_deg": 0.0, "candidates": 1}
    # The mesh exported from the truth lies on the truth, up to the two marching-cubes grids (the exporter's
    # spacing is 2/127 = 0.016) and decimation: measured 0.0036 (0.0065 when sampled point to point).
    assert result["chamfer"] < 0.005
    # Best match: the house, clearly ahead of every other object.
    ranking = {m["object"]: m["iou"] for m in result["ranking"]}
    assert result["best_match"] == "house" and result["best_match_is_prompted"]
    assert len(ranking) == 11 and max(v for k, v in ranking.items() if k != "house") < ranking["house"] - 0.1
    assert ranking["house"] == result["silhouette_iou"]
    # Front views look like the front, back views like the back.
    assert result["front_matches_front"] is True
    assert result["front_back"]["front_views"]["vs_same_side"]["iou"] >= 0.95
    assert sorted(result["front_back"]["front_azimuths"]) == [-22.5, -22.5, 22.5, 22.5]
    json.dumps(result)  # JSON-ready


def test_a_wrong_object_scores_clearly_lower(renderer, tmp_path):
    field = WorldField("duck", "yellow")
    right = evaluate_scene(NeRFScene.from_parts(field, renderer), "a yellow duck", compare_all_objects=False, resolution=RESOLUTION)
    mesh = export_ply(field, tmp_path)
    wrong = evaluate_scene(NeRFScene.from_parts(field, renderer), "a yellow snowman", mesh=mesh, compare_all_objects=False,
                           resolution=RESOLUTION)
    assert right["silhouette_iou"] >= 0.95
    assert wrong["silhouette_iou"] < right["silhouette_iou"] - 0.15
    assert wrong["chamfer"] > 0.03  # vs < 0.02 for the right object (previous test)
    assert right["psnr"] > wrong["psnr"] + 3.0


def test_front_back_check_fails_for_a_turned_around_and_a_two_faced_result(renderer):
    turned = evaluate_scene(NeRFScene.from_parts(WorldField("chair", "blue", rotation_deg=180.0), renderer), "a blue chair",
                            compare_all_objects=False, resolution=RESOLUTION)
    fb = turned["front_back"]
    assert fb["front_views_match_front"] is False and fb["back_views_match_back"] is False
    assert turned["front_matches_front"] is False
    # Turned around, its front views are (up to edge pixels) the truth's back views.
    assert fb["front_views"]["vs_opposite_side"]["iou"] >= 0.95

    class TwoFacedHouse(WorldField):
        """The front half of the house mirrored onto the back: a door on both ends."""

        def object_frame(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[:, 0], x[:, 1], x[:, 2].abs()], dim=-1)

    janus = evaluate_scene(NeRFScene.from_parts(TwoFacedHouse("house", "red"), renderer), "a red house", compare_all_objects=False,
                           resolution=RESOLUTION)
    fb = janus["front_back"]
    assert fb["front_views_match_front"] is True and fb["back_views_match_back"] is False
    assert janus["front_matches_front"] is False


def test_symmetric_objects_are_aligned_about_y_and_objects_with_a_front_are_not(renderer, tmp_path):
    # A cube turned by 30° is a cube: the alignment finds δ ≡ −30° (mod 90°) to within half of
    # its 9° step, the IoU is the unturned cube's, and the truth's surface turned alike matches the mesh.
    field = WorldField("cube", "green", rotation_deg=30.0)
    cube = evaluate_scene(NeRFScene.from_parts(field, renderer), "a green cube", mesh=export_ply(field, tmp_path),
                          compare_all_objects=False, resolution=RESOLUTION)
    offset = cube["alignment"]["azimuth_offset_deg"]
    assert cube["alignment"]["rule"] == "search" and cube["alignment"]["candidates"] == 40
    assert abs((offset + 30.0 + 45.0) % 90.0 - 45.0) <= 4.5
    assert cube["silhouette_iou"] >= 0.95
    assert cube["chamfer"] < 0.02  # measured 0.005: mostly the alignment's error (3° here), not the surfaces
    assert cube["front_back"]["applicable"] is False and cube["front_matches_front"] is None
    # The summary states the turn applied to the truth, −δ ≡ +30° (mod 90°), not δ.
    turned = float(re.search(r"truth turned ([+-]\d+)° about \+Y", format_summary(cube)).group(1))
    assert abs((turned - 30.0 + 45.0) % 90.0 - 45.0) <= 5.0  # half a 9° step, plus rounding to 1°
    # The truth's colours are re-traced for the chosen offset only; they agree with the cached silhouettes.
    mask = render_result(NeRFScene.from_parts(field, renderer), held_out_cameras(16), RESOLUTION)[1]
    match = match_object(mask, "cube", 16, RESOLUTION)
    assert match["iou"] == pytest.approx(cube["silhouette_iou"], abs=1e-5)
    assert torch.equal(truth_images("cube", "green", 16, RESOLUTION, match["rows"])[1],
                       _truth_masks("cube", 16, RESOLUTION, 5, "cpu")[match["rows"]])

    # A duck turned by 90° is not a duck facing the front.
    turned = evaluate_scene(NeRFScene.from_parts(WorldField("duck", "yellow", rotation_deg=90.0), renderer), "a yellow duck",
                            compare_all_objects=False, resolution=RESOLUTION)
    assert turned["alignment"]["azimuth_offset_deg"] == 0.0
    assert turned["silhouette_iou"] < 0.8


# ------------------------------------------------------------------------------------------ the CLI
def _run_dir(tmp_path, prompt: str):
    """A run directory with a checkpoint of an untrained (blob-initialised) field."""
    from carv3d.checkpoint import save_checkpoint
    from carv3d.config import load_config
    from carv3d.run_dir import create_run_dir
    from carv3d.scene import build_scene

    cfg = load_config(overrides=[f"train.output_dir={tmp_path}", "train.run_name=run", "scene.grid.n_levels=4",
                                 "scene.grid.log2_hashmap_size=12", "render.sampler=stratified"], prompt=prompt)
    run_dir = create_run_dir(cfg)
    scene = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0)
    save_checkpoint(run_dir, 0, {"scene": scene.state_dict()})
    return run_dir


def test_cli_writes_json_and_the_blob_is_not_mistaken_for_a_cube(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, "a red cube")
    (run_dir / "mesh").mkdir()
    (run_dir / "mesh" / "mesh.ply").write_text("garbage\n")  # a corrupt export: no Chamfer, the rest is reported
    code = main(["evaluate", str(run_dir), "--views", "12", "--resolution", "32", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert "silhouette IoU" in out and str(run_dir / "evaluation.json") in out
    assert result["step"] == 0 and result["views"]["count"] == 12 and len(result["per_view"]["psnr"]) == 12
    # The untrained blob is a ball: its IoU against the cube flatters it (0.82 measured), but the
    # ranking puts a round object ahead of the cube.
    assert 0.5 < result["silhouette_iou"] < 0.9
    assert result["best_match_is_prompted"] is False and result["best_match"] in ("sphere", "cylinder")
    assert result["ranking"][0]["iou"] > result["silhouette_iou"] + 0.05
    assert "[12.0" not in (run_dir / "evaluation.json").read_text()  # sanity: lists of numbers are on one line
    assert '"elevation_deg": [5.0, 5.0' in (run_dir / "evaluation.json").read_text()
    assert result["chamfer"] is None and "could not be read as a mesh" in result["surface"]["mesh"]
    assert "Chamfer distance     n/a" in out and "re-run `carv3d export RUN_DIR`" in out
    # The run trains with render.shading=albedo (the default): its colours are compared with the world
    # as the teacher saw it, lit.
    assert result["views"]["truth_lighting"] == "world"

    code = main(["evaluate", str(run_dir)])  # exists, no --overwrite: nothing is loaded or written
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    code = main(["evaluate", str(run_dir), "--views", "10"])
    assert code == 2 and "multiple of 4" in capsys.readouterr().err


def test_cli_checks_the_output_file_before_loading_the_scene(tmp_path, capsys, monkeypatch):
    import carv3d.run_evaluation

    run_dir = _run_dir(tmp_path, "a red cube")

    def no_loading(*args, **kwargs):
        raise AssertionError("the scene was loaded before the output file was checked")

    monkeypatch.setattr(carv3d.run_evaluation, "load_scene", no_loading)
    (tmp_path / "afile").write_text("")
    before = sorted(tmp_path.rglob("*"))
    cases = [(tmp_path / "afile" / "x.json", f"'{tmp_path / 'afile'}' is a file, not a folder"),
             (tmp_path / "afile" / "sub" / "x.json", "cannot write"),
             (tmp_path, "is a folder")]  # an existing folder is not an existing file to --overwrite
    if Path("/proc/self").is_dir():  # Linux: no file can be created in /proc, not even by root
        cases.append((Path("/proc/x.json"), "cannot write '/proc/x.json'"))
    for out, message in cases:
        for overwrite in ([], ["--overwrite"]):
            code = main(["evaluate", str(run_dir), "--out", str(out), *overwrite])
            err = capsys.readouterr().err
            assert code == 2 and message in err and "pass --out" in err, err
            assert "already exists" not in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no probe file left


def test_a_failed_final_write_is_a_user_error_and_leaves_no_file(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import carv3d.run_evaluation as evaluate

    run_dir = _run_dir(tmp_path, "a red cube")
    out = tmp_path / "new" / "sub" / "x.json"
    monkeypatch.setattr(evaluate, "load_scene", lambda *args, **kwargs: SimpleNamespace(step=0, scene=None))

    def evaluation_that_loses_the_folder(*args, **kwargs):
        assert out.parent.is_dir()  # missing folders are created up front
        shutil.rmtree(out.parent)
        out.parent.write_text("in the way")
        return {"silhouette_iou": 1.0}

    monkeypatch.setattr(evaluate, "evaluate_scene", evaluation_that_loses_the_folder)
    with pytest.raises(OutputPathError, match=re.escape(f"could not write '{out}'") + ".*pass --out"):
        evaluate.evaluate_run(run_dir, views=12, resolution=32, out=out, device="cpu")
    assert out.parent.read_text() == "in the way" and list((tmp_path / "new").iterdir()) == [out.parent]


def test_world_lit_truth_is_the_image_the_teacher_was_trained_on():
    """truth_images(lighting="world") against a second path, the teacher's data renderer render_world,
    and the unlit truth: lighting only darkens (light factor ≤ 1) and leaves background and masks alone."""
    from carv3d.world.evaluate import evaluation_cameras, truth_lighting_for
    from carv3d.world.raytrace import render_world

    rows = torch.arange(8)
    lit, lit_mask = truth_images("house", "blue", 16, 32, rows, lighting="world")
    unlit, unlit_mask = truth_images("house", "blue", 16, 32, rows, lighting="unlit")
    teacher_view = render_world("house", "blue", evaluation_cameras(16, 1, "cpu")[rows], 32, 32)
    torch.testing.assert_close(lit, teacher_view.rgb, rtol=0, atol=1e-5)
    assert torch.equal(lit_mask, unlit_mask)
    assert (lit <= unlit + 1e-6).all() and (lit[~lit_mask.expand_as(lit)] == unlit[~lit_mask.expand_as(lit)]).all()
    assert float((unlit - lit).abs().max()) > 0.2  # the back of the house is in shadow
    assert truth_lighting_for("albedo") == "world" and truth_lighting_for("random") == "unlit"
    with pytest.raises(EvaluationOptionError, match="lighting"):
        evaluate_scene(NeRFScene.from_parts(WorldField("cube"), VolumeRenderer(1.0, samples_per_ray=8)), "a red cube", truth_lighting="sunset")


def test_cli_refuses_a_prompt_outside_the_world(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, "a golden dragon")
    code = main(["evaluate", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1
    assert "golden, dragon" in err and "only for prompts of the embedded world" in err
    assert not (run_dir / "evaluation.json").exists()


def _match_one_offset_at_a_time(mask, object_name, views, resolution):
    """The matching as it was written first: one IoU and one host read per candidate offset."""
    from carv3d.world.evaluate import _ring_factor, _ring_rows
    from carv3d.world.metrics import silhouette_iou

    factor = _ring_factor(object_name, views)
    truth = _truth_masks(object_name, views, resolution, factor, str(mask.device))
    best = None
    for shift in range(factor * views // 2 if factor > 1 else 1):
        rows = _ring_rows(views, factor, shift)
        per_view = silhouette_iou(mask, truth[rows])
        if best is None or float(per_view.mean()) > best["iou"] + 1e-9:
            best = {"iou": float(per_view.mean()), "per_view": per_view, "rows": rows, "shift": shift}
    return best


@pytest.mark.parametrize("object_name", ["cube", "chair", "duck", "torus"])
def test_batched_offset_search_picks_what_the_one_at_a_time_search_picks(object_name):
    """Every rule (search, fixed, invariant) against a second implementation of the search, on the
    truth of another object turned by 20° and on an empty mask (every offset ties: the first wins)."""
    views, resolution = 16, 32
    turned = WorldField("house", "blue", rotation_deg=20.0)
    renderer = VolumeRenderer(1.0, sampler="stratified", samples_per_ray=64, background="white")
    mask = render_result(NeRFScene.from_parts(turned, renderer), held_out_cameras(views), resolution)[1]
    for candidate in (mask, torch.zeros_like(mask)):
        got = match_object(candidate, object_name, views, resolution)
        want = _match_one_offset_at_a_time(candidate, object_name, views, resolution)
        assert got["iou"] == pytest.approx(want["iou"], abs=1e-7)
        assert torch.equal(got["rows"], want["rows"]) and torch.allclose(got["per_view"], want["per_view"])


def test_an_evaluation_reads_the_device_a_few_times_not_once_per_offset(monkeypatch):
    """Each host read is a GPU sync, slow where many benchmark runs share one card: the offset search
    reads once per object, and the truth's colours are traced once per prompt and offset (cached)."""
    renderer = VolumeRenderer(1.0, sampler="stratified", samples_per_ray=32, background="white")
    scene = NeRFScene.from_parts(WorldField("chair", "orange"), renderer)
    evaluate_scene(scene, "an orange chair", resolution=32)  # fills the caches
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    evaluate_scene(scene, "an orange chair", resolution=32)
    monkeypatch.undo()
    assert len(reads) <= 40  # 29 measured (11 objects' offset searches among them); 110 one offset at a time
