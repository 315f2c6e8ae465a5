"""Turntable videos, images and contact sheets of a field.

A turntable is ``n_frames`` cameras evenly spaced in azimuth at one elevation, starting at the
front (azimuth 0, looking from +Z), rendered without gradients and in ray chunks so large frames
fit in memory. Files are written atomically (a crash never leaves half a video).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import torch
from tqdm.auto import tqdm

from carv3d.io import atomic_path
from carv3d.cameras import orbit_cameras

ImageArray = Union[np.ndarray, torch.Tensor]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3 or 1, H, W) float in [0, 1] → (B, H, W, 3) uint8, rounded to the nearest level; one
    channel is shown grey. A non-finite pixel (a diverged run's last validation) is written black
    (NaN, -inf) or white (+inf) rather than left to the cast, whose result is undefined."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    finite = torch.nan_to_num(images.detach().float(), nan=0.0, posinf=1.0, neginf=0.0)
    scaled = (finite.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def render_turntable(
    scene,
    n_frames: int,
    size: int,
    elevation: float = 15.0,
    distance: float = 1.5,
    fovy: float = 50.0,
    shading: str = "albedo",
    chunk_rays: int = 16384,
    progress: bool = False,
) -> np.ndarray:
    """Render a turntable of a scene (:class:`carv3d.scene.Scene`: ``render`` and ``device``).

    Deterministic: no generator, so samples sit at bin midpoints, the light (if any) is a
    headlight and a ``random`` background renders white.

    Args:
        scene: what to render, on its own device.
        n_frames: frames; frame k looks from azimuth ``360° · k / n_frames``.
        size: frames are ``size × size`` pixels.
        elevation: camera elevation in degrees.
        distance: camera distance from the origin.
        fovy: vertical field of view in degrees.
        shading: ``albedo`` | ``lambertian`` | ``textureless``.
        chunk_rays: rays rendered at a time.
        progress: show a tqdm bar over the frames (on stderr).

    Returns:
        (n_frames, size, size, 3) uint8.
    """
    cameras = orbit_cameras(n_frames, elevation_deg=elevation, distance=distance, fovy_deg=fovy, device=scene.device)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        for k in tqdm(range(n_frames), desc="turntable", unit="frame", disable=not progress, leave=False):
            out = scene.render(cameras[k : k + 1], shading=shading, height=size, width=size, chunk_rays=chunk_rays)
            frames[k] = to_uint8(out.rgb)[0]
    return frames


def _as_uint8_array(images: ImageArray) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {array.dtype}; convert with to_uint8()")
    return array


def write_video(frames: ImageArray, path: Union[str, Path], fps: int = 24) -> Path:
    """Write (N, H, W, 3) uint8 frames as an H.264 MP4 (yuv420p, plays in browsers), atomically.

    H.264 with 4:2:0 chroma needs even sides: an odd height or width is padded by repeating the
    last row or column.

    Returns:
        The path written.
    """
    array = _as_uint8_array(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3), got {array.shape}")
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    with atomic_path(path) as tmp:
        imageio_v2.mimwrite(
            tmp, list(array), format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, quality=8,
        )
    return path


def write_image(path: Union[str, Path], image: ImageArray) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 image as PNG, atomically. Returns the path."""
    array = _as_uint8_array(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W, 3) or (H, W), got {array.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, array, extension=".png")
    return path


def image_grid(images: Union[ImageArray, Sequence[ImageArray]], ncols: int, fill: int = 255) -> np.ndarray:
    """Tile N same-sized uint8 images (N, H, W, C) into a sheet of ``ncols`` columns.

    Image k goes to row ``k // ncols``, column ``k % ncols``; cells after the last image are
    filled with ``fill`` (white by default).

    Returns:
        (rows · H, ncols · W, C) uint8 with ``rows = ceil(N / ncols)``.
    """
    if isinstance(images, (list, tuple)):
        array = np.stack([_as_uint8_array(image) for image in images])
    else:
        array = _as_uint8_array(images)
    n, h, w, c = array.shape
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    sheet = np.full((nrows * h, ncols * w, c), fill, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, ncols)
        sheet[r * h : (r + 1) * h, col * w : (col + 1) * w] = array[k]
    return sheet
