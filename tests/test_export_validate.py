"""Exported GLB files pass the Khronos glTF validator with 0 errors (npm package gltf-validator).

Skipped where node or the package is missing; `npm ci` in the repository root installs it.
"""

from __future__ import annotations

import shutil

import pytest

from carv3d.config import ExportConfig
from carv3d.export import ValidatorUnavailableError, export_mesh, validate_gltf
from carv3d.export.analytic import AnalyticField, Shape, box_sdf, sphere_sdf, split_colour
from carv3d.export.validate import error_messages, validator_available

needs_validator = pytest.mark.skipif(not validator_available(),
                                     reason="node or the gltf-validator npm package is missing (run `npm ci`)")


def scene():
    return AnalyticField([Shape(lambda x: box_sdf(x, (0.0, -0.1, 0.0), (0.3, 0.2, 0.3)),
                                split_colour((0.9, 0.2, 0.1), (0.1, 0.3, 0.9))),
                          Shape(lambda x: sphere_sdf(x, (0.1, 0.25, 0.0), 0.2))], softness=0.03)


@needs_validator
@pytest.mark.parametrize("texture_size", [128, 0], ids=["textured", "vertex-colours"])
def test_exported_glb_has_no_validator_errors(tmp_path, texture_size):
    cfg = ExportConfig(resolution=40, texture_size=texture_size, faces=3000, silhouette_views=4, silhouette_size=32)
    files = export_mesh(scene(), tmp_path, cfg, formats=["glb"])
    report = validate_gltf(files["glb"])
    assert report["issues"]["numErrors"] == 0, error_messages(report)
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    info = report["info"]
    assert info["totalTriangleCount"] <= 3000
    assert info["totalVertexCount"] > 0
    assert info.get("materialCount", 0) == 1  # vertex colours too: without one glTF's default is metallic


def gaussians_field():
    """Two clusters of Gaussians, red and blue: the density/colour query that a Gaussian run exports."""
    import math

    import torch

    from carv3d.scene.gaussians_field import GaussianField
    from carv3d.scene.gaussians_model import Gaussians

    generator = torch.Generator().manual_seed(0)
    n = 400
    g = Gaussians(n)
    centres = torch.tensor([[-0.25, 0.0, 0.0], [0.25, 0.05, 0.0]]).repeat_interleave(n // 2, 0)
    colours = torch.tensor([[0.9, 0.15, 0.1], [0.1, 0.2, 0.9]]).repeat_interleave(n // 2, 0)
    with torch.no_grad():
        g.means.copy_(centres + 0.12 * torch.randn(n, 3, generator=generator))
        g.log_scales.fill_(math.log(0.06))
        g.quats.zero_()
        g.quats[:, 0] = 1.0
        g.opacity_logits.fill_(2.0)
        g.sh_dc.copy_(((colours - 0.5) / 0.28209479177387814)[:, None, :])
    return GaussianField(lambda: g, radius=1.0)


@needs_validator
def test_a_gaussian_scenes_glb_has_no_validator_errors(tmp_path):
    """The Gaussians' mesh goes through the same export as the NeRF's; its GLB must pass too."""
    cfg = ExportConfig(resolution=40, texture_size=128, faces=3000, silhouette_views=4, silhouette_size=32)
    files = export_mesh(gaussians_field(), tmp_path, cfg, formats=["glb"])
    report = validate_gltf(files["glb"])
    assert report["issues"]["numErrors"] == 0, error_messages(report)
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    assert 0 < report["info"]["totalTriangleCount"] <= 3000


@needs_validator
def test_validator_reports_errors_in_a_broken_file(tmp_path):
    files = export_mesh(scene(), tmp_path, ExportConfig(resolution=24, texture_size=0, silhouette_views=2,
                                                        silhouette_size=16), formats=["glb"])
    broken = tmp_path / "broken.glb"
    broken.write_bytes(files["glb"].read_bytes()[:-200])  # truncated binary chunk
    assert validate_gltf(broken)["issues"]["numErrors"] > 0


def test_missing_node_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "x.glb"
    path.write_bytes(b"glTF")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValidatorUnavailableError, match="npm ci"):
        validate_gltf(path)
