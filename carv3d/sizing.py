"""Settings sized for the machine: on a CPU, the keys the user did not set take CPU-sized values.

The default config is the GPU preset (``carv``: two renders per step, auto-K up to 16, 64 px renders
of 64 samples on a 16-level grid). On a CPU a render and a teacher call cost real time and memory,
so when the device resolves to the CPU, :func:`size_for_device` replaces the values of
:data:`CPU_SETTINGS` — the sizes of ``configs/demo_cpu.yaml`` — in every key that no layer of the
user's set (a ``--config`` file, a ``key=value`` override, a run's own ``config.yaml`` on
``--resume``). Each change is logged like the other automatic choices::

    CPU: estimator.upstream_samples 2 → 1 (set it explicitly to keep 2)

The resolved values are written into the run's ``config.yaml``, so ``--resume`` (which loads every
key from it, so every key counts as set) reproduces the run. Which keys were set is recorded by
:func:`carv3d.config.load_config` with :func:`record_explicit`; a config built another way
(``carv3d.config.defaults()``, by hand) has no record and is never changed.

:func:`estimate_peak_bytes` is a rough model of a run's peak resident memory (measured on a
2-core CPU, ``scripts/bench_memory.py``); :func:`check_memory` says so before a run whose estimate
exceeds the memory available, with settings that fit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from carv3d.log import logger

# The CPU layer (the demo's sizes, configs/demo_cpu.yaml): one render per step (on a CPU a render is
# not free, and the carv preset's camera strata then act across steps), K bounded to 4 (nor is the
# teacher), a 8-level grid and 32 px renders of 32 samples, and the demo's output sizes.
CPU_SETTINGS: dict[str, Any] = {
    "estimator.upstream_samples": 1,
    "estimator.max_noise_draws": 4,
    "scene.grid.n_levels": 8,
    "scene.grid.log2_hashmap_size": 16,
    "scene.grid.per_level_scale": 1.5,
    "scene.mlp_width": 32,
    "render.width": 32,
    "render.height": 32,
    "render.samples_per_ray": 32,
    "export.resolution": 96,
    "export.texture_size": 256,
    "export.faces": 20000,
    "train.turntable_frames": 24,
    "train.turntable_fps": 12,
}

EXPLICIT_FLAG = "carv3d_explicit"  # on a leaf node: a layer of the user's set it
RECORDED_FLAG = "carv3d_recorded"  # on the root: load_config recorded the explicit keys
_ABSENT = object()


# ------------------------------------------------------------------------------------ explicit keys
def _leaf_keys(node: Any, prefix: str = "") -> Iterable[str]:
    """Dotted keys of the leaves of a layer (a list is one leaf)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _leaf_keys(node._get_node(key), f"{prefix}{key}.")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_keys(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def _leaf_node(cfg: DictConfig, key: str) -> Any:
    parent_key, _, name = key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    except Exception:  # a key the merged config does not have (another seam type)
        return None
    if not isinstance(parent, DictConfig) or name not in parent:
        return None
    return parent._get_node(name)


def record_explicit(cfg: DictConfig, layers: Iterable[Any]) -> None:
    """Mark every leaf that one of ``layers`` (the user's: files, overrides, --prompt, a base
    config) sets, as a node flag that survives copies, pickling and updates of the config."""
    cfg._set_flag(RECORDED_FLAG, True)
    for layer in layers:
        for key in _leaf_keys(layer):
            node = _leaf_node(cfg, key)
            if node is not None:
                node._set_flag(EXPLICIT_FLAG, True)


def restore_explicit(cfg: DictConfig, keys: Iterable[str]) -> None:
    """Make ``keys`` (an earlier :func:`explicit_keys`) the record of ``cfg``, whatever it had.

    A config rebuilt from a resolved YAML (a sweep's job on its worker) has every key in its one
    layer; this puts back the record of the layers it was resolved from, so the worker still
    sizes the keys the sweep's user did not set.
    """

    def clear(node: DictConfig) -> None:
        for key in node.keys():
            child = node._get_node(key)
            child._set_flag(EXPLICIT_FLAG, None)
            if isinstance(child, DictConfig):
                clear(child)

    clear(cfg)
    cfg._set_flag(RECORDED_FLAG, True)
    for key in keys:
        node = _leaf_node(cfg, key)
        if node is not None:
            node._set_flag(EXPLICIT_FLAG, True)


def sized_for_cpu(key: str, value: Any) -> bool:
    """Whether ``value`` is what :func:`size_for_device` sets ``key`` to on a CPU."""
    return key in CPU_SETTINGS and _plain(value) == CPU_SETTINGS[key]


def explicit_keys(cfg: DictConfig) -> Optional[set[str]]:
    """The keys a layer of the user's set, or None when the config carries no record of them."""
    if not cfg._get_node_flag(RECORDED_FLAG):
        return None
    found: set[str] = set()

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            child = node._get_node(key)
            if child._get_node_flag(EXPLICIT_FLAG):
                found.add(f"{prefix}{key}")
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{key}.")

    walk(cfg, "")
    return found


# ------------------------------------------------------------------------------------ sizing
def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def size_for_device(cfg: DictConfig, device: Any) -> dict[str, tuple[Any, Any]]:
    """On a CPU, set :data:`CPU_SETTINGS` in ``cfg`` (in place) for every key the user did not set.

    Returns:
        key → (old value, new value) for each change (each one logged); empty elsewhere.
    """
    if getattr(device, "type", str(device)) != "cpu":
        return {}
    explicit = explicit_keys(cfg)
    if explicit is None:
        return {}
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in CPU_SETTINGS.items():
        if key in explicit:
            continue
        current = _plain(OmegaConf.select(cfg, key, default=_ABSENT))
        if current is _ABSENT or current == value:
            continue
        if key == "estimator.max_noise_draws" and (str(cfg.estimator.noise_draws) != "auto"
                                                   or value < int(cfg.estimator.min_noise_draws)):
            continue  # a fixed K does not read the bound; an explicit min above it keeps the GPU bound
        OmegaConf.update(cfg, key, value, merge=False)
        changes[key] = (current, value)
        logger.info("CPU: %s %s → %s (set it explicitly to keep %s)", key, current, value, current)
    return changes


# ------------------------------------------------------------------------------------ memory
GIB = 2**30
# Measured on a 2-core CPU (scripts/bench_memory.py, docs/memory_cpu_after.json): the process with
# torch, diffusers and the embedded teacher loaded, before the first step (0.47-0.52 GB), and the
# whole process of a CPU-sized run with its chunked end-of-run outputs (0.72-0.87 GB).
BASE_BYTES = int(0.5 * GIB)
OUTPUTS_BYTES = int(0.9 * GIB)


def estimate_peak_bytes(cfg: DictConfig) -> int:
    """A rough upper estimate of a CPU run's peak resident memory (the embedded teacher).

    The training step dominates: per render point the hash grid keeps 8 corner rows (int32) and
    weights per level for the backward (8·L·8 bytes), the MLP its activations (≈ 3·width·4 bytes),
    the renderer ≈ 1.2 kB of per-sample tensors, their gradients and the allocator's slack (fitted:
    the default config's GPU sizes, 524,288 points, peak at 1.85 GB; this gives 2.0). End-of-run
    renders are chunked, so they stay under :data:`OUTPUTS_BYTES`.
    """
    grid = cfg.scene.get("grid")
    levels = int(grid.n_levels) if grid is not None else 16
    width = int(cfg.scene.get("mlp_width", 64))
    points = (int(cfg.estimator.upstream_samples) * int(cfg.render.width) * int(cfg.render.height)
              * int(cfg.render.samples_per_ray))
    per_point = 8 * levels * 8 + 3 * width * 4 + 1200
    if cfg.render.shading != "albedo" or float(cfg.optim.orientation_weight) > 0:
        per_point *= 7  # normals: 6 more density evaluations per sample, with their graph
    return max(OUTPUTS_BYTES, BASE_BYTES + points * per_point)


def available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), or None."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def check_memory(cfg: DictConfig, device: Any, available: Optional[int] = None) -> Optional[str]:
    """On a CPU, a warning (logged and returned) when the estimated peak exceeds the free memory."""
    if getattr(device, "type", str(device)) != "cpu":
        return None
    available = available_bytes() if available is None else available
    need = estimate_peak_bytes(cfg)
    if available is None or need <= available:
        return None
    fits = {key: value for key, value in CPU_SETTINGS.items() if key.startswith(("estimator.upstream", "render."))}
    message = (f"this config needs about {need / GIB:.1f} GB, {available / GIB:.1f} GB is free; settings that fit: "
               + " ".join(f"{k}={v}" for k, v in fits.items()))
    logger.warning(message)
    return message
