"""Splatting in plain PyTorch: project 3D Gaussians to the image, then alpha-composite them per pixel.

This is the rasteriser of ``scene.rasterizer: torch`` (any device, differentiable by autograd) and
the reference the gsplat backend is checked against. It follows gsplat's conventions (its
``fully_fused_projection`` and ``rasterize_to_pixels``, classic mode) so the two give the same images:

1. **Cameras** (:func:`camera_matrices`): carv3d's OpenGL camera-to-world ``C`` becomes gsplat's
   OpenCV world-to-camera ``V = (C · diag(1, −1, −1, 1))⁻¹`` and intrinsics ``f = (H/2) / tan(fovy/2)``,
   ``(c_x, c_y) = (W/2, H/2)``: a pixel centre ``(j + ½, i + ½)`` is on carv3d's ray of row i, column j.
2. **Projection** (:func:`project`, EWA splatting, Zwicker et al. 2001): with ``t = W μ + b`` the mean
   in camera space and the Jacobian of the perspective map at t (t_x, t_y clamped to 1.3 × the field
   of view, as gsplat does),

       J = [[f/t_z, 0, −f t_x / t_z²], [0, f/t_z, −f t_y / t_z²]],
       μ' = (f t_x / t_z + c_x, f t_y / t_z + c_y),      Σ' = J W Σ Wᵀ Jᵀ + ε I   (ε = 0.3 px², a blur of ~½ px),

   the conic is Σ'⁻¹ and the pixel radius ``r = ceil(3.33 √Σ'_kk)`` per axis. A Gaussian is culled
   (r = 0) behind the near plane (t_z ≤ 0.01), or when its box misses the image.
3. **Compositing** (:func:`rasterize`): at a pixel p, each Gaussian has

       α_i = min(0.999, o_i · exp(−½ (p − μ'_i)ᵀ Σ'_i⁻¹ (p − μ'_i))),   skipped when α_i < 1/255,

   and in front-to-back order of t_z (``T_i = Π_{j<i} (1 − α_j)``)

       F(p) = Σ_i α_i T_i f_i,        A(p) = Σ_i α_i T_i = 1 − T_final,

   stopping before the first Gaussian that would take the transmittance to 1e-4 or below. Any
   per-Gaussian features f_i composite the same way (colour, distance, normal).

Outside its 3.33σ box a Gaussian's α is below 1/255 (``exp(−3.33²/2) < 1/255``), so skipping
Gaussians whose box misses a tile changes nothing: the image is composited per tile of 8 × 8 pixels
(:func:`tile_lists`: each tile's Gaussians, front to back, padded to the longest list), tiles in
chunks of at most ``max_pairs`` (pixel, Gaussian) pairs. Tiles only cull; compositing is dense
within a tile and differentiated by autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from carv3d.cameras import Cameras

EPS_2D = 0.3  # px², added to the projected covariance (gsplat's eps2d)
NEAR_PLANE = 0.01
RADIUS_SIGMAS = 3.33
MIN_ALPHA = 1.0 / 255.0
MAX_ALPHA = 0.999
MIN_TRANSMITTANCE = 1e-4
MAX_POWER = 6.0  # > ln 255: exp(−6) < 1/255
MAX_PAIRS = 2**21  # (pixel, Gaussian) pairs at once: ~8 MB per float32 temporary
TILE = 8  # pixels per tile side (culling only)


def camera_matrices(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gsplat's camera inputs: world-to-camera ``viewmats`` (B, 4, 4), OpenCV axes, and ``Ks`` (B, 3, 3)."""
    c2w = cameras.c2w
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=c2w.dtype, device=c2w.device)
    rotation = c2w[:, :3, :3] * flip  # columns: +X right, +Y down, +Z forward
    position = c2w[:, :3, 3]
    viewmats = torch.zeros_like(c2w)
    viewmats[:, :3, :3] = rotation.transpose(1, 2)
    viewmats[:, :3, 3] = -(rotation.transpose(1, 2) @ position.unsqueeze(-1)).squeeze(-1)
    viewmats[:, 3, 3] = 1.0
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy.to(c2w.dtype))
    ks = torch.zeros(len(cameras), 3, 3, dtype=c2w.dtype, device=c2w.device)
    ks[:, 0, 0], ks[:, 1, 1] = focal, focal
    ks[:, 0, 2], ks[:, 1, 2], ks[:, 2, 2] = 0.5 * width, 0.5 * height, 1.0
    return viewmats, ks


@dataclass
class Projection:
    """N Gaussians seen by B cameras.

    Attributes:
        means2d: (B, N, 2) pixel coordinates of the means (x right, y down; pixel centres at +½).
        conics: (B, N, 3) the upper triangle (a, b, c) of Σ'⁻¹ = [[a, b], [b, c]].
        depths: (B, N) camera-space z.
        radii: (B, N, 2) int32 pixel radii of the 3.33σ box; 0 where culled.
    """

    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    radii: torch.Tensor


def project(means: torch.Tensor, covars: torch.Tensor, viewmats: torch.Tensor, ks: torch.Tensor,
            width: int, height: int, opacities: Optional[torch.Tensor] = None, eps2d: float = EPS_2D,
            near_plane: float = NEAR_PLANE) -> Projection:
    """EWA projection of Gaussians (means (N, 3), covariances (N, 3, 3)) into B cameras (module docstring).

    With ``opacities`` (N,) the box shrinks to where α can reach 1/255, ``min(3.33, √(2 ln(255 o)))``
    standard deviations, and Gaussians below 1/255 are culled, as gsplat's CUDA projection does.
    """
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]
    t = (means @ rot.transpose(1, 2)) + trans[:, None, :]  # (B, N, 3) = W μ + b
    fx, fy = ks[:, 0, 0, None], ks[:, 1, 1, None]  # (B, 1)
    cx, cy = ks[:, 0, 2, None], ks[:, 1, 2, None]
    tx, ty, tz = t.unbind(-1)
    # The Jacobian is taken at t clamped to 1.3 × the field of view (gsplat): Gaussians far outside
    # the image would otherwise get huge, needle-like footprints.
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx_c = tz * torch.minimum(torch.maximum(tx / tz, -(cx / fx + 0.3 * tan_x)), (width - cx) / fx + 0.3 * tan_x)
    ty_c = tz * torch.minimum(torch.maximum(ty / tz, -(cy / fy + 0.3 * tan_y)), (height - cy) / fy + 0.3 * tan_y)
    # Σ' = (J W) Σ (J W)ᵀ with the rows of J W written out: J = [[f/t_z, 0, −f t_x/t_z²], [0, f/t_z, −f t_y/t_z²]]
    # (elementwise: no batched 2×3 matrix products, which are slow on a CPU).
    w0, w1, w2 = (rot[:, None, k, :] for k in range(3))  # rows of W, (B, 1, 3)
    row_x = (fx / tz)[..., None] * w0 - (fx * tx_c / tz**2)[..., None] * w2  # (B, N, 3)
    row_y = (fy / tz)[..., None] * w1 - (fy * ty_c / tz**2)[..., None] * w2
    sigma_x = (covars[None] * row_x[..., None, :]).sum(-1)  # Σ (J W)_xᵀ, (B, N, 3)
    sigma_y = (covars[None] * row_y[..., None, :]).sum(-1)
    a = (row_x * sigma_x).sum(-1) + eps2d
    b = 0.5 * ((row_x * sigma_y).sum(-1) + (row_y * sigma_x).sum(-1))
    c = (row_y * sigma_y).sum(-1) + eps2d
    det_raw = a * c - b * b
    det = det_raw.clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], dim=-1)
    with torch.no_grad():
        extend = torch.full_like(tz, RADIUS_SIGMAS)
        valid = (det_raw > 0) & (tz > near_plane)
        if opacities is not None:
            o = opacities.detach().to(tz.dtype).expand_as(tz)
            extend = torch.minimum(extend, (2.0 * torch.log(o.clamp_min(MIN_ALPHA) / MIN_ALPHA)).sqrt())
            valid = valid & (o >= MIN_ALPHA)
        radii = torch.stack([torch.ceil(extend * a.sqrt()), torch.ceil(extend * c.sqrt())], dim=-1)
        inside = ((means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
                  & (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height))
        radii = torch.where((valid & inside).unsqueeze(-1), radii, torch.zeros_like(radii)).to(torch.int32)
    return Projection(means2d, conics, tz, radii)


def composite(alpha: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of P pixels over M depth-sorted Gaussians.

    Args:
        alpha: (P, M) α_i per pixel, in depth order, already 0 where skipped.
        features: (M, C) f_i.

    Returns:
        (P, C) Σ α_i T_i f_i and (P,) Σ α_i T_i, stopping before T would reach ``MIN_TRANSMITTANCE``.
    """
    log_keep = torch.log1p(-alpha)  # log(1 − α_i) ≥ log(0.001)
    with torch.no_grad():  # which Gaussians come before the stop (a step function: no gradient)
        included = torch.cumsum(log_keep, dim=1) > math.log(MIN_TRANSMITTANCE)
    alpha = alpha * included
    log_keep = torch.log1p(-alpha)
    transmittance = torch.exp(torch.cumsum(log_keep, dim=1) - log_keep)  # exclusive: Π_{j<i} (1 − α_j)
    weights = alpha * transmittance
    return weights @ features, weights.sum(dim=1)


def _pixel_alpha(pixels: torch.Tensor, means2d: torch.Tensor, conics: torch.Tensor,
                 opacities: torch.Tensor) -> torch.Tensor:
    """α of Gaussians at pixel centres, 0 where below 1/255 (module docstring).

    pixels (T, P, 2); means2d (T, M, 2), conics (T, M, 3), opacities (T, M) → (T, P, M).
    """
    dx = pixels[:, :, None, 0] - means2d[:, None, :, 0]
    dy = pixels[:, :, None, 1] - means2d[:, None, :, 1]
    a, b, c = (v[:, None, :] for v in conics.unbind(-1))
    power = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    # Beyond ln 255 every α is below 1/255 (o ≤ 1) and dropped: clamping first keeps exp away from
    # underflow, whose subnormal results are several times slower on a CPU.
    alpha = (opacities[:, None, :] * torch.exp(-power.clamp_max(MAX_POWER))).clamp_max(MAX_ALPHA)
    return torch.where((power >= 0) & (alpha >= MIN_ALPHA), alpha, torch.zeros_like(alpha))


def composite(alpha: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of pixels over depth-sorted Gaussians.

    Args:
        alpha: (T, P, M) α_i per pixel, in depth order along M, already 0 where skipped.
        features: (T, M, C) f_i.

    Returns:
        (T, P, C) Σ α_i T_i f_i and (T, P) Σ α_i T_i, stopping before T would reach ``MIN_TRANSMITTANCE``.
    """
    log_keep = torch.log1p(-alpha)  # log(1 − α_i) ≥ log(0.001)
    with torch.no_grad():  # which Gaussians come before the stop (a step function: no gradient)
        included = torch.cumsum(log_keep, dim=-1) > math.log(MIN_TRANSMITTANCE)
    alpha = alpha * included
    log_keep = torch.log1p(-alpha)
    transmittance = torch.exp(torch.cumsum(log_keep, dim=-1) - log_keep)  # exclusive: Π_{j<i} (1 − α_j)
    weights = alpha * transmittance
    return weights @ features, weights.sum(dim=-1)


def tile_lists(means2d: torch.Tensor, radii: torch.Tensor, depths: torch.Tensor, height: int, width: int,
               tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which Gaussians reach each tile of ``tile × tile`` pixels, front to back.

    A Gaussian reaches the tiles its box ``μ' ± r`` overlaps (outside it α < 1/255, see the module
    docstring). Args are one camera's: means2d (N, 2), radii (N, 2), depths (N,).

    Returns:
        index (n_tiles, M) into the N Gaussians, sorted by depth, padded with N (a slot past the
        end), and counts (n_tiles,); tiles are numbered row-major.
    """
    device = means2d.device
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    visible = (radii > 0).all(dim=-1).nonzero().squeeze(-1)
    visible = visible[torch.argsort(depths[visible], stable=True)]
    m = means2d[visible].detach()
    r = radii[visible].to(m.dtype)
    lo = ((m - r) / tile).floor().clamp_min(0).long()
    hi = ((m + r) / tile).floor().long()
    hi = torch.stack([hi[:, 0].clamp_max(tiles_x - 1), hi[:, 1].clamp_max(tiles_y - 1)], dim=-1)
    span = (hi - lo + 1).clamp_min(0)  # (V, 2) tiles per axis
    per_gaussian = span[:, 0] * span[:, 1]
    owner = torch.repeat_interleave(torch.arange(visible.numel(), device=device), per_gaussian)
    first = torch.cumsum(per_gaussian, 0) - per_gaussian
    k = torch.arange(owner.numel(), device=device) - first[owner]  # k-th tile of its Gaussian
    tx = lo[owner, 0] + k % span[owner, 0].clamp_min(1)
    ty = lo[owner, 1] + k // span[owner, 0].clamp_min(1)
    tile_id = ty * tiles_x + tx
    order = torch.argsort(tile_id, stable=True)  # stable: depth order within a tile
    tile_id, owner = tile_id[order], owner[order]
    n_tiles = tiles_x * tiles_y
    counts = torch.bincount(tile_id, minlength=n_tiles)
    slot = torch.arange(tile_id.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[tile_id]
    index = torch.full((n_tiles, int(counts.max()) if counts.numel() and tile_id.numel() else 0), means2d.shape[0],
                       dtype=torch.long, device=device)
    index[tile_id, slot] = visible[owner]
    return index, counts


def rasterize(projection: Projection, opacities: torch.Tensor, features: torch.Tensor, height: int, width: int,
              max_pairs: int = MAX_PAIRS, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite B images (module docstring, step 3).

    Args:
        projection: the Gaussians in the B cameras.
        opacities: (N,) o_i.
        features: (B, N, C) per-camera features f_i (colour, distance, ...).
        height, width: image size.
        max_pairs: at most this many (pixel, Gaussian) pairs at once.
        tile: tile side in pixels (tiles only cull: any size gives the same image).

    Returns:
        images (B, H, W, C) ``Σ α_i T_i f_i`` and alpha (B, H, W, 1) ``Σ α_i T_i``.
    """
    batch, n, channels = features.shape
    dtype, device = features.dtype, features.device
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    offsets = torch.arange(tile, device=device, dtype=dtype) + 0.5
    local = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij")[::-1], dim=-1).reshape(-1, 2)  # (t², 2) x, y
    corners = torch.stack(torch.meshgrid(torch.arange(tiles_y, device=device), torch.arange(tiles_x, device=device),
                                         indexing="ij")[::-1], dim=-1).reshape(-1, 2).to(dtype) * tile
    pixels_all = corners[:, None, :] + local[None]  # (n_tiles, t², 2)
    images, alphas = [], []
    for b in range(batch):
        index, _ = tile_lists(projection.means2d[b], projection.radii[b], projection.depths[b].detach(),
                              height, width, tile)
        pad = lambda v, fill: torch.cat([v, v.new_full((1, *v.shape[1:]), fill)])  # noqa: E731  slot N: nothing
        means2d, conics = pad(projection.means2d[b], 0.0), pad(projection.conics[b], 0.0)
        opa, feats = pad(opacities, 0.0), pad(features[b], 0.0)
        tiles_per_chunk = max(1, max_pairs // max(1, tile * tile * index.shape[1]))
        image_parts, alpha_parts = [], []
        for t0 in range(0, index.shape[0], tiles_per_chunk):
            idx = index[t0:t0 + tiles_per_chunk]
            if idx.shape[1] == 0:
                image_parts.append(features.new_zeros(idx.shape[0], tile * tile, channels))
                alpha_parts.append(features.new_zeros(idx.shape[0], tile * tile))
                continue
            alpha = _pixel_alpha(pixels_all[t0:t0 + tiles_per_chunk], means2d[idx], conics[idx], opa[idx])
            image, acc = composite(alpha, feats[idx])
            image_parts.append(image)
            alpha_parts.append(acc)
        image = torch.cat(image_parts).reshape(tiles_y, tiles_x, tile, tile, channels)
        acc = torch.cat(alpha_parts).reshape(tiles_y, tiles_x, tile, tile, 1)
        image = image.permute(0, 2, 1, 3, 4).reshape(tiles_y * tile, tiles_x * tile, channels)[:height, :width]
        acc = acc.permute(0, 2, 1, 3, 4).reshape(tiles_y * tile, tiles_x * tile, 1)[:height, :width]
        images.append(image)
        alphas.append(acc)
    return torch.stack(images), torch.stack(alphas)
