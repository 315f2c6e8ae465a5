"""Memory work keeps results: the lean hash-grid paths and chunked renders equal the plain ones, and
CPU sizing (carv3d.sizing) applies its values only to keys the user did not set, logged."""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from carv3d.config import defaults, load_config, to_yaml
from carv3d.scene import field as field_module
from carv3d.scene.hashgrid import HashGridEncoding, _InterpolateTable
from carv3d.sizing import CPU_SETTINGS, check_memory, estimate_peak_bytes, explicit_keys, size_for_device

SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0)
CPU = torch.device("cpu")
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


# ---------------------------------------------------------------------------------- hash grid
def _encoding(seed: int = 0) -> HashGridEncoding:
    enc = HashGridEncoding(**SMALL, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a table with structure, not the ±1e-4 initial noise
        enc.params.copy_(torch.randn(enc.params.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return enc


def _reference(enc: HashGridEncoding, x: torch.Tensor) -> torch.Tensor:
    """The encoding as it was before the memory work: int64 rows of every level and the weights
    stacked from a list, all kept for the backward."""
    x_t = x.t().contiguous()
    index = torch.empty((enc.n_levels, 8, x.shape[0]), dtype=torch.int64)
    weights = torch.stack([enc.level_corners(level, x_t, index[level]) for level in range(enc.n_levels)])
    return _InterpolateTable.apply(enc.params.view(-1, enc.n_features_per_level), index, weights)


def test_hash_grid_lean_paths_equal_the_reference_bit_for_bit():
    enc = _encoding()
    x = torch.rand(5000, 3, generator=torch.Generator().manual_seed(3))
    x[:3] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]])  # wrap-around corners
    upstream = torch.randn(5000, enc.n_output_dims, generator=torch.Generator().manual_seed(4))

    expected = _reference(enc, x)
    (expected * upstream).sum().backward()
    expected_grad = enc.params.grad.clone()
    enc.params.grad = None

    got = enc(x)  # training path: int32 rows, weights written in place
    (got * upstream).sum().backward()
    assert torch.equal(got, expected)
    assert torch.equal(enc.params.grad, expected_grad)
    with torch.no_grad():  # no graph: level by level, nothing kept
        assert torch.equal(enc(x), expected)
    enc.params.requires_grad_(False)  # nothing requires a gradient: the same no-graph path
    assert torch.equal(enc(x), expected)


def test_hash_grid_position_gradients_equal_the_reference():
    enc = _encoding(5).double()
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    upstream = torch.randn(300, enc.n_output_dims, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    (_reference(enc, x_ref) * upstream).sum().backward()
    x_new = x.clone().requires_grad_(True)
    got = enc(x_new)
    (got * upstream).sum().backward()
    assert torch.equal(x_new.grad, x_ref.grad)


# ---------------------------------------------------------------------------------- chunked renders
@pytest.fixture()
def scene():
    from carv3d.scene.nerf import NeRFScene

    cfg = defaults()
    for key, value in {"scene.grid.n_levels": 4, "scene.grid.log2_hashmap_size": 12, "scene.mlp_width": 16,
                       "render.samples_per_ray": 24}.items():
        OmegaConf.update(cfg, key, value)
    scene = NeRFScene(cfg.scene, cfg.render, CPU, seed=0)
    with torch.no_grad():  # structure in the table, so that albedo, shading and opacity vary
        scene.field.encoding.params.copy_(torch.randn(scene.field.encoding.params.shape,
                                                      generator=torch.Generator().manual_seed(1)) * 0.5)
    return scene.eval()


def test_validation_sheet_chunked_equals_one_piece(scene, monkeypatch):
    from carv3d.outputs import validation_sheet

    whole = validation_sheet(scene, 40, chunk_rays=None)
    assert whole.shape == (3 * 40, 4 * 40, 3) and whole.std() > 1  # a sheet with content
    chunked = validation_sheet(scene, 40, chunk_rays=777)  # chunks that split images and rays unevenly
    assert np.array_equal(chunked, whole)
    monkeypatch.setattr(field_module, "NO_GRAD_CHUNK", 1000)  # the field's own no-grad point chunks too
    assert np.array_equal(validation_sheet(scene, 40, chunk_rays=777), whole)


def test_chunked_render_values_match(scene, monkeypatch):
    """Below the uint8 sheet: the float images of a deterministic render, chunked or not."""
    from carv3d.cameras import orbit_cameras

    cameras = orbit_cameras(3, elevation_deg=15.0, distance=2.0, fovy_deg=45.0)
    with torch.no_grad():
        whole = scene.render(cameras, generator=None, shading="lambertian", height=24, width=24, need_albedo=True)
        monkeypatch.setattr(field_module, "NO_GRAD_CHUNK", 500)
        parts = scene.render(cameras, generator=None, shading="lambertian", height=24, width=24, need_albedo=True,
                             chunk_rays=300)
    for name in ("rgb", "albedo", "opacity", "depth"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- CPU sizing
def test_cpu_sizing_of_the_default_config_is_applied_and_logged(caplog):
    cfg = load_config(prompt="a red cube")
    assert cfg.estimator.upstream_samples == 2 and cfg.render.width == 64  # the carv preset: GPU sizes
    with caplog.at_level(logging.INFO, logger="carv3d"):
        changes = size_for_device(cfg, CPU)
    assert changes["estimator.upstream_samples"] == (2, 1)
    assert changes["estimator.max_noise_draws"] == (16, 4)
    assert changes["render.samples_per_ray"] == (64, 32)
    for key, value in CPU_SETTINGS.items():
        assert OmegaConf.select(cfg, key) == value
    assert "CPU: estimator.upstream_samples 2 → 1 (set it explicitly to keep 2)" in caplog.text
    assert "CPU: render.width 64 → 32 (set it explicitly to keep 64)" in caplog.text
    assert size_for_device(cfg, CPU) == {}  # idempotent


def test_explicit_settings_win(tmp_path):
    cfg = load_config(overrides=["estimator.upstream_samples=2", "render.width=64"], prompt="a red cube")
    changes = size_for_device(cfg, CPU)
    assert "estimator.upstream_samples" not in changes and "render.width" not in changes
    assert cfg.estimator.upstream_samples == 2 and cfg.render.width == 64 and cfg.render.height == 32
    # a config file's keys are explicit too: the demo sets every CPU-sized key itself
    assert size_for_device(load_config(DEMO), CPU) == {}
    # a file layer with a section
    path = tmp_path / "c.yaml"
    path.write_text("render:\n  samples_per_ray: 48\n")
    cfg = load_config(path, prompt="a red cube")
    size_for_device(cfg, CPU)
    assert cfg.render.samples_per_ray == 48 and cfg.render.width == 32


def test_no_sizing_off_the_cpu_or_without_a_record():
    cfg = load_config(prompt="a red cube")
    assert size_for_device(cfg, torch.device("cuda")) == {}
    assert cfg.estimator.upstream_samples == 2
    hand_built = defaults()  # not from load_config: nothing is known about what was set
    assert explicit_keys(hand_built) is None and size_for_device(hand_built, CPU) == {}


def test_the_record_survives_copies_and_resume_keeps_the_sized_values(tmp_path):
    cfg = load_config(overrides=["render.width=48"], prompt="a red cube")
    for other in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), cfg.copy()):
        assert explicit_keys(other) == {"render.width", "prompt"}
    size_for_device(cfg, CPU)
    path = tmp_path / "config.yaml"  # what the run writes; --resume loads every key from it
    path.write_text(to_yaml(cfg))
    resumed = load_config(config_file=path)
    assert size_for_device(resumed, CPU) == {}
    assert OmegaConf.to_container(resumed) == OmegaConf.to_container(cfg)


def test_the_k_bound_is_left_alone_where_it_is_not_read_or_would_break_the_min():
    fixed = load_config(overrides=["estimator.noise_draws=3"], prompt="a red cube")
    size_for_device(fixed, CPU)
    assert fixed.estimator.max_noise_draws == 16 and fixed.estimator.upstream_samples == 1
    high_min = load_config(overrides=["estimator.min_noise_draws=8"], prompt="a red cube")
    size_for_device(high_min, CPU)
    assert high_min.estimator.max_noise_draws == 16


def test_memory_estimate_and_warning():
    gpu_sized = load_config(prompt="a red cube")
    cpu_sized = load_config(prompt="a red cube")
    size_for_device(cpu_sized, CPU)
    # measured (docs/memory_cpu_after.json): 0.80 GB CPU-sized, 1.81 GB with the GPU sizes
    assert 0.8 * 2**30 < estimate_peak_bytes(cpu_sized) < 1.0 * 2**30
    assert 1.8 * 2**30 < estimate_peak_bytes(gpu_sized) < 2.2 * 2**30
    message = check_memory(gpu_sized, CPU, available=estimate_peak_bytes(gpu_sized) - 1)
    assert message is not None and "needs about" in message and "estimator.upstream_samples=1" in message
    assert check_memory(cpu_sized, CPU, available=64 * 2**30) is None
    assert check_memory(gpu_sized, torch.device("cuda"), available=1) is None


def test_a_cpu_run_writes_the_sized_values_into_its_config(tmp_path):
    from carv3d.train import train

    cfg = load_config(overrides=["train.steps=1", "train.val_resolution=16", "export.at_end=false",
                                 "train.turntable_frames=0", "train.progress=false", "train.tensorboard=false",
                                 "train.device=cpu", f"train.output_dir={tmp_path}", "train.run_name=sized"],
                      prompt="a red cube")
    run_dir = train(cfg)
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.estimator.upstream_samples == 1 and saved.render.width == 32 and saved.scene.grid.n_levels == 8
    assert saved.train.turntable_frames == 0  # explicit: kept
