"""Turntables, videos, images and contact sheets."""

from __future__ import annotations

import math

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

from carv3d.render.renderer import VolumeRenderer
from carv3d.render.turntable import image_grid, render_turntable, to_uint8, write_image, write_video
from carv3d.scene.nerf import NeRFScene


class BlackSphere(nn.Module):
    """A dense black ball of radius ρ at the origin."""

    radius = 1.0

    def __init__(self, rho: float):
        super().__init__()
        self.rho = rho

    def density(self, x):
        return 400.0 * (x.norm(dim=-1) <= self.rho).float()

    def forward(self, x):
        return self.density(x), torch.zeros_like(x)

    def normals(self, x):
        return torch.nn.functional.normalize(x, dim=-1)


def test_sphere_renders_a_disc_of_the_projected_area():
    rho, distance, fovy, size = 0.5, 1.5, 50.0, 64
    renderer = VolumeRenderer(1.0, samples_per_ray=96, background="white")
    frames = render_turntable(NeRFScene.from_parts(BlackSphere(rho), renderer), n_frames=3, size=size, distance=distance, fovy=fovy, chunk_rays=1500)
    assert frames.shape == (3, size, size, 3) and frames.dtype == np.uint8
    # The silhouette is a cone of half-angle asin(ρ/D) around the optical axis; on the image
    # plane it is a circle of radius f·tan(asin(ρ/D)) pixels, f = (size/2) / tan(fovy/2).
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    radius_px = focal * math.tan(math.asin(rho / distance))
    expected = math.pi * radius_px**2  # ≈ 1849 px
    for frame in frames:
        area = int((frame.mean(axis=-1) < 128).sum())
        # Pixel-centre counting of a disc of radius r ≈ 24 px errs by O(r^(2/3)) ≈ 10 px (0.5%);
        # 2% leaves room for the sampling of the rim.
        assert area == pytest.approx(expected, rel=0.02)
        centre = size // 2
        assert frame[centre, centre].max() == 0 and frame[0, 0].min() == 255


def test_write_video_round_trip(tmp_path):
    n_frames, height, width = 7, 33, 31  # odd sides are padded to even ones for H.264
    colours = np.linspace(20, 235, n_frames).astype(np.uint8)
    frames = np.zeros((n_frames, height, width, 3), dtype=np.uint8)
    frames[..., 0] = colours[:, None, None]
    frames[..., 1] = 255 - colours[:, None, None]
    frames[..., 2] = 128
    path = write_video(frames, tmp_path / "turntable.mp4", fps=12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turntable.mp4"]  # no temporary left behind
    reader = imageio_v2.get_reader(path, format="FFMPEG")
    decoded = [frame for frame in reader]
    meta = reader.get_meta_data()
    reader.close()
    assert len(decoded) == n_frames
    assert decoded[0].shape == (height + 1, width + 1, 3)
    assert meta["fps"] == pytest.approx(12)
    assert "h264" in meta["codec"]
    for k in range(n_frames):  # lossy, but each solid frame keeps its colour (and the order)
        mean = decoded[k][:height, :width].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(mean, frames[k, 0, 0], atol=6)


def test_turntable_video_of_a_rendered_field(tmp_path):
    renderer = VolumeRenderer(1.0, samples_per_ray=32, background="white")
    frames = render_turntable(NeRFScene.from_parts(BlackSphere(0.4), renderer), n_frames=5, size=24)
    path = write_video(frames, tmp_path / "sub" / "t.mp4", fps=24)
    reader = imageio_v2.get_reader(path, format="FFMPEG")
    count = reader.count_frames()
    shape = reader.get_data(0).shape
    reader.close()
    assert (count, shape) == (5, (24, 24, 3))


def test_write_image_is_lossless_and_atomic(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    path = write_image(tmp_path / "view.png", image)
    np.testing.assert_array_equal(iio.imread(path), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.png"]
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "bad.png", image.astype(np.float32))
    assert not (tmp_path / "bad.png").exists()


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 3), k * 10, dtype=np.uint8) for k in range(5)])
    sheet = image_grid(images, ncols=3)
    assert sheet.shape == (4, 9, 3)
    for k in range(5):
        r, c = divmod(k, 3)
        assert np.all(sheet[2 * r : 2 * r + 2, 3 * c : 3 * c + 3] == k * 10)
    assert np.all(sheet[2:4, 6:9] == 255)  # the empty sixth cell
    assert image_grid(list(images[:2]), ncols=4).shape == (2, 6, 3)  # never more columns than images


def test_to_uint8_rounds_and_clamps():
    images = torch.tensor([[-0.5, 0.0, 0.5, 1.0 / 255 * 0.49, 1.0 / 255 * 0.51, 2.0]]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(images)
    assert out.shape == (1, 1, 6, 3)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 128, 0, 1, 255])


def test_to_uint8_writes_non_finite_pixels_black_or_white_and_one_channel_grey():
    images = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5]).view(1, 1, 1, 4)
    out = to_uint8(images)
    assert out.shape == (1, 1, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [[0] * 3, [255] * 3, [0] * 3, [128] * 3])


def test_turntable_progress_bar_counts_the_frames_and_changes_nothing(capsys):
    scene = NeRFScene.from_parts(BlackSphere(0.4), VolumeRenderer(1.0, samples_per_ray=8, background="white"))
    quiet = render_turntable(scene, n_frames=3, size=8)
    assert capsys.readouterr().err == ""
    shown = render_turntable(scene, n_frames=3, size=8, progress=True)
    err = capsys.readouterr().err
    assert "turntable:" in err and "/3 [" in err and "frame" in err
    np.testing.assert_array_equal(quiet, shown)
