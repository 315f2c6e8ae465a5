"""The hash encoding as two fused Triton kernels (forward; backward with atomic scatter).

Same encoding as :class:`carv3d.scene.hashgrid.HashGridEncoding` — tinycudann's level scales,
+0.5 offset, dense coarse levels, coherent prime hash, corner order and flat table layout (see that
module's docstring for the formulas) — computed without materialising anything per corner:

forward, one program per block of ``BLOCK`` points, looping over the L levels::

    p      = s_l · x + 0.5,   g = floor(p),   f = p − g                  per axis d
    row_c  = offset_l + (hashed_l ? ⊕_d (g_d + c_d)·π_d : Σ_d (g_d + c_d)·stride_d) mod T_l    (uint32)
    w_c    = (w_z · w_y) · w_x,  w_d = c_d ? f_d : 1 − f_d               c = c_x + 2c_y + 4c_z
    y_l    = Σ_c w_c · θ[row_c]                                          accumulated in float32

backward, the same walk, recomputing rows and weights from x (nothing is saved but x and θ)::

    ∂L/∂θ[row_c]  += w_c · ∂L/∂y_l                                        atomic adds
    ∂L/∂x_d       += s_l · Σ_c (∂w_c/∂f_d) · ⟨θ[row_c], ∂L/∂y_l⟩            ∂w_c/∂f_d = ±Π_{e≠d} w_e

Precision: positions, weights and sums are float32 (float64 when the table or x is float64). The
table gradient is scattered into a float32 buffer with float32 atomics whatever the table's dtype
and cast to it once at the end: float16 atomics (tinycudann's choice, on half2 pairs) would round
every one of the ~L·8 additions per point, and the buffer costs one table-sized fp32 write.
Atomics add in no fixed order, so the table gradient is reproducible to float32 rounding only —
the same as the torch backend's ``index_add_`` on CUDA.

Memory: the autograd node keeps x (12 bytes a point) and the table; the torch backend keeps each
point's 8·L rows and weights (512 bytes a point at L = 16).

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported), which is how the CPU tests exercise the kernels' logic.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
import triton
import triton.language as tl
from torch import nn
from torch.autograd.function import once_differentiable

from carv3d.errors import BackendUnavailableError
from carv3d.scene.layout import level_factors, set_up_table

Device = Union[str, torch.device]
# Points per program: 512 was the fastest of 64..512 for forward+backward at every point count on an
# H100 (docs/gpu_check_hashgrid_h100.json, sections.encode): 4 points a thread keep more gathers in flight.
DEFAULT_BLOCK_POINTS = 512


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _axis(x, scale):
    """Cell corner g (uint32, wrapping like tcnn's uint32 arithmetic) and fraction f of one axis."""
    pos = x * scale + 0.5
    cell = tl.floor(pos)
    return cell.to(tl.int32).to(tl.uint32), pos - cell


@triton.jit
def _row(t0, t1, t2, hashed, size, base):
    """Flat table row of one corner from its per-axis terms (g_d + c_d)·factor_d (uint32).

    Hashed levels XOR the terms, dense ones add them; either result is taken modulo T_l (a power
    of two when hashed). int64 from here on: offsets pass 2^32 in large tables.
    """
    local = tl.where(hashed, t0 ^ t1 ^ t2, t0 + t1 + t2) % size
    return base + local.to(tl.int64)


@triton.jit
def _level_geometry(x0, x1, x2, level, scale_ptr, factor_ptr, size_ptr, offset_ptr, hashed_ptr, POS: tl.constexpr):
    """Rows of the 8 corners (tcnn's order c = c_x + 2c_y + 4c_z), the per-axis fractions and s_l."""
    scale = tl.load(scale_ptr + level).to(tl.float32, bitcast=True).to(POS)  # s_l's float32 bits
    k0 = tl.load(factor_ptr + 3 * level + 0).to(tl.uint32)  # 1 or π_0 = 1
    k1 = tl.load(factor_ptr + 3 * level + 1).to(tl.uint32)  # R or π_1
    k2 = tl.load(factor_ptr + 3 * level + 2).to(tl.uint32)  # R² or π_2
    size = tl.load(size_ptr + level).to(tl.uint32)
    base = tl.load(offset_ptr + level)
    hashed = tl.load(hashed_ptr + level) != 0
    g0, f0 = _axis(x0, scale)
    g1, f1 = _axis(x1, scale)
    g2, f2 = _axis(x2, scale)
    a0, b0 = g0 * k0, (g0 + 1) * k0  # lower and upper side of the cell, axis 0 (uint32 wrap)
    a1, b1 = g1 * k1, (g1 + 1) * k1
    a2, b2 = g2 * k2, (g2 + 1) * k2
    r0 = _row(a0, a1, a2, hashed, size, base)
    r1 = _row(b0, a1, a2, hashed, size, base)
    r2 = _row(a0, b1, a2, hashed, size, base)
    r3 = _row(b0, b1, a2, hashed, size, base)
    r4 = _row(a0, a1, b2, hashed, size, base)
    r5 = _row(b0, a1, b2, hashed, size, base)
    r6 = _row(a0, b1, b2, hashed, size, base)
    r7 = _row(b0, b1, b2, hashed, size, base)
    return r0, r1, r2, r3, r4, r5, r6, r7, f0, f1, f2, scale


@triton.jit
def _gather(table_ptr, row, f, ok, F: tl.constexpr, ACC: tl.constexpr):
    """θ[row, f] for a block of points: (BLOCK,) in the accumulation dtype."""
    return tl.load(table_ptr + row * F + f, mask=ok, other=0.0).to(ACC)


@triton.jit
def _load_points(x_ptr, pid, n_points, BLOCK: tl.constexpr, POS: tl.constexpr):
    n = pid * BLOCK + tl.arange(0, BLOCK)
    ok = n < n_points
    n64 = n.to(tl.int64)
    x0 = tl.load(x_ptr + n64 * 3 + 0, mask=ok, other=0.0).to(POS)
    x1 = tl.load(x_ptr + n64 * 3 + 1, mask=ok, other=0.0).to(POS)
    x2 = tl.load(x_ptr + n64 * 3 + 2, mask=ok, other=0.0).to(POS)
    return n64, ok, x0, x1, x2


@triton.jit
def _corner_weights(f0, f1, f2, ACC: tl.constexpr):
    """w_c for c = 0..7, multiplied (w_z·w_y)·w_x in the positions' dtype as the torch grid does,
    then converted to the accumulation dtype."""
    u0, u1, u2 = 1.0 - f0, 1.0 - f1, 1.0 - f2
    zy00, zy01, zy10, zy11 = u2 * u1, u2 * f1, f2 * u1, f2 * f1
    return ((zy00 * u0).to(ACC), (zy00 * f0).to(ACC), (zy01 * u0).to(ACC), (zy01 * f0).to(ACC),
            (zy10 * u0).to(ACC), (zy10 * f0).to(ACC), (zy11 * u0).to(ACC), (zy11 * f0).to(ACC))


# Every tensor below is (BLOCK,): one point per lane, all levels, corners and features of a point in
# the same thread (features unrolled with static_range), so no data moves between threads.
@triton.jit
def _encode_forward_kernel(x_ptr, table_ptr, y_ptr, scale_ptr, factor_ptr, size_ptr, offset_ptr, hashed_ptr,
                           n_points, n_levels, F: tl.constexpr, BLOCK: tl.constexpr,
                           POS: tl.constexpr, ACC: tl.constexpr):
    """y[n, l·F + f] = Σ_c w_c · θ[row_c, f] for a block of points and every level."""
    n64, ok, x0, x1, x2 = _load_points(x_ptr, tl.program_id(0), n_points, BLOCK, POS)
    out = y_ptr + n64 * (n_levels * F)
    for level in range(n_levels):
        r0, r1, r2, r3, r4, r5, r6, r7, f0, f1, f2, scale = _level_geometry(
            x0, x1, x2, level, scale_ptr, factor_ptr, size_ptr, offset_ptr, hashed_ptr, POS)
        w0, w1, w2, w3, w4, w5, w6, w7 = _corner_weights(f0, f1, f2, ACC)
        for f in tl.static_range(F):
            acc = w0 * _gather(table_ptr, r0, f, ok, F, ACC)
            acc += w1 * _gather(table_ptr, r1, f, ok, F, ACC)
            acc += w2 * _gather(table_ptr, r2, f, ok, F, ACC)
            acc += w3 * _gather(table_ptr, r3, f, ok, F, ACC)
            acc += w4 * _gather(table_ptr, r4, f, ok, F, ACC)
            acc += w5 * _gather(table_ptr, r5, f, ok, F, ACC)
            acc += w6 * _gather(table_ptr, r6, f, ok, F, ACC)
            acc += w7 * _gather(table_ptr, r7, f, ok, F, ACC)
            tl.store(out + level * F + f, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scatter(grad_table_ptr, row, f, value, ok, F: tl.constexpr):
    """∂L/∂θ[row, f] += value, in the gradient buffer's dtype (float32 or float64)."""
    tl.atomic_add(grad_table_ptr + row * F + f, value.to(grad_table_ptr.dtype.element_ty), mask=ok, sem="relaxed")


@triton.jit
def _encode_backward_kernel(x_ptr, table_ptr, grad_y_ptr, grad_table_ptr, grad_x_ptr,
                            scale_ptr, factor_ptr, size_ptr, offset_ptr, hashed_ptr, n_points, n_levels,
                            F: tl.constexpr, BLOCK: tl.constexpr, POS: tl.constexpr, ACC: tl.constexpr,
                            TABLE_GRAD: tl.constexpr, X_GRAD: tl.constexpr):
    """Table gradient by atomic scatter and/or position gradient, for a block of points."""
    n64, ok, x0, x1, x2 = _load_points(x_ptr, tl.program_id(0), n_points, BLOCK, POS)
    grad_row = grad_y_ptr + n64 * (n_levels * F)
    gx0 = tl.zeros((BLOCK,), ACC)
    gx1 = tl.zeros((BLOCK,), ACC)
    gx2 = tl.zeros((BLOCK,), ACC)
    for level in range(n_levels):
        r0, r1, r2, r3, r4, r5, r6, r7, f0, f1, f2, scale = _level_geometry(
            x0, x1, x2, level, scale_ptr, factor_ptr, size_ptr, offset_ptr, hashed_ptr, POS)
        w0, w1, w2, w3, w4, w5, w6, w7 = _corner_weights(f0, f1, f2, ACC)
        d0 = tl.zeros((BLOCK,), ACC)  # ⟨θ[row_c], ∂L/∂y_l⟩ per corner, for the position gradient
        d1 = tl.zeros((BLOCK,), ACC)
        d2 = tl.zeros((BLOCK,), ACC)
        d3 = tl.zeros((BLOCK,), ACC)
        d4 = tl.zeros((BLOCK,), ACC)
        d5 = tl.zeros((BLOCK,), ACC)
        d6 = tl.zeros((BLOCK,), ACC)
        d7 = tl.zeros((BLOCK,), ACC)
        for f in tl.static_range(F):
            g = tl.load(grad_row + level * F + f, mask=ok, other=0.0).to(ACC)  # ∂L/∂y_l,f
            if TABLE_GRAD:
                _scatter(grad_table_ptr, r0, f, w0 * g, ok, F)
                _scatter(grad_table_ptr, r1, f, w1 * g, ok, F)
                _scatter(grad_table_ptr, r2, f, w2 * g, ok, F)
                _scatter(grad_table_ptr, r3, f, w3 * g, ok, F)
                _scatter(grad_table_ptr, r4, f, w4 * g, ok, F)
                _scatter(grad_table_ptr, r5, f, w5 * g, ok, F)
                _scatter(grad_table_ptr, r6, f, w6 * g, ok, F)
                _scatter(grad_table_ptr, r7, f, w7 * g, ok, F)
            if X_GRAD:
                d0 += _gather(table_ptr, r0, f, ok, F, ACC) * g
                d1 += _gather(table_ptr, r1, f, ok, F, ACC) * g
                d2 += _gather(table_ptr, r2, f, ok, F, ACC) * g
                d3 += _gather(table_ptr, r3, f, ok, F, ACC) * g
                d4 += _gather(table_ptr, r4, f, ok, F, ACC) * g
                d5 += _gather(table_ptr, r5, f, ok, F, ACC) * g
                d6 += _gather(table_ptr, r6, f, ok, F, ACC) * g
                d7 += _gather(table_ptr, r7, f, ok, F, ACC) * g
        if X_GRAD:
            f0, f1, f2, s = f0.to(ACC), f1.to(ACC), f2.to(ACC), scale.to(ACC)
            u0, u1, u2 = 1.0 - f0, 1.0 - f1, 1.0 - f2
            # ∂y/∂f_d: differences across axis d, weighted by the other two axes' weights
            gx0 += s * (u2 * (u1 * (d1 - d0) + f1 * (d3 - d2)) + f2 * (u1 * (d5 - d4) + f1 * (d7 - d6)))
            gx1 += s * (u2 * (u0 * (d2 - d0) + f0 * (d3 - d1)) + f2 * (u0 * (d6 - d4) + f0 * (d7 - d5)))
            gx2 += s * (u1 * (u0 * (d4 - d0) + f0 * (d5 - d1)) + f1 * (u0 * (d6 - d2) + f0 * (d7 - d3)))
    if X_GRAD:
        out_ty = grad_x_ptr.dtype.element_ty
        tl.store(grad_x_ptr + n64 * 3 + 0, gx0.to(out_ty), mask=ok)
        tl.store(grad_x_ptr + n64 * 3 + 1, gx1.to(out_ty), mask=ok)
        tl.store(grad_x_ptr + n64 * 3 + 2, gx2.to(out_ty), mask=ok)


# ------------------------------------------------------------------------------------ the wrapper
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _precision(x: torch.Tensor, table: torch.Tensor) -> dict[str, Any]:
    """The kernels' dtypes, as the torch grid's: positions and weights in x's precision (POS), sums
    in the table's (ACC) — except that float16/bfloat16 become float32 in both."""
    wide = lambda t: tl.float64 if t.dtype == torch.float64 else tl.float32  # noqa: E731
    return {"POS": wide(x), "ACC": wide(table)}


def _launch_context(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one (when it is not already)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _TritonEncode(torch.autograd.Function):
    """x: (N, 3), table: flat (ΣT_l·F,) → (N, L·F) in the table's dtype; first-order only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, table: torch.Tensor, encoding: "TritonHashGridEncoding") -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, table)
        ctx.encoding = encoding
        return encoding._launch_forward(x, table)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, table = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_table = ctx.encoding._launch_backward(x, table, grad_y.contiguous(), need_x, need_table)
        return grad_x, grad_table, None


class TritonHashGridEncoding(nn.Module):
    """The multiresolution hash encoding computed by fused Triton kernels (see the module doc).

    Drop-in for :class:`carv3d.scene.hashgrid.HashGridEncoding`: same constructor, the same
    ``params`` (flat table, same layout and, for a generator, the same initial values, so state
    dicts move between the two), the same output (N, L·F) in the table's dtype, and gradients to
    the table and to the positions.

    Args:
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale:
            as for :class:`HashGridEncoding`.
        generator: draws the initial table.
        device: a CUDA device (or the CPU under ``TRITON_INTERPRET=1``).
        block_points: points per Triton program (a power of two).

    Raises:
        BackendUnavailableError: on a device the kernels cannot run on.
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
        block_points: int = DEFAULT_BLOCK_POINTS,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        if device.type != "cuda" and not interpreter_enabled():
            raise BackendUnavailableError(
                f"the triton hash-grid backend needs a CUDA device, not '{device}'; "
                "use scene.grid.backend=torch (or auto) on this device."
            )
        if block_points < 16 or block_points & (block_points - 1):
            raise ValueError(f"block_points must be a power of two >= 16, not {block_points}")
        set_up_table(self, n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale,
                     generator, device)
        self.block_points = block_points
        # per level: s_l (exactly float32, as the layout computes it), the factors of (g_d, g_d + 1)
        # (dense strides 1, R, R² or the primes), T_l, the first row, hashed or dense
        factors = level_factors(self.levels)
        levels = {
            # float32 bits in an int32 buffer: ``module.to(dtype)`` casts float buffers, and s_l must stay exact
            "level_scale_bits": torch.tensor([v.scale for v in self.levels], dtype=torch.float32).view(torch.int32),
            "level_factors": torch.tensor(factors, dtype=torch.int64),
            "level_size": torch.tensor([v.table_size for v in self.levels], dtype=torch.int64),
            "level_offset": torch.tensor([v.offset for v in self.levels], dtype=torch.int64),
            "level_hashed": torch.tensor([int(v.hashed) for v in self.levels], dtype=torch.int32),
        }
        for name, value in levels.items():
            self.register_buffer(name, value.to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points. x: (N, 3) in [0, 1] → (N, L·F), level-major, in the table's dtype."""
        if x.dim() != 2 or x.shape[1] != 3:
            raise ValueError(f"expected points of shape (N, 3), got {tuple(x.shape)}")
        if self.params.dtype not in _FLOATS or x.dtype not in _FLOATS:
            raise TypeError(f"float tables and points only, not {self.params.dtype} / {x.dtype}")
        if torch.is_grad_enabled() and (x.requires_grad or self.params.requires_grad):
            return _TritonEncode.apply(x, self.params, self)
        return self._launch_forward(x.contiguous(), self.params)

    # The launches: N = 0 (an occupancy grid can leave no samples) launches nothing.
    def _geometry(self) -> tuple[torch.Tensor, ...]:
        return self.level_scale_bits, self.level_factors, self.level_size, self.level_offset, self.level_hashed

    def _meta(self) -> dict[str, Any]:
        f = self.n_features_per_level
        # No fused multiply-add: p = s·x + 0.5 rounds twice, as the torch backend's separate kernels
        # do, so both backends pick the same cell (and the same rows) for every point.
        return {"F": f, "BLOCK": self.block_points, "enable_fp_fusion": False}

    def _launch_forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = table.new_empty((n, self.n_output_dims))
        if n == 0:
            return y
        with _launch_context(x.device):
            _encode_forward_kernel[(triton.cdiv(n, self.block_points),)](
                x, table, y, *self._geometry(), n, self.n_levels, **_precision(x, table), **self._meta())
        return y

    def _launch_backward(self, x: torch.Tensor, table: torch.Tensor, grad_y: torch.Tensor, need_x: bool,
                         need_table: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        n = x.shape[0]
        accumulate = torch.float64 if table.dtype == torch.float64 else torch.float32  # the atomics' dtype
        grad_table = torch.zeros(table.shape, dtype=accumulate, device=table.device) if need_table else None
        grad_x = torch.zeros_like(x) if need_x else None
        if n > 0 and (need_x or need_table):
            dummy = grad_y  # an unused pointer argument when a gradient is not asked for
            with _launch_context(x.device):
                _encode_backward_kernel[(triton.cdiv(n, self.block_points),)](
                    x, table, grad_y, dummy if grad_table is None else grad_table, dummy if grad_x is None else grad_x,
                    *self._geometry(), n, self.n_levels, TABLE_GRAD=need_table, X_GRAD=need_x,
                    **_precision(x, table), **self._meta())
        if grad_table is not None and grad_table.dtype != table.dtype:
            grad_table = grad_table.to(table.dtype)
        return grad_x, grad_table

    def extra_repr(self) -> str:
        n_dense = sum(not level.hashed for level in self.levels)
        return (
            f"levels={self.n_levels}, features={self.n_features_per_level}, dense_levels={n_dense}, "
            f"resolutions={self.levels[0].resolution}..{self.levels[-1].resolution}, params={self.params.numel()}, "
            f"block_points={self.block_points}"
        )
