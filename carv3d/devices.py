"""Device names from configs and flags → torch devices, in one place (training, teacher, commands)."""

from __future__ import annotations

import importlib
import importlib.util
import time
from typing import Any, Callable, Optional

import torch

from carv3d.errors import ConfigError
from carv3d.log import logger


def _spelled(option: str, value: str) -> str:
    """How the user writes ``option`` set to ``value``: ``--device cpu`` for a flag, ``train.device=cpu``
    for a config key (the ``key=value`` override syntax)."""
    return f"{option} {value}" if option.startswith("-") or " " in option else f"{option}={value}"


def resolve_device(name: "str | torch.device", option: str = "train.device") -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU.

    Args:
        name: auto, cpu, cuda or cuda:N.
        option: how the user spelled the setting, for the error message (``train.device``, ``--device``).
    """
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} is '{name}'; expected auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} asks for CUDA but this torch has no CUDA device; use {_spelled(option, 'cpu')} "
                          f"or {_spelled(option, 'auto')}.")
    return device


def package_installed(name: str) -> bool:
    """Whether ``name`` can be imported here, without importing it."""
    return importlib.util.find_spec(name) is not None


def load_extension(module: str, importer: Callable[[str], Any] = importlib.import_module) -> tuple[float, Optional[str]]:
    """Import ``module``, which builds a JIT-compiled CUDA extension on first use on a machine and
    loads the build afterwards: (seconds it took, None), or (seconds, what went wrong).

    A failed build does not always raise: nerfacc's and gsplat's ``_backend`` modules print a
    message and leave ``_C = None`` when they find no CUDA toolkit, and the run then fails at its
    first kernel call. So a module whose ``_C`` is None counts as a failure too.
    """
    started = time.perf_counter()
    try:
        loaded = importer(module)
    except Exception as err:  # a failed build is what this reports
        return time.perf_counter() - started, f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - started
    if getattr(loaded, "_C", True) is None:
        return seconds, f"{module} imported without its compiled kernels (_C is None: no CUDA toolkit found?)"
    return seconds, None


def time_extension_load(module: str, label: str) -> float:
    """:func:`load_extension`'s seconds; a failure is logged, not raised: this is only a warm-up, and
    the code that needs the kernels reports a real problem itself."""
    seconds, error = load_extension(module)
    if error:
        logger.warning("%s CUDA warm-up failed: %s", label, error)
    return seconds


def warm_up_nerfacc() -> Optional[float]:
    """Build (first use on a fresh machine, ~65 s) or load nerfacc's CUDA kernels once, in this
    process; the seconds it took, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return time_extension_load("nerfacc.cuda._backend", "nerfacc")


def warm_up_gsplat() -> Optional[float]:
    """Build (first use on a fresh machine, ~60–110 s) or load gsplat's CUDA extension once, in this
    process; the seconds it took, or None without CUDA or without gsplat installed."""
    if not torch.cuda.is_available() or not package_installed("gsplat"):
        return None
    return time_extension_load("gsplat.cuda._backend", "gsplat")


def warm_up_cuda_extensions() -> Optional[float]:
    """Build or load every JIT-compiled CUDA extension carv3d uses once, in this process: nerfacc's
    (the NeRF's occupancy grid) and, when installed, gsplat's (Gaussian splats; ~70–110 s to build).

    Call it in a parent before starting several worker processes on one machine, so that they do not
    all start the same JIT build at once: a worker that finds another's build in progress waits on
    its lock, and ten workers waiting on a build that twenty busy ones slow down can lose their
    whole time budget. Returns the seconds it took, or None without CUDA.
    """
    nerfacc = warm_up_nerfacc()
    if nerfacc is None:
        return None
    return nerfacc + (warm_up_gsplat() or 0.0)
