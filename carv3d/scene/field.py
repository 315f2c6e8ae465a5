"""The scene being optimised: a hash-grid density and albedo field in the box [−r, r]³.

A world point x is mapped to the unit cube, encoded by the multiresolution hash grid and decoded
by one small MLP into four raw numbers (raw density and three raw albedo channels)::

    u        = (x / r + 1) / 2                          unit-cube coordinates, clamped to [0, 1]
    (a, c)   = MLP(encode(u))                           a: (N,), c: (N, 3)
    σ(x)     = act(a + bias(x)) · 1[x ∈ [−r, r]³]       density; 0 outside the box
    albedo   = sigmoid(c)

``act`` is softplus or truncated exp (exp forward, gradient exp(min(·, 15)): threestudio's
``trunc_exp``). ``bias`` initialises the scene as a ball, threestudio's ``blob_magic3d``::

    bias(x) = blob_density · (1 − |x| / blob_radius)

so at step 0 the density is high inside |x| < blob_radius and falls off outside it. Normals for
shading are the normalised negative density gradient, by central differences:

    ∂σ/∂x_d ≈ (σ(x + ε e_d) − σ(x − ε e_d)) / 2ε,      n = −∇σ / |∇σ|

(so nothing differentiates the encoding in x). Everything after the encoding — MLP, bias,
activation, box mask, sigmoid — is the field's *head*; with ``scene.compile_head`` on a CUDA device
it runs through ``torch.compile`` (dynamic point counts, forward and backward), which fuses its
element-wise steps into the matmuls' neighbours instead of launching each one.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from carv3d.config import check_section
from carv3d.log import logger
from carv3d.scene.hashgrid import Device, make_hash_encoding

TRUNC_EXP_GRAD_CLAMP = 15.0  # threestudio/torch-ngp: the backward uses exp(min(x, 15))
NO_GRAD_CHUNK = 2**17  # points per field evaluation without autograd (about 40 MB of temporaries at L = 16)


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient is exp(min(x, 15)): large raw densities cannot blow up the update."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=TRUNC_EXP_GRAD_CLAMP))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """Truncated exponential: ``exp(x)`` forward, ``exp(min(x, 15))`` as its derivative."""
    return _TruncExp.apply(x)


def blob_bias(x: torch.Tensor, blob_density: float, blob_radius: float) -> torch.Tensor:
    """Pre-activation density bias of a ball: ``blob_density · (1 − |x| / blob_radius)``. x: (N, 3) → (N,)."""
    return blob_density * (1.0 - torch.linalg.vector_norm(x, dim=-1) / blob_radius)


def _init_linear(layer: nn.Linear, generator: Optional[torch.Generator]) -> None:
    """torch's default nn.Linear initialisation, drawn from ``generator``.

    weight ~ U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with a = √5), bias ~ the same.
    """
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_mlp(
    n_inputs: int, width: int, hidden_layers: int, n_outputs: int, generator: Optional[torch.Generator] = None
) -> nn.Sequential:
    """``hidden_layers`` ReLU layers of ``width`` units, then a linear output layer.

    With ``hidden_layers = 0`` it is a single linear map. Built where ``generator`` lives.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    sizes = [n_inputs] + [width] * hidden_layers + [n_outputs]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out, device=device)
        _init_linear(linear, generator)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NeRFField(nn.Module):
    """Density and albedo of the scene, from a hash grid and one MLP (see the module doc).

    Args:
        scene_cfg: a ``NeRFSceneConfig`` (dataclass or OmegaConf node).
        device: where the field lives; also decides the hash-grid backend.
        generator: draws the initial table and MLP weights; None uses torch's global generator.

    Attributes:
        radius: half the side of the scene box.
        encoding_backend: "torch", "triton" or "tcnn", as chosen by :func:`make_hash_encoding`.
        encoding: the hash encoding, ``(N, 3)`` in [0, 1] → ``(N, L·F)``.
        mlp: ``(N, L·F)`` → ``(N, 4)`` raw density and raw albedo.
        head_compiled: whether the head runs through ``torch.compile`` (``scene.compile_head`` on CUDA).
    """

    def __init__(self, scene_cfg: Any, device: Device = "cpu", generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        # The one statement of the valid values is the typed config (carv3d.config); a section built
        # by hand (not through load_config) is checked against it here.
        check_section(scene_cfg, "scene")
        self.radius = float(scene_cfg.radius)
        self.density_activation = str(scene_cfg.density_activation)
        self.density_bias = str(scene_cfg.density_bias)
        self.blob_density = float(scene_cfg.blob_density)
        self.blob_radius = float(scene_cfg.blob_radius)
        self.normal_epsilon = float(scene_cfg.normal_epsilon)

        self.encoding, self.encoding_backend = make_hash_encoding(scene_cfg.grid, device, generator=generator)
        n_encoded = int(scene_cfg.grid.n_levels) * int(scene_cfg.grid.n_features_per_level)
        mlp = build_mlp(n_encoded, int(scene_cfg.mlp_width), int(scene_cfg.mlp_hidden_layers), 4, generator)
        self.mlp = mlp.to(device)
        self.head_compiled = bool(scene_cfg.compile_head) and torch.device(device).type == "cuda"
        self._compiled_head = torch.compile(self._head, dynamic=True) if self.head_compiled else None
        if scene_cfg.compile_head:
            logger.info("scene: field head (MLP, activation) %s", "compiled with torch.compile (scene.compile_head)"
                        if self.head_compiled else f"not compiled on {device} (scene.compile_head is for CUDA only)")

    def bias(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation density bias. x: (N, 3) world points → (N,)."""
        if self.density_bias == "blob":
            return blob_bias(x, self.blob_density, self.blob_radius)
        return x.new_zeros(x.shape[0])

    def _head(self, encoded: torch.Tensor, x: torch.Tensor, with_albedo: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Everything after the encoding: encoded (N, L·F), x (N, 3) → density (N,), albedo (N, 3) or None."""
        raw = self.mlp(encoded)
        pre = raw[:, 0] + self.bias(x)
        density = F.softplus(pre) if self.density_activation == "softplus" else trunc_exp(pre)
        inside = (x.abs() <= self.radius).all(dim=-1)
        density = torch.where(inside, density, torch.zeros_like(density))
        return density, (torch.sigmoid(raw[:, 1:4]) if with_albedo else None)

    def _evaluate(self, x: torch.Tensor, with_albedo: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (N, 3) world points → density (N,), albedo (N, 3) or None.

        Without autograd (validation sheets, turntables, export) the points go through the encoding
        and the MLP :data:`NO_GRAD_CHUNK` at a time: the MLP's hidden activations of a whole render
        (and of its 6 shifted copies for normals) would otherwise be resident at once.
        """
        if not torch.is_grad_enabled() and x.shape[0] > NO_GRAD_CHUNK:
            parts = [self._evaluate(part, with_albedo) for part in x.split(NO_GRAD_CHUNK)]
            albedo = torch.cat([p[1] for p in parts]) if with_albedo else None
            return torch.cat([p[0] for p in parts]), albedo
        unit = ((x / self.radius + 1.0) * 0.5).clamp(0.0, 1.0)  # u: (N, 3)
        encoded = self.encoding(unit).to(x.dtype)
        head = self._compiled_head if self._compiled_head is not None else self._head
        return head(encoded, x, with_albedo)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density and albedo. x: (N, 3) world points → density (N,), albedo (N, 3) in (0, 1)."""
        return self._evaluate(x, with_albedo=True)  # type: ignore[return-value]

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Density only. x: (N, 3) → (N,)."""
        return self._evaluate(x, with_albedo=False)[0]

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """Unit normals −∇σ/|∇σ| by central differences with step ``scene.normal_epsilon``.

        The 6 shifted copies of x are evaluated in one batched call. Differentiable in the
        field's parameters. Where the density is flat (e.g. outside the box) the normal is 0.

        Args:
            x: (N, 3) world points.

        Returns:
            (N, 3) unit normals pointing out of dense regions.
        """
        eps = self.normal_epsilon
        steps = torch.eye(3, dtype=x.dtype, device=x.device) * eps  # e_d · ε: (3, 3)
        offsets = torch.stack((steps, -steps), dim=1).reshape(6, 1, 3)  # +e0, −e0, +e1, −e1, +e2, −e2
        sigma = self.density((x[None] + offsets).reshape(-1, 3)).view(3, 2, -1)  # (3 axes, ±, N)
        gradient = ((sigma[:, 0] - sigma[:, 1]) / (2 * eps)).t()  # ∇σ: (N, 3)
        return -F.normalize(gradient, dim=-1)

    def parameter_groups(self, lr_grid: float, lr_mlp: float) -> list[dict[str, Any]]:
        """Adam parameter groups: the hash table(s) at ``lr_grid``, the MLP at ``lr_mlp``.

        Each group carries a ``name`` ("grid", "mlp"); every parameter is in exactly one group.
        """
        return [
            {"name": "grid", "params": list(self.encoding.parameters()), "lr": lr_grid},
            {"name": "mlp", "params": list(self.mlp.parameters()), "lr": lr_mlp},
        ]
