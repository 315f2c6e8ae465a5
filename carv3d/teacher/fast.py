"""Which fast paths a frozen diffusers teacher takes on CUDA: ``teacher.*`` read once, for its device.

At Stable Diffusion scale the U-Net call of a training step is launch-bound up to K ≈ 8 (REFERENCE
§4: 8 CFG draws cost 1.4× one draw): hundreds of small kernels whose launches cost more than their
arithmetic. :class:`FastPaths` names the paths a teacher takes; :func:`resolve_fast_paths` reads
them from the config for a device, :func:`auto_compile_for_run` turns ``compile=auto`` off for a
short run and :func:`resolve_auto_compile` settles it once the U-Net is known. The decisions:

- ``cuda_graph``: the U-Net's forward recorded once per shape and replayed
  (:class:`carv3d.teacher.graphs.CapturedUNet`).
- ``channels_last``: NHWC weights and activations, the layout cuDNN's fp16/bf16 convolution kernels
  want (avoids NCHW↔NHWC transposes around every convolution). ``on``: the U-Net and the VAE;
  ``unet``: the U-Net alone, the VAE NCHW, since the compiled encoder's backward with channels-last
  tensors copies its full-resolution gradients between layouts (31 copies, 2.8 ms a K = 8 step;
  docs/profile_compiled_cl_links_h100.json). ``auto`` is ``unet`` with a compile and off eager,
  where GroupNorm's NHWC kernels made it slower (:func:`_auto_layout`).
- ``compile`` also sets where Inductor keeps its caches (:func:`prepare_compile_cache`, when a
  teacher is built; deciding changes nothing).
- ``compile``: ``torch.compile`` of the U-Net (``full`` or ``regional``) and of the VAE encoder
  (:mod:`carv3d.teacher.compiling`); ``auto`` compiles a large U-Net in a long run only.

The calls that apply them are built in :mod:`carv3d.teacher.graphs`; the attention kernels, which
are not a switch, are chosen in :mod:`carv3d.teacher.attention`.

Everything here is CUDA only. On another device each path is skipped and the reason logged; the
eager code path is then exactly the one without fast paths.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from carv3d.log import logger
from carv3d.teacher.compiling import enable_compile_cache

SWITCHES = ("auto", "on", "off")
COMPILE_MODES = ("off", "full", "regional")
# teacher.compile=auto compiles a U-Net at least this large: Stable Diffusion's has 866 M parameters;
# the embedded world teacher's 2.4 M run in a step that the render dominates.
AUTO_COMPILE_MIN_PARAMETERS = 100_000_000
# A compile pays for itself only over a long run: on an H100 at SD 2.1 scale, K = 8, a cold full
# compile with channels-last tensors costs 40–60 s for steps ≈ 20 ms faster (docs/bench_speed_ab_h100.json),
# about 3,000 steps, and each K a run stays at is compiled (teacher.compile_after). Shorter runs stay eager.
AUTO_COMPILE_MIN_STEPS = 4000


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths a teacher uses (resolved for its device by :func:`resolve_fast_paths`)."""

    cuda_graph: bool = False
    # "auto" until the compile mode is known (resolve_auto_compile): channels-last tensors go with a compile
    channels_last: Union[bool, str] = False
    compile: str = "off"  # one of COMPILE_MODES, or "auto" until the U-Net is known (resolve_auto_compile)
    # the VAE's layout when it differs from the U-Net's (teacher.channels_last=unet: U-Net NHWC, VAE NCHW);
    # None: as the U-Net
    vae_channels_last: Optional[bool] = None
    # compile=full: trace the U-Net's batch dimension as a symbol, so that every K auto-K visits runs one
    # compiled graph instead of compiling again per K. Off: on an H100 it compiled once (77 s against
    # 42-49 s per K) but each call was 24-25 % slower (40.5 against 32.4 ms at K = 8, 78.8 against
    # 63.4 ms at K = 16; docs/compile_shapes_h100.json), which a 10,000-step run pays many times over.
    dynamic_batch: bool = False
    # compile=full: calls of one shape before it is compiled (teacher.compile_after); 0 = at first sight
    compile_after: int = 0

    @property
    def vae_nhwc(self) -> bool:
        """Whether the VAE runs with channels-last tensors."""
        return self.channels_last is True if self.vae_channels_last is None else self.vae_channels_last

    def describe(self) -> str:
        on = [name for name in ("cuda_graph", "channels_last") if getattr(self, name) is True]
        if self.channels_last is True and not self.vae_nhwc:
            on[on.index("channels_last")] = "channels_last (U-Net only)"
        if self.channels_last == "auto":
            on.append("channels_last=auto")
        if self.compile != "off":
            on.append(f"compile={self.compile}" + (f" (each U-Net shape after {self.compile_after} calls)"
                                                   if self.compile == "full" and self.compile_after else ""))
        return ", ".join(on) if on else "none (eager)"


def _spelling(value: Any) -> str:
    return str(value).lower() if not isinstance(value, bool) else ("on" if value else "off")


def _switch(value: Any, key: str, device: torch.device) -> bool:
    """auto → on for CUDA; on → on for CUDA, skipped (logged) elsewhere; off → off."""
    value = _spelling(value)
    if value not in SWITCHES:
        raise ValueError(f"teacher.{key} is '{value}'; expected one of {', '.join(SWITCHES)}")
    if value == "off":
        return False
    if device.type != "cuda":
        if value == "on":
            logger.info("teacher: %s=on skipped on %s (a CUDA-only fast path)", key, device)
        return False
    return True


def resolve_fast_paths(teacher_cfg: Any, device: torch.device) -> FastPaths:
    """Read ``teacher.cuda_graph``, ``teacher.channels_last`` and ``teacher.compile`` for ``device``.

    ``teacher_cfg`` is the typed ``teacher`` section (:class:`carv3d.config.DiffusersTeacherConfig`):
    its defaults are stated there, once.
    """
    device = torch.device(device)
    mode = compile_mode(teacher_cfg.compile)
    if mode != "off" and device.type != "cuda":
        if mode != "auto":
            logger.info("teacher: compile=%s skipped on %s (only used on CUDA)", mode, device)
        mode = "off"
    spelling = _spelling(teacher_cfg.channels_last)
    unet_only = spelling == "unet"  # the U-Net NHWC, the VAE NCHW
    channels_last: Union[bool, str] = _switch("on" if unet_only else spelling, "channels_last", device)
    if channels_last and spelling == "auto":
        channels_last = "auto"  # follows the compile (_auto_layout), now or once the U-Net is known
    return _auto_layout(FastPaths(
        cuda_graph=_switch(teacher_cfg.cuda_graph, "cuda_graph", device),
        channels_last=channels_last,
        vae_channels_last=False if unet_only and channels_last else None,
        compile=mode,
        compile_after=int(getattr(teacher_cfg, "compile_after", 0)) if mode != "off" else 0,
    ))


def prepare_compile_cache(fast: FastPaths, teacher_cfg: Any) -> None:
    """Before a teacher with these fast paths is built: with a compile, point Inductor's persistent
    caches at ``teacher.compile_cache`` (created; logged). Kept apart from :func:`resolve_fast_paths`,
    which only decides, so that deciding (``carv3d doctor``, tests) changes nothing."""
    if fast.compile == "off":
        return
    cache = enable_compile_cache(getattr(teacher_cfg, "compile_cache", "auto"))
    logger.info("teacher: compile=%s, compile cache %s", fast.compile, cache or "torch's default (this boot only)")


def _auto_layout(fast: FastPaths) -> FastPaths:
    """``channels_last=auto`` once the compile mode is known: compiled, the U-Net in NHWC and the VAE
    in NCHW (``teacher.channels_last=unet``); eager, NCHW throughout. Other layouts are kept.

    Why: eager NHWC measured slower (GroupNorm has no fast NHWC kernel). Compiled, NHWC speeds the
    U-Net, but the VAE encoder's compiled backward then converts its channels-last gradients between
    layouts (31 copies, 2.8 ms of a K = 8 step; docs/profile_compiled_cl_links_h100.json). With the
    VAE in NCHW the backward took 9.9-10.1 against 11.5-11.7 ms and the step 52.8 / 54.7 against
    54.5 / 55.1 ms at K = 8 and 84.8 against 86.2 ms at K = 16, in both orders on one H100
    (docs/bench_speed_vae_layout_h100.json and _r2.json).
    """
    if fast.channels_last != "auto" or fast.compile == "auto":
        return fast
    compiled = fast.compile != "off"
    return dataclasses.replace(fast, channels_last=compiled, vae_channels_last=False if compiled else None)


def auto_compile_for_run(teacher_cfg: Any, steps: int) -> Any:
    """``teacher_cfg`` with ``compile=auto`` turned ``off`` for a run of fewer than
    :data:`AUTO_COMPILE_MIN_STEPS` steps (logged); otherwise ``teacher_cfg`` itself.

    Runs too short to win back the compile time (configs/gaussians_sd21.yaml's 1,000 steps, the CPU
    demo) start at once; long runs (configs/sd21.yaml's 10,000) keep ``auto``, which the teacher
    resolves by its U-Net's size (:func:`resolve_auto_compile`). The given config is not changed.
    """
    if compile_mode(getattr(teacher_cfg, "compile", "off")) != "auto" or steps >= AUTO_COMPILE_MIN_STEPS:
        return teacher_cfg
    shorter = copy.deepcopy(teacher_cfg)
    shorter.compile = "off"
    logger.info("teacher: compile=auto -> off for a %d-step run (auto compiles runs of %d steps or more)",
                steps, AUTO_COMPILE_MIN_STEPS)
    return shorter


def compile_mode(value: Any) -> str:
    """``teacher.compile`` → ``auto`` or one of :data:`COMPILE_MODES` (``true``/``false``: full/off)."""
    if isinstance(value, bool):
        return "full" if value else "off"
    text = str(value).lower()
    text = {"true": "full", "on": "full", "false": "off", "none": "off"}.get(text, text)
    if text not in COMPILE_MODES + ("auto",):
        raise ValueError(f"teacher.compile is '{value}'; expected one of auto, {', '.join(COMPILE_MODES)}")
    return text


def resolve_auto_compile(fast: FastPaths, unet: torch.nn.Module) -> FastPaths:
    """``compile=auto`` → ``full`` for a U-Net of at least :data:`AUTO_COMPILE_MIN_PARAMETERS`
    parameters, ``off`` for a smaller one (logged either way); other modes are returned as given.
    ``channels_last=auto`` then follows the compile (:func:`_auto_layout`): the U-Net in NHWC with
    one, NCHW without.

    Why full with channels-last tensors: measured on one H100 at SD 2.1-base scale
    (docs/bench_speed_ab_h100.json), against the eager teacher with its CUDA graph, the step took
    54.1 against 74.6 ms at K = 8, 28.7 against 40.0 at K = 1 and 85.7 against 116.5 at K = 16;
    a cold compile costs 40–60 s per K, won back after about 3,000 steps. Eager, channels-last
    tensors are slower (GroupNorm has no fast NHWC kernel; Inductor generates its own). Earlier,
    without channels-last (docs/bench_compile_h100.json), the regional compile started in 59 s for
    90 ms steps and the full one in 86 s for 85–89 ms against 104 eager.
    """
    mode = fast.compile
    if mode == "auto":
        parameters = sum(p.numel() for p in unet.parameters())
        mode = "full" if parameters >= AUTO_COMPILE_MIN_PARAMETERS else "off"
        logger.info("teacher: compile=auto -> %s (U-Net of %.1f M parameters; auto compiles from %.0f M)",
                    mode, parameters / 1e6, AUTO_COMPILE_MIN_PARAMETERS / 1e6)
    if mode == fast.compile and fast.channels_last != "auto":
        return fast
    return _auto_layout(dataclasses.replace(fast, compile=mode))
