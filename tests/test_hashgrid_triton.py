"""The Triton hash-grid backend: its kernels against the torch grid and a brute-force reference, its
compilation for a real GPU target, and the backend choice.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors, but it must be on
before triton is imported, and the main test process may already have imported triton (torch's
compiler stack does). So the kernel tests run in a subprocess of their own:
:func:`test_kernels_under_the_interpreter` starts ``pytest`` on this file with the variable set, and
in that process (``INTERPRETED``) this module defines the kernel tests instead of the driver. The
other tests (backend choice, compilation to sm_90 PTX/cubin with Triton's bundled toolchain) need no
kernel launch and run in the main process.

Tolerances: float64 tables and points are compared to 1e-12 (the kernels and the references do the
same arithmetic up to summation order); float32 to 1e-6 relative on O(1) tables (a few ulps of a
sum of 8 products); float16 tables against a float64 reference to half an fp16 ulp of the result
plus the fp32 error, which is what one rounding of an fp32-accumulated sum allows.
"""

from __future__ import annotations

import importlib.util
import math
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carv3d.config import HashGridConfig
from carv3d.errors import BackendUnavailableError, ConfigError, UserError
from carv3d.log import logger
from carv3d.scene.hashgrid import HashGridEncoding, choose_grid_backend, make_hash_encoding

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]' brings it; ~290 MB wheel)")

SMALL = dict(n_levels=8, n_features_per_level=2, log2_hashmap_size=16, base_resolution=16, per_level_scale=1.447269)
TINY = dict(n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=2, per_level_scale=2.0)


@pytest.fixture()
def log_messages(caplog):
    """pytest's caplog on the carv3d logger at INFO (read ``.messages`` after the code logged)."""
    with caplog.at_level(logging.INFO, logger=logger.name):
        yield caplog


# ------------------------------------------------------------------------ the choice (no kernels)
def _never() -> str:
    raise AssertionError("an import check ran where its answer does not matter")


def test_auto_prefers_tcnn_then_triton_then_torch_on_cuda():
    cuda = torch.device("cuda")
    assert choose_grid_backend("auto", cuda, lambda: None, _never)[0] == "tcnn"
    name, why = choose_grid_backend("auto", cuda, lambda: "ModuleNotFoundError: tinycudann", lambda: None)
    assert name == "triton" and "tinycudann does not import" in why
    name, why = choose_grid_backend("auto", cuda, lambda: "no tcnn", lambda: "ModuleNotFoundError: triton")
    assert name == "torch" and "no tcnn" in why and "triton" in why


def test_auto_on_cpu_is_torch_without_importing_either():
    assert choose_grid_backend("auto", torch.device("cpu"), _never, _never) == (
        "torch", "auto: device is cpu; the tcnn and triton backends need CUDA")
    for name in ("torch", "triton", "tcnn"):
        assert choose_grid_backend(name, torch.device("cpu"), _never, _never)[0] == name


def test_unknown_backend_names_the_choices():
    with pytest.raises(ConfigError, match="expected one of: auto, torch, triton, tcnn"):
        make_hash_encoding(HashGridConfig(backend="cuda"), "cpu")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs triton on the CPU on purpose")
def test_explicit_triton_on_cpu_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="scene.grid.backend=torch"):
        make_hash_encoding(HashGridConfig(backend="triton", n_levels=2, log2_hashmap_size=10), "cpu")
    assert issubclass(BackendUnavailableError, UserError)


def test_explicit_triton_without_the_package_says_how_to_install(monkeypatch):
    import carv3d.scene.hashgrid as hashgrid

    monkeypatch.setattr(hashgrid, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(BackendUnavailableError, match=r"pip install triton.*scene.grid.backend=torch"):
        make_hash_encoding(HashGridConfig(backend="triton"), "cuda")


@needs_triton
def test_auto_on_cuda_without_tcnn_builds_and_logs_triton(monkeypatch, log_messages):
    """The path make_hash_encoding takes on a CUDA machine without tinycudann (the class stubbed:
    this machine has no CUDA device to put a table on)."""
    import carv3d.scene.hashgrid as hashgrid
    import carv3d.scene.hashgrid_triton as hashgrid_triton

    built = {}

    class Stub:
        def __init__(self, *args, **kwargs):
            built.update(args=args, kwargs=kwargs)

    monkeypatch.setattr(hashgrid, "tinycudann_import_error", lambda: "ModuleNotFoundError: No module named 'tinycudann'")
    monkeypatch.setattr(hashgrid_triton, "TritonHashGridEncoding", Stub)
    encoding, name = make_hash_encoding(HashGridConfig(), "cuda", generator=None)
    assert name == "triton" and isinstance(encoding, Stub)
    assert built["args"] == (16, 2, 19, 16, 1.447269) and built["kwargs"]["device"] == torch.device("cuda")
    assert any(m.startswith("hash grid: Triton backend (auto: CUDA device, tinycudann does not import")
               for m in log_messages.messages)


# ------------------------------------------------------------------ compiled for a GPU, on the CPU
def _compile(kernel, signature: dict, constexprs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        source = ASTSource(kernel, signature, constexprs=constexprs)
    except TypeError as err:  # another Triton's compiler API: this check is for the dev extra's version
        pytest.skip(f"triton {triton.__version__}'s ASTSource takes other arguments ({err})")
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="compiles real kernels: main process only")
def test_kernels_compile_for_sm90_with_float32_atomics():
    """Both kernels go through Triton's whole pipeline to an sm_90 cubin (no GPU needed), for the
    dtypes the GPU check runs: float32 tables, and float16 tables whose gradient is scattered with
    float32 atomics (the module's stated choice), with and without the position gradient."""
    from carv3d.scene import hashgrid_triton as H
    import triton.language as tl

    geometry = {"scale_ptr": "*i32", "factor_ptr": "*i64", "size_ptr": "*i64", "offset_ptr": "*i64",
                "hashed_ptr": "*i32", "n_points": "i32", "n_levels": "i32"}
    const = {"F": 2, "BLOCK": H.DEFAULT_BLOCK_POINTS, "POS": tl.float32, "ACC": tl.float32}
    for table in ("fp32", "fp16"):
        sig = {"x_ptr": "*fp32", "table_ptr": f"*{table}", "y_ptr": f"*{table}", **geometry}
        forward = _compile(H._encode_forward_kernel, {**sig, **{k: "constexpr" for k in const}}, const)
        assert "cubin" in forward.asm and "fma.rn" not in forward.asm["ptx"]  # p = s·x + 0.5 rounds twice
        for x_grad in (False, True):
            sig = {"x_ptr": "*fp32", "table_ptr": f"*{table}", "grad_y_ptr": f"*{table}", "grad_table_ptr": "*fp32",
                   "grad_x_ptr": "*fp32", **geometry}
            flags = {**const, "TABLE_GRAD": True, "X_GRAD": x_grad}
            backward = _compile(H._encode_backward_kernel, {**sig, **{k: "constexpr" for k in flags}}, flags)
            ptx = backward.asm["ptx"]
            atomics = re.findall(r"\b(?:red|atom)\.global\.[\w.]+", ptx)  # e.g. @%p1 red.global.gpu.relaxed.add.f32
            assert len(atomics) >= 8, "eight corner scatters per level"
            assert all(op.endswith(".add.f32") for op in atomics), sorted(set(atomics))


# ------------------------------------------------------------------------------ the GPU check script
@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="main process only")
def test_gpu_check_script_runs_its_sections_in_cpu_smoke_mode(tmp_path):
    """scripts/gpu_check_hashgrid.py --cpu-smoke (≈ 45 s): every section runs through the interpreter
    on tiny sizes and its correctness section passes its own tolerances."""
    import json

    result = subprocess.run([sys.executable, "scripts/gpu_check_hashgrid.py", str(tmp_path), "--cpu-smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_hashgrid.json").read_text())
    assert report["status"] == "finished"
    assert {k: v["status"] for k, v in report["sections"].items()} == dict.fromkeys(
        ("correctness", "render", "encode", "profile", "bench_speed"), "ok")
    assert report["summary"]["correct"] is True
    assert report["sections"]["render"]["triton"]["hash_grid_backend"] == "triton"
    assert report["sections"]["render"]["triton+compile_head"]["head_compiled"] is False  # CUDA only
    assert report["sections"]["render"]["first_view"]["triton"]["rgb_max_abs_diff_vs_torch"] < 1e-5
    assert (tmp_path / "bench_speed_quick.json").exists()


# ------------------------------------------------------------------------------ the interpreter
@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="this is the driver of the interpreted run")
def test_kernels_under_the_interpreter():
    """Runs this file's kernel tests with TRITON_INTERPRET=1 in a fresh process (see the module doc)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__, "-k", "interpreted"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail and " 0 passed" not in tail, tail


if INTERPRETED:  # the kernel tests: defined only in the interpreted process

    from carv3d.scene.hashgrid_triton import TritonHashGridEncoding
    from test_hashgrid import ref_encode

    CPU = torch.device("cpu")

    def _pair(cfg: dict, dtype: torch.dtype, seed: int = 0, scale: float = 1.0, block: int = 256):
        """A torch grid and a Triton grid holding the same O(1) table in ``dtype``. The interpreter
        runs programs one after the other: big blocks keep the tests fast."""
        ref = HashGridEncoding(**cfg).to(dtype)
        tri = TritonHashGridEncoding(**cfg, device=CPU, block_points=block).to(dtype)
        with torch.no_grad():
            values = torch.rand(ref.params.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            ref.params.copy_((values * 2 - 1) * scale)
            tri.params.copy_(ref.params)
        return ref, tri

    def _points(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        x = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x[:3] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]], dtype=torch.float64)  # wraps
        return x.to(dtype)

    def test_interpreted_values_equal_the_brute_force_reference():
        _, tri = _pair(SMALL, torch.float64, seed=1, block=32)  # levels 0–2 dense, 3–7 hashed
        assert [lv.hashed for lv in tri.levels] == [False] * 3 + [True] * 5
        x = _points(77, 2)  # 77: the last block of 32 is partly masked
        expected = ref_encode(tri.params.detach().view(-1, 2).numpy(), x.numpy(), SMALL)
        torch.testing.assert_close(tri(x).detach(), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)

    def test_interpreted_float32_values_and_gradients_equal_the_torch_grid():
        ref, tri = _pair(SMALL, torch.float32, seed=3)
        x = _points(200, 4, torch.float32)
        upstream = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
        x_ref, x_tri = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ref, y_tri = ref(x_ref), tri(x_tri)
        assert y_tri.dtype == torch.float32 and y_tri.shape == (200, 16)
        torch.testing.assert_close(y_tri, y_ref, rtol=1e-6, atol=1e-6)
        (y_ref * upstream).sum().backward()
        (y_tri * upstream).sum().backward()
        torch.testing.assert_close(tri.params.grad, ref.params.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_tri.grad, x_ref.grad, rtol=1e-4, atol=1e-4)  # ∂/∂x scales by s_l ≤ 300

    def test_interpreted_float64_gradients_equal_the_torch_grid_and_finite_differences():
        ref, tri = _pair(TINY, torch.float64, seed=6)  # R = 2 (dense, wraps), 4 (dense), 8 (hashed into 64)
        assert [lv.hashed for lv in tri.levels] == [False, False, True]
        x = _points(40, 7)
        upstream = torch.randn(40, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        x_ref, x_tri = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (ref(x_ref) * upstream).sum().backward()
        (tri(x_tri) * upstream).sum().backward()
        torch.testing.assert_close(tri.params.grad, ref.params.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_tri.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
        # the position gradient by central differences of the kernel's own forward, away from the
        # wrapped corners and cell faces (the encoding is only piecewise smooth in x)
        eps, inner = 1e-6, slice(3, None)
        with torch.no_grad():
            for d in range(3):
                step = torch.zeros(3, dtype=torch.float64)
                step[d] = eps
                plus = (tri(x[inner] + step) * upstream[inner]).sum(1)
                minus = (tri(x[inner] - step) * upstream[inner]).sum(1)
                torch.testing.assert_close(x_tri.grad[inner, d], (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-6)

    def test_interpreted_table_gradient_is_the_transposed_encoding():
        """The encoding is linear in the table: ∂(Σ y·u)/∂θ_j = Σ y(e_j)·u for the unit table e_j.
        Checked column by column on a hashed TINY level with many repeated rows (atomic adds)."""
        _, tri = _pair(TINY, torch.float64, seed=9)
        x = torch.rand(64, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 0.3  # crowded
        upstream = torch.randn(64, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        (tri(x) * upstream).sum().backward()
        table = tri.params.detach().clone()
        rows = tri.levels[2].offset * 2 + torch.arange(2 * tri.levels[2].table_size)  # hashed level's entries
        with torch.no_grad():
            for j in rows[::8].tolist():
                unit = torch.zeros_like(table)
                unit[j] = 1.0
                tri.params.copy_(unit)
                assert abs(float((tri(x) * upstream).sum()) - float(tri.params.grad[j])) < 1e-12
            tri.params.copy_(table)

    def test_interpreted_float16_tables_accumulate_in_float32():
        """Output and gradient in the table's dtype, within one fp16 rounding of the float64 answer."""
        ref64, tri16 = _pair(SMALL, torch.float16, seed=12)
        with torch.no_grad():
            ref64 = ref64.double()
            ref64.params.copy_(tri16.params.double())  # the same (fp16-representable) values
        x = _points(300, 13, torch.float32)
        upstream = torch.randn(300, 16, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
        y16 = tri16(x)
        y64 = ref64(x)  # float32 positions and weights, as the kernel's; float64 sums
        assert y16.dtype == torch.float16
        assert ((y16.double() - y64).abs() <= 2**-11 * y64.abs() + 1e-6).all()
        (y16.double() * upstream).sum().backward()  # ∂L/∂y reaches the kernel rounded to fp16
        (y64 * upstream.half().double()).sum().backward()
        g16, g64 = tri16.params.grad, ref64.params.grad
        assert g16.dtype == torch.float16
        assert ((g16.double() - g64).abs() <= 2**-11 * g64.abs() + 1e-5).all()

    def test_interpreted_odd_sizes_no_grad_and_empty_input():
        for features in (1, 3):  # features unroll at compile time: any F, not only powers of two
            cfg = {**TINY, "n_features_per_level": features}
            ref, tri = _pair(cfg, torch.float64, seed=15)
            x = _points(33, 16)
            with torch.no_grad():
                torch.testing.assert_close(tri(x), ref(x), rtol=1e-12, atol=1e-12)
            upstream = torch.randn(33, 3 * features, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
            (tri(x) * upstream).sum().backward()
            (ref(x) * upstream).sum().backward()
            torch.testing.assert_close(tri.params.grad, ref.params.grad, rtol=1e-12, atol=1e-12)
        tri.params.grad = None
        empty = tri(torch.zeros(0, 3, dtype=torch.float64))
        assert empty.shape == (0, 9)
        empty.sum().backward()  # nothing launched, a zero gradient
        assert torch.count_nonzero(tri.params.grad) == 0

    def test_interpreted_backend_choice_and_field_match_the_torch_backend(log_messages):
        """Chosen by scene.grid.backend=triton, a seed gives the torch backend's initial table, and a
        NeRF field on it gives the same density and table gradient as one on the torch grid."""
        from carv3d.config import NeRFSceneConfig
        from carv3d.scene.field import NeRFField

        grid = dict(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)
        fields = {name: NeRFField(NeRFSceneConfig(grid=HashGridConfig(backend=name, **grid), mlp_width=16), CPU,
                                  generator=torch.Generator().manual_seed(0)) for name in ("torch", "triton")}
        assert fields["triton"].encoding_backend == "triton"
        assert isinstance(fields["triton"].encoding, TritonHashGridEncoding)
        assert any(m == "hash grid: Triton backend (requested by scene.grid.backend=triton)" for m in log_messages.messages)
        assert torch.equal(fields["triton"].encoding.params, fields["torch"].encoding.params)
        fields["triton"].load_state_dict(fields["torch"].state_dict())  # same keys both ways
        x = torch.rand(500, 3, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
        sigma = {name: f.density(x) for name, f in fields.items()}
        torch.testing.assert_close(sigma["triton"], sigma["torch"], rtol=1e-5, atol=1e-5)
        for name in fields:
            sigma[name].square().sum().backward()
        torch.testing.assert_close(fields["triton"].encoding.params.grad, fields["torch"].encoding.params.grad,
                                   rtol=1e-4, atol=1e-6)

    def test_interpreted_corner_order_and_hash_by_hand():
        """Corner c's row (tcnn's order c = c_x + 2c_y + 4c_z, prime hash by hand) holds 16^c, so the
        one output value Σ_c w_c·16^c (exact in float64) tells which corner landed on which row."""
        _, tri = _pair({**SMALL, "n_levels": 6}, torch.float64)
        level = tri.levels[5]  # R = 102, hashed into 2^16 rows
        assert level.hashed and level.resolution == 102
        fraction = (0.25, 0.375, 0.125)  # a different weight on each axis: a swapped axis shows
        p = torch.tensor([1 + fraction[0], 2 + fraction[1], 3 + fraction[2]], dtype=torch.float64)  # cell (1, 2, 3)
        x = ((p - 0.5) / level.scale)[None]
        expected = 0.0
        with torch.no_grad():
            tri.params.zero_()
            for c in range(8):
                corner = (c & 1, (c >> 1) & 1, (c >> 2) & 1)  # (c_x, c_y, c_z)
                h = 0
                for g, bit, prime in zip((1, 2, 3), corner, (1, 2654435761, 805459861)):
                    h ^= ((g + bit) * prime) % 2**32
                tri.params.view(-1, 2)[level.offset + h % level.table_size, 0] = 16.0**c
                weight = math.prod(f if bit else 1 - f for f, bit in zip(fraction, corner))
                expected += weight * 16.0**c
            got = float(tri(x)[0, 2 * 5])
        assert abs(got - expected) <= 1e-12 * expected, (got, expected)
