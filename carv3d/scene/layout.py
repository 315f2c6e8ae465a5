"""Where each level of a tinycudann-style hash grid lives: scales, resolutions, table sizes.

Pure arithmetic shared by both hash-grid backends (see :mod:`carv3d.scene.hashgrid` for the
encoding these numbers describe). Computed in float32 exactly as tinycudann's
``GridEncodingTemplated`` constructor does, so both backends agree on every level::

    s_l = exp2f(l · log2f(b)) · N_0 − 1            (float32)
    R_l = ceil(s_l) + 1
    T_l = min(roundup8(min(R_l³, 2^31 − 1)), 2^log2_hashmap_size)
    hashed_l = T_l < R_l³                           (tcnn: "hashmap_size < stride")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from carv3d.errors import ConfigError

PRIMES = (1, 2654435761, 805459861)  # tinycudann's coherent_prime_hash factors for 3 dimensions
UINT32_MASK = 0xFFFFFFFF
INIT_RANGE = 1e-4  # tables start uniform in (−1e-4, 1e-4), as tinycudann initialises them


@dataclass(frozen=True)
class GridLevel:
    """Geometry of one level of the encoding.

    Attributes:
        scale: s_l, the factor from [0, 1] to grid units.
        resolution: R_l = ceil(s_l) + 1 vertices per axis.
        table_size: T_l rows in this level's table.
        offset: first row of this level in the flat table.
        hashed: True when vertices are hashed (T_l < R_l³), False for a dense index.
    """

    scale: float
    resolution: int
    table_size: int
    offset: int
    hashed: bool


def grid_levels(
    n_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float
) -> list[GridLevel]:
    """Per-level scale, resolution, table size, offset and index kind, exactly as tinycudann.

    Raises:
        ConfigError: for a configuration no encoding can be built from.
    """
    if n_levels < 1:
        raise ConfigError(f"scene.grid.n_levels is {n_levels}; it must be at least 1.")
    if not 3 <= log2_hashmap_size <= 30:
        raise ConfigError(f"scene.grid.log2_hashmap_size is {log2_hashmap_size}; use 3..30 (19 is usual).")
    if base_resolution < 2:
        raise ConfigError(f"scene.grid.base_resolution is {base_resolution}; it must be at least 2.")
    if not per_level_scale >= 1.0:
        raise ConfigError(f"scene.grid.per_level_scale is {per_level_scale}; it must be >= 1 (finer levels).")
    f32 = np.float32  # round to float32 after every operation, like tcnn's float arithmetic
    log2_b = f32(math.log2(f32(per_level_scale)))  # log2f(b)
    max_params = UINT32_MASK // 2  # tcnn caps R³ here before rounding up
    levels, offset = [], 0
    for level in range(n_levels):
        # exp2f(l · log2f(b)) · N_0 − 1; exp2 in double then rounded: correctly rounded on every
        # machine (numpy's float32 exp2 differs by an ulp between CPUs; CUDA's exp2f is within 2 ulp)
        scale = f32(f32(f32(2.0 ** float(f32(level) * log2_b)) * f32(base_resolution)) - f32(1.0))
        resolution = int(np.ceil(scale)) + 1
        dense = resolution**3
        table = -(-min(dense, max_params) // 8) * 8  # round up to a multiple of 8
        table = min(table, 2**log2_hashmap_size)
        stride = dense if resolution <= 0x659 else UINT32_MASK  # tcnn's overflow guard for 3D
        hashed = table < stride  # then table == 2^log2: the hash path relies on a power of two
        levels.append(GridLevel(float(scale), resolution, table, offset, hashed))
        offset += table
    return levels


def init_table(n_params: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform(−1e-4, 1e-4) values for a flat table, drawn on the generator's device.

    Both backends draw their tables here, so one seed gives the same initial table on either.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    values = torch.rand(n_params, generator=generator, device=device, dtype=torch.float32)
    return values.mul_(2 * INIT_RANGE).sub_(INIT_RANGE)


def level_factors(levels: list[GridLevel]) -> list[list[int]]:
    """Per level, the factors that multiply a corner's integer coordinates (g_d, g_d + 1) into its
    row: dense strides (1, R, R²) for a level stored whole, the primes π for a hashed one."""
    return [[1, v.resolution, v.resolution**2] if not v.hashed else list(PRIMES) for v in levels]


def set_up_table(module: torch.nn.Module, n_levels: int, n_features_per_level: int, log2_hashmap_size: int,
                 base_resolution: int, per_level_scale: float, generator: Optional[torch.Generator],
                 device: str | torch.device) -> None:
    """What every hash-grid backend shares: ``module.n_levels``, ``n_features_per_level``, ``levels``
    (:func:`grid_levels`), ``n_output_dims`` = L·F and the trainable flat table ``params``
    (:func:`init_table`, so one seed gives every backend the same initial table)."""
    if n_features_per_level < 1:
        raise ConfigError(f"scene.grid.n_features_per_level is {n_features_per_level}; it must be >= 1.")
    module.n_levels = n_levels
    module.n_features_per_level = n_features_per_level
    module.levels = grid_levels(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
    module.n_output_dims = n_levels * n_features_per_level
    n_rows = module.levels[-1].offset + module.levels[-1].table_size
    module.params = torch.nn.Parameter(init_table(n_rows * n_features_per_level, generator).to(device))
