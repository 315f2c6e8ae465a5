"""Will this machine run this config? ``carv3d doctor``'s checks, before a run spends its minutes.

Each check asks the function the run itself asks (the prompt and run-name checks, the device, the
hash-grid backend, the ray sampler or rasteriser, the teacher's folder and fast paths, the memory
estimate), so the answer is the run's, not a second opinion. What the run would only find out late
is checked up front: an unwritable output or compile-cache folder, an existing run directory,
missing or incomplete weights, a turntable video encoder that is not installed, and on a CUDA
machine the JIT builds of nerfacc's and gsplat's kernels, which are built here (once per machine,
timed) instead of inside a run's first step.

A check is ``ok``, a ``note`` (the run works, with a consequence worth knowing) or ``fail`` (the run
would stop, or could not start). Each fail says what to do. Nothing is created or changed: no
folder, no environment variable, not the caller's config.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from carv3d.devices import load_extension
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


def _extension_check(name: str, module: str, build: bool, importer: Callable[[str], Any]) -> Check:
    if not build:
        return Check(name, NOTE, "not built now (--no-build): a run builds it in its first step if this machine has "
                                 "not, about a minute once per machine")
    seconds, error = load_extension(module, importer)
    if error:
        return Check(name, FAIL, f"the CUDA build failed after {seconds:.1f} s: {error[:400]}. It needs a CUDA "
                                 f"toolkit (nvcc) matching torch's CUDA {torch.version.cuda} and ninja; see the "
                                 f"README's GPU install")
    return Check(name, OK, f"built or loaded in {seconds:.1f} s (a build is kept per machine, in torch's "
                           f"extensions folder: TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)")


def _device_check(cfg: Any) -> tuple[Check, Optional[torch.device]]:
    from carv3d.devices import resolve_device

    try:
        device = resolve_device(cfg.train.device)
    except UserError as err:
        return Check("device", FAIL, str(err)), None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            return Check("device", FAIL, f"train.device={cfg.train.device} but this machine has {count} CUDA "
                                         f"device(s), cuda:0 to cuda:{count - 1}"), None
        props = torch.cuda.get_device_properties(index)
        return Check("device", OK, f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB"), device
    detail = f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    if torch.cuda.is_available():
        return Check("device", NOTE, detail + f"; this machine has {torch.cuda.device_count()} CUDA device(s) "
                                              f"(train.device=auto uses the first)"), device
    if torch.version.cuda:
        return Check("device", NOTE, detail + f"; this torch is built for CUDA {torch.version.cuda} but sees no "
                                              f"device (driver, or CUDA_VISIBLE_DEVICES?)"), device
    return Check("device", OK, detail), device


def _prompt_checks(cfg: Any) -> list[Check]:
    from carv3d.config import check_prompt
    from carv3d.teacher.loading import closed_vocabulary

    if not str(cfg.prompt or "").strip():
        return [Check("prompt", NOTE, "none given: `carv3d train` needs --prompt (or prompt: in the config); pass "
                                      "--prompt here to check it against the teacher")]
    try:
        prompt = check_prompt(cfg.prompt)
        if str(cfg.teacher.type) == "diffusers":
            vocabulary, folder = closed_vocabulary(str(cfg.teacher.pretrained))
            if vocabulary is not None:
                vocabulary.check(prompt, "prompt", folder)
                negative = str(cfg.teacher.get("negative_prompt", "") or "")
                vocabulary.check(negative, "negative prompt (teacher.negative_prompt)", folder)
    except UserError as err:
        return [Check("prompt", FAIL, str(err))]
    return [Check("prompt", OK, repr(prompt))]


def _scene_checks(cfg: Any, device: torch.device, build: bool, importer: Callable[[str], Any]) -> list[Check]:
    from carv3d.errors import BackendUnavailableError

    if str(cfg.scene.type) == "gaussians":
        from carv3d.scene.gaussians_gsplat import choose_rasterizer

        try:
            rasterizer, reason = choose_rasterizer(str(cfg.scene.rasterizer), device)
        except BackendUnavailableError as err:
            return [Check("rasterizer", FAIL, str(err))]
        checks = [Check("rasterizer", OK, f"{rasterizer} ({reason})")]
        if rasterizer == "gsplat":
            checks.append(_extension_check("gsplat build", "gsplat.cuda._backend", build, importer))
        return checks
    from carv3d.render.renderer import choose_sampler
    from carv3d.scene.hashgrid import choose_grid_backend, grid_backend_unavailable

    backend, reason = choose_grid_backend(str(cfg.scene.grid.backend), device)
    problem = grid_backend_unavailable(backend, device)
    checks = [Check("hash grid", FAIL, problem) if problem else Check("hash grid", OK, f"{backend} ({reason})")]
    try:
        sampler, reason = choose_sampler(cfg.render, device)
    except BackendUnavailableError as err:
        return checks + [Check("ray sampler", FAIL, str(err))]
    checks.append(Check("ray sampler", OK, f"{sampler} ({reason})"))
    if sampler == "occupancy_grid":
        checks.append(_extension_check("nerfacc build", "nerfacc.cuda._backend", build, importer))
    return checks


def _weights_check(cfg: Any) -> Check:
    from carv3d.teacher.folder import inspect_teacher_folder
    from carv3d.teacher.loading import resolve_teacher_path

    if str(cfg.teacher.type) != "diffusers":
        return Check("teacher weights", NOTE, f"teacher.type={cfg.teacher.type}: its weights are not checked here")
    try:
        folder = resolve_teacher_path(str(cfg.teacher.pretrained))
        inspect_teacher_folder(folder)  # every part present, safetensors weights; nothing is loaded
    except UserError as err:
        return Check("teacher weights", FAIL, str(err))
    return Check("teacher weights", OK, f"{cfg.teacher.pretrained} → {folder}")


def _fast_path_checks(cfg: Any, device: torch.device) -> list[Check]:
    from carv3d.teacher.fast import auto_compile_for_run, resolve_fast_paths

    if str(cfg.teacher.type) != "diffusers":
        return []
    teacher_cfg = auto_compile_for_run(cfg.teacher, int(cfg.train.steps))  # as the run resolves it
    try:
        fast = resolve_fast_paths(teacher_cfg, device)
    except (UserError, ValueError) as err:
        return [Check("teacher fast paths", FAIL, str(err))]
    detail = fast.describe()
    if fast.compile == "auto":
        detail += " (compile=auto: full for a U-Net of ≥ 100 M parameters, decided when it loads)"
    checks = [Check("teacher fast paths", OK, detail)]
    if fast.compile != "off":
        checks.append(compile_cache_check(str(teacher_cfg.compile_cache)))
    return checks


def compile_cache_check(setting: str) -> Check:
    """The folder the run's compile caches would use (:func:`carv3d.teacher.compiling.compile_cache_folder`,
    which decides without creating it), and whether it can be written."""
    from carv3d.teacher.compiling import compile_cache_folder

    folder = compile_cache_folder(setting)
    if folder is None:
        return Check("compile cache", NOTE, "torch's default under /tmp: emptied by a reboot, so compiles repeat "
                                            "(teacher.compile_cache=auto keeps them)")
    problem = unwritable_reason(folder)
    if problem:
        return Check("compile cache", FAIL, f"{problem}; set teacher.compile_cache (or TORCHINDUCTOR_CACHE_DIR) to "
                                            f"a writable folder")
    return Check("compile cache", OK, str(folder))


def _memory_check(cfg: Any, device: torch.device) -> list[Check]:
    from carv3d.sizing import check_memory

    warning = check_memory(cfg, device)
    return [Check("memory", NOTE, warning)] if warning else []


def _output_checks(cfg: Any) -> list[Check]:
    from carv3d.run_dir import check_plain_name

    output_dir = Path(str(cfg.train.output_dir)).expanduser()
    problem = unwritable_reason(output_dir)
    if problem:
        checks = [Check("output folder", FAIL, f"{problem}; set train.output_dir to a writable folder")]
    else:
        checks = [Check("output folder", OK, str(output_dir.resolve()))]
    name = str(cfg.train.run_name)
    if name:
        try:
            check_plain_name(name)
        except UserError as err:
            checks.append(Check("run name", FAIL, str(err)))
        else:
            existing = output_dir / name
            checks.append(Check("run name", FAIL, f"run directory '{existing}' already exists; carv3d never overwrites "
                                                  f"a run: continue it with `carv3d train --resume {existing}`, or "
                                                  f"choose another train.run_name") if existing.exists()
                          else Check("run name", OK, str(existing)))
    if int(cfg.train.turntable_frames) > 0:
        checks.append(_video_check())
    return checks


def _video_check() -> Check:
    missing = Check("turntable video", NOTE, "no ffmpeg for imageio: the run skips turntable.mp4 (pip install "
                                             "imageio-ffmpeg, then `carv3d render RUN_DIR`)")
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return missing
    try:
        import imageio_ffmpeg

        return Check("turntable video", OK, f"ffmpeg at {imageio_ffmpeg.get_ffmpeg_exe()}")
    except Exception as err:  # the package without its binary
        return Check("turntable video", NOTE, f"{missing.detail}: {err}")


def run_checks(cfg: Any, build: bool = True,
               importer: Callable[[str], Any] = importlib.import_module) -> list[Check]:
    """The checks for a run of ``cfg`` on this machine.

    ``cfg`` is a loaded config (:func:`carv3d.config.load_config`); a copy is sized for the device as
    the trainer sizes it (a CPU takes the demo's sizes for keys not set). ``build``: build or load
    the CUDA extensions the run will use (on a CUDA device only). ``importer`` imports an
    extension's module (a test stands in a failing build). The checks that need the device are
    left out when it cannot be used; the others run anyway.
    """
    from carv3d.sizing import size_for_device

    cfg = copy.deepcopy(cfg)
    checks = [Check("torch", OK, f"{torch.__version__}, "
                                 + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build (no CUDA)"))]
    device_check, device = _device_check(cfg)
    checks.append(device_check)
    if device is not None:
        changes = size_for_device(cfg, device)
        if changes:
            keys = list(changes)
            named = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            checks.append(Check("sizes", NOTE, f"{len(keys)} key{'s' if len(keys) > 1 else ''} you did not set "
                                               f"take {device.type}-sized values ({named}): `carv3d config show` "
                                               f"lists them"))
    checks += _prompt_checks(cfg)
    if device is not None:
        checks += _scene_checks(cfg, device, build, importer)
    checks.append(_weights_check(cfg))
    if device is not None:
        checks += _fast_path_checks(cfg, device)
        checks += _memory_check(cfg, device)
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
