"""Automatic threshold: CPU silhouettes (mesh raster, grid projections, field opacity) and the
1-D IoU search, checked against analytic silhouettes and against a brute-force search over meshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from carv3d.config import ExportConfig
from carv3d.export import (EmptyMeshError, auto_threshold, density_grid, export_mesh, extract_isosurface,
                           mesh_iou)
from carv3d.export.analytic import AnalyticField, Shape, box_sdf, sphere_field, sphere_sdf
from carv3d.export.silhouette import (camera_rays, fibonacci_cameras, grid_projections, march_opacity,
                                      mesh_silhouettes, silhouette_iou)
from carv3d.export.threshold import candidate_levels, iou_curve, pick_level


def analytic_sphere_silhouette(cameras, size, centre, rho):
    """A pixel sees the sphere iff its ray passes within ρ of the centre (ray–sphere distance)."""
    origins, directions = camera_rays(cameras, size, size)
    to_centre = torch.tensor(centre, dtype=torch.float32) - origins
    along = (to_centre * directions).sum(-1, keepdim=True)
    distance = (to_centre - along * directions).norm(dim=-1)
    return (distance <= rho).reshape(len(cameras), size, size).numpy()


def test_mesh_silhouettes_match_analytic_sphere():
    field = sphere_field(0.4, centre=(0.1, 0.0, -0.1))
    vertices, faces = extract_isosurface(density_grid(field, 64), field.surface_level, field.radius)
    cameras = fibonacci_cameras(4, distance=2.0, fovy_deg=60.0)
    masks = mesh_silhouettes(vertices, faces, cameras, 64, 64)
    truth = analytic_sphere_silhouette(cameras, 64, (0.1, 0.0, -0.1), 0.4)
    # The disc is ~750 px with a ~100 px rim; a pixel of error on the rim would cost ~13%.
    assert silhouette_iou(masks, truth).min() > 0.97


def test_grid_opacity_matches_ray_marched_field_opacity():
    field = sphere_field(0.4, max_density=30.0, softness=0.05)
    cameras = fibonacci_cameras(3, distance=2.0, fovy_deg=60.0)
    _, grid_alpha = grid_projections(density_grid(field, 64), field.radius, cameras, 32, 32)
    field_alpha = march_opacity(field, cameras, 32, 32, n_samples=256).numpy()
    assert np.abs(grid_alpha - field_alpha).mean() < 0.01
    assert np.abs(grid_alpha - field_alpha).max() < 0.1


def test_iou_curve_counts_exactly():
    rng = np.random.default_rng(1)
    max_projection = rng.gamma(2.0, 3.0, size=(3, 16, 16))
    target = rng.random((3, 16, 16)) < 0.4
    levels = np.array([0.5, 2.0, 4.0, 7.5, 12.0])
    brute = [silhouette_iou(max_projection > level, target).mean() for level in levels]
    np.testing.assert_allclose(iou_curve(max_projection, target, levels), brute, atol=1e-12)


def test_pick_level_takes_the_middle_of_a_tied_plateau():
    assert pick_level(np.arange(7.0), np.array([0.1, 0.5, 0.9, 0.9, 0.9, 0.9, 0.2])) == 3


@pytest.fixture(scope="module")
def box_and_ball():
    """A box with a ball on it: a soft NeRF-like density (ε = 0.03) with σ_max = 100."""
    shapes = [Shape(lambda x: box_sdf(x, (0.0, -0.1, 0.0), (0.35, 0.2, 0.3))),
              Shape(lambda x: sphere_sdf(x, (0.15, 0.25, 0.0), 0.2))]
    field = AnalyticField(shapes, softness=0.03)
    return field, density_grid(field, 64)


def test_auto_threshold_mesh_matches_nerf_opacity(box_and_ball):
    field, grid = box_and_ball
    nerf = lambda cameras: march_opacity(field, cameras, 48, 48, n_samples=96)  # noqa: E731
    search = auto_threshold(field, nerf, grid=grid, n_views=6)
    vertices, faces = extract_isosurface(grid, search.threshold, field.radius)
    achieved = mesh_iou(vertices, faces, search)
    assert achieved >= 0.9 and abs(achieved - search.iou) < 0.02  # the search's prediction holds
    # Brute force over real meshes: no level on a log grid does better than the search.
    levels = np.geomspace(0.5, 95.0, 12)
    brute = [mesh_iou(*extract_isosurface(grid, level, field.radius), search) for level in levels]
    assert achieved >= max(brute) - 0.005
    # The surface level σ_max/2 sits inside the NeRF's visible extent: the search beats it.
    naive = mesh_iou(*extract_isosurface(grid, field.surface_level, field.radius), search)
    assert achieved > naive


def test_auto_threshold_defaults_to_the_grids_own_opacity(box_and_ball):
    field, grid = box_and_ball
    search = auto_threshold(field, grid=grid, n_views=4, image_size=32)
    assert search.target.shape == (4, 32, 32)
    assert mesh_iou(*extract_isosurface(grid, search.threshold, field.radius), search) >= 0.9


def test_auto_threshold_on_an_empty_scene_is_a_clear_error():
    field = sphere_field(0.3, max_density=1e-3)  # opacity ≈ 0 everywhere
    with pytest.raises(EmptyMeshError, match="numeric threshold"):
        auto_threshold(field, resolution=16, n_views=2, image_size=16)


def test_nerf_opacity_of_the_wrong_shape_is_rejected(box_and_ball):
    field, grid = box_and_ball
    with pytest.raises(ValueError, match="B=3"):
        auto_threshold(field, lambda cameras: torch.zeros(2, 8, 8), grid=grid, n_views=3)



class UniformField:
    """σ = 50 everywhere in the box: the NeRF is an opaque cube, so the mesh is the scene box."""

    radius = 1.0

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), 50.0)

    def __call__(self, x: torch.Tensor):
        return self.density(x), torch.full((x.shape[0], 3), 0.5)


def test_auto_threshold_on_a_uniform_field_keeps_everything(tmp_path):
    # Old: the only levels were ≥ 50, so τ = 50 and the mesh was empty ("use threshold=auto").
    assert candidate_levels(np.array([[0.0, 50.0], [50.0, 50.0]])).tolist() == [25.0]
    field = UniformField()
    search = auto_threshold(field, resolution=16, n_views=2, image_size=16)
    assert search.threshold < 50.0 and search.iou > 0.99
    files = export_mesh(field, tmp_path, ExportConfig(resolution=16, texture_size=0, silhouette_views=2,
                                                      silhouette_size=16), formats=["ply"])
    mesh = trimesh.load(files["ply"], process=False)
    assert mesh.is_watertight and mesh.volume == pytest.approx(8.0, rel=1e-6)  # the [−1, 1]³ box
