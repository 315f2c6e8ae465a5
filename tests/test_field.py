"""NeRF field: blob initialisation against its closed form, normals against the analytic gradient,
the box, activations, parameter groups, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from carv3d.config import HashGridConfig, NeRFSceneConfig
from carv3d.errors import ConfigError
from carv3d.scene.field import NeRFField, trunc_exp


def small_cfg(**overrides) -> NeRFSceneConfig:
    grid = HashGridConfig(backend="torch", n_levels=4, n_features_per_level=2, log2_hashmap_size=12,
                          base_resolution=8, per_level_scale=1.5)  # fmt: skip
    return NeRFSceneConfig(grid=grid, **overrides)


def make_field(seed: int = 0, **overrides) -> NeRFField:
    return NeRFField(small_cfg(**overrides), generator=torch.Generator().manual_seed(seed))


def zero_last_layer(field: NeRFField) -> None:
    last = field.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def points(n: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(n, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1) * scale


def test_blob_density_with_a_zero_last_layer_is_softplus_of_the_bias():
    field = make_field(radius=1.0, blob_density=10.0, blob_radius=0.5)
    zero_last_layer(field)
    x = points(500, 1, scale=0.99)
    r = torch.sqrt((x**2).sum(-1))
    expected = F.softplus(10.0 * (1.0 - r / 0.5))  # threestudio's blob_magic3d before softplus
    density, albedo = field(x)
    # float32: |x| may round differently by an ulp, amplified by 10/0.5 → relative 1e-5
    torch.testing.assert_close(density, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(albedo, torch.full((500, 3), 0.5))  # sigmoid(0)
    field64, x64 = field.double(), x.double()
    expected64 = F.softplus(10.0 * (1.0 - torch.sqrt((x64**2).sum(-1)) / 0.5))
    torch.testing.assert_close(field64.density(x64), expected64, rtol=1e-13, atol=0.0)
    field.float()
    # the closed form at two radii: softplus(10) at the centre, softplus(0) = log 2 on the blob's edge
    at = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(field.density(at), torch.tensor([10.0 + math.log1p(math.exp(-10.0)), math.log(2.0)]))


def test_exp_activation_and_no_bias():
    field = make_field(density_activation="exp", density_bias="blob")
    zero_last_layer(field)
    x = points(100, 2, scale=0.9)
    torch.testing.assert_close(field.density(x), torch.exp(10.0 * (1 - x.norm(dim=-1) / 0.5)), rtol=1e-6, atol=0.0)
    field = make_field(density_bias="none")
    zero_last_layer(field)
    torch.testing.assert_close(field.density(x), torch.full((100,), math.log(2.0)))  # softplus(0)


def test_trunc_exp_clamps_its_gradient_only():
    x = torch.tensor([0.0, 2.0, 15.0, 20.0], dtype=torch.float64, requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    y.sum().backward()
    expected = torch.exp(torch.tensor([0.0, 2.0, 15.0, 15.0], dtype=torch.float64))
    torch.testing.assert_close(x.grad, expected)


def test_density_is_zero_outside_the_box():
    field = make_field(radius=1.0, blob_radius=2.0)  # a blob larger than the box: positive bias outside
    x = points(300, 3, scale=1.6)
    outside = (x.abs() > 1.0).any(-1)
    assert 50 < outside.sum() < 300
    density, _ = field(x)
    assert torch.all(density[outside] == 0.0)
    assert torch.all(density[~outside] > 0.0)
    assert torch.equal(field.density(x), density)
    edge = torch.tensor([[1.0, 0.0, 0.0], [1.0 + 1e-6, 0.0, 0.0]])
    d = field.density(edge)
    assert d[0] > 0 and d[1] == 0  # the box is closed


def test_blob_normals_point_radially_outward():
    field = make_field(radius=1.0, normal_epsilon=0.01)
    zero_last_layer(field)
    x = points(400, 4, scale=0.9)
    r = x.norm(dim=-1)
    x = x[(r > 0.1) & (r < 0.9)]
    n = field.normals(x)
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(len(x)), rtol=1e-5, atol=1e-5)
    cosine = (n * x / x.norm(dim=-1, keepdim=True)).sum(-1)
    assert cosine.min() > 0.99


def test_normals_match_the_analytic_gradient_of_the_field():
    """Central differences against autograd's ∇σ (the encoding supports position gradients)."""
    field = make_field(seed=5, normal_epsilon=1e-5).double()
    with torch.no_grad():
        field.encoding.params.uniform_(-1, 1, generator=torch.Generator().manual_seed(6))
    x = points(50, 7, scale=0.8, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(field.density(x).sum(), x)
    expected = -grad / grad.norm(dim=-1, keepdim=True)
    n = field.normals(x.detach())
    # agreement is ~1e-9 except where a ±1e-5 step straddles a cell face (the encoding has kinks
    # there; cells of the finest level are 2/26 wide) or a ReLU kink: 2 of these 50 points
    close = (n - expected).norm(dim=-1) < 1e-6
    assert close.float().mean() >= 0.9


class _Normals(torch.nn.Module):
    """Exposes field.normals as forward, so torch.func.functional_call can swap its parameters."""

    def __init__(self, field: NeRFField) -> None:
        super().__init__()
        self.field = field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field.normals(x)


def test_normals_are_differentiable_gradcheck():
    """Normals' gradient w.r.t. the output layer, against finite differences (float64)."""
    field = make_field(seed=8, mlp_width=8).double()
    wrapper = _Normals(field)
    x = points(5, 9, scale=0.7, dtype=torch.float64)
    w = (field.mlp[-1].weight.detach().clone() * 3).requires_grad_(True)  # (4, width)

    def normals(last_weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapper, {"field.mlp.2.weight": last_weight}, (x,), strict=False)

    assert torch.autograd.gradcheck(normals, (w,), eps=1e-6, atol=1e-5)


def test_parameter_groups_cover_every_parameter_once():
    field = make_field()
    groups = field.parameter_groups(lr_grid=0.01, lr_mlp=0.001)
    assert [g["name"] for g in groups] == ["grid", "mlp"]
    assert [g["lr"] for g in groups] == [0.01, 0.001]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in field.parameters()}
    assert groups[0]["params"] == [field.encoding.params]
    torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)  # the groups are valid Adam groups


def test_same_generator_seed_same_field():
    a, b, c = make_field(seed=3), make_field(seed=3), make_field(seed=4)
    x = points(64, 10)
    da, aa = a(x)
    db, ab = b(x)
    assert torch.equal(da, db) and torch.equal(aa, ab)
    assert not torch.equal(a(x)[0], c(x)[0])
    assert a.encoding_backend == "torch" and a.radius == 1.0


def test_bad_scene_values_are_config_errors():
    with pytest.raises(ConfigError, match="density_activation"):
        make_field(density_activation="relu")
    with pytest.raises(ConfigError, match="radius"):
        make_field(radius=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_field_equals_cpu_field_for_one_seed():
    """A CPU generator draws the same initial field on either device (torch backend)."""
    cpu = make_field(seed=11)
    cuda = NeRFField(small_cfg(), device="cuda", generator=torch.Generator().manual_seed(11))
    x = points(1000, 12, scale=0.9)
    d_cpu, a_cpu = cpu(x)
    d_cuda, a_cuda = cuda(x.cuda())
    # fp32 on both devices; cuBLAS and the CPU sum the MLP's products in different orders, which moved
    # one density of 1000 by 2e-5 (relative) on the H200.
    torch.testing.assert_close(d_cuda.cpu(), d_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a_cuda.cpu(), a_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cuda.normals(x.cuda()).cpu(), cpu.normals(x), rtol=1e-3, atol=1e-3)
