"""The field's head (everything after the encoding) and ``scene.compile_head``: off on a CPU (logged),
one graph for torch.compile with dynamic point counts, equal to the eager head forward and backward."""

from __future__ import annotations

import logging

import pytest
import torch

from carv3d.config import HashGridConfig, NeRFSceneConfig
from carv3d.log import logger
from carv3d.scene import field as field_module
from carv3d.scene.field import NeRFField

GRID = HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)


def _field(compile_head: bool = False, activation: str = "softplus") -> NeRFField:
    cfg = NeRFSceneConfig(grid=GRID, mlp_width=16, compile_head=compile_head, density_activation=activation)
    field = NeRFField(cfg, "cpu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # structure in the table, so density and albedo vary
        field.encoding.params.copy_(torch.randn(field.encoding.params.shape, generator=torch.Generator().manual_seed(1)))
    return field


def _points(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 2.4 - 1.2  # some outside the box


def test_compile_head_is_skipped_on_cpu_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger=logger.name):
        asked = _field(compile_head=True)
    assert not asked.head_compiled and asked._compiled_head is None
    assert "scene: field head (MLP, activation) not compiled on cpu (scene.compile_head is for CUDA only)" in caplog.messages
    plain, x = _field(), _points(300, 2)
    for a, b in zip(asked(x), plain(x)):
        assert torch.equal(a, b)


def test_density_is_the_first_output_of_forward_chunked_or_not(monkeypatch):
    field, x = _field(), _points(1000, 3)
    density, albedo = field(x)
    assert torch.equal(field.density(x), density) and albedo.shape == (1000, 3)
    assert (density[(x.abs() > 1.0).any(-1)] == 0).all() and ((albedo > 0) & (albedo < 1)).all()
    monkeypatch.setattr(field_module, "NO_GRAD_CHUNK", 128)  # the no-graph path in uneven chunks
    with torch.no_grad():
        chunked_density, chunked_albedo = field(x)
        assert torch.equal(chunked_density, density) and torch.equal(chunked_albedo, albedo)
        assert torch.equal(field.density(x), density)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_compiled_head_is_one_graph_and_equals_the_eager_head(activation):
    """torch.compile of the head with fullgraph=True (a graph break fails) and dynamic shapes, on the CPU
    (Inductor's C++ backend; on CUDA the same graph goes to Triton): forward and backward equal the
    eager head to float32 rounding, at two point counts."""
    field = _field(activation=activation)
    compiled = torch.compile(field._head, dynamic=True, fullgraph=True)
    for n in (300, 517):
        x = _points(n, n)
        encoded = torch.randn(n, 8, generator=torch.Generator().manual_seed(n + 1), requires_grad=True)
        upstream = torch.randn(n, 4, generator=torch.Generator().manual_seed(n + 2))
        results = []
        for head in (field._head, compiled):
            field.zero_grad(set_to_none=True)
            encoded.grad = None
            density, albedo = head(encoded, x, True)
            (density * upstream[:, 0] + (albedo * upstream[:, 1:]).sum(1)).sum().backward()
            results.append((density.detach(), albedo.detach(), encoded.grad.clone(),
                            [p.grad.clone() for p in field.mlp.parameters()]))
        (d0, a0, e0, g0), (d1, a1, e1, g1) = results
        torch.testing.assert_close(d1, d0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-6)
        for p1, p0 in zip(g1, g0):
            torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5)
        density_only, none = compiled(encoded, x, False)
        assert none is None and torch.allclose(density_only, d0, rtol=1e-5, atol=1e-6)
