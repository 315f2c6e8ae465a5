"""Will this machine run this config? ``carv3d doctor``'s checks, before a run spends its minutes.

Each check asks the function the run itself asks (the device, the hash-grid backend, the ray sampler
or rasteriser, the teacher's weights, the fast paths), so the answer is the run's, not a second
opinion. What the run would only find out late is checked up front: an unwritable output or
compile-cache folder, missing weights, a turntable video encoder that is not installed, and on a
CUDA machine the JIT builds of nerfacc's and gsplat's kernels, which are built here (once per
machine, timed) instead of inside a run's first step.

A check is ``ok``, a ``note`` (the run works, with a consequence worth knowing) or ``fail`` (the run
would stop, or could not start). Each fail says what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from carv3d.errors import UserError
from carv3d.io import unwritable_reason

OK, NOTE, FAIL = "ok", "note", "fail"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, its status, and what was found (or what to do)."""

    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def load_extension(module: str, importer: Callable[[str], Any] = importlib.import_module) -> tuple[float, Optional[str]]:
    """Import ``module``, which builds a JIT-compiled CUDA extension on first use on a machine and
    loads the build afterwards; (seconds, None) or (seconds, the error)."""
    started = time.perf_counter()
    try:
        importer(module)
    except Exception as err:  # a failed build is what this reports
        return time.perf_counter() - started, f"{type(err).__name__}: {err}"
    return time.perf_counter() - started, None


def _extension_check(name: str, module: str, build: bool, importer: Callable[[str], Any]) -> Check:
    if not build:
        return Check(name, NOTE, "not built now (--no-build): a run builds it in its first step if this machine has "
                                 "not, about a minute once per machine")
    seconds, error = load_extension(module, importer)
    if error:
        return Check(name, FAIL, f"the CUDA build failed after {seconds:.1f} s: {error[:400]}. It needs a CUDA "
                                 f"toolkit (nvcc) matching torch's CUDA {torch.version.cuda} and ninja; see the "
                                 f"README's GPU install")
    return Check(name, OK, f"built or loaded in {seconds:.1f} s (a build is once per machine, under "
                           f"~/.cache/torch_extensions)")


def _device_check(cfg: Any) -> tuple[Check, Optional[torch.device]]:
    from carv3d.devices import resolve_device

    try:
        device = resolve_device(cfg.train.device)
    except UserError as err:
        return Check("device", FAIL, str(err)), None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Check("device", OK, f"{device}: {props.name}, {props.total_memory / 2**30:.1f} GiB"), device
    return Check("device", OK, f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"), device


def _scene_checks(cfg: Any, device: torch.device, build: bool, importer: Callable[[str], Any]) -> list[Check]:
    from carv3d.errors import BackendUnavailableError

    checks = []
    if str(cfg.scene.type) == "gaussians":
        from carv3d.scene.gaussians_gsplat import select_rasterizer

        try:
            rasterizer = select_rasterizer(str(cfg.scene.rasterizer), device)
        except BackendUnavailableError as err:
            return [Check("rasterizer", FAIL, str(err))]
        checks.append(Check("rasterizer", OK, rasterizer + (" (gsplat's CUDA kernels)" if rasterizer == "gsplat"
                                                             else " (carv3d's pure-torch rasteriser)")))
        if rasterizer == "gsplat":
            checks.append(_extension_check("gsplat build", "gsplat.cuda._backend", build, importer))
        return checks
    from carv3d.render.renderer import select_sampler
    from carv3d.scene.hashgrid import choose_grid_backend

    backend, reason = choose_grid_backend(str(cfg.scene.grid.backend), device)
    checks.append(Check("hash grid", OK, f"{backend} ({reason})"))
    try:
        sampler = select_sampler(cfg.render, device)
    except BackendUnavailableError as err:
        return checks + [Check("ray sampler", FAIL, str(err))]
    checks.append(Check("ray sampler", OK, sampler))
    if sampler == "occupancy_grid":
        checks.append(_extension_check("nerfacc build", "nerfacc.cuda._backend", build, importer))
    return checks


def _teacher_checks(cfg: Any, device: torch.device) -> list[Check]:
    from carv3d.teacher.fast import resolve_fast_paths
    from carv3d.teacher.loading import resolve_teacher_path

    if str(cfg.teacher.type) != "diffusers":
        return [Check("teacher", NOTE, f"teacher.type={cfg.teacher.type}: its weights are not checked here")]
    try:
        folder = resolve_teacher_path(str(cfg.teacher.pretrained))
    except UserError as err:
        return [Check("teacher weights", FAIL, str(err))]
    checks = [Check("teacher weights", OK, f"{cfg.teacher.pretrained} → {folder}")]
    try:
        fast = resolve_fast_paths(cfg.teacher, device)
    except (UserError, ValueError) as err:
        return checks + [Check("teacher fast paths", FAIL, str(err))]
    detail = fast.describe()
    if fast.compile == "auto":
        detail += " (compile=auto: decided by the U-Net's size and the run's length when the run starts)"
    checks.append(Check("teacher fast paths", OK, detail))
    if fast.compile != "off":
        checks.append(_compile_cache_check(str(cfg.teacher.compile_cache)))
    return checks


def _compile_cache_check(setting: str) -> Check:
    from carv3d.teacher.compiling import default_compile_cache

    if setting == "":
        return Check("compile cache", NOTE, "torch's default under /tmp: emptied by a reboot, so compiles repeat")
    folder = default_compile_cache() if setting == "auto" else Path(setting).expanduser()
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        folder = Path(env)
    problem = unwritable_reason(folder)
    if problem:
        return Check("compile cache", FAIL, f"{problem}; set teacher.compile_cache to a writable folder")
    return Check("compile cache", OK, str(folder))


def _output_checks(cfg: Any) -> list[Check]:
    problem = unwritable_reason(Path(str(cfg.train.output_dir)))
    checks = [Check("output folder", FAIL, f"{problem}; set train.output_dir to a writable folder") if problem
              else Check("output folder", OK, str(Path(str(cfg.train.output_dir)).expanduser().resolve()))]
    if int(cfg.train.turntable_frames) > 0:
        if importlib.util.find_spec("imageio_ffmpeg") is None:
            checks.append(Check("turntable video", NOTE, "imageio-ffmpeg is not installed: the run skips turntable.mp4 "
                                                         "(pip install imageio-ffmpeg, then `carv3d render RUN_DIR`)"))
        else:
            checks.append(Check("turntable video", OK, "imageio-ffmpeg installed"))
    return checks


def run_checks(cfg: Any, build: bool = True,
               importer: Callable[[str], Any] = importlib.import_module) -> list[Check]:
    """The checks for a run of ``cfg`` on this machine, in the order a run meets them.

    ``cfg`` is a loaded config (:func:`carv3d.config.load_config`); it is sized for the device as
    the trainer sizes it (a CPU takes the demo's sizes for keys not set). ``build``: build or load
    the CUDA extensions the run will use (on a CUDA device only). ``importer`` imports an
    extension's module (a test stands in a failing build).
    """
    from carv3d.sizing import size_for_device

    checks = [Check("torch", OK, f"{torch.__version__}, "
                                 + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build (no CUDA)"))]
    device_check, device = _device_check(cfg)
    checks.append(device_check)
    if device is None:
        return checks
    changes = size_for_device(cfg, device)
    if changes:
        keys = list(changes)
        named = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        checks.append(Check("sizes", NOTE, f"{len(keys)} key{'s' if len(keys) > 1 else ''} you did not set "
                                           f"take {device.type}-sized values ({named}): `carv3d config show` lists them"))
    checks += _scene_checks(cfg, device, build, importer)
    checks += _teacher_checks(cfg, device)
    checks += _output_checks(cfg)
    return checks


def format_checks(checks: list[Check]) -> str:
    """One aligned line per check, then the verdict."""
    width = max(len(check.name) for check in checks)
    lines = [f"{check.status:<4}  {check.name:<{width}}  {check.detail}" for check in checks]
    failed = [check.name for check in checks if check.status == FAIL]
    lines.append(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}" if failed
                 else f"all {len(checks)} checks passed")
    return "\n".join(lines)
