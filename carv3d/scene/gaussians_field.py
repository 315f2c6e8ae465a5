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

Each Gaussian is cut off outside its 3σ box ``|x_k − μ_k| ≤ 3 √Σ_kk`` (at most e^{−4.5} ≈ 1% of its
peak is dropped there), so a query looks at each point's block of space and only the Gaussians whose
box reaches it; outside the scene box ``[−r, r]³`` the density is 0, as the NeRF's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from carv3d.scene.gaussians_model import Gaussians, covariance, precision

CUTOFF_SIGMAS = 3.0
BLOCKS_PER_AXIS = 8
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
        block = self.radius * 2.0 / BLOCKS_PER_AXIS
        cell = ((x.detach() + self.radius) / block).floor().clamp(0, BLOCKS_PER_AXIS - 1).long()
        key = (cell[:, 0] * BLOCKS_PER_AXIS + cell[:, 1]) * BLOCKS_PER_AXIS + cell[:, 2]
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
            c = torch.tensor([k // BLOCKS_PER_AXIS**2, (k // BLOCKS_PER_AXIS) % BLOCKS_PER_AXIS, k % BLOCKS_PER_AXIS],
                             device=x.device, dtype=x.dtype)
            lo, hi = -self.radius + c * block, -self.radius + (c + 1) * block
            near = ((hi_all >= lo) & (lo_all <= hi)).all(dim=-1).nonzero().squeeze(-1)
            if near.numel() == 0:
                continue
            per_batch = max(1, MAX_PAIRS // near.numel())
            for s in range(0, rows.numel(), per_batch):
                sub = rows[s:s + per_batch]
                d = x[sub, None, :] - means[near][None]  # (P, M, 3)
                within = ((d.abs() <= half[near][None]).all(dim=-1))
                m2 = torch.einsum("pmi,mij,pmj->pm", d, prec[near], d)
                w = torch.where(within, kappa[near] * torch.exp(-0.5 * m2), torch.zeros_like(m2))
                sigma = sigma.index_add(0, sub, w.sum(dim=1))
                if with_albedo:
                    weighted = weighted.index_add(0, sub, w @ colours[near])
        albedo = torch.where(sigma[:, None] > 0, weighted / sigma[:, None].clamp_min(1e-30),
                             torch.full_like(weighted, 0.5)) if with_albedo else weighted
        return sigma, albedo
