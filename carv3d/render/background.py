"""What a ray sees when it leaves the scene box without being absorbed.

Modes:

- ``white``: ``b = (1, 1, 1)``.
- ``random``: one uniform colour ``b ~ U[0, 1]^3`` per image, drawn from the render's generator.
  A background that changes every step cannot be explained by the scene, so the field cannot
  "paint" the background into the volume. A render without a generator (validation, turntables)
  uses white, so those stay deterministic.
- ``learned``: ``b = sigmoid(MLP(γ(d)))`` on the ray direction ``d`` with a small sinusoidal encoding
  ``γ(d) = (d, sin(2^k π d), cos(2^k π d))_{k<F}``, trainable (give ``parameters()`` to the
  optimizer's background group; the other modes have none). It depends on direction only, like
  an environment map at infinity.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

BACKGROUND_MODES = ("white", "random", "learned")


class Background(nn.Module):
    """Background colours for rays.

    Args:
        mode: ``white`` | ``random`` | ``learned``.
        hidden: width of the learned MLP's hidden layer.
        n_frequencies: F, sinusoidal frequencies of the direction encoding.
    """

    def __init__(self, mode: str = "white", hidden: int = 32, n_frequencies: int = 2):
        super().__init__()
        if mode not in BACKGROUND_MODES:
            raise ValueError(f"unknown background mode '{mode}'; expected one of {BACKGROUND_MODES}")
        self.mode = mode
        self.n_frequencies = n_frequencies
        self.mlp: Optional[nn.Sequential] = None
        if mode == "learned":
            in_features = 3 + 6 * n_frequencies
            self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def encode(self, directions: torch.Tensor) -> torch.Tensor:
        """γ(d): (..., 3) → (..., 3 + 6F)."""
        scales = (2.0 ** torch.arange(self.n_frequencies, device=directions.device, dtype=directions.dtype)) * math.pi
        angles = (directions.unsqueeze(-1) * scales).flatten(-2)  # (..., 3F)
        return torch.cat([directions, torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, directions: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Background colour of every ray.

        Args:
            directions: (B, ..., 3) unit ray directions; the first axis indexes images.
            generator: source of the random colours (``random`` mode), drawn on its device.

        Returns:
            (B, ..., 3) colours in [0, 1].
        """
        if self.mode == "learned":
            assert self.mlp is not None
            return torch.sigmoid(self.mlp(self.encode(directions)))
        if self.mode == "random" and generator is not None:
            batch = directions.shape[0]
            colours = torch.rand((batch, 3), generator=generator, device=generator.device)
            colours = colours.to(directions.device, directions.dtype)
            return colours.view(batch, *([1] * (directions.dim() - 2)), 3).expand_as(directions)
        return torch.ones_like(directions)
