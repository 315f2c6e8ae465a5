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

Three backends compute this encoding: this module's pure-torch one (any device), fused Triton kernels
(:mod:`carv3d.scene.hashgrid_triton`, CUDA) and tinycudann (CUDA). Backend choice lives in
:func:`make_hash_encoding` and nowhere else.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from carv3d.config import CHOICES
from carv3d.errors import BackendUnavailableError, ConfigError
from carv3d.log import logger
from carv3d.scene.layout import UINT32_MASK, grid_levels, init_table, level_factors, set_up_table

TCNN_INSTALL_HINT = (
    "install it on a CUDA machine with `pip install "
    "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch`, "
    "or use the pure-torch backend with scene.grid.backend=torch"
)

Device = Union[str, torch.device]


_SAME_SIZE_INT = {4: torch.int32, 8: torch.int64, 16: torch.complex128}  # bytes → a dtype to move them


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a contiguous (T, F) table. index: (M,) → (M, F).

    A row of F floats is gathered as *one* element of an equally wide dtype where one exists
    (F=2 float32 as int64): a 1-D gather is several times faster on CPU than a 2-D row gather.
    Bit-exact: the bytes are only moved.
    """
    width = table.shape[1] * table.element_size()
    if width in _SAME_SIZE_INT and table.is_contiguous():
        packed = table.view(_SAME_SIZE_INT[width]).view(-1)  # (T,)
        return packed.index_select(0, index).view(table.dtype).view(-1, table.shape[1])
    return table.index_select(0, index)


def _interpolate_level(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, y: torch.Tensor,
                       level: int) -> None:
    """Level ``level`` of the encoding into its columns of ``y``: ``Σ_c w_c · θ[index_c]``.

    index: (8, N) rows, weights: (8, N) in the table's dtype, y: (N, L·F). The one statement of the
    forward arithmetic, shared by the autograd path and the no-graph path (so they agree bit for bit).
    """
    n_features = table.shape[1]
    n = index.shape[1]
    rows = _gather_rows(table, index.reshape(-1)).view(8, n, n_features)
    for f in range(n_features):  # Σ_c w_c · θ_c, feature by feature: contiguous (8, N) math
        y[:, level * n_features + f] = (weights * rows[:, :, f]).sum(0)


class _InterpolateTable(torch.autograd.Function):
    """``y_l = Σ_c w_lc · θ[index_lc]`` for every level, with a scatter backward; first-order only.

    Forward gathers the 8 corner rows of each level and contracts them with the trilinear
    weights, writing level l into output columns [l·F, (l+1)·F). Backward, per level and feature:

        ∂L/∂θ[r]   = Σ_{n,c : index_lcn = r} w_lcn · ∂L/∂y_ln     a 1-D index_add_
        ∂L/∂w_lcn  = θ[index_lcn] · ∂L/∂y_ln                      only when the weights need it

    Plain indexing backpropagates through ``index_put_(accumulate=True)``, which sorts the
    indices first; a hash grid repeats indices a lot, and the direct scatter is faster on CPU
    (REFERENCE §5 measured ~1.5×, and a 1-D scatter per feature beats a 2-D row scatter again).
    Working one level at a time keeps the temporaries small enough to stay in cache.
    """

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # table: (T, F), index: (L, 8, N) int64, weights: (L, 8, N) → y: (N, L·F)
        n_levels, _, n = index.shape
        ctx.n_rows, ctx.weights_dtype = table.shape[0], weights.dtype
        weights = weights.to(table.dtype)
        ctx.save_for_backward(table, index, weights)
        y = table.new_empty((n, n_levels * table.shape[1]))
        for level in range(n_levels):
            _interpolate_level(table, index[level], weights[level], y, level)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Optional[torch.Tensor], None, Optional[torch.Tensor]]:
        table, index, weights = ctx.saved_tensors
        n_levels, _, n = index.shape
        n_features = table.shape[1]
        grad_y = grad_y.to(table.dtype).t().contiguous()  # (L·F, N): one contiguous row per output
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_t = grad_y.new_zeros((n_features, ctx.n_rows))  # (F, T): a contiguous 1-D scatter each
            for level in range(n_levels):
                flat_index = index[level].view(-1)
                for f in range(n_features):
                    values = weights[level] * grad_y[level * n_features + f]  # (8, N)
                    grad_t[f].index_add_(0, flat_index, values.view(-1))
            grad_table = grad_t.t().contiguous()
        if ctx.needs_input_grad[2]:
            grad_weights = torch.empty_like(weights)  # (L, 8, N)
            for level in range(n_levels):
                rows = _gather_rows(table, index[level].view(-1)).view(8, n, n_features)
                g = grad_y[level * n_features : (level + 1) * n_features]  # (F, N)
                grad_weights[level] = (rows * g.t()).sum(-1)
            grad_weights = grad_weights.to(ctx.weights_dtype)
        return grad_table, None, grad_weights


def _corners(sides: torch.Tensor, op: Callable[..., torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Both sides of a cell per axis → its 8 corners: sides (2, 3, N) → (8, N).

    Corner c = c_0 + 2c_1 + 4c_2 (tinycudann's order: bit d says whether axis d takes the upper
    side); ``op`` (+, ⊕ or ×) combines the axes. N stays the contiguous inner dimension, so
    every broadcast is a plain vectorised loop.
    """
    x, y, z = sides[:, 0], sides[:, 1], sides[:, 2]  # (2, N) each
    zy = op(z[:, None], y[None, :])  # (2_z, 2_y, N)
    result = op(zy[:, :, None], x[None, None], out=out)  # (2_z, 2_y, 2_x, N)
    return result.view(8, -1)


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
        set_up_table(self, n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale,
                     generator, device)
        # per level, the factors that multiply (g_d, g_d + 1): dense strides (1, R, R²) or primes π
        self.register_buffer("factors", torch.tensor(level_factors(self.levels), device=device).view(-1, 3, 1),
                             persistent=False)

    def level_corners(self, level: int, x_t: torch.Tensor, out: torch.Tensor,
                      weights_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Table rows and trilinear weights of the 8 corners around each point, on one level.

        Args:
            level: l.
            x_t: (3, N) points in [0, 1], one row per axis.
            out: (8, N) int64, receives the rows (level offset included).
            weights_out: (8, N), receives the weights (only where x needs no gradient).

        Returns:
            (8, N) weights Π_d (c_d ? f_d : 1 − f_d), differentiable in x.
        """
        spec = self.levels[level]
        pos = x_t * spec.scale + 0.5  # p: (3, N)
        cell = torch.floor(pos)
        frac = pos - cell  # f: (3, N); carries ∂f/∂x = s_l
        a = cell.long() * self.factors[level]  # g_d · factor_d: (3, N)
        sides = torch.stack((a, a + self.factors[level]))  # (2, 3, N): lower and upper side per axis
        if spec.hashed:  # ⊕_d ((g_d + c_d)·π_d mod 2^32), mod T_l. T_l is a power of two, so masking
            sides &= spec.table_size - 1  # each term first equals masking the XOR (and the uint32 wrap)
            _corners(sides, torch.bitwise_xor, out=out.view(2, 2, 2, -1))
        else:  # (Σ_d (g_d + c_d)·stride_d mod 2^32) mod T_l; the mod wraps the +0.5 overshoot
            _corners(sides, torch.add, out=out.view(2, 2, 2, -1))
            out.bitwise_and_(UINT32_MASK).remainder_(spec.table_size)
        out += spec.offset
        into = None if weights_out is None else weights_out.view(2, 2, 2, -1)
        return _corners(torch.stack((1 - frac, frac)), torch.mul, out=into)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points. x: (N, 3) in [0, 1] → (N, L·F), level-major, in the table's dtype.

        Memory (N points, L levels): with a graph, the backward keeps each point's 8 corner rows per
        level, in int32 where the table has fewer than 2^31 rows (4 bytes, else 8), and their
        weights (8·L·(4 + 4) bytes a point: 512 at L = 16). Without a graph (``torch.no_grad`` or
        nothing requires a gradient) the levels are computed one at a time and nothing is kept:
        the same arithmetic, bit for bit, in (8, N) temporaries.
        """
        x_t = x.t().contiguous()  # (3, N)
        table = self.params.view(-1, self.n_features_per_level)  # (ΣT_l, F)
        n = x.shape[0]
        corner = torch.empty((8, n), dtype=torch.int64, device=x.device)  # one level's rows, int64 arithmetic
        if not (torch.is_grad_enabled() and (self.params.requires_grad or x.requires_grad)):
            y = table.new_empty((n, self.n_output_dims))
            for level in range(self.n_levels):
                weights = self.level_corners(level, x_t, corner).to(table.dtype)
                _interpolate_level(table, corner, weights, y, level)
            return y
        index = torch.empty((self.n_levels, 8, n), dtype=self._index_dtype(table), device=x.device)
        if x.requires_grad:  # the weights carry a graph to x
            levels = []
            for level in range(self.n_levels):
                levels.append(self.level_corners(level, x_t, corner))
                index[level] = corner
            weights = torch.stack(levels)
        else:  # written in place: no list of levels beside the stacked copy
            weights = torch.empty((self.n_levels, 8, n), dtype=x_t.dtype, device=x.device)
            for level in range(self.n_levels):
                self.level_corners(level, x_t, corner, weights_out=weights[level])
                index[level] = corner
        return _InterpolateTable.apply(table, index, weights)  # (N, L·F)

    @staticmethod
    def _index_dtype(table: torch.Tensor) -> torch.dtype:
        """int32 rows where they fit (half the memory the backward keeps), else int64."""
        return torch.int32 if table.shape[0] < 2**31 else torch.int64

    def extra_repr(self) -> str:
        n_dense = sum(not level.hashed for level in self.levels)
        return (
            f"levels={self.n_levels}, features={self.n_features_per_level}, dense_levels={n_dense}, "
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


def triton_import_error() -> Optional[str]:
    """None when ``import triton`` works, else why not (the ``[gpu]`` extra installs it)."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # ImportError when missing; anything else from a broken install
        return f"{type(err).__name__}: {err}"
    return None


def choose_grid_backend(
    requested: str, device: torch.device, tcnn_error: Optional[Callable[[], Optional[str]]] = None,
    triton_error: Optional[Callable[[], Optional[str]]] = None,
) -> tuple[str, str]:
    """The backend ``scene.grid.backend`` names on ``device``, and why: the decision, nothing built.

    ``auto`` on CUDA takes tinycudann when it imports, else Triton when it imports, else torch;
    on any other device torch. An explicit name is returned as is (the constructors check that
    their backend can run). The import checks are called only where the answer matters, so a
    CPU run never imports triton or tinycudann.

    Args:
        requested: ``scene.grid.backend``.
        device: where the encoding will live.
        tcnn_error, triton_error: the import checks (default :func:`tinycudann_import_error`,
            :func:`triton_import_error`): None when the package imports, else why not.

    Returns:
        (backend: "torch", "triton" or "tcnn", the reason to log).
    """
    if requested != "auto":
        return requested, f"requested by scene.grid.backend={requested}"
    if device.type != "cuda":
        return "torch", f"auto: device is {device.type}; the tcnn and triton backends need CUDA"
    tcnn_reason = (tcnn_error or tinycudann_import_error)()
    if tcnn_reason is None:
        return "tcnn", "auto: CUDA device and tinycudann imports"
    triton_reason = (triton_error or triton_import_error)()
    if triton_reason is None:
        return "triton", f"auto: CUDA device, tinycudann does not import ({tcnn_reason})"
    return "torch", f"auto: tinycudann does not import ({tcnn_reason}), nor does triton ({triton_reason})"


def grid_backend_unavailable(backend: str, device: Device) -> Optional[str]:
    """Why ``backend`` (a :func:`choose_grid_backend` answer) cannot run on ``device``, or None.
    ``torch`` runs anywhere; ``tcnn`` and ``triton`` need a CUDA device and their package."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if device.type != "cuda":
        return (f"scene.grid.backend={backend} needs a CUDA device, but the device is '{device}'; "
                f"use scene.grid.backend=auto or torch")
    reason = tinycudann_import_error() if backend == "tcnn" else triton_import_error()
    if reason is None:
        return None
    if backend == "tcnn":
        return f"scene.grid.backend=tcnn but tinycudann does not import ({reason}); {TCNN_INSTALL_HINT}"
    return _triton_missing(reason)


def _triton_missing(reason: str) -> str:
    return (f"scene.grid.backend=triton but triton does not import ({reason}); install it with `pip install "
            f"triton` (carv3d's [gpu] extra), or use scene.grid.backend=torch")


_BACKEND_NAMES = {"torch": "pure-torch", "triton": "Triton", "tcnn": "tinycudann"}


def make_hash_encoding(
    grid_cfg: Any, device: Device, generator: Optional[torch.Generator] = None
) -> tuple[nn.Module, str]:
    """Build the hash encoding for ``scene.grid`` on ``device``: the one place a backend is chosen.

    :func:`choose_grid_backend` decides (``auto``: tcnn, then triton on CUDA, torch elsewhere);
    ``torch`` always works; ``triton`` and ``tcnn`` fail loudly where they cannot run. The choice
    and its reason are logged. (Whether nvcc exists is irrelevant: tcnn is prebuilt or absent, and
    Triton compiles with its own bundled toolchain.)

    Args:
        grid_cfg: a ``HashGridConfig`` (dataclass or OmegaConf node).
        device: where the encoding lives.
        generator: draws the initial table.

    Returns:
        (encoding, backend name: "torch", "triton" or "tcnn").

    Raises:
        BackendUnavailableError: ``backend=tcnn`` or ``triton`` without CUDA or without the package.
        ConfigError: an unknown backend name or an invalid grid.
    """
    requested = str(grid_cfg.backend)
    device = torch.device(device)
    args = (
        int(grid_cfg.n_levels),
        int(grid_cfg.n_features_per_level),
        int(grid_cfg.log2_hashmap_size),
        int(grid_cfg.base_resolution),
        float(grid_cfg.per_level_scale),
    )
    choices = CHOICES["scene.grid.backend"]  # the one statement of the valid names
    if requested not in choices:
        raise ConfigError(f"scene.grid.backend is '{requested}'; expected one of: {', '.join(choices)}.")
    backend, why = choose_grid_backend(requested, device)
    if backend == "tcnn":
        encoding: nn.Module = TcnnHashGridEncoding(*args, generator=generator, device=device)
    elif backend == "triton":
        reason = triton_import_error()
        if reason is not None:  # the device is the kernels' own check (Triton's interpreter runs on a CPU)
            raise BackendUnavailableError(_triton_missing(reason))
        from carv3d.scene.hashgrid_triton import TritonHashGridEncoding  # imports triton: only when chosen

        encoding = TritonHashGridEncoding(*args, generator=generator, device=device)
    else:
        encoding = HashGridEncoding(*args, generator=generator, device=device)
    logger.info(f"hash grid: {_BACKEND_NAMES[backend]} backend ({why})")
    return encoding, backend
