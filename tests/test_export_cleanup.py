"""Export cleanup: hole filling, decimation to a face budget, orientation (closed-form references)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carv3d.export import decimate, density_grid, extract_isosurface, fill_small_holes, make_mesh, orient_outward
from carv3d.export.analytic import sphere_field
from carv3d.export.cleanup import boundary_loops, submesh
from carv3d.export.isosurface import signed_volume

SPHERE_VOLUME = 4 / 3 * math.pi * 0.5**3


@pytest.fixture(scope="module")
def sphere():
    field = sphere_field(0.5)
    return make_mesh(*extract_isosurface(density_grid(field, 48), field.surface_level, field.radius))


def test_small_hole_is_filled_consistently(sphere):
    centroids = np.asarray(sphere.triangles_center)
    cap = np.linalg.norm(centroids - [0.0, 0.5, 0.0], axis=1) < 0.06  # a small cap at the top
    holed = submesh(sphere, ~cap)
    assert not holed.is_watertight and len(boundary_loops(np.asarray(holed.faces))) == 1
    filled, n = fill_small_holes(holed, max_edges=64)
    assert n == 1
    assert filled.is_watertight and filled.is_winding_consistent
    # The fan over the cap's rim loses at most the cap's bulge, < π·a²·h with a ≈ 0.06 (+ one
    # rim triangle) and h ≈ a²/(2ρ): about 5e-5 of the closed mesh's volume.
    a = 0.08
    bulge = math.pi * a**2 * a**2 / (2 * 0.5)
    closed = signed_volume(sphere.vertices, sphere.faces)
    assert closed - bulge <= signed_volume(filled.vertices, filled.faces) <= closed + 1e-9


def test_holes_larger_than_the_limit_stay_open(sphere):
    centroids = np.asarray(sphere.triangles_center)
    holed = submesh(sphere, centroids[:, 1] < 0.3)  # a wide opening
    filled, n = fill_small_holes(holed, max_edges=16)
    assert n == 0 and not filled.is_watertight


def test_decimation_meets_the_budget_and_keeps_the_shape(sphere):
    budget = 2000
    small = decimate(sphere, budget)
    assert budget * 0.95 <= len(small.faces) <= budget
    assert small.is_watertight
    assert signed_volume(small.vertices, small.faces) == pytest.approx(SPHERE_VOLUME, rel=0.01)
    radii = np.linalg.norm(small.vertices, axis=1)
    assert np.abs(radii - 0.5).max() < 0.01  # quadric collapse keeps vertices on the surface
    assert decimate(sphere, 0) is sphere and decimate(sphere, 10**9) is sphere


def test_orient_outward_flips_an_inward_mesh(sphere):
    inward = make_mesh(sphere.vertices, np.asarray(sphere.faces)[:, ::-1])
    assert signed_volume(inward.vertices, inward.faces) < 0
    fixed = orient_outward(inward)
    assert signed_volume(fixed.vertices, fixed.faces) == pytest.approx(SPHERE_VOLUME, rel=0.01)
