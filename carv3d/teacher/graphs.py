"""The functions a teacher calls for its U-Net and its VAE encoder, fast paths applied; CUDA graphs.

The teacher is frozen and a step calls its U-Net at a handful of fixed shapes (one per K), so its
forward can be recorded once per shape and replayed (``teacher.cuda_graph``): :class:`CapturedUNet`
records ``unet(sample, t, encoder_hidden_states)`` into a ``torch.cuda.CUDAGraph`` the first time a
shape is seen (after two warm-up calls on a side stream, as PyTorch's docs prescribe) and afterwards
copies the inputs into the graph's static buffers and replays it: one launch instead of hundreds, no
Python in the U-Net. All graphs share one memory pool (they never run concurrently and their output
is copied out before the next replay).

:func:`build_unet_call` and :func:`build_encode_call` assemble what a
:class:`~carv3d.teacher.fast.FastPaths` asks for: channels-last inputs, the compile
(:mod:`carv3d.teacher.compiling`) and, around it, the CUDA graph (the two compose: the compiled
kernels are what gets recorded). With no fast path each is exactly the eager call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from carv3d.log import logger
from carv3d.teacher.compiling import (CompileWhenSettled, batch_dynamic, compile_regions, eager_under_dispatch_modes,
                                      unet_input_key)
from carv3d.teacher.fast import FastPaths


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

    _key = staticmethod(unet_input_key)

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
