"""Volume compositing: from densities on intervals to weights, and from weights to pixel values.

Along a ray with intervals ``[t_i, t_i + δ_i)`` and densities ``σ_i`` (the emission–absorption
model with piecewise-constant density), the probability that light survives up to interval ``i``
and is then absorbed inside it is

    T_i = exp(−Σ_{j<i} σ_j δ_j)              (transmittance: nothing absorbed before i)
    α_i = 1 − exp(−σ_i δ_i)                   (absorbed inside interval i)
    w_i = T_i · α_i                           (the rendering weight)

and a per-sample quantity ``v_i`` (colour, normal, depth) composites to ``Σ_i w_i v_i``. The weights
telescope: ``Σ_i w_i = 1 − exp(−Σ_i σ_i δ_i)``, the pixel's *opacity*. Over a background ``b``:

    C = Σ_i w_i c_i + (1 − Σ_i w_i) · b.

Both layouts of :class:`~carv3d.render.sampling.RaySegments` go through nerfacc
(``render_weight_from_density``, ``accumulate_along_rays``):

- batched ``(n_rays, n_samples)`` tensors: plain torch cumulative sums, on any device;
- packed ``(n_total,)`` tensors with ``ray_indices``: nerfacc's CUDA scans, CUDA tensors only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import nerfacc
import torch

from carv3d.render.sampling import RaySegments


def compute_weights(
    segments: RaySegments, sigmas: torch.Tensor, n_rays: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rendering weights ``w_i = T_i (1 − exp(−σ_i δ_i))`` for every interval.

    Args:
        segments: the intervals (batched or packed).
        sigmas: densities, same shape as ``segments.t_starts`` (float32 recommended: the
            transmittance is an exponential of a cumulative sum).
        n_rays: number of rays (used by the packed layout).

    Returns:
        weights, transmittance, alphas: each the shape of ``sigmas``. Differentiable to ``sigmas``.

    Raises:
        RuntimeError: packed segments on a non-CUDA device. nerfacc's packed scans only exist as
            CUDA kernels; on CPU tensors they would try (and fail) to JIT-compile them. The sampler
            choice (:func:`carv3d.render.renderer.select_sampler`) never lets this happen.
    """
    if segments.packed:
        if not sigmas.is_cuda:
            raise RuntimeError("packed (ray_indices) compositing needs CUDA tensors; use batched segments on CPU")
        return nerfacc.render_weight_from_density(
            segments.t_starts, segments.t_ends, sigmas, ray_indices=segments.ray_indices, n_rays=n_rays
        )
    return nerfacc.render_weight_from_density(segments.t_starts, segments.t_ends, sigmas)


def accumulate(
    segments: RaySegments, weights: torch.Tensor, values: Optional[torch.Tensor], n_rays: int
) -> torch.Tensor:
    """``Σ_i w_i v_i`` per ray (``Σ_i w_i`` when ``values`` is None).

    Args:
        segments: the intervals the weights belong to.
        weights: shape of ``segments.t_starts``.
        values: (*weights.shape, D) or None.
        n_rays: number of rays.

    Returns:
        (n_rays, D), or (n_rays, 1) for ``values=None``. Pure torch (a sum or an ``index_add``),
        so it works on any device for both layouts.
    """
    if segments.packed:
        return nerfacc.accumulate_along_rays(weights, values, ray_indices=segments.ray_indices, n_rays=n_rays)
    return nerfacc.accumulate_along_rays(weights, values)


def expected_depth(segments: RaySegments, weights: torch.Tensor, opacity: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Depth of the surface a pixel sees: the mean termination distance given that the ray stops,

        depth = Σ_i w_i · t_mid_i / Σ_i w_i,

    and 0 where the opacity is 0 (nerfacc's convention).

    Args:
        segments: the intervals.
        weights: shape of ``segments.t_starts``.
        opacity: (n_rays, 1), ``Σ_i w_i``.
        n_rays: number of rays.

    Returns:
        (n_rays, 1), in the units of ``t`` (world units for unit directions).
    """
    weighted = accumulate(segments, weights, segments.t_mids.unsqueeze(-1), n_rays)
    return weighted / opacity.clamp_min(torch.finfo(weighted.dtype).eps)
