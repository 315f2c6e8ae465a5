"""``torch.compile`` of a frozen teacher (``teacher.compile``): the pieces its calls are built from.

``full`` compiles the whole U-Net as one graph, with fixed shapes; ``regional`` only its repeated
blocks (diffusers' ``compile_repeated_blocks``: the transformer blocks, compiled once and reused by
every instance, which cuts the compile time; :func:`compile_regions`). The VAE encoder is compiled
too, its backward included (training differentiates through it). A full compile starts each U-Net
shape eagerly and compiles it after ``teacher.compile_after`` calls (:class:`CompileWhenSettled`),
so the K values auto-K only passes through are never compiled. Compiled artefacts persist across
processes in Inductor's FX-graph and AOT-autograd caches under ``teacher.compile_cache``
(:func:`enable_compile_cache`), so a machine compiles each shape's kernels once; tracing still runs
in every process. Under a dispatch mode (``FlopCounterMode``, the profiler's) a compiled call runs
eagerly without Dynamo skipping its code for good (:func:`eager_under_dispatch_modes`), and
:func:`batch_dynamic` is the one-graph-for-every-batch alternative to static shapes (measured
slower, off by default).

Which mode a teacher compiles with is decided in :mod:`carv3d.teacher.fast`; its calls are
assembled in :mod:`carv3d.teacher.graphs`.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from carv3d.log import logger


def default_compile_cache() -> Path:
    """``$CARV3D_CACHE/torch_compile``, else ``$XDG_CACHE_HOME/carv3d/torch_compile``, else ``~/.cache/...``."""
    if os.environ.get("CARV3D_CACHE"):
        return Path(os.environ["CARV3D_CACHE"]) / "torch_compile"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "carv3d" / "torch_compile"


def compile_cache_folder(setting: Any = "auto") -> Optional[Path]:
    """The folder Inductor's persistent caches will use for ``teacher.compile_cache`` = ``setting``,
    decided without creating or changing anything (:func:`enable_compile_cache` then makes it so).

    ``setting``: ``auto`` (:func:`default_compile_cache`), a folder, or ``""`` for torch's default
    (None). An explicit ``TORCHINDUCTOR_CACHE_DIR`` in the environment wins; Inductor writes its own
    /tmp default into that variable the first time anything asks for its cache folder, so only a
    value other than that default is the user's choice.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and os.path.abspath(env) != os.path.abspath(default_cache_dir()):
        return Path(env)
    text = str(setting)
    if text == "":
        return None
    return default_compile_cache() if text == "auto" else Path(text).expanduser()


def enable_compile_cache(setting: Any = "auto") -> Optional[Path]:
    """Point Inductor's persistent caches at a folder that outlives the process (and /tmp).

    Inductor keeps compiled kernels in an FX-graph cache and, for training graphs, an
    AOT-autograd cache, keyed by the traced graph, the inputs' shapes/dtypes, the device and the
    torch version; both default to ``/tmp/torchinductor_<user>``, which a reboot or a fresh
    container empties. The folder is :func:`compile_cache_folder`'s, created here.

    Returns:
        The cache folder in use, or None for torch's default.
    """
    folder = compile_cache_folder(setting)
    if folder is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # Inductor's default, as it was
    else:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by Inductor at each cache lookup
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return folder


def unet_input_key(sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> tuple:
    """What tells one U-Net call's inputs from another's: their shapes and dtypes, and the sample's device.

    :class:`CompileWhenSettled` counts a shape's calls by it, and
    :class:`carv3d.teacher.graphs.CapturedUNet` records one CUDA graph per key.
    """
    return (tuple(sample.shape), sample.dtype, sample.device, tuple(timestep.shape), timestep.dtype,
            tuple(hidden.shape), hidden.dtype)


class CompileWhenSettled:
    """The U-Net call that compiles a shape only once it has held for ``after`` calls.

    ``teacher.compile=full`` with static shapes compiles once per U-Net batch (40–50 s each at
    Stable Diffusion scale on an H100, docs/compile_shapes_h100.json), and auto-K passes through a
    few K early in a run before it settles (4, 8, then 16 in a logged SD 2.1 run, ~50 steps each:
    docs/speed_suite_h100_r3/gaussians_full_run.json).
    Here each shape runs ``early`` (the eager U-Net, in its CUDA graph) for its first ``after``
    calls and ``late`` (the compiled one) from then on, so only the K a run stays at pays a compile.
    At the switch ``early``'s graph of that shape is dropped (``forget``), freeing its memory.

    Args:
        early: the call for a shape's first ``after`` calls.
        late: the call from then on (compiled; it compiles on its first call of each shape).
        after: calls of one shape before it switches.
    """

    def __init__(self, early: Callable[..., torch.Tensor], late: Callable[..., torch.Tensor], after: int) -> None:
        if after < 1:
            raise ValueError(f"after must be at least 1; got {after}")
        self.early, self.late, self.after = early, late, int(after)
        self.calls: Counter = Counter()

    @property
    def replays(self) -> int:
        """CUDA-graph replays of both calls (0 without graphs)."""
        return int(getattr(self.early, "replays", 0)) + int(getattr(self.late, "replays", 0))

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        key = unet_input_key(sample, timestep, hidden)
        self.calls[key] += 1
        count = self.calls[key]
        if count <= self.after:
            return self.early(sample, timestep, hidden)
        if count == self.after + 1:
            logger.info("teacher: U-Net input %s held for %d calls; compiling it now (40-50 s at Stable "
                        "Diffusion scale, about 7 s from a warm compile cache)", tuple(sample.shape), self.after)
            forget = getattr(self.early, "forget", None)
            if forget is not None:
                forget(sample, timestep, hidden)
        return self.late(sample, timestep, hidden)


def batch_dynamic(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled`` called with dimension 0 of every tensor argument marked dynamic for Dynamo.

    A compile with static shapes (``dynamic=False``) traces and compiles again for every new batch
    size, and auto-K changes the U-Net's batch (2·K rows with guidance) a few times early in a run.
    Marked dynamic, the batch becomes a symbol of the one traced graph: convolutions and matmuls are
    library calls that take any batch, and Inductor's generated kernels index with it. A size that
    Dynamo must specialise anyway (a batch of 1) still compiles its own graph (``maybe_mark_dynamic``
    does not insist). Measured slower per call than static shapes (see ``FastPaths.dynamic_batch``),
    so only ``FastPaths(dynamic_batch=True)`` uses it.
    """

    def call(*args: Any) -> Any:
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return compiled(*args)

    call.__wrapped__ = compiled  # type: ignore[attr-defined]
    return call


def eager_under_dispatch_modes(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call``, run with Dynamo switched off whenever a ``TorchDispatchMode`` is active.

    Dynamo does not trace under a dispatch mode (``FlopCounterMode``, the profiler's memory modes,
    fake tensors): it declines the frame *and marks its code object to be skipped for the rest of
    the process* (``ConvertFrameReturn``'s default strategy, applied to the code). The compiled
    teacher's calls are closures built by :mod:`carv3d.teacher.graphs`, one code object per kind of call, so one
    call under ``FlopCounterMode`` made every later compiled encoder of the process run eagerly:
    measured on an H100 (``scripts/bench_compile.py``' encoder probe) the encoder's forward went
    from 7.1 ms compiled to 12.2 ms, no recompile logged, its two cache entries still present —
    the cause of the encode speed-up that vanished in bench_speed's second configuration, whose
    FLOP count ran the compiled encoder under ``FlopCounterMode``. Under a mode this wrapper
    calls through ``torch.compiler.set_stance("force_eager")``, which bypasses Dynamo without
    marking anything, so the compiled code stays in use afterwards.
    """

    def guarded(*args: Any) -> Any:
        if torch._C._len_torch_dispatch_stack() > 0:
            with torch.compiler.set_stance("force_eager"):
                return call(*args)
        return call(*args)

    guarded.__wrapped__ = call  # type: ignore[attr-defined]
    return guarded


def compile_regions(unet: torch.nn.Module) -> int:
    """Regional compilation: ``torch.compile`` each of the U-Net's repeated blocks in place.

    diffusers models list their repeated block classes in ``_repeated_blocks`` (the U-Net's
    ``BasicTransformerBlock``); each instance gets ``module.compile(dynamic=False)``, and since
    all instances share their code, Dynamo traces the block once per input shape instead of the
    whole U-Net. Returns the number of blocks compiled.

    Raises:
        ValueError: the model names no repeated blocks (use ``teacher.compile=full``).
    """
    names = set(getattr(unet, "_repeated_blocks", None) or ())
    blocks = [module for module in unet.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"teacher.compile=regional: {type(unet).__name__} names no repeated blocks to compile; "
                         "use teacher.compile=full.")
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
