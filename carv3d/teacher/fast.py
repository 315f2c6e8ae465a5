"""Fast paths for a frozen diffusers teacher on CUDA: CUDA graphs, channels_last, compile, SDPA.

At Stable Diffusion scale the U-Net call of a training step is launch-bound up to K ≈ 8 (REFERENCE
§4: 8 CFG draws cost 1.4× one draw): hundreds of small kernels whose launches cost more than their
arithmetic. The teacher is frozen and a step calls it at a handful of fixed shapes (one per K), so
its forward can be recorded once per shape and replayed:

- ``cuda_graph``: :class:`CapturedUNet` records ``unet(sample, t, encoder_hidden_states)`` into a
  ``torch.cuda.CUDAGraph`` the first time a shape is seen (after two warm-up calls on a side stream,
  as PyTorch's docs prescribe) and afterwards copies the inputs into the graph's static buffers and
  replays it: one launch instead of hundreds, no Python in the U-Net. All graphs share one memory
  pool (they never run concurrently and their output is copied out before the next replay).
- ``channels_last``: NHWC weights and activations, the layout cuDNN's fp16/bf16 convolution kernels
  want (avoids NCHW↔NHWC transposes around every convolution). Applies to the U-Net and the VAE.
  ``auto`` turns it on with a compile only: eager, GroupNorm's NHWC kernels made it slower.
  ``unet`` converts the U-Net alone and leaves the VAE NCHW: the compiled encoder's backward with
  channels-last tensors copies its full-resolution gradients between layouts (31 copies, 2.8 ms a
  K = 8 step; docs/profile_compiled_cl_links_h100.json).
- ``compile``: ``torch.compile`` (fixed shapes) of the U-Net — ``full``: the whole U-Net as one
  graph; ``regional``: only its repeated blocks (diffusers' ``compile_repeated_blocks``: the
  transformer blocks, compiled once and reused by every instance, which cuts the compile time) —
  and of the VAE encoder, whose backward is compiled too (training differentiates through it).
  Composes with the CUDA graph: the compiled kernels are what gets recorded. A full compile starts
  each U-Net shape eagerly and compiles it after ``teacher.compile_after`` calls
  (:class:`CompileWhenSettled`), so the K values auto-K only passes through are never compiled. Compiled artefacts
  persist across processes in Inductor's FX-graph and AOT-autograd caches under
  ``teacher.compile_cache`` (:func:`enable_compile_cache`), so a machine compiles each shape's
  kernels once; tracing still runs in every process.
- fused attention: diffusers runs attention through ``F.scaled_dot_product_attention``
  (``AttnProcessor2_0``) on torch ≥ 2; :func:`attention_summary` reports which processors a model
  uses so the startup log shows it. A head wider than the fused kernels cover (the VAE encoder's
  512-channel one) gets SDPA's math kernel (:class:`MathSDPAttnProcessor`).

Everything here is CUDA only. On another device each path is skipped and the reason logged; the
eager code path is then exactly the one without fast paths.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from carv3d.log import logger

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
    if mode != "off":
        cache = enable_compile_cache(getattr(teacher_cfg, "compile_cache", "auto"))
        logger.info("teacher: compile=%s, compile cache %s", mode, cache or "torch's default (this boot only)")
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


def default_compile_cache() -> Path:
    """``$CARV3D_CACHE/torch_compile``, else ``$XDG_CACHE_HOME/carv3d/torch_compile``, else ``~/.cache/...``."""
    if os.environ.get("CARV3D_CACHE"):
        return Path(os.environ["CARV3D_CACHE"]) / "torch_compile"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "carv3d" / "torch_compile"


def enable_compile_cache(setting: Any = "auto") -> Optional[Path]:
    """Point Inductor's persistent caches at a folder that outlives the process (and /tmp).

    Inductor keeps compiled kernels in an FX-graph cache and, for training graphs, an
    AOT-autograd cache, keyed by the traced graph, the inputs' shapes/dtypes, the device and the
    torch version; both default to ``/tmp/torchinductor_<user>``, which a reboot or a fresh
    container empties. ``setting``: ``auto`` (:func:`default_compile_cache`), a folder, or ``""``
    to leave torch's default. An explicit ``TORCHINDUCTOR_CACHE_DIR`` in the environment wins.

    Returns:
        The cache folder in use, or None for torch's default.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    text = str(setting)
    # Inductor writes its /tmp default into the variable the first time anything asks for its cache
    # folder, so only a value other than that default is the user's own choice.
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and os.path.abspath(env) != os.path.abspath(default_cache_dir()):
        folder: Optional[Path] = Path(env)
    elif text == "":
        folder = None
        if env:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")  # Inductor's default, as it was
    else:
        folder = default_compile_cache() if text == "auto" else Path(text).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by Inductor at each cache lookup
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return folder


def attention_summary(model: Optional[torch.nn.Module]) -> str:
    """Which attention processors a diffusers model uses, e.g. ``"AttnProcessor2_0 ×16 (SDPA)"``."""
    if model is None:
        return "no attention layers"
    # attn_processors is a ModelMixin property; a submodule (the VAE's encoder) is walked instead
    processors = list(getattr(model, "attn_processors", {}).values()) or [
        module.processor for module in model.modules() if hasattr(module, "processor") and hasattr(module, "set_processor")]
    if not processors:
        return "no attention layers"
    counts = Counter(type(p).__name__ for p in processors)
    parts = [f"{name} ×{n}" + (" (SDPA)" if "2_0" in name else " (SDPA, math kernel)" if "SDPA" in name.upper() else "")
             for name, n in sorted(counts.items())]
    return ", ".join(parts)


# Fused attention kernels cover heads of at most this many channels (FlashAttention-2's limit; the
# cuDNN kernels' too). A wider head falls to the memory-efficient kernel's generic variant.
FUSED_ATTENTION_MAX_HEAD_DIM = 256


class MathSDPAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with ``scaled_dot_product_attention`` held to its math kernel.

    For attention with one very wide head: the VAE's mid-block attends over all 64×64 latent
    positions with a single 512-channel head. No fused kernel covers 512 channels, so SDPA picks the
    memory-efficient kernel's generic variant, whose backward took 6.1 ms of an H100 step
    (docs/profile_h100.json: ``fmha_cutlassB_..._k65536``); the math kernel computes the same sums as
    two plain matrix products around a softmax (4096 × 4096 scores, 32 MB in fp16). Measured on one
    H100, the encoder's forward + backward at 512² went from 25.2 to 21.3 ms
    (docs/bench_vae_attention_h100.json). ``sdpa_kernel`` is traced by Dynamo, so the choice holds
    inside ``torch.compile`` too.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._inner = AttnProcessor2_0()

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The parameters are spelled out: diffusers passes a processor only the keywords it names.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def wide_head_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """diffusers ``Attention`` layers of ``model`` whose heads are wider than
    :data:`FUSED_ATTENTION_MAX_HEAD_DIM` channels (no fused kernel serves them)."""
    layers = []
    for module in model.modules():
        heads = getattr(module, "heads", None)
        inner = getattr(module, "inner_dim", None)
        if type(module).__name__ == "Attention" and heads and inner and inner // heads > FUSED_ATTENTION_MAX_HEAD_DIM:
            layers.append(module)
    return layers


def use_math_attention_for_wide_heads(model: torch.nn.Module) -> int:
    """Give each of ``model``'s :func:`wide_head_attention_layers` a :class:`MathSDPAttnProcessor`
    (when it runs diffusers' default ``AttnProcessor2_0``); returns how many it changed."""
    changed = 0
    for layer in wide_head_attention_layers(model):
        if type(layer.processor).__name__ == "AttnProcessor2_0":
            layer.set_processor(MathSDPAttnProcessor())
            changed += 1
    return changed


class _Graph:
    """One recorded U-Net call: static inputs, the graph, and its output buffer."""

    def __init__(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> None:
        self.sample = sample.clone()
        self.timestep = timestep.clone()
        self.hidden = hidden.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.output: Optional[torch.Tensor] = None


class CapturedUNet:
    """``unet(sample, t, encoder_hidden_states=...).sample`` replayed from CUDA graphs, one per shape.

    Call it like the U-Net's forward but with tensors only; it returns the ``.sample`` tensor (a
    fresh copy: the graph's output buffer is overwritten by the next replay). A shape whose capture
    fails (an unsupported op in a custom U-Net) is logged once and runs eagerly from then on.

    Args:
        forward: ``forward(sample, timestep, hidden) -> Tensor``, the (possibly compiled) U-Net call.
        max_graphs: keep at most this many shapes (auto-K visits a few K values; each graph holds
            its activations' memory in the shared pool).
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 max_graphs: int = 8) -> None:
        self.forward = forward
        self.max_graphs = int(max_graphs)
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: set[tuple] = set()
        self.pool: Any = None
        self.replays = 0

    @staticmethod
    def _key(sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> tuple:
        return (tuple(sample.shape), sample.dtype, sample.device, tuple(timestep.shape), timestep.dtype,
                tuple(hidden.shape), hidden.dtype)

    @torch.no_grad()
    def _capture(self, key: tuple, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> _Graph:
        entry = _Graph(sample, timestep, hidden)
        side = torch.cuda.Stream(device=sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side):  # warm-up: cuDNN/cuBLAS autotuning and lazy init happen here, not in the graph
            for _ in range(2):
                self.forward(entry.sample, entry.timestep, entry.hidden)
        torch.cuda.current_stream(sample.device).wait_stream(side)
        with torch.cuda.graph(entry.graph, pool=self.pool):
            entry.output = self.forward(entry.sample, entry.timestep, entry.hidden)
        if self.pool is None:
            self.pool = entry.graph.pool()
        logger.info("teacher: captured a CUDA graph of the U-Net for input %s", tuple(sample.shape))
        return entry

    def forget(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> bool:
        """Drop the graph recorded for these inputs' shape (True if there was one). With no graph
        left the pool handle goes too, so the pool's memory is freed once the graphs are."""
        dropped = self.graphs.pop(self._key(sample, timestep, hidden), None) is not None
        if not self.graphs:
            self.pool = None
        return dropped

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # A replayed graph returns a tensor with no autograd history, so a call that needs gradients runs eagerly.
        if not sample.is_cuda or (torch.is_grad_enabled() and sample.requires_grad):
            return self.forward(sample, timestep, hidden)
        # Capture and replay on the input's own GPU: torch.cuda.graph and its streams use the current device.
        with torch.cuda.device(sample.device):
            return self._graphed(sample, timestep, hidden)

    def _graphed(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        key = self._key(sample, timestep, hidden)
        if key in self.failed:
            return self.forward(sample, timestep, hidden)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                # Rare (K moved far). Drop the pool handle with its graphs: a new capture starts a new pool
                # instead of reusing the id of one whose last graph is gone.
                self.graphs.clear()
                self.pool = None
            try:
                entry = self._capture(key, sample, timestep, hidden)
            except Exception as err:  # noqa: BLE001 — any capture failure falls back to eager, logged
                self.failed.add(key)
                logger.warning("teacher: CUDA graph capture failed for input %s (%s: %s); running it eagerly",
                               tuple(sample.shape), type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
                torch.cuda.synchronize(sample.device)
                return self.forward(sample, timestep, hidden)
            self.graphs[key] = entry
        entry.sample.copy_(sample)
        entry.timestep.copy_(timestep)
        entry.hidden.copy_(hidden)
        entry.graph.replay()
        self.replays += 1
        assert entry.output is not None
        return entry.output.clone()


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
        key = CapturedUNet._key(sample, timestep, hidden)
        self.calls[key] += 1
        count = self.calls[key]
        if count <= self.after:
            return self.early(sample, timestep, hidden)
        if count == self.after + 1:
            logger.info("teacher: U-Net input %s held for %d calls; compiling it now (40-50 s at Stable "
                        "Diffusion scale)", tuple(sample.shape), self.after)
            forget = getattr(self.early, "forget", None)
            if forget is not None:
                forget(sample, timestep, hidden)
        return self.late(sample, timestep, hidden)


def build_unet_call(unet: torch.nn.Module, fast: FastPaths) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The function the teacher calls for one U-Net batch: ``(sample, t, hidden) -> prediction``.

    Applies ``channels_last`` to the U-Net's weights (in place) and to each input, then wraps the
    call in ``torch.compile`` and/or :class:`CapturedUNet` as ``fast`` says; a full compile with
    ``compile_after`` starts each shape eagerly (:class:`CompileWhenSettled`). With no fast path it
    is exactly ``unet(sample, t, encoder_hidden_states=hidden).sample``.
    """
    if fast.channels_last:
        unet.to(memory_format=torch.channels_last)

    def eager(sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if fast.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return unet(sample, timestep, encoder_hidden_states=hidden).sample

    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = eager
    if fast.compile == "full" and fast.dynamic_batch:
        call = eager_under_dispatch_modes(batch_dynamic(torch.compile(eager, dynamic=None)))
    elif fast.compile == "full":
        call = eager_under_dispatch_modes(torch.compile(eager, dynamic=False))
    elif fast.compile == "regional":
        compile_regions(unet)
        call = eager_under_dispatch_modes(eager)
    graphed = CapturedUNet if fast.cuda_graph else (lambda fn: fn)
    if fast.compile == "full" and fast.compile_after > 0:
        return CompileWhenSettled(graphed(eager), graphed(call), fast.compile_after)
    return graphed(call)


def build_encode_call(vae: torch.nn.Module, fast: FastPaths) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function the teacher calls to encode pixels: ``pixels (N, 3, S, S) -> posterior mean``.

    For diffusers' ``AutoencoderKL`` the posterior's moments are ``quant_conv(encoder(pixels))``
    (``_encode``) and its mean is their first half of channels, which is what
    ``vae.encode(pixels).latent_dist.mean`` returns; computed directly, without the distribution
    object (whose std and variance a training step never reads) and without tiling or slicing (a
    render is a few small images), so the call is plain tensor code that ``torch.compile`` traces
    whole, forward and backward. ``channels_last`` (applied to the VAE's weights by the teacher)
    also converts each input.
    """

    def eager(pixels: torch.Tensor) -> torch.Tensor:
        if fast.vae_nhwc:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        moments = vae.encoder(pixels)
        if getattr(vae, "quant_conv", None) is not None:
            moments = vae.quant_conv(moments)
        return moments.chunk(2, dim=1)[0]

    if fast.compile != "off":
        return eager_under_dispatch_modes(torch.compile(eager, dynamic=False))
    return eager


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
    teacher's calls are closures built by this module, one code object per kind of call, so one
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
