"""Fast paths and sync-free steps, the parts that can be checked on a CPU.

The CUDA side (graph replay vs eager, gradients, no host syncs) is in tests/test_fast_teacher.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from carv3d.config import load_config
from carv3d.errors import ConfigError
from carv3d.teacher.attention import attention_summary
from carv3d.teacher.fast import FastPaths, resolve_fast_paths
from carv3d.teacher.graphs import CapturedUNet, build_unet_call

from test_train_e2e import tiny_overrides

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("spelling, expected", [("on", "on"), ("off", "off"), ("true", "on"), ("false", "off"),
                                                ("auto", "auto")])
def test_switch_keys_accept_yaml_booleans(spelling, expected):
    # YAML reads a bare on/off as a boolean; the switch keys fold those back to on/off.
    cfg = load_config(overrides=[f"teacher.cuda_graph={spelling}", f"teacher.channels_last={spelling}",
                                 f"train.sync_free={spelling}"])
    assert (cfg.teacher.cuda_graph, cfg.teacher.channels_last, cfg.train.sync_free) == (expected,) * 3


def test_switch_keys_reject_other_values_and_default_to_auto():
    with pytest.raises(ConfigError, match="teacher.cuda_graph"):
        load_config(overrides=["teacher.cuda_graph=sometimes"])
    cfg = load_config()
    assert (cfg.teacher.cuda_graph, cfg.teacher.channels_last, cfg.train.sync_free, cfg.teacher.compile) == \
        ("auto", "auto", "auto", "auto")  # channels_last=auto: with a compile only (eager NHWC measured slower)


def test_fast_paths_are_off_on_cpu_whatever_is_asked(caplog):
    cfg = load_config(overrides=["teacher.cuda_graph=on", "teacher.channels_last=on", "teacher.compile=true"])
    with caplog.at_level("INFO", logger="carv3d"):
        fast = resolve_fast_paths(cfg.teacher, torch.device("cpu"))
    assert fast == FastPaths(False, False, "off")
    assert "cuda_graph=on skipped" in caplog.text and "compile=full skipped" in caplog.text
    on_cuda = resolve_fast_paths(load_config().teacher, torch.device("cuda"))  # resolving needs no GPU
    assert on_cuda == FastPaths(cuda_graph=True, channels_last="auto", compile="auto",  # both follow the U-Net
                                compile_after=150)
    for compile_mode, expected in (("off", False), ("full", True), ("regional", True)):  # known now: resolved now
        cfg = load_config(overrides=[f"teacher.compile={compile_mode}"]).teacher
        fast = resolve_fast_paths(cfg, torch.device("cuda"))
        assert fast.channels_last is expected and fast.vae_nhwc is False  # compiled: the U-Net only
    assert resolve_fast_paths(load_config(overrides=["teacher.channels_last=on", "teacher.compile=off"]).teacher,
                              torch.device("cuda")).channels_last is True  # an explicit on is kept eager too
    assert resolve_fast_paths(load_config(overrides=["teacher.cuda_graph=off"]).teacher,
                              torch.device("cuda")).cuda_graph is False


def test_channels_last_unet_puts_the_unet_in_nhwc_and_leaves_the_vae_nchw():
    def resolved(value, device):
        return resolve_fast_paths(load_config(overrides=[f"teacher.channels_last={value}", "teacher.compile=off"]).teacher,
                                  torch.device(device))

    unet_only = resolved("unet", "cuda")
    assert unet_only.channels_last is True and unet_only.vae_nhwc is False
    assert "channels_last (U-Net only)" in unet_only.describe()
    both = resolved("on", "cuda")
    assert both.channels_last is True and both.vae_nhwc is True and "U-Net only" not in both.describe()
    on_cpu = resolved("unet", "cpu")
    assert on_cpu.channels_last is False and on_cpu.vae_nhwc is False
    with pytest.raises(ConfigError, match="teacher.channels_last"):
        load_config(overrides=["teacher.channels_last=vae"])


def test_the_vaes_layout_follows_each_fast_path_setting_both_ways(tiny_teacher):
    """with_fast_paths sets the shared VAE's layout either way, so a benchmark's second mode does not
    inherit the first one's; the encoding is the same in every layout."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    conv = tiny_teacher.vae.encoder.conv_in.weight
    reference = tiny_teacher.encode(images)
    try:
        nhwc = tiny_teacher.with_fast_paths(FastPaths(channels_last=True))
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        torch.testing.assert_close(nhwc.encode(images), reference)
        unet_only = tiny_teacher.with_fast_paths(FastPaths(channels_last=True, vae_channels_last=False))
        assert conv.is_contiguous()
        assert tiny_teacher.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(unet_only.encode(images), reference)
    finally:
        tiny_teacher.with_fast_paths(FastPaths())
        tiny_teacher.unet.to(memory_format=torch.contiguous_format)
    assert conv.is_contiguous() and tiny_teacher.unet.conv_in.weight.is_contiguous()


# ------------------------------------------------------------------ the U-Net call
def test_eager_unet_call_is_the_plain_forward_and_cpu_capture_passes_through(tiny_teacher):
    unet = tiny_teacher.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 500, 990])
    hidden = torch.randn(3, 77, 32, generator=generator)
    expected = unet(sample, t, encoder_hidden_states=hidden).sample
    call = build_unet_call(unet, FastPaths())
    assert torch.equal(call(sample, t, hidden), expected)
    captured = CapturedUNet(call)
    assert torch.equal(captured(sample, t, hidden), expected)  # CPU tensors: no graph, same call
    assert captured.graphs == {} and captured.replays == 0
    assert "AttnProcessor2_0" in attention_summary(unet) and "(SDPA)" in attention_summary(unet)


def test_compile_when_settled_runs_a_shape_eagerly_for_its_first_calls_then_compiled():
    from carv3d.teacher.compiling import CompileWhenSettled

    class Recorder:
        def __init__(self, name):
            self.name, self.calls, self.forgotten = name, [], []

        def __call__(self, sample, t, hidden):
            self.calls.append(sample.shape[0])
            return torch.full((1,), float(len(self.name)))

        def forget(self, sample, t, hidden):
            self.forgotten.append(sample.shape[0])

    early, late = Recorder("early"), Recorder("compiled")
    call = CompileWhenSettled(early, late, after=2)

    def inputs(batch):
        return torch.zeros(batch, 4, 8, 8), torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 77, 32)

    # K = 2 passes by (two calls of batch 4), K = 4 settles (batch 8, five calls)
    results = [call(*inputs(batch)) for batch in (4, 4, 8, 8, 8, 8, 8)]
    assert early.calls == [4, 4, 8, 8] and late.calls == [8, 8, 8]
    assert early.forgotten == [8]                     # the eager graph of batch 8 is dropped once, at the switch
    assert [r.item() for r in results] == [5, 5, 5, 5, 8, 8, 8]
    assert call(*inputs(4)).item() == 8               # batch 4 counted its own two calls: its third is compiled
    assert late.calls == [8, 8, 8, 4] and early.forgotten == [8, 4]
    early.replays, late.replays = 6, 4
    assert call.replays == 10                         # what bench_speed reports as cuda_graph_replays
    with pytest.raises(ValueError, match="at least 1"):
        CompileWhenSettled(early, late, after=0)


def test_unet_call_compiles_after_the_configured_calls_and_matches_the_eager_unet(tiny_teacher, monkeypatch):
    import carv3d.teacher.graphs as graphs_module
    from carv3d.teacher.compiling import CompileWhenSettled

    compiled_calls = []

    def fake_compile(fn, dynamic=None, **kwargs):
        def compiled(*args):
            compiled_calls.append(args[0].shape[0])
            return fn(*args)
        return compiled

    monkeypatch.setattr(graphs_module.torch, "compile", fake_compile)
    unet = tiny_teacher.unet
    call = build_unet_call(unet, FastPaths(compile="full", compile_after=2))
    assert isinstance(call, CompileWhenSettled)
    assert isinstance(build_unet_call(unet, FastPaths(compile="full")), type(fake_compile(None)))  # 0: at once
    generator = torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 900])
    hidden = torch.randn(2, 77, 32, generator=generator)
    expected = unet(sample, t, encoder_hidden_states=hidden).sample
    for _ in range(4):
        assert torch.equal(call(sample, t, hidden), expected)
    assert compiled_calls == [2, 2]                   # calls 3 and 4
    cfg = load_config(overrides=["teacher.compile=full", "teacher.compile_after=40"]).teacher
    assert resolve_fast_paths(cfg, torch.device("cuda")).compile_after == 40
    assert "after 40 calls" in resolve_fast_paths(cfg, torch.device("cuda")).describe()
    assert resolve_fast_paths(cfg, torch.device("cpu")).compile_after == 0   # no compile on a CPU
    with pytest.raises(ConfigError, match="teacher.compile_after"):
        load_config(overrides=["teacher.compile_after=-1"])


def test_captured_unet_forgets_one_shape_and_its_pool_with_the_last():
    captured = CapturedUNet(lambda s, t, h: s)
    small = (torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, 77, 32))
    large = (torch.zeros(4, 4, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4, 77, 32))
    captured.graphs = {CapturedUNet._key(*small): "graph of 2", CapturedUNet._key(*large): "graph of 4"}
    captured.pool = "pool"
    assert captured.forget(*small) is True and list(captured.graphs.values()) == ["graph of 4"]
    assert captured.pool == "pool"                    # still used by the other graph
    assert captured.forget(*small) is False
    assert captured.forget(*large) is True and captured.graphs == {} and captured.pool is None


def test_loaded_teacher_on_cpu_runs_eagerly(tiny_teacher):
    assert tiny_teacher.fast == FastPaths()
    assert not isinstance(tiny_teacher._unet_call, CapturedUNet)


# ------------------------------------------------------------------ sync-free steps
def _nan_from_call(trainer, first_bad: int, last_bad: int) -> None:
    """Make teacher calls first_bad..last_bad (1-based) return NaN noise predictions."""
    clean = trainer.teacher.predict_noise
    calls = {"n": 0}

    def predict_noise(*args, **kwargs):
        calls["n"] += 1
        out = clean(*args, **kwargs)
        return out * float("nan") if first_bad <= calls["n"] <= last_bad else out

    trainer.teacher.predict_noise = predict_noise


def _run_steps(tiny_sd_path, tmp_path, sync_free: str, steps: int = 6):
    from carv3d.train import Trainer

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=steps, **{"train.sync_free": sync_free}),
                      prompt="a red cube")
    trainer = Trainer(cfg)
    if not trainer.sync_free:
        # The same (fused) Adam as the sync-free trainer, so that only the skip mechanism differs:
        # with eps = 1e-15 Adam turns rounding differences in near-zero gradients into ±lr steps.
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in trainer.optimizer.param_groups]
        trainer.optimizer = torch.optim.Adam(groups, fused=True)
    _nan_from_call(trainer, 3, 4)  # steps 3 and 4 are non-finite
    in_a_row = []
    for _ in range(steps):
        trainer.train_step()
        if trainer.step == 4:
            in_a_row.append(trainer.guard.in_a_row())  # read mid-run: 2 skipped in a row
    return trainer, in_a_row


def test_sync_free_step_skips_nonfinite_steps_like_the_synchronous_one(tiny_sd_path, tmp_path):
    """Device-side skipping (fused Adam's found_inf) against the host-side `if not finite: skip`.

    Same draws, same optimizer, same skipped steps: the parameters agree bit for bit, the counters
    exactly, and the optimizer step counts show that the two skipped steps did not count.
    """
    sync, sync_rows = _run_steps(tiny_sd_path, tmp_path / "sync", "off")
    free, free_rows = _run_steps(tiny_sd_path, tmp_path / "free", "on")
    assert not sync.sync_free and free.sync_free
    assert sync_rows == free_rows == [2]
    assert (sync.guard.total(), sync.guard.in_a_row()) == (free.guard.total(), free.guard.in_a_row()) == (2, 0)
    for (name, a), (_, b) in zip(sync.scene.named_parameters(), free.scene.named_parameters()):
        assert torch.equal(a, b), name
        assert torch.isfinite(b).all()
    steps = {float(s["step"]) for s in free.optimizer.state_dict()["state"].values()}
    assert steps == {4.0}  # 6 steps, 2 skipped


def _sync_free_trainer_stepped(tiny_sd_path, tmp_path, first_bad: int, last_bad: int, steps: int):
    """A sync-free trainer (limit: 3 skips in a row) whose teacher calls first_bad..last_bad are NaN, after `steps` steps."""
    from carv3d.train import Trainer

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=steps, **{
        "train.sync_free": "on", "train.max_nonfinite_steps": 3}), prompt="a red cube")
    trainer = Trainer(cfg)
    _nan_from_call(trainer, first_bad, last_bad)
    for _ in range(steps):
        trainer.train_step()
    return trainer


def test_sync_free_divergence_is_caught_at_the_next_check(tiny_sd_path, tmp_path):
    from carv3d.errors import TrainingDivergedError
    from carv3d.train import Trainer

    trainer = _sync_free_trainer_stepped(tiny_sd_path, tmp_path, first_bad=2, last_bad=99, steps=4)
    # train_step never raises by itself: nothing is read on the host
    with pytest.raises(TrainingDivergedError, match="3 non-finite steps in a row"):
        trainer.check_divergence()


def test_step_section_timers_cover_the_step(tiny_sd_path, tmp_path):
    import time

    from carv3d.step import SECTIONS
    from carv3d.train import Trainer

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=3), prompt="a red cube")
    trainer = Trainer(cfg)
    trainer.train_step()
    trainer.timing_metrics()  # reset
    started = time.perf_counter()
    for _ in range(2):
        trainer.train_step()
    wall_ms = 1000 * (time.perf_counter() - started) / 2
    timing = trainer.timing_metrics()
    assert set(timing) == {f"time_{name}_ms" for name in SECTIONS}
    # every section but VSD's particle training (this is an SDS run: no particle model)
    assert all(v > 0 for k, v in timing.items() if k != "time_particle_ms"), timing
    assert timing["time_particle_ms"] == 0.0
    assert sum(timing.values()) <= wall_ms * 1.01  # disjoint sections inside the step
    assert sum(timing.values()) > 0.5 * wall_ms  # and they are most of it
    assert trainer.timing_metrics() == {f"time_{name}_ms": 0.0 for name in SECTIONS}


# ------------------------------------------------------------------ the benchmark script
@pytest.mark.slow
def test_bench_speed_runs_end_to_end_on_cpu_with_tiny_models(tmp_path):
    bench_speed = _bench_module()
    out = tmp_path / "bench.json"
    assert bench_speed.main(["--device", "cpu", "--quick", "--tiny", "--draws", "2", "--warmup", "1", "--steps", "2",
                             "--samplers", "stratified,occupancy_grid", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "finished"
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["name"] for r in ok} == {"eager/torch/stratified/K2", "fast/torch/stratified/K2"}
    for r in ok:
        assert r["ms_per_step_median"] > 0 and r["it_per_s"] == pytest.approx(1000 / r["ms_per_step_median"])
        assert r["flops"]["unet"] > 0 and r["flops"]["vae_encode_forward_backward"] > 0
        assert 0 < r["floor_ms"] and r["hash_grid"]["points"] > 0
        assert set(r["split_ms"]) == {"render", "encode", "teacher", "particle", "backward", "optimizer"}  # step.SECTIONS
    assert {r["status"] for r in report["results"] if r["sampler_requested"] == "occupancy_grid"} == {"unavailable"}


def _bench_module():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import bench_speed
    finally:
        sys.path.pop(0)
    return bench_speed


def test_bench_flop_counts_scale_with_the_rows_of_the_teacher_call(tiny_teacher):
    bench = _bench_module()
    k1 = bench.teacher_flops(tiny_teacher, 1, 7.5, 64)
    k4 = bench.teacher_flops(tiny_teacher, 4, 7.5, 64)
    no_cfg = bench.teacher_flops(tiny_teacher, 4, 1.0, 64)
    assert k1["unet"] > 0 and k4["unet"] == 4 * k1["unet"]  # U-Net FLOPs are linear in the batch
    assert no_cfg["unet"] * 2 == k4["unet"]  # guidance doubles the rows
    assert k1["vae_encode_forward_backward"] == k4["vae_encode_forward_backward"] > 0  # one render either way


def test_bench_grid_bytes_model():
    bench = _bench_module()
    from carv3d.config import load_config
    from carv3d.scene import build_scene

    cfg = load_config(overrides=["scene.grid.n_levels=4", "scene.grid.log2_hashmap_size=10"])
    field = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0).field
    table = field.encoding.params.numel() * 4
    got = bench.grid_bytes_per_step(field, 1000)
    assert got["table_bytes"] == table
    assert got["bytes"] == 1000 * 4 * 8 * 2 * 4 * 3 + 8 * table


def test_sync_free_catches_a_run_of_skips_that_ended_before_the_check(tiny_sd_path, tmp_path):
    """Steps 2–4 non-finite (3 in a row, the limit), steps 5–6 finite again: the synchronous path
    would have stopped at step 4, so the next sync-free check must stop too."""
    from carv3d.errors import TrainingDivergedError
    from carv3d.train import Trainer

    trainer = _sync_free_trainer_stepped(tiny_sd_path, tmp_path, first_bad=2, last_bad=4, steps=6)
    assert trainer.guard.in_a_row() == 0  # recovered: the current run of skips is over
    with pytest.raises(TrainingDivergedError, match="3 non-finite steps in a row"):
        trainer.check_divergence()


def test_sync_free_reads_counters_only_on_log_steps_when_checkpoints_are_off(tiny_sd_path, tmp_path, monkeypatch):
    from carv3d.train import Trainer

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=6, **{
        "train.sync_free": "on", "train.checkpoint_every": 0, "train.log_every": 3, "train.val_every": 0,
        "train.turntable_frames": 0, "export.at_end": False}), prompt="a red cube")
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    (tmp_path / "run").mkdir()
    checks = []
    monkeypatch.setattr(trainer, "check_divergence", lambda: checks.append(trainer.step))
    trainer.run()
    assert checks == [3, 6]  # checkpoint_every = 0 means no checkpoints, not a check every step


@pytest.mark.parametrize("first, second", [("off", "on"), ("on", "off")])
def test_resume_across_step_modes(tiny_sd_path, tmp_path, first, second):
    """A checkpoint of one step mode resumes in the other: the optimizer follows the new run (fused
    Adam with its step counts on the parameters' device for sync-free steps), and keeps counting."""
    from carv3d.train import Trainer

    def trainer(mode, out):
        return Trainer(load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path / out, steps=4,
                                                            **{"train.sync_free": mode}), prompt="a red cube"))

    before = trainer(first, "a")
    _nan_from_call(before, 2, 2)  # one skipped step, so the in-a-row/total counters have content
    for _ in range(2):
        before.train_step()
    state = {**before.state_dict(), "step": before.step}
    after = trainer(second, "b")
    after.load_state_dict(state)
    assert all(group["fused"] == (True if second == "on" else None) for group in after.optimizer.param_groups)
    after.train_step()  # would raise with non-fused Adam and found_inf
    counts = {float(s["step"]) for s in after.optimizer.state.values()}
    assert counts == {2.0}  # 1 before (one of two steps skipped) + 1 now
    assert (after.guard.total(), after.guard.in_a_row()) == (1, 0)
    assert all(torch.isfinite(p).all() for p in after.scene.parameters())


def test_nonfinite_in_a_row_survives_a_checkpoint(tiny_sd_path, tmp_path):
    from carv3d.train import Trainer

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=4, **{"train.sync_free": "on"}),
                      prompt="a red cube")
    before = Trainer(cfg)
    _nan_from_call(before, 2, 3)
    for _ in range(3):
        before.train_step()
    state = {**before.state_dict(), "step": before.step}
    after = Trainer(cfg)
    after.load_state_dict(state)
    assert (after.guard.in_a_row(), after.guard.total()) == (2, 2)


# ------------------------------------------------------------------ compile modes and the cache
@pytest.mark.parametrize("value, mode", [("true", "full"), ("false", "off"), ("on", "full"), ("full", "full"),
                                         ("regional", "regional"), ("off", "off"), ("auto", "auto")])
def test_compile_key_reads_modes_and_the_old_booleans(value, mode):
    assert load_config(overrides=[f"teacher.compile={value}"]).teacher.compile == mode
    with pytest.raises(ConfigError, match="teacher.compile.*auto, off, full, regional"):
        load_config(overrides=["teacher.compile=fast"])


def test_regional_compile_wraps_exactly_the_repeated_blocks(tiny_teacher):
    """diffusers' ``_repeated_blocks`` (BasicTransformerBlock for the U-Net) are the compiled modules,
    nothing else; the U-Net itself stays eager. (Counted on a copy: the fixture is shared.)"""
    import copy

    from carv3d.teacher.compiling import compile_regions

    unet = copy.deepcopy(tiny_teacher.unet)
    expected = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(expected) >= 1
    assert compile_regions(unet) == len(expected)
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == expected
    with pytest.raises(ValueError, match="teacher.compile=full"):
        compile_regions(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compile_cache_goes_to_a_folder_that_outlives_the_process(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    from carv3d.teacher.compiling import default_compile_cache, enable_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("CARV3D_CACHE", str(tmp_path / "cache"))
    assert default_compile_cache() == tmp_path / "cache" / "torch_compile"
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    assert enable_compile_cache("auto") == tmp_path / "cache" / "torch_compile"
    assert (tmp_path / "cache" / "torch_compile").is_dir() and inductor_config.fx_graph_cache is True
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torch_compile")
    # An explicit environment variable wins over the config; "" leaves torch's default alone.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert enable_compile_cache(str(tmp_path / "other")) == tmp_path / "mine"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert enable_compile_cache("") is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # Inductor fills the variable with its /tmp default on first use: that is not a user's choice.
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] != str(tmp_path / "cache" / "torch_compile")
    assert enable_compile_cache("auto") == tmp_path / "cache" / "torch_compile"
    assert cache_dir() == str(tmp_path / "cache" / "torch_compile")


def test_a_compiled_call_under_a_dispatch_mode_stays_compiled_afterwards():
    """Dynamo marks a function's code object "skip" for the whole process when it is called under
    a TorchDispatchMode (FlopCounterMode here). The unguarded function shows that reference
    behaviour — after one call under the mode the backend is never called again — and the guarded
    one (what the teacher's compiled calls are wrapped in) keeps compiling and running the compiled code."""
    from torch.utils.flop_counter import FlopCounterMode

    from carv3d.teacher.compiling import eager_under_dispatch_modes

    def counting_backend(calls):
        def backend(graph_module, example_inputs):
            calls.append(1)
            return graph_module.forward
        return backend

    def unguarded_fn(x):
        return torch.sin(x) * 2 + 1

    def guarded_fn(x):
        return torch.cos(x) * 2 + 1

    x = torch.randn(8)
    plain_calls, guarded_calls = [], []
    plain = torch.compile(unguarded_fn, backend=counting_backend(plain_calls), dynamic=False)
    guarded = eager_under_dispatch_modes(torch.compile(guarded_fn, backend=counting_backend(guarded_calls),
                                                       dynamic=False))
    for fn in (plain, guarded):
        with FlopCounterMode(display=False):
            fn(x)
    assert plain_calls == [] and guarded_calls == []          # nothing compiles under the mode
    assert torch.allclose(plain(x), unguarded_fn(x)) and torch.allclose(guarded(x), guarded_fn(x))
    assert plain_calls == []                                  # poisoned: eager for the rest of the process
    assert guarded_calls == [1]                               # compiled on its first call outside the mode
    with FlopCounterMode(display=False):
        guarded(x)
    guarded(x)
    assert guarded_calls == [1]                               # and the compiled code stays in use


def test_a_dynamic_batch_traces_the_unet_once_for_every_k_and_static_shapes_once_per_k():
    """auto-K's batches (2K rows) through diffusers' U-Net: marked dynamic, Dynamo traces one graph
    for all of them; with static shapes it traces one per batch. Outputs equal the eager U-Net's."""
    from torch._dynamo.testing import CompileCounter

    from carv3d.teacher.compiling import batch_dynamic
    from carv3d.testing.tiny_teachers import make_tiny_unet

    torch.manual_seed(0)
    unet = make_tiny_unet(4, 8).requires_grad_(False)

    def eager(sample, t, hidden):
        return unet(sample, t, encoder_hidden_states=hidden).sample

    frames = {}
    for mode in ("dynamic", "static"):
        torch._dynamo.reset()
        counter = CompileCounter()
        call = torch.compile(eager, backend=counter, dynamic=None if mode == "dynamic" else False)
        call = batch_dynamic(call) if mode == "dynamic" else call
        for batch in (2, 4, 6):
            sample, t = torch.randn(batch, 4, 8, 8), torch.randint(0, 1000, (batch,))
            hidden = torch.randn(batch, 77, unet.config.cross_attention_dim)
            torch.testing.assert_close(call(sample, t, hidden), eager(sample, t, hidden))
        frames[mode] = counter.frame_count
    torch._dynamo.reset()
    assert frames == {"dynamic": 1, "static": 3}


def test_unet_call_compiles_with_a_dynamic_batch_only_when_asked(tiny_teacher, monkeypatch):
    """build_unet_call passes dynamic=None and marks dimension 0 of the inputs for Dynamo with
    FastPaths.dynamic_batch; static shapes (dynamic=False, nothing marked) otherwise."""
    import carv3d.teacher.graphs as graphs_module

    seen = []

    def fake_compile(fn, dynamic=None, **kwargs):
        seen.append(dynamic)
        return fn

    monkeypatch.setattr(graphs_module.torch, "compile", fake_compile)
    static = build_unet_call(tiny_teacher.unet, FastPaths(compile="full"))
    dynamic = build_unet_call(tiny_teacher.unet, FastPaths(compile="full", dynamic_batch=True))
    assert seen == [False, None]
    marked = {}
    for name, call in (("static", static), ("dynamic", dynamic)):
        sample, t, hidden = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
        call(sample, t, hidden)
        marked[name] = [getattr(x, "_dynamo_weak_dynamic_indices", set()) for x in (sample, t, hidden)]
    assert marked == {"static": [set(), set(), set()], "dynamic": [{0}, {0}, {0}]}


def test_auto_compile_is_full_with_channels_last_for_a_large_unet_and_off_for_a_small_one(tiny_teacher, monkeypatch,
                                                                                          caplog):
    from carv3d.teacher import fast as fast_module

    unet = tiny_teacher.unet
    size = sum(p.numel() for p in unet.parameters())
    auto = FastPaths(cuda_graph=True, channels_last="auto", compile="auto")
    with caplog.at_level("INFO", logger="carv3d"):
        assert fast_module.resolve_auto_compile(auto, unet) == FastPaths(cuda_graph=True, channels_last=False,
                                                                         compile="off")
    assert "compile=auto -> off" in caplog.text
    monkeypatch.setattr(fast_module, "AUTO_COMPILE_MIN_PARAMETERS", size)  # as large as the threshold
    assert fast_module.resolve_auto_compile(auto, unet) == FastPaths(cuda_graph=True, channels_last=True, compile="full",
                                                                     vae_channels_last=False)  # the VAE stays NCHW
    explicit = FastPaths(compile="full")
    assert fast_module.resolve_auto_compile(explicit, unet) is explicit
    # channels_last=auto follows an explicit compile mode as well, and an explicit layout is kept
    regional = fast_module.resolve_auto_compile(FastPaths(channels_last="auto", compile="regional"), unet)
    assert regional.channels_last is True and regional.vae_nhwc is False
    assert fast_module.resolve_auto_compile(FastPaths(channels_last=False, compile="auto"), unet).channels_last is False
    both = fast_module.resolve_auto_compile(FastPaths(channels_last=True, compile="auto"), unet)
    assert both.channels_last is True and both.vae_nhwc is True  # an explicit on keeps the VAE in NHWC too
    assert FastPaths(channels_last="auto").describe() == "channels_last=auto"
    # On a CPU auto is off before any model is looked at (and says nothing: nothing was asked).
    cpu = resolve_fast_paths(load_config().teacher, torch.device("cpu"))
    assert cpu.compile == "off"


@pytest.mark.parametrize("steps, expected", [(1000, "off"), (3999, "off"), (4000, "auto"), (10_000, "auto")])
def test_auto_compile_is_off_for_runs_too_short_to_win_the_compile_back(steps, expected, caplog):
    from carv3d.teacher.fast import AUTO_COMPILE_MIN_STEPS, auto_compile_for_run

    assert AUTO_COMPILE_MIN_STEPS == 4000
    cfg = load_config(overrides=[f"train.steps={steps}"])
    with caplog.at_level("INFO", logger="carv3d"):
        chosen = auto_compile_for_run(cfg.teacher, int(cfg.train.steps))
    assert chosen.compile == expected
    assert cfg.teacher.compile == "auto"                       # the run's own config is not changed
    assert ("-> off for a" in caplog.text) == (expected == "off")
    for mode in ("off", "full", "regional"):                   # an explicit choice is kept whatever the length
        explicit = load_config(overrides=[f"train.steps={steps}", f"teacher.compile={mode}"]).teacher
        assert auto_compile_for_run(explicit, steps) is explicit


# ------------------------------------------------------------------ the VAE's wide attention head
def _vae_style_attention(channels: int = 512) -> torch.nn.Module:
    """One attention layer built as diffusers builds the VAE's mid-block one: a single head as wide
    as the channels, group norm, residual."""
    from diffusers.models.attention_processor import Attention

    return Attention(channels, heads=1, dim_head=channels, norm_num_groups=32, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()


def test_math_sdpa_processor_matches_sdpa_and_the_explicit_softmax_values_and_gradients():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from carv3d.teacher.attention import MathSDPAttnProcessor

    torch.manual_seed(0)
    layer = _vae_style_attention().double()
    x = torch.randn(2, 512, 6, 5, dtype=torch.float64)
    weights = torch.randn(2, 512, 6, 5, dtype=torch.float64)
    results = {}
    for name, processor in (("sdpa", AttnProcessor2_0()), ("math", MathSDPAttnProcessor()), ("bmm", AttnProcessor())):
        layer.set_processor(processor)
        pixels = x.clone().requires_grad_(True)
        out = layer(pixels)
        (out * weights).sum().backward()
        results[name] = (out.detach(), pixels.grad)
    # float64 throughout, except that the explicit baddbmm + softmax + bmm (the reference computed
    # another way) takes its softmax in float32 (upcast_softmax casts to float): hence its tolerance
    torch.testing.assert_close(results["math"][0], results["sdpa"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["math"][1], results["sdpa"][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["bmm"][0], results["math"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results["bmm"][1], results["math"][1], rtol=0, atol=1e-6)
    assert results["sdpa"][1].abs().max() > 1e-3  # the gradient is not trivially zero


def test_only_heads_wider_than_the_fused_kernels_get_the_math_kernel():
    from carv3d.teacher.attention import (FUSED_ATTENTION_MAX_HEAD_DIM, MathSDPAttnProcessor,
                                          use_math_attention_for_wide_heads, wide_head_attention_layers)
    from carv3d.testing.random_sd import make_vae

    torch.manual_seed(0)
    vae = make_vae()  # Stable Diffusion's VAE: one 512-channel head in the encoder's and the decoder's mid-block
    assert [layer.inner_dim // layer.heads for layer in wide_head_attention_layers(vae)] == [512, 512]
    assert use_math_attention_for_wide_heads(vae.encoder) == 1
    assert use_math_attention_for_wide_heads(vae.encoder) == 0  # already done
    assert isinstance(vae.encoder.mid_block.attentions[0].processor, MathSDPAttnProcessor)
    assert type(vae.decoder.mid_block.attentions[0].processor).__name__ == "AttnProcessor2_0"  # never asked
    assert attention_summary(vae.encoder) == "MathSDPAttnProcessor ×1 (SDPA, math kernel)"
    narrow = _vae_style_attention(FUSED_ATTENTION_MAX_HEAD_DIM)  # as wide as the fused kernels go: unchanged
    assert wide_head_attention_layers(narrow) == [] and use_math_attention_for_wide_heads(narrow) == 0


def test_math_sdpa_processor_traces_into_one_compiled_graph():
    # The kernel choice is a context manager inside the layer's forward; Dynamo must trace through it
    # (no graph break), or the compiled encoder would run its attention eagerly.
    import torch._dynamo.testing

    from carv3d.teacher.attention import MathSDPAttnProcessor

    torch.manual_seed(0)
    layer = _vae_style_attention(64)
    layer.set_processor(MathSDPAttnProcessor())
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    assert backend.frame_count == 1
    torch.testing.assert_close(out, layer(x))
    torch._dynamo.reset()


def test_bench_vae_attention_times_every_processor_and_checks_it_against_fp32(tmp_path):
    from carv3d.testing.scripts import load_script

    bench = load_script("bench_vae_attention")
    out = tmp_path / "vae_attention.json"
    assert bench.main(["--device", "cpu", "--size", "32", "--no-compile", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["shape"]["wide_head_layers"] == 1
    rows = report["rows"]
    assert [(r["variant"], r["channels_last"]) for r in rows] == [
        (v, layout) for layout in (False, True) for v in ("sdpa", "sdpa-math", "bmm")]
    for row in rows:  # fp32 on the CPU: every processor computes the reference's sums
        assert row["ms_median"] > 0 and row["compiled"] is False
        assert row["max_abs_diff_encoding"] < 1e-4 and row["max_abs_diff_image_grad"] < 1e-4 * max(row["image_grad_scale"], 1)
