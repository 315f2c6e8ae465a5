"""The representation of ``scene.type: gaussians``: N anisotropic 3D Gaussians with colour.

Gaussian i is stored as unconstrained parameters (3DGS's parametrisation, Kerbl et al. 2023)::

    means        μ_i ∈ R³                     position
    log_scales   ŝ_i ∈ R³                     scales s_i = exp(ŝ_i)  (standard deviations along the axes)
    quats        q_i ∈ R⁴ (w, x, y, z)        rotation R_i = R(q_i / ‖q_i‖)
    opacity_logits  ô_i ∈ R                   opacity o_i = sigmoid(ô_i)
    sh           f_i ∈ R^{(d+1)² × 3}         spherical-harmonics colour of degree d

so that its density and covariance are

    G_i(x) = exp(−½ (x − μ_i)ᵀ Σ_i⁻¹ (x − μ_i)),     Σ_i = R_i S_i S_iᵀ R_iᵀ,  S_i = diag(s_i),

and its colour seen along the unit direction v (from the camera towards the Gaussian) is

    c_i(v) = max(0, ½ + Σ_{l ≤ d, m} Y_lm(v) f_i,lm)          (Y_00 = C0 = 1 / (2√π))

— the real SH basis and the ``+ ½`` offset of 3DGS and gsplat, so degree 0 is ``c = ½ + C0 · f_0``.

The initial Gaussians follow DreamGaussian (Tang et al. 2023, ``gs_renderer.initialize``): means
uniform in a ball of radius ``init_radius``, a grey colour (``f_0 ∈ [0, 1/255)``), opacity
``init_opacity``, identity rotation, and isotropic scales equal to the root mean squared distance
to the 3 nearest other means (3DGS's ``distCUDA2``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

SH_C0 = 0.28209479177387814  # Y_00 = 1 / (2√π)
SH_C1 = 0.4886025119029199  # √(3 / 4π)
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)
PARAMETER_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")


def sh_coefficients(degree: int) -> int:
    """(d + 1)² coefficients per colour channel."""
    return (degree + 1) ** 2


def quaternion_to_rotation(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of quaternions (w, x, y, z), normalised first. (..., 4) → (..., 3, 3)."""
    w, x, y, z = torch.unbind(quats / quats.norm(dim=-1, keepdim=True), dim=-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


def covariance(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Σ = R S Sᵀ Rᵀ. quats (..., 4), scales (..., 3) → (..., 3, 3)."""
    m = quaternion_to_rotation(quats) * scales[..., None, :]  # R S: column k scaled by s_k
    return m @ m.transpose(-1, -2)


def precision(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Σ⁻¹ = R S⁻² Rᵀ (no matrix inverse). quats (..., 4), scales (..., 3) → (..., 3, 3)."""
    m = quaternion_to_rotation(quats) / scales[..., None, :]
    return m @ m.transpose(-1, -2)


def sh_basis(degree: int, directions: torch.Tensor) -> torch.Tensor:
    """The real SH basis Y_lm(v) up to ``degree`` (3DGS's order and signs). (..., 3) unit → (..., (d+1)²)."""
    x, y, z = directions.unbind(-1)
    values = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        values += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        values += [SH_C2[0] * xy, SH_C2[1] * yz, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * xz, SH_C2[4] * (xx - yy)]
    if degree >= 3:
        values += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * xy * z, SH_C3[2] * y * (4 * zz - xx - yy),
                   SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                   SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(values, dim=-1)


def sh_to_colour(sh: torch.Tensor, directions: Optional[torch.Tensor], degree: int) -> torch.Tensor:
    """c = max(0, ½ + Σ Y_lm(v) f_lm). sh (N, (d+1)², 3); directions (..., N, 3) unit, or None for the
    view-independent (degree 0) colour → (..., N, 3)."""
    if degree == 0 or directions is None:
        return (0.5 + SH_C0 * sh[:, 0, :]).clamp_min(0.0)
    basis = sh_basis(degree, directions)  # (..., N, K)
    return (0.5 + (basis.unsqueeze(-1) * sh[:, : sh_coefficients(degree)]).sum(-2)).clamp_min(0.0)


def nearest_neighbour_scales(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """√(mean squared distance to the k nearest other points), per point (3DGS's ``distCUDA2``), by
    brute force in chunks. (N, 3) → (N,); floored at 1e-7 so that the log is finite."""
    n = points.shape[0]
    if n <= 1:
        return torch.full((n,), 0.01, dtype=points.dtype, device=points.device)
    k = min(k, n - 1)
    out = []
    for start in range(0, n, chunk):
        d2 = torch.cdist(points[start:start + chunk], points).square()
        d2[torch.arange(d2.shape[0]), torch.arange(start, start + d2.shape[0])] = float("inf")  # not itself
        out.append(d2.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out).clamp_min(1e-14).sqrt()


class Gaussians(nn.Module):
    """N Gaussians as ``nn.Parameter`` s named :data:`PARAMETER_NAMES` (see the module docstring).

    ``sh_dc`` holds f_0 (N, 1, 3) and ``sh_rest`` the higher degrees (N, (d+1)² − 1, 3), so they can
    take different learning rates (3DGS: 1/20 for the rest). The number of Gaussians changes during
    training: :meth:`assign` swaps in new tensors (density control does that, optimiser state included).
    """

    def __init__(self, n: int, sh_degree: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        self.sh_degree = int(sh_degree)
        rest = sh_coefficients(self.sh_degree) - 1
        empty = lambda *shape: nn.Parameter(torch.zeros(*shape, device=device))  # noqa: E731
        self.means, self.log_scales, self.quats = empty(n, 3), empty(n, 3), empty(n, 4)
        self.opacity_logits, self.sh_dc, self.sh_rest = empty(n), empty(n, 1, 3), empty(n, rest, 3)

    @classmethod
    def in_ball(cls, n: int, radius: float, opacity: float, sh_degree: int, generator: torch.Generator) -> "Gaussians":
        """DreamGaussian's initial Gaussians (module docstring), drawn from ``generator`` on its device."""
        device = generator.device
        gaussians = cls(n, sh_degree, device)
        direction = torch.randn(n, 3, generator=generator, device=device)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        r = radius * torch.rand(n, 1, generator=generator, device=device).pow(1.0 / 3.0)  # uniform in volume
        means = direction * r
        with torch.no_grad():
            gaussians.means.copy_(means)
            gaussians.log_scales.copy_(nearest_neighbour_scales(means).log()[:, None].expand(n, 3))
            gaussians.quats[:, 0] = 1.0
            gaussians.opacity_logits.fill_(math.log(opacity / (1.0 - opacity)))
            gaussians.sh_dc.copy_(torch.rand(n, 1, 3, generator=generator, device=device) / 255.0)
        return gaussians

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor], sh_degree: int, device: torch.device | str) -> "Gaussians":
        """Gaussians holding ``values`` (e.g. :func:`carv3d.scene.gaussians_ply.read_splats`); higher SH
        coefficients than ``sh_degree`` keeps are dropped, missing ones are zero."""
        n = values["means"].shape[0]
        gaussians = cls(n, sh_degree, device)
        rest = values["sh_rest"][:, : gaussians.sh_rest.shape[1]]
        with torch.no_grad():
            for name in PARAMETER_NAMES:
                if name != "sh_rest":
                    getattr(gaussians, name).copy_(values[name])
            gaussians.sh_rest[:, : rest.shape[1]].copy_(rest)
        return gaussians

    def __len__(self) -> int:
        return self.means.shape[0]

    # ------------------------------------------------------------------ activated values
    def scales(self) -> torch.Tensor:
        return self.log_scales.exp()

    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    def sh(self) -> torch.Tensor:
        """(N, (d+1)², 3) all SH coefficients."""
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)

    def colours(self, directions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """c_i(v) for unit directions (..., N, 3), or the view-independent colour (N, 3) with None."""
        return sh_to_colour(self.sh(), directions, self.sh_degree if directions is not None else 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    def assign(self, values: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
        """Replace the parameters by new tensors (any N, all with the same first axis); returns the
        new ``nn.Parameter`` s by name (callers move optimiser state onto them)."""
        sizes = {v.shape[0] for v in values.values()}
        if len(sizes) != 1 or set(values) != set(PARAMETER_NAMES):
            raise ValueError(f"assign needs every one of {PARAMETER_NAMES} with one length, got {sorted(values)}")
        new = {name: nn.Parameter(values[name].detach().clone()) for name in PARAMETER_NAMES}
        for name, param in new.items():
            setattr(self, name, param)
        return new

    def resize(self, n: int) -> None:
        """N zero Gaussians (before loading a state of another size)."""
        self.assign({name: p.new_zeros((n, *p.shape[1:])) for name, p in self.tensors().items()})
