"""The Gaussians as a density / colour field, for the mesh export and anything else that queries
``scene.field`` (the field protocol of :mod:`carv3d.render.renderer`).

A splat composites with ``α = o · G(p)``; a volume with density σ lets through ``exp(−∫σ dt)``. A
3D Gaussian's line integral through its centre along an axis with scale s is ``√(2π) s``, so

    σ(x) = Σ_i κ_i G_i(x),        κ_i = −ln(1 − o_i) / (√(2π) s̄_i),     s̄_i = (s_i1 s_i2 s_i3)^{1/3}

gives a ray through the centre of an isotropic Gaussian the splat's own opacity o_i, and (because
``exp(−Σ τ_i) = Π (1 − α_i)``) a stack of them the splats' compositing. For anisotropic Gaussians the
geometric-mean scale s̄ makes it exact on average over directions, not per direction. The mesh's
automatic threshold then sees the same kind of density as a NeRF's (``carv3d.export``), and the
albedo is the density-weighted mean of the Gaussians' view-independent colours,

    albedo(x) = Σ_i κ_i G_i(x) c_i / Σ_i κ_i G_i(x)      (grey ½ where no Gaussian reaches).

Each Gaussian is cut off outside its 3σ ellipsoid ``(x − μ)ᵀ Σ⁻¹ (x − μ) ≤ 9`` (where it has fallen to
e^{−4.5} ≈ 1% of its peak), so a query looks at each point's block of space and only the Gaussians
whose bounding box ``|x_k − μ_k| ≤ 3 √Σ_kk`` reaches it (blocks about four typical box half-widths
wide); the squared Mahalanobis distances of a block's points to its Gaussians are one matrix product
``φ(x) · c`` of quadratic features, taken relative to the block's centre. Outside the scene box ``[−r, r]³`` the density is 0, as the NeRF's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from carv3d.scene.gaussians_model import Gaussians, covariance, precision

CUTOFF_SIGMAS = 3.0
MIN_BLOCKS_PER_AXIS, MAX_BLOCKS_PER_AXIS = 2, 32
MAX_PAIRS = 2**22  # (point, Gaussian) pairs per batch
MAX_OPACITY = 0.999  # the rasteriser's α clamp: κ stays finite


class GaussianField:
    """``field(x) -> (σ, albedo)``, ``field.density(x)``, ``field.radius`` of live Gaussians.

    Args:
        gaussians: the scene's Gaussians (read at every query: densification may replace them).
        radius: the scene box's half side.
    """

    def __init__(self, gaussians: Callable[[], Gaussians], radius: float):
        self._gaussians = gaussians
        self.radius = float(radius)

    @property
    def device(self) -> torch.device:
        return self._gaussians().means.device

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self._query(x, with_albedo=False)[0]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._query(x, with_albedo=True)

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """Unit ``−∇σ / ‖∇σ‖`` by autograd (outward where density falls off)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.density(x).sum(), x)
        return -torch.nn.functional.normalize(grad, dim=-1)

    def _query(self, x: torch.Tensor, with_albedo: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._gaussians()
        means, scales = g.means, g.scales()
        opacity = g.opacities().clamp_max(MAX_OPACITY)
        kappa = -torch.log1p(-opacity) / (math.sqrt(2.0 * math.pi) * scales.prod(dim=-1).pow(1.0 / 3.0))
        prec = precision(g.quats, scales)
        half = CUTOFF_SIGMAS * torch.diagonal(covariance(g.quats, scales), dim1=-2, dim2=-1).sqrt().detach()
        colours = g.colours()
        sigma = x.new_zeros(x.shape[0])
        weighted = x.new_zeros(x.shape[0], 3)
        inside = (x.abs() <= self.radius).all(dim=-1)
        # Blocks about 4 typical box half-widths wide: few Python iterations for a few large Gaussians,
        # few (point, Gaussian) pairs for many small ones.
        typical = float(half.max(dim=-1).values.median()) if half.numel() else self.radius
        per_axis = int(min(MAX_BLOCKS_PER_AXIS, max(MIN_BLOCKS_PER_AXIS, round(2.0 * self.radius / (4.0 * typical)))))
        block = self.radius * 2.0 / per_axis
        cell = ((x.detach() + self.radius) / block).floor().clamp(0, per_axis - 1).long()
        key = (cell[:, 0] * per_axis + cell[:, 1]) * per_axis + cell[:, 2]
        key = torch.where(inside, key, torch.full_like(key, -1))
        order = torch.argsort(key)
        keys, counts = torch.unique_consecutive(key[order], return_counts=True)
        start = 0
        lo_all, hi_all = (means.detach() - half), (means.detach() + half)
        for k, n in zip(keys.tolist(), counts.tolist()):
            rows = order[start:start + n]
            start += n
            if k < 0:
                continue
            c = torch.tensor([k // per_axis**2, (k // per_axis) % per_axis, k % per_axis], device=x.device, dtype=x.dtype)
            lo, hi = -self.radius + c * block, -self.radius + (c + 1) * block
            near = ((hi_all >= lo) & (lo_all <= hi)).all(dim=-1).nonzero().squeeze(-1)
            if near.numel() == 0:
                continue
            centre = 0.5 * (lo + hi)  # coordinates relative to the block: small numbers, little cancellation
            coef = _quadratic_coefficients(prec[near], means[near] - centre)  # (10, M)
            per_batch = max(1, MAX_PAIRS // near.numel())
            for s in range(0, rows.numel(), per_batch):
                sub = rows[s:s + per_batch]
                m2 = _quadratic_features(x[sub] - centre) @ coef  # (P, M) Mahalanobis², one matrix product
                w = torch.where(m2 <= CUTOFF_SIGMAS**2, kappa[near] * torch.exp(-0.5 * m2.clamp_min(0.0)),
                                torch.zeros_like(m2))
                sigma = sigma.index_add(0, sub, w.sum(dim=1))
                if with_albedo:
                    weighted = weighted.index_add(0, sub, w @ colours[near])
        albedo = torch.where(sigma[:, None] > 0, weighted / sigma[:, None].clamp_min(1e-30),
                             torch.full_like(weighted, 0.5)) if with_albedo else weighted
        return sigma, albedo


def _quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = (x₀², x₁², x₂², 2x₀x₁, 2x₀x₂, 2x₁x₂, x₀, x₁, x₂, 1), so that (x − μ)ᵀ P (x − μ) = φ(x) · c(P, μ)."""
    x0, x1, x2 = x.unbind(-1)
    return torch.stack([x0 * x0, x1 * x1, x2 * x2, 2 * x0 * x1, 2 * x0 * x2, 2 * x1 * x2, x0, x1, x2,
                        torch.ones_like(x0)], dim=-1)


def _quadratic_coefficients(prec: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """c(P, μ) = (P₀₀, P₁₁, P₂₂, P₀₁, P₀₂, P₁₂, −2Pμ, μᵀPμ) per Gaussian: (10, M)."""
    pm = (prec @ means.unsqueeze(-1)).squeeze(-1)  # (M, 3)
    return torch.stack([prec[:, 0, 0], prec[:, 1, 1], prec[:, 2, 2], prec[:, 0, 1], prec[:, 0, 2], prec[:, 1, 2],
                        -2 * pm[:, 0], -2 * pm[:, 1], -2 * pm[:, 2], (means * pm).sum(-1)], dim=0)
