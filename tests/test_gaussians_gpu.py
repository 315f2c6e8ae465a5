"""gsplat on CUDA against the torch rasteriser (GPU), and the GPU check script's CPU smoke run (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carv3d.cameras import make_cameras
from carv3d.scene.gaussians_model import covariance
from carv3d.scene.gaussians_raster import camera_matrices, project, rasterize

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
def test_gsplat_matches_the_torch_rasteriser_values_and_gradients():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("gsplat")
    from carv3d.scene.gaussians_gsplat import rasterize_gsplat

    device = torch.device("cuda")
    # An fp32 comparison: TF32 matmuls in the torch projection would differ from gsplat's fp32 by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    n, size = 2000, 96
    params = [(torch.rand(n, 3, generator=gen) - 0.5).to(device), (0.01 + 0.04 * torch.rand(n, 3, generator=gen)).log().to(device),
              torch.randn(n, 4, generator=gen).to(device), torch.randn(n, generator=gen).to(device),
              torch.rand(2, n, 4, generator=gen).to(device)]
    cams = make_cameras(torch.tensor([10.0, 40.0]), torch.tensor([30.0, -120.0]), torch.tensor([1.6, 1.6]),
                        torch.tensor([50.0, 50.0])).to(device)
    viewmats, ks = camera_matrices(cams, size, size)
    weights = torch.randn(2, size, size, 5, generator=gen).to(device)
    results = []
    for backend in ("gsplat", "torch"):
        leaves = [p.clone().requires_grad_(True) for p in params]
        means, log_scales, quats, logits, feats = leaves
        opacities = torch.sigmoid(logits)
        if backend == "gsplat":
            images, alpha, _ = rasterize_gsplat(means, quats, log_scales.exp(), opacities, feats, viewmats, ks, size, size)
        else:
            proj = project(means, covariance(quats, log_scales.exp()), viewmats, ks, size, size, opacities)
            images, alpha = rasterize(proj, opacities, feats, size, size)
        (torch.cat([images, alpha], -1) * weights).sum().backward()
        results.append((images.detach(), alpha.detach(), [p.grad for p in leaves]))
    (im_a, al_a, g_a), (im_b, al_b, g_b) = results
    assert (im_a - im_b).abs().max() < 2e-4 and (al_a - al_b).abs().max() < 2e-4
    for ga, gb in zip(g_a, g_b):
        assert (ga - gb).norm() / ga.norm() < 2e-3


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke(tmp_path):
    """The GPU check script runs its sections on the CPU (tiny sizes) and writes their JSON."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check_gaussians.py"), str(tmp_path), "--cpu-smoke",
                           "--sections", "env,jit,agreement,timing,quality"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gaussians_gpu_check_cpu_smoke.json").read_text())
    assert report["env"]["device"] == "cpu" and "skipped" in report["agreement"]
    assert report["timing"]["scene_render_backward"]["median_ms"] > 0
    rows = report["quality"]["rows"]
    assert [r["prompt"] for r in rows] == ["a red cube", "a blue sphere"] and all("error" not in r for r in rows)
    assert all(0.0 <= r["silhouette_iou"] <= 1.0 for r in rows)


@pytest.mark.gpu
def test_a_gaussian_scene_on_cuda_exports_a_mesh(tiny_pixel_path):
    """The mesh export of CUDA Gaussians (their density queried where they live)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from carv3d.config import load_config
    from carv3d.export.pipeline import build_mesh
    from carv3d.scene import build_scene

    cfg = load_config(overrides=["scene.type=gaussians", "scene.n_points=2000", "scene.rasterizer=torch",
                                 "export.resolution=48", "export.refine_from=24", "export.texture_size=64",
                                 "export.threshold=0.5"])
    scene = build_scene(cfg.scene, cfg.render, torch.device("cuda"), seed=0)
    with torch.no_grad():
        scene.gaussians.opacity_logits.fill_(4.0)  # a dense ball: a non-empty isosurface
    mesh = build_mesh(scene.field, cfg.export)
    assert len(mesh.faces) > 0 and mesh.vertices.min() >= -scene.field.radius - 1e-6
