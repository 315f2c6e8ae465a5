"""Rendering (cameras live in :mod:`carv3d.cameras`): rays, samplers, compositing, shading, backgrounds and turntables.

The batched torch path (stratified samples, nerfacc's batched compositing) runs on any device;
nerfacc's occupancy-grid path runs on CUDA tensors only. :func:`select_sampler` is the one place
that chooses between them.
"""

from carv3d.render.background import Background
from carv3d.render.compositing import accumulate, compute_weights, expected_depth
from carv3d.render.occupancy import OccupancyGridSampler
from carv3d.render.rays import camera_rays, ray_box_intersect
from carv3d.render.renderer import RayOutput, RenderOutput, VolumeRenderer, select_sampler
from carv3d.render.sampling import RaySegments, stratified_samples
from carv3d.render.shading import sample_light_directions, shade
from carv3d.render.turntable import image_grid, render_turntable, to_uint8, write_image, write_video

__all__ = [
    "Background",
    "OccupancyGridSampler",
    "RayOutput",
    "RaySegments",
    "RenderOutput",
    "VolumeRenderer",
    "accumulate",
    "camera_rays",
    "compute_weights",
    "expected_depth",
    "image_grid",
    "ray_box_intersect",
    "render_turntable",
    "sample_light_directions",
    "select_sampler",
    "shade",
    "stratified_samples",
    "to_uint8",
    "write_image",
    "write_video",
]
