"""The 3DGS splat PLY: written, read back, read by trimesh, and compared with gsplat's own writer."""

from __future__ import annotations

import pytest
import torch

from carv3d.errors import OutputPathError
from carv3d.scene.gaussians_model import Gaussians
from carv3d.scene.gaussians_ply import SplatFileError, property_names, read_splats, write_splats


def random_splats(n=7, sh_degree=2, seed=0):
    g = Gaussians(n, sh_degree)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return g


def write(g, path, **kwargs):
    return write_splats(path, g.means, g.log_scales, g.quats, g.opacity_logits, g.sh_dc, g.sh_rest, **kwargs)


def test_round_trip_and_header_order(tmp_path):
    g = random_splats()
    path = write(g, tmp_path / "splats.ply")
    header = path.read_bytes().split(b"end_header\n")[0].decode().splitlines()
    names = [line.split()[2] for line in header if line.startswith("property")]
    assert names == property_names(24)  # (2 + 1)² − 1 = 8 rest coefficients × 3 channels
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    loaded = read_splats(path)
    for name, value in g.tensors().items():
        assert torch.equal(loaded[name], value.detach()), name


def test_f_rest_is_channel_major_as_in_the_inria_layout(tmp_path):
    """f_rest_k for k < K is red's coefficient k (Inria: features_rest.transpose(1, 2).flatten(1))."""
    trimesh = pytest.importorskip("trimesh")
    g = random_splats(n=3, sh_degree=1)
    path = write(g, tmp_path / "s.ply")
    raw = trimesh.load(path, process=False).metadata["_ply_raw"]["vertex"]["data"]
    rest = g.sh_rest.detach()  # (N, 3 coefficients, 3 channels)
    assert torch.equal(torch.from_numpy(raw["f_rest_0"].copy()), rest[:, 0, 0])  # red, coefficient 0
    assert torch.equal(torch.from_numpy(raw["f_rest_1"].copy()), rest[:, 1, 0])  # red, coefficient 1
    assert torch.equal(torch.from_numpy(raw["f_rest_3"].copy()), rest[:, 0, 1])  # green, coefficient 0
    assert torch.equal(torch.from_numpy(raw["opacity"].copy()), g.opacity_logits.detach())
    assert not raw["nx"].any()


def test_same_values_as_gsplats_writer(tmp_path):
    exporter = pytest.importorskip("gsplat.exporter")
    g = random_splats(n=5, sh_degree=1)
    ours = read_splats(write(g, tmp_path / "ours.ply"))
    exporter.export_splats(g.means.detach(), g.log_scales.detach(), g.quats.detach(), g.opacity_logits.detach(),
                           g.sh_dc.detach(), g.sh_rest.detach(), format="ply", save_to=str(tmp_path / "gsplat.ply"))
    theirs = read_splats(tmp_path / "gsplat.ply")  # gsplat writes no normals; the rest is the same layout
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_bad_files_are_one_clear_error(tmp_path):
    g = random_splats(n=2, sh_degree=0)
    good = write(g, tmp_path / "good.ply")
    with pytest.raises(OutputPathError, match="already exists"):
        write(g, good)
    assert write(g, good, overwrite=True) == good
    (tmp_path / "text.ply").write_text("hello")
    with pytest.raises(SplatFileError, match="not a PLY"):
        read_splats(tmp_path / "text.ply")
    (tmp_path / "short.ply").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(SplatFileError, match="truncated"):
        read_splats(tmp_path / "short.ply")
    data = good.read_bytes().replace(b"property float opacity\n", b"property float alpha\n")
    (tmp_path / "renamed.ply").write_bytes(data)
    with pytest.raises(SplatFileError, match="opacity"):
        read_splats(tmp_path / "renamed.ply")
    with pytest.raises(SplatFileError, match="cannot read"):
        read_splats(tmp_path / "missing.ply")


def test_a_scene_starts_from_a_splat_file(tmp_path):
    """scene.init_from: the scene's Gaussians are the file's (SH degree 2 → 1 drops the degree-2 terms)."""
    from carv3d.config import load_config
    from carv3d.scene import build_scene

    g = random_splats(n=9, sh_degree=2)
    path = write(g, tmp_path / "init.ply")
    cfg = load_config(overrides=["scene.type=gaussians", f"scene.init_from={path}", "scene.sh_degree=1"])
    scene = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0)
    assert len(scene.gaussians) == 9 and scene.grad_accum.shape == (9,)
    assert torch.equal(scene.gaussians.means.detach(), g.means.detach())
    assert torch.equal(scene.gaussians.sh_rest.detach(), g.sh_rest.detach()[:, :3])
    bad = load_config(overrides=["scene.type=gaussians", f"scene.init_from={tmp_path / 'none.ply'}"])
    with pytest.raises(SplatFileError, match="cannot read"):
        build_scene(bad.scene, bad.render, torch.device("cpu"), 0)
