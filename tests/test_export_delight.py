"""De-lit textures: the embedded world's red cube, coloured as the teacher saw it (its fixed light baked
into the colours, what a run trained with albedo shading learns), exported with a texture; the
texture's front and back must both be the world's red (its known material colour)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carv3d.config import ExportConfig
from carv3d.export.pipeline import build_mesh
from carv3d.export.texture import colour_facing
from carv3d.world.evaluate import WorldField
from carv3d.world.objects import COLOURS
from carv3d.world.raytrace import AMBIENT, light_direction

TOLERANCE = 0.10  # the bar: front and back albedo within 10 % (of the world's red, and of each other)


class LitWorldField(WorldField):
    """The world object's colours under the world's light: c = a · (k + (1 − k)·max(0, n·l))."""

    def forward(self, x):
        density, albedo = super().forward(x)
        light = light_direction(x.device, x.dtype)
        factor = AMBIENT + (1 - AMBIENT) * (self.normals(x) @ light).clamp_min(0.0)
        return density, albedo * factor.unsqueeze(-1)


def side_colour(mesh, axis) -> np.ndarray:
    return colour_facing(mesh.uv_mesh, mesh.texture, axis)


@pytest.fixture(scope="module")
def lit_cube():
    return LitWorldField("cube", "red", softness=0.01, max_density=100.0)


def export(field, delight: bool):
    cfg = ExportConfig(resolution=64, threshold=field.surface_level, texture_size=256, faces=4000, delight=delight)
    with torch.no_grad():
        return build_mesh(field, cfg)


def test_lit_cube_texture_is_delit_to_the_world_red(lit_cube):
    red = np.array(COLOURS["red"])
    lit = export(lit_cube, delight=False)
    front, back = side_colour(lit, np.array([0, 0, 1.0])), side_colour(lit, np.array([0, 0, -1.0]))
    assert front[0] / back[0] > 2.0  # the light baked in: 0.89 against the ambient 0.4 of the world
    mesh = export(lit_cube, delight=True)
    assert mesh.light is not None
    angle = np.degrees(np.arccos(mesh.light.direction @ light_direction().numpy()))
    assert angle < 10 and abs(mesh.light.ambient - AMBIENT) < 0.05, (angle, mesh.light)
    front, back = side_colour(mesh, np.array([0, 0, 1.0])), side_colour(mesh, np.array([0, 0, -1.0]))
    assert abs(front[0] - back[0]) / max(front[0], back[0]) < TOLERANCE
    np.testing.assert_allclose([front[0], back[0]], red[0], rtol=TOLERANCE)
    # the vertex colours (PLY, vertex-colour GLB) are de-lit alike (medians: at the cube's edges the
    # mesh's normal and the SDF's, which lit the colour, point to different faces)
    for axis in ([0, 1.0, 0], [0, -1.0, 0], [1.0, 0, 0], [-1.0, 0, 0]):
        side = mesh.vertex_normal @ np.array(axis) > 0.9
        np.testing.assert_allclose(np.median(mesh.colors[side, 0]) / 255.0, red[0], rtol=TOLERANCE, err_msg=str(axis))
