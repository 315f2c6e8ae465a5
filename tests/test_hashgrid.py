"""Hash encoding: against an independent brute-force reference, hand-computed hashes, closed forms,
gradcheck, and the backend choice."""

from __future__ import annotations

import itertools
import logging
import math
import time

import numpy as np
import pytest
import torch

from carv3d.config import HashGridConfig
from carv3d.errors import BackendUnavailableError, ConfigError, UserError
from carv3d.log import logger
from carv3d.scene.hashgrid import HashGridEncoding, TcnnHashGridEncoding, make_hash_encoding
from carv3d.scene.layout import grid_levels

SMALL = dict(n_levels=8, n_features_per_level=2, log2_hashmap_size=16, base_resolution=16, per_level_scale=1.447269)
TINY = dict(n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2, per_level_scale=2.0)


# ---------------------------------------------------------------- an independent reference


def ref_levels(n_levels, log2_hashmap_size, base_resolution, per_level_scale):
    """(scale, resolution, table size, offset, hashed) per level, from the formulas.

    The scale follows tcnn's float32 arithmetic, exp2f(l · log2f(b)) · N_0 − 1, each step rounded
    to float32 (float64 would move s_l by ~3e-7 relative and the features with it).
    """
    f32 = np.float32
    out, offset = [], 0
    for level in range(n_levels):
        exponent = f32(level) * f32(math.log2(f32(per_level_scale)))
        scale = float(f32(f32(f32(2.0 ** float(exponent)) * f32(base_resolution)) - f32(1)))
        res = math.ceil(scale) + 1
        size = min(8 * math.ceil(res**3 / 8), 2**log2_hashmap_size)
        out.append((scale, res, size, offset, size < res**3))
        offset += size
    return out


def ref_vertex_row(vertex, res, size, hashed):
    """Row of one grid vertex inside its level, with Python integers (uint32 by explicit mod 2^32)."""
    m = 2**32
    if hashed:
        h = 0
        for coord, prime in zip(vertex, (1, 2654435761, 805459861)):
            h ^= (coord * prime) % m
        return h % size
    return ((vertex[0] + vertex[1] * res + vertex[2] * res * res) % m) % size


def ref_encode(table: np.ndarray, x: np.ndarray, cfg: dict) -> np.ndarray:
    """Loop over points, levels and the 8 corners. table: (rows, F) float64, x: (N, 3) → (N, L·F)."""
    n_features = cfg["n_features_per_level"]
    levels = ref_levels(cfg["n_levels"], cfg["log2_hashmap_size"], cfg["base_resolution"], cfg["per_level_scale"])
    out = np.zeros((len(x), len(levels) * n_features))
    for i, point in enumerate(x):
        for l, (scale, res, size, offset, hashed) in enumerate(levels):
            pos = [scale * float(c) + 0.5 for c in point]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell)]
            for corner in itertools.product((0, 1), repeat=3):
                weight = 1.0
                for d in range(3):
                    weight *= frac[d] if corner[d] else 1.0 - frac[d]
                vertex = [cell[d] + corner[d] for d in range(3)]
                row = offset + ref_vertex_row(vertex, res, size, hashed)
                out[i, l * n_features : (l + 1) * n_features] += weight * table[row]
    return out


def random_table(enc: HashGridEncoding, seed: int) -> None:
    """Replace the ±1e-4 initial table by O(1) values so that differences are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        enc.params.copy_(torch.rand(enc.params.shape, generator=g, dtype=enc.params.dtype) * 2 - 1)


# ---------------------------------------------------------------- geometry of the levels


def test_threestudio_levels_match_the_formulas():
    levels = grid_levels(16, 19, 16, 1.447269)
    # s_l = 16 · 1.447269^l − 1 (float32), R_l = ceil(s_l) + 1: the finest level has 4096 vertices per axis
    assert [lv.resolution for lv in levels] == [
        16, 24, 34, 49, 71, 102, 148, 213, 308, 446, 646, 934, 1352, 1956, 2831, 4096
    ]  # fmt: skip
    # T_l = min(R³ rounded up to 8, 2^19): 16³ = 4096, 24³ = 13824, 34³ = 39304, 49³ = 117649 → 117656,
    # 71³ = 357911 → 357912, then 102³ > 2^19 = 524288: hashed from level 5 on
    assert [lv.table_size for lv in levels] == [4096, 13824, 39304, 117656, 357912] + [524288] * 11
    assert [lv.hashed for lv in levels] == [False] * 5 + [True] * 11
    assert [lv.offset for lv in levels][:6] == [0, 4096, 17920, 57224, 174880, 532792]
    for lv, (scale, res, size, offset, hashed) in zip(levels, ref_levels(16, 19, 16, 1.447269)):
        assert (lv.resolution, lv.table_size, lv.offset, lv.hashed) == (res, size, offset, hashed)
        assert lv.scale == scale
    for l in range(16):  # float32 arithmetic vs float64: log2f(b) rounding grows with l
        assert levels[l].scale == pytest.approx(16 * 1.447269**l - 1, rel=1e-6)
    total_rows = 4096 + 13824 + 39304 + 117656 + 357912 + 11 * 524288
    enc = HashGridEncoding(16, 2, 19, 16, 1.447269, generator=torch.Generator().manual_seed(0))
    assert enc.params.numel() == 2 * total_rows == 12_599_920


def test_invalid_grid_is_a_config_error():
    with pytest.raises(ConfigError, match="per_level_scale"):
        grid_levels(4, 19, 16, 0.5)
    with pytest.raises(ConfigError, match="n_levels"):
        grid_levels(0, 19, 16, 1.5)
    assert issubclass(ConfigError, UserError)


# ---------------------------------------------------------------- values


def test_matches_brute_force_reference_dense_and_hashed_levels():
    enc = HashGridEncoding(**SMALL).double()  # levels 0–2 dense, 3–7 hashed
    assert [lv.hashed for lv in enc.levels] == [False] * 3 + [True] * 5
    random_table(enc, 1)
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0] = torch.tensor([0.0, 0.0, 0.0])
    x[1] = torch.tensor([1.0, 1.0, 1.0])  # top corner: the +0.5 offset wraps the dense index
    x[2] = torch.tensor([1.0, 0.0, 0.5])
    expected = ref_encode(enc.params.detach().view(-1, 2).numpy(), x.numpy(), SMALL)
    got = enc(x).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_float32_output_and_deterministic_init():
    a = HashGridEncoding(**SMALL, generator=torch.Generator().manual_seed(7))
    b = HashGridEncoding(**SMALL, generator=torch.Generator().manual_seed(7))
    c = HashGridEncoding(**SMALL, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.params, b.params) and not torch.equal(a.params, c.params)
    assert a.params.abs().max() < 1e-4 and a.params.abs().max() > 0.9e-4  # U(−1e-4, 1e-4)
    y = a(torch.rand(10, 3))
    assert y.dtype == torch.float32 and y.shape == (10, 16)


def test_dense_level_interpolates_a_linear_field_exactly():
    """Trilinear interpolation reproduces an affine function of the vertex coordinates: closed form."""
    enc = HashGridEncoding(**SMALL).double()
    level = enc.levels[1]  # dense, R = 24
    assert not level.hashed
    r = level.resolution
    k, j, i = torch.meshgrid(torch.arange(r), torch.arange(r), torch.arange(r), indexing="ij")  # z, y, x
    with torch.no_grad():
        table = enc.params.view(-1, 2)
        rows = level.offset + (i + j * r + k * r * r).reshape(-1)  # dense index: x fastest
        table[rows, 0] = (1.0 * i + 2.0 * j - 3.0 * k + 0.5).reshape(-1).double()
        table[rows, 1] = (0.25 * k - 1.0).reshape(-1).double()
    x = torch.rand(200, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.9  # no wrap
    p = x * level.scale + 0.5  # grid units
    y = enc(x)[:, 2:4].detach()
    torch.testing.assert_close(y[:, 0], p[:, 0] + 2 * p[:, 1] - 3 * p[:, 2] + 0.5, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(y[:, 1], 0.25 * p[:, 2] - 1.0, rtol=1e-12, atol=1e-10)


def test_hash_indices_by_hand():
    """Level 5 of SMALL: R = 102, hashed into T = 2^16 rows. Numbers worked out by hand:

    vertex (1, 2, 3): 2 · 2654435761 mod 2^32 = 1013904226, 3 · 805459861 = 2416379583,
        1 ⊕ 1013904226 ⊕ 2416379583 = 2892625372, mod 65536 = 62940.
    vertex (2, 3, 4): 3 · 2654435761 mod 2^32 = 3668339987, 4 · 805459861 mod 2^32 = 3221839444,
        2 ⊕ 3668339987 ⊕ 3221839444 = 447689541, mod 65536 = 13125.
    vertex (57, 211, 13): 211 · 2654435761 mod 2^32 = 1740197091, 13 · 805459861 mod 2^32 = 1881043601,
        57 ⊕ 1740197091 ⊕ 1881043601 = 396836427, mod 65536 = 15947.
    """
    enc = HashGridEncoding(**SMALL)
    level = enc.levels[5]
    assert (level.resolution, level.table_size, level.hashed) == (102, 65536, True)
    # offset = 16³ + 24³ + 34³ (dense levels 0–2; all multiples of 8) + 2 · 2^16 (hashed levels 3–4)
    assert level.offset == 4096 + 13824 + 39304 + 2 * 65536 == 188296
    cells = torch.tensor([[1, 2, 3], [57, 211, 13]], dtype=torch.float64)
    x = ((cells + 0.25 - 0.5) / level.scale).float()  # p = s·x + 0.5 = g + 0.25
    rows = torch.empty(8, 2, dtype=torch.int64)
    enc.level_corners(5, x.t().contiguous(), rows)
    assert rows[0, 0].item() == level.offset + 62940  # corner (0, 0, 0) of cell (1, 2, 3)
    assert rows[7, 0].item() == level.offset + 13125  # corner (1, 1, 1): vertex (2, 3, 4)
    assert rows[0, 1].item() == level.offset + 15947
    # the other corners, in tcnn's order c = c0 + 2c1 + 4c2, against the reference
    for c, corner in enumerate(itertools.product((0, 1), repeat=3)):
        vertex = [[1, 2, 3][d] + corner[2 - d] for d in range(3)]  # product() varies the last fastest
        assert rows[c, 0].item() == level.offset + ref_vertex_row(vertex, 102, 65536, True)


def test_interpolation_is_continuous_across_cells():
    """Neighbouring points on either side of a cell face give (almost) the same features."""
    enc = HashGridEncoding(**SMALL).double()
    random_table(enc, 4)
    face = (5 - 0.5) / enc.levels[7].scale  # p = s·x + 0.5 = 5: a cell face of the finest level
    x = torch.tensor([[face - 1e-9, 0.3, 0.6], [face + 1e-9, 0.3, 0.6]], dtype=torch.float64)
    y = enc(x)
    assert (y[0] - y[1]).abs().max() < 1e-6


# ---------------------------------------------------------------- gradients


def test_gradcheck_table_and_positions():
    enc = HashGridEncoding(**TINY).double()  # R = 2 (dense, wraps), 4 (dense), 8 (hashed into 64 rows)
    assert [lv.hashed for lv in enc.levels] == [False, False, True]
    random_table(enc, 5)
    x = torch.rand(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    table = enc.params.detach().clone().requires_grad_(True)

    def encode(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(enc, {"params": table}, (x,))

    assert torch.autograd.gradcheck(encode, (table, x.requires_grad_(True)), eps=1e-6, atol=1e-6)


def test_table_gradient_matches_plain_indexing():
    """The scatter backward against autograd through ordinary indexing, on repeated indices."""
    enc = HashGridEncoding(**SMALL)
    random_table(enc, 8)
    x = torch.rand(2000, 3, generator=torch.Generator().manual_seed(9))
    w = torch.randn(2000, 16, generator=torch.Generator().manual_seed(10))
    (enc(x) * w).sum().backward()

    table = enc.params.detach().view(-1, 2).clone().requires_grad_(True)
    x_t = x.t().contiguous()
    out = []
    for level in range(enc.n_levels):
        rows = torch.empty(8, 2000, dtype=torch.int64)
        weights = enc.level_corners(level, x_t, rows)
        out.append((weights[..., None] * table[rows]).sum(0))  # (N, F)
    (torch.cat(out, dim=1) * w).sum().backward()
    torch.testing.assert_close(enc.params.grad.view(-1, 2), table.grad, rtol=1e-5, atol=1e-6)


def test_cpu_timing_small_config(capsys):
    """Not an assertion on speed: prints the CPU cost of forward + backward on 2^16 points.

    Measured on one thread (best of 3), which is stable when other jobs share the cores.
    """
    enc = HashGridEncoding(**SMALL, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2**16, 3, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc(x).sum().backward()  # warm-up
        best_fwd = best_bwd = float("inf")
        for _ in range(3):
            enc.params.grad = None
            t0 = time.perf_counter()
            y = enc(x)
            t1 = time.perf_counter()
            y.square().sum().backward()
            t2 = time.perf_counter()
            best_fwd, best_bwd = min(best_fwd, t1 - t0), min(best_bwd, t2 - t1)
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print(
            f"\n[timing] torch hash grid (8 levels, 2^16 table), 2^16 points, 1 thread: "
            f"forward {best_fwd * 1e3:.0f} ms, backward {best_bwd * 1e3:.0f} ms"
        )
    assert y.shape == (2**16, 16)


# ---------------------------------------------------------------- backend choice


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_auto_and_torch_pick_the_torch_backend_on_cpu():
    handler = _Capture()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        cfg = HashGridConfig(backend="auto", n_levels=2, log2_hashmap_size=10)
        enc, name = make_hash_encoding(cfg, "cpu", generator=torch.Generator().manual_seed(0))
        assert name == "torch" and isinstance(enc, HashGridEncoding)
        assert any("pure-torch" in m and "cpu" in m for m in handler.messages)
        enc2, name2 = make_hash_encoding(HashGridConfig(backend="torch", n_levels=2, log2_hashmap_size=10), "cpu",
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert name2 == "torch" and torch.equal(enc.params, enc2.params)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_explicit_tcnn_without_cuda_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="scene.grid.backend=torch"):
        make_hash_encoding(HashGridConfig(backend="tcnn"), "cpu")
    assert issubclass(BackendUnavailableError, UserError)


def test_explicit_tcnn_missing_says_how_to_install(monkeypatch):
    """On a CUDA device without tinycudann the message gives the pip command (simulated here)."""
    import carv3d.scene.hashgrid as hashgrid

    monkeypatch.setattr(hashgrid, "tinycudann_import_error", lambda: "ModuleNotFoundError: no tinycudann")
    with pytest.raises(BackendUnavailableError) as err:
        TcnnHashGridEncoding(**SMALL, device="cuda")
    message = str(err.value)
    assert "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch" in message
    assert "scene.grid.backend=torch" in message


def _tcnn_available() -> bool:
    try:
        import tinycudann  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _tcnn_available(), reason="needs CUDA and tinycudann")
def test_tcnn_matches_torch_backend_on_the_same_table():
    torch_enc = HashGridEncoding(**SMALL, device="cuda")
    tcnn_enc = TcnnHashGridEncoding(**SMALL, device="cuda", dtype=torch.float32)
    random_table(torch_enc, 11)
    with torch.no_grad():
        tcnn_enc.params.copy_(torch_enc.params)
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(12)).cuda()
    torch.testing.assert_close(tcnn_enc(x), torch_enc(x), rtol=1e-4, atol=1e-4)
    w = torch.randn(4096, 16, generator=torch.Generator().manual_seed(13)).cuda()
    (torch_enc(x) * w).sum().backward()
    (tcnn_enc(x) * w).sum().backward()
    torch.testing.assert_close(tcnn_enc.params.grad, torch_enc.params.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_cpu():
    cpu = HashGridEncoding(**SMALL)
    random_table(cpu, 14)
    gpu = HashGridEncoding(**SMALL, device="cuda")
    with torch.no_grad():
        gpu.params.copy_(cpu.params)
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(15))
    w = torch.randn(4096, 16, generator=torch.Generator().manual_seed(16))
    y_cpu, y_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-6)
    (y_cpu * w).sum().backward()
    (y_gpu * w.cuda()).sum().backward()  # atomics sum in another order: float32 rounding only
    torch.testing.assert_close(gpu.params.grad.cpu(), cpu.params.grad, rtol=1e-4, atol=1e-5)
