"""Multiresolution hash encoding (Instant-NGP) with tinycudann's grid semantics.

A point ``x`` in the unit cube is encoded by L grids of growing resolution. Each level looks up
the 8 vertices of the cell that holds ``x``, interpolates their F-dimensional feature vectors
trilinearly and the L results are concatenated, level-major::

    s_l   = 2^(l · log2 b) · N_0 − 1               scale of level l (b = per_level_scale, N_0 = base)
    R_l   = ceil(s_l) + 1                          vertices per axis
    T_l   = min(roundup8(R_l³), 2^log2_hashmap_size)   rows of the level's table
    p     = s_l · x + 0.5                          position in grid units (the +0.5 staggers levels)
    g     = floor(p),   f = p − g                  cell corner and fractional part, per axis
    y_l   = Σ_{c ∈ {0,1}³} Π_d (c_d ? f_d : 1 − f_d) · θ_l[index_l(g + c)]
    out   = [y_0, y_1, ..., y_{L−1}]                (N, L·F)

The vertex index follows tinycudann's ``grid_index`` (``include/tiny-cuda-nn/common_device.h``;
older versions in ``encodings/grid.h``), read through the search tool:

- dense: ``index = g_0 + g_1·R + g_2·R²`` (x fastest), computed in uint32;
- hash: ``index = (g_0·1) ⊕ (g_1·2654435761) ⊕ (g_2·805459861)`` in uint32 arithmetic
  (``coherent_prime_hash``: the first "prime" is 1, which keeps neighbouring x in one cache line);
- the hash replaces the dense index exactly when ``T_l < R³`` (tcnn writes ``hashmap_size <
  stride``; for ``R > 1625`` it sets stride to 0xFFFFFFFF to avoid overflow). Because T_l is R³
  rounded up to 8 or capped at 2^log2, this is the same as "the dense grid does not fit";
- either way the result is taken ``% T_l``. The +0.5 offset lets a corner reach ``R`` on a dense
  level, and the modulo wraps it around (tinycudann's comment: "The offset can cause wraparound
  indexing in dense grids, which didn't negatively impact the approximation quality").

The scales are computed in float32 like tcnn (``exp2f(l · log2f(b)) · N_0 − 1``), so resolutions and
table sizes match the CUDA backend bit for bit. All levels live in one flat parameter of
``Σ_l T_l · F`` values (row ``offset_l + index``, feature fastest): the same layout as
``tinycudann.Encoding.params``, so tables can be copied between the two backends.

Backend choice lives in :func:`make_hash_encoding` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from carv3d.errors import BackendUnavailableError, ConfigError
from carv3d.log import logger

PRIMES = (1, 2654435761, 805459861)  # tinycudann's coherent_prime_hash factors for 3 dimensions
UINT32_MASK = 0xFFFFFFFF
INIT_RANGE = 1e-4  # tables start uniform in (−1e-4, 1e-4), as tinycudann initialises them
TCNN_INSTALL_HINT = (
    "install it on a CUDA machine with `pip install "
    "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch`, "
    "or use the pure-torch backend with scene.grid.backend=torch"
)

Device = Union[str, torch.device]


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
    log2_b = np.log2(np.float32(per_level_scale))  # float32 throughout, like tcnn's exp2f/log2f
    max_params = UINT32_MASK // 2  # tcnn caps R³ here before rounding up
    levels, offset = [], 0
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_b) * np.float32(base_resolution) - np.float32(1.0)
        resolution = int(np.ceil(scale)) + 1
        dense = resolution**3
        table = -(-min(dense, max_params) // 8) * 8  # round up to a multiple of 8
        table = min(table, 2**log2_hashmap_size)
        stride = dense if resolution <= 0x659 else UINT32_MASK  # tcnn's overflow guard for 3D
        levels.append(GridLevel(float(scale), resolution, table, offset, table < stride))
        offset += table
    return levels


def init_table(n_params: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform(−1e-4, 1e-4) values for a flat table, drawn on the generator's device.

    Both backends draw their tables here, so one seed gives the same initial table on either.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    values = torch.rand(n_params, generator=generator, device=device, dtype=torch.float32)
    return values.mul_(2 * INIT_RANGE).sub_(INIT_RANGE)


class _GatherRows(torch.autograd.Function):
    """``rows = table[index]`` whose backward is one ``index_add_`` scatter.

    Plain advanced indexing backpropagates through ``index_put_(accumulate=True)``, which sorts
    the indices first; a hash grid repeats indices a lot, and the direct scatter is about 1.5×
    faster on CPU (REFERENCE §5). The backward is itself differentiable (it is linear in the
    incoming gradient), so double backward works too.
    """

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # table: (T, F), index: (M,) int64 → rows: (M, F)
        ctx.save_for_backward(index)
        ctx.n_rows = table.shape[0]
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        grad_table = grad_rows.new_zeros((ctx.n_rows, grad_rows.shape[1]))
        return grad_table.index_add_(0, index, grad_rows), None


def _corner_components(g: torch.Tensor) -> torch.Tensor:
    """Integer vertex coordinates of both cell sides per axis. g: (N, L, 3) → (N, L, 3, 2)."""
    return torch.stack((g, g + 1), dim=-1)


def _combine_corners(t: torch.Tensor, op: str) -> torch.Tensor:
    """Combine per-axis terms t: (N, L, 3, 2) into 8 corners (N, L, 8), corner = c_0 + 2c_1 + 4c_2.

    The corner order is tinycudann's: bit d of the corner number says whether axis d takes g_d + 1.
    """
    x, y, z = t[:, :, 0, None, None, :], t[:, :, 1, None, :, None], t[:, :, 2, :, None, None]
    out = (x + y + z) if op == "add" else (x ^ y ^ z)  # (N, L, 2_z, 2_y, 2_x)
    return out.reshape(*t.shape[:2], 8)


class HashGridEncoding(nn.Module):
    """Pure-torch multiresolution hash encoding with tinycudann's semantics (see the module doc).

    Runs on any device. Gradients flow to the table (``params``) and, through the trilinear
    weights, to the input positions (piecewise: the encoding is continuous but only piecewise
    smooth in x, with kinks on cell faces).

    Args:
        n_levels: L.
        n_features_per_level: F.
        log2_hashmap_size: log2 of the largest per-level table.
        base_resolution: N_0.
        per_level_scale: b, the growth of the scale from one level to the next.
        generator: draws the initial table; None uses torch's global generator.
        device: where the module lives.
    """

    def __init__(
        self,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        *,
        generator: Optional[torch.Generator] = None,
        device: Device = "cpu",
    ) -> None:
        super().__init__()
        if n_features_per_level < 1:
            raise ConfigError(f"scene.grid.n_features_per_level is {n_features_per_level}; it must be >= 1.")
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.levels = grid_levels(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        self.n_output_dims = n_levels * n_features_per_level
        n_rows = self.levels[-1].offset + self.levels[-1].table_size
        self.params = nn.Parameter(init_table(n_rows * n_features_per_level, generator).to(device))
        # Levels are dense up to n_dense, hashed after: resolutions grow with the level (b >= 1).
        self.n_dense = sum(not level.hashed for level in self.levels)

        def buffer(name: str, values: list, dtype: torch.dtype) -> None:
            self.register_buffer(name, torch.tensor(values, dtype=dtype, device=device), persistent=False)

        buffer("scales", [level.scale for level in self.levels], torch.float32)  # (L,)
        buffer("table_sizes", [level.table_size for level in self.levels], torch.int64)  # (L,)
        buffer("offsets", [level.offset for level in self.levels], torch.int64)  # (L,)
        # dense strides (1, R, R²) per level: (L, 3); hash factors: (3,)
        buffer("strides", [[1, lv.resolution, lv.resolution**2] for lv in self.levels], torch.int64)
        buffer("primes", list(PRIMES), torch.int64)

    def corner_indices(self, g: torch.Tensor) -> torch.Tensor:
        """Rows of the flat table for the 8 corners of each cell.

        Args:
            g: (N, L, 3) int64 lower cell corners ``floor(s_l · x + 0.5)``.

        Returns:
            (N, L, 8) int64 rows, level offset included; corner c = c_0 + 2c_1 + 4c_2.
        """
        sides = _corner_components(g)  # (N, L, 3, 2)
        parts = []
        nd = self.n_dense
        if nd > 0:  # dense: Σ_d (g_d + c_d) · stride_d, in uint32
            terms = sides[:, :nd] * self.strides[:nd, :, None]
            parts.append(_combine_corners(terms, "add") & UINT32_MASK)
        if nd < self.n_levels:  # hash: ⊕_d (g_d + c_d) · π_d, each product in uint32
            terms = (sides[:, nd:] * self.primes[:, None]) & UINT32_MASK
            parts.append(_combine_corners(terms, "xor"))
        index = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return index % self.table_sizes[:, None] + self.offsets[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points. x: (N, 3) in [0, 1] → (N, L·F), level-major, in the table's dtype."""
        n = x.shape[0]
        pos = x[:, None, :] * self.scales.to(x.dtype)[None, :, None] + 0.5  # p: (N, L, 3)
        cell = torch.floor(pos)
        frac = pos - cell  # f: (N, L, 3); carries d/dx = s_l
        index = self.corner_indices(cell.long())  # (N, L, 8)
        # trilinear weights Π_d (c_d ? f_d : 1 − f_d), same corner order: (N, L, 8)
        w = torch.stack((1 - frac, frac), dim=-1)  # (N, L, 3, 2)
        weights = (w[:, :, 2, :, None, None] * w[:, :, 1, None, :, None] * w[:, :, 0, None, None, :]).reshape(
            n, self.n_levels, 8
        )
        table = self.params.view(-1, self.n_features_per_level)  # (ΣT_l, F)
        rows = _GatherRows.apply(table, index.reshape(-1))  # (N·L·8, F)
        rows = rows.view(n * self.n_levels, 8, self.n_features_per_level)
        out = torch.bmm(weights.reshape(n * self.n_levels, 1, 8).to(rows.dtype), rows)  # (N·L, 1, F)
        return out.view(n, self.n_output_dims)

    def extra_repr(self) -> str:
        return (
            f"levels={self.n_levels}, features={self.n_features_per_level}, dense_levels={self.n_dense}, "
            f"resolutions={self.levels[0].resolution}..{self.levels[-1].resolution}, params={self.params.numel()}"
        )


def tinycudann_import_error() -> Optional[str]:
    """None when ``import tinycudann`` works, else why it does not (it also fails without CUDA)."""
    try:
        import tinycudann  # noqa: F401
    except Exception as err:  # ImportError when missing; EnvironmentError without a CUDA torch
        return f"{type(err).__name__}: {err}"
    return None


class TcnnHashGridEncoding(nn.Module):
    """The same encoding computed by tinycudann's fused CUDA kernels.

    Same configuration, the same table layout and the same initial values as
    :class:`HashGridEncoding` for a given generator; the output is cast to float32 (tcnn
    computes in float16 by default).

    Args:
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale:
            as for :class:`HashGridEncoding`; n_features_per_level must be 1, 2, 4 or 8.
        generator: draws the initial table.
        device: a CUDA device.
        dtype: tcnn's parameter/compute precision (torch.float16 or torch.float32); None lets
            tcnn pick its fastest (float16 on most GPUs).

    Raises:
        BackendUnavailableError: when the device is not CUDA or tinycudann does not import.
    """

    def __init__(
        self,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        *,
        generator: Optional[torch.Generator] = None,
        device: Device = "cuda",
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"the tinycudann hash-grid backend needs a CUDA device, not '{device}'; "
                "use scene.grid.backend=torch (or auto) on this device."
            )
        reason = tinycudann_import_error()
        if reason is not None:
            raise BackendUnavailableError(f"tinycudann is not available ({reason}); {TCNN_INSTALL_HINT}.")
        if n_features_per_level not in (1, 2, 4, 8):
            raise ConfigError(
                f"scene.grid.n_features_per_level is {n_features_per_level}; tinycudann supports 1, 2, 4 or 8."
            )
        import tinycudann

        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.levels = grid_levels(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        self.n_output_dims = n_levels * n_features_per_level
        config = {
            "otype": "HashGrid",
            "n_levels": n_levels,
            "n_features_per_level": n_features_per_level,
            "log2_hashmap_size": log2_hashmap_size,
            "base_resolution": base_resolution,
            "per_level_scale": float(per_level_scale),
            "interpolation": "Linear",
        }
        kwargs = {} if dtype is None else {"dtype": dtype}
        with torch.cuda.device(device):
            self.encoding = tinycudann.Encoding(3, config, **kwargs)
        n_params = (self.levels[-1].offset + self.levels[-1].table_size) * n_features_per_level
        if self.encoding.params.numel() != n_params:  # a tcnn version with another layout
            raise RuntimeError(
                f"tinycudann allocated {self.encoding.params.numel()} grid parameters where the torch "
                f"backend's layout has {n_params}; the backends would not be interchangeable."
            )
        with torch.no_grad():
            self.encoding.params.copy_(init_table(n_params, generator).to(self.encoding.params))

    @property
    def params(self) -> nn.Parameter:
        """The flat table, in the layout of :class:`HashGridEncoding.params`."""
        return self.encoding.params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points. x: (N, 3) in [0, 1] → (N, L·F) float32."""
        return self.encoding(x.float().contiguous()).float()


def make_hash_encoding(
    grid_cfg: Any, device: Device, generator: Optional[torch.Generator] = None
) -> tuple[nn.Module, str]:
    """Build the hash encoding for ``scene.grid`` on ``device``: the one place a backend is chosen.

    ``backend=auto`` takes tinycudann when the device is CUDA and ``import tinycudann`` works,
    else the torch backend; ``torch`` always works; ``tcnn`` fails loudly when unavailable. The
    choice and its reason are logged. (Whether nvcc exists is irrelevant: tcnn is prebuilt or absent.)

    Args:
        grid_cfg: a ``HashGridConfig`` (dataclass or OmegaConf node).
        device: where the encoding lives.
        generator: draws the initial table.

    Returns:
        (encoding, backend name: "torch" or "tcnn").

    Raises:
        BackendUnavailableError: ``backend=tcnn`` without CUDA or without tinycudann.
        ConfigError: an unknown backend name or an invalid grid.
    """
    backend = str(grid_cfg.backend)
    device = torch.device(device)
    args = (
        int(grid_cfg.n_levels),
        int(grid_cfg.n_features_per_level),
        int(grid_cfg.log2_hashmap_size),
        int(grid_cfg.base_resolution),
        float(grid_cfg.per_level_scale),
    )
    if backend not in ("auto", "torch", "tcnn"):
        raise ConfigError(f"scene.grid.backend is '{backend}'; expected one of: auto, torch, tcnn.")
    if backend == "tcnn":
        encoding = TcnnHashGridEncoding(*args, generator=generator, device=device)
        logger.info("hash grid: tinycudann backend (requested by scene.grid.backend=tcnn)")
        return encoding, "tcnn"
    if backend == "auto":
        if device.type != "cuda":
            why = f"device is {device.type}; tinycudann needs CUDA"
        else:
            reason = tinycudann_import_error()
            if reason is None:
                encoding = TcnnHashGridEncoding(*args, generator=generator, device=device)
                logger.info("hash grid: tinycudann backend (auto: CUDA device and tinycudann imports)")
                return encoding, "tcnn"
            why = f"tinycudann does not import ({reason})"
    else:
        why = "requested by scene.grid.backend=torch"
    logger.info(f"hash grid: pure-torch backend ({why})")
    return HashGridEncoding(*args, generator=generator, device=device), "torch"
