"""When to stop a run without ground truth: once more steps no longer change what it renders.

Every ``train.converge_check_every`` steps the scene is rendered from :data:`PROBE_VIEWS` fixed
cameras (:func:`probe_cameras`) at :data:`PROBE_RESOLUTION` pixels: albedo shading, no generator (so
the render is deterministic and draws from no random stream), the scene in eval mode, no grad. With
``A_k`` the probe opacity images of check k and ``P_k = rgb − (1 − A_k)·background`` their
premultiplied (foreground) colour, summed over all probe pixels::

    shape change   d_k = Σ|A_k − A_{k−1}| / Σ max(A_k, A_{k−1})  =  1 − Σ min(A_k, A_{k−1}) / Σ max(A_k, A_{k−1})
    colour change  c_k = Σ|P_k − P_{k−1}| / (3 · Σ max(A_k, A_{k−1}))
    change         s_k = max(d_k, c_k)

``d_k`` is one minus the soft IoU of the two opacity image sets (the fraction of the silhouette that
moved), ``c_k`` the mean colour change per channel over the same area; both are scale-free, so one
tolerance serves small and large objects. The rule (:class:`ConvergenceRule`): the run has converged
at check k when ``s_j < tolerance`` for the last ``patience`` checks j ≤ k in a row and at least
``min_steps`` steps were taken. The first check has no previous images and counts as a change.

Nothing here touches a random generator, so a run with the detector on trains bit for bit as one
with it off up to the step it stops at; the detector's state (the previous probe images and the
count) goes into the checkpoint, so a resumed run stops at the same step as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from carv3d.cameras import Cameras, make_cameras

PROBE_VIEWS = 8  # azimuths k·45°, elevations alternating 15° and 45°
PROBE_ELEVATIONS = (15.0, 45.0)  # degrees
PROBE_RESOLUTION = 32  # pixels per side: a change signal, not a picture; 8 × 32² rays cost less than a training step's render


def probe_cameras(distance: float, fovy_deg: float, device: torch.device | str = "cpu") -> Cameras:
    """The fixed probe views: camera k at azimuth ``k · 45°`` and elevation ``PROBE_ELEVATIONS[k mod 2]``,
    at ``distance`` from the centre with vertical field of view ``fovy_deg`` (the trainer passes the
    middle of ``camera.distance_range`` and ``camera.fovy_range``: the distance the teacher saw)."""
    k = torch.arange(PROBE_VIEWS, dtype=torch.float32)
    elevation = torch.tensor(PROBE_ELEVATIONS, dtype=torch.float32)[k.long() % len(PROBE_ELEVATIONS)]
    full = torch.ones(PROBE_VIEWS)
    return make_cameras(elevation, k * (360.0 / PROBE_VIEWS), distance * full, fovy_deg * full).to(device)


@dataclass
class ProbeImages:
    """One check's probe renders: opacity (V, 1, H, W) and premultiplied colour (V, 3, H, W), float32."""

    opacity: torch.Tensor
    colour: torch.Tensor


@torch.no_grad()
def render_probes(scene: Any, cameras: Cameras, resolution: int = PROBE_RESOLUTION) -> ProbeImages:
    """Render the probes: eval mode, albedo, no generator (deterministic, no random draws); the
    scene's train/eval mode is restored afterwards."""
    was_training = scene.training
    scene.eval()
    try:
        out = scene.render(cameras, generator=None, shading="albedo", height=resolution, width=resolution)
    finally:
        scene.train(was_training)
    opacity = out.opacity.float()
    colour = out.rgb.float() - (1.0 - opacity) * out.background.float()
    return ProbeImages(opacity.clone(), colour.clone())


def probe_change(previous: ProbeImages, current: ProbeImages) -> dict[str, float]:
    """``shape`` d, ``colour`` c and ``change`` s = max(d, c) between two checks (module docstring).
    Both images empty (Σ max A = 0): no change."""
    union = torch.maximum(previous.opacity, current.opacity).sum()
    if float(union) <= 0.0:
        return {"shape": 0.0, "colour": 0.0, "change": 0.0}
    shape = float((current.opacity - previous.opacity).abs().sum() / union)
    colour = float((current.colour - previous.colour).abs().sum() / (3.0 * union))
    return {"shape": shape, "colour": colour, "change": max(shape, colour)}


@dataclass
class ConvergenceRule:
    """The stopping rule on the change signal alone (no rendering: benchmarks replay it on recorded signals).

    ``update(step, s)`` with ``still`` the checks in a row with ``s < tolerance`` (reset to 0 by a
    check at or above it, or without a signal, ``s = None``) returns True once
    ``still ≥ patience`` and ``step ≥ min_steps``.
    """

    tolerance: float
    patience: int
    min_steps: int
    still: int = 0

    def update(self, step: int, change: Optional[float]) -> bool:
        self.still = self.still + 1 if change is not None and change < self.tolerance else 0
        return self.still >= self.patience and step >= self.min_steps


def first_stop(steps: list[int], changes: list[Optional[float]], tolerance: float, patience: int,
               min_steps: int) -> Optional[int]:
    """The step at which :class:`ConvergenceRule` fires on a recorded sequence of checks, or None."""
    rule = ConvergenceRule(tolerance, patience, min_steps)
    for step, change in zip(steps, changes):
        if rule.update(step, change):
            return step
    return None


@dataclass
class ConvergenceCheck:
    """What one check measured. ``change`` etc. are None at the first check (nothing to compare)."""

    step: int
    change: Optional[float]
    shape: Optional[float]
    colour: Optional[float]
    still: int
    converged: bool
    seconds: float

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl fields of this check."""
        row = {"convergence_still_checks": float(self.still), "convergence_probe_seconds": self.seconds}
        if self.change is not None:
            row.update(convergence_change=self.change, convergence_shape_change=float(self.shape),
                       convergence_colour_change=float(self.colour))
        if self.converged:
            row["converged"] = 1.0
        return row


class ConvergenceDetector:
    """The rule of the module docstring, applied to a live scene every ``check_every`` steps.

    Args:
        check_every, tolerance, patience, min_steps: ``train.converge_*`` (see :mod:`carv3d.config`).
        cameras: the probe views (:func:`probe_cameras`).
    """

    def __init__(self, check_every: int, tolerance: float, patience: int, min_steps: int, cameras: Cameras):
        self.check_every = int(check_every)
        self.rule = ConvergenceRule(float(tolerance), int(patience), int(min_steps))
        self.cameras = cameras
        self.previous: Optional[ProbeImages] = None
        self.checks = 0
        self.last_change: Optional[float] = None
        self.stopped_at: Optional[int] = None
        self.probe_seconds = 0.0  # all probe renders of the run (not training time)

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device) -> "ConvergenceDetector":
        """From the resolved config: ``cfg.train.converge_*`` and the middle of the camera ranges."""
        train, camera = cfg.train, cfg.camera
        cameras = probe_cameras(0.5 * sum(camera.distance_range), 0.5 * sum(camera.fovy_range), device)
        return cls(train.converge_check_every, train.converge_tolerance, train.converge_patience,
                   train.converge_min_steps, cameras)

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def check(self, scene: Any, step: int) -> ConvergenceCheck:
        """Render the probes at ``step``, compare with the last check, apply the rule."""
        started = time.perf_counter()
        current = render_probes(scene, self.cameras)
        change = probe_change(self.previous, current) if self.previous is not None else None
        self.previous = current
        self.checks += 1
        self.last_change = None if change is None else change["change"]
        converged = self.rule.update(step, self.last_change)
        if converged:
            self.stopped_at = step
        self.probe_seconds += time.perf_counter() - started
        return ConvergenceCheck(step, self.last_change, None if change is None else change["shape"],
                                None if change is None else change["colour"], self.rule.still, converged,
                                self.probe_seconds)

    def restart(self) -> None:
        """Continue past a stop (a resumed run that had converged): the count starts again."""
        self.stopped_at = None
        self.rule.still = 0

    def summary(self) -> dict[str, Any]:
        """For run.json: the rule, where it stopped (None: it did not), and what the probes cost."""
        return {"converged_at": self.stopped_at, "checks": self.checks, "last_change": self.last_change,
                "still_checks": self.rule.still, "probe_seconds": round(self.probe_seconds, 3),
                "check_every": self.check_every, "tolerance": self.rule.tolerance,
                "patience": self.rule.patience, "min_steps": self.rule.min_steps}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        previous = self.previous
        return {"previous_opacity": None if previous is None else previous.opacity.cpu(),
                "previous_colour": None if previous is None else previous.colour.cpu(),
                "still": self.rule.still, "checks": self.checks, "last_change": self.last_change,
                "stopped_at": self.stopped_at, "probe_seconds": self.probe_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.cameras.c2w.device
        opacity, colour = state.get("previous_opacity"), state.get("previous_colour")
        self.previous = None if opacity is None else ProbeImages(opacity.to(device), colour.to(device))
        self.rule.still = int(state.get("still", 0))
        self.checks = int(state.get("checks", 0))
        self.last_change = state.get("last_change")
        self.stopped_at = state.get("stopped_at")
        self.probe_seconds = float(state.get("probe_seconds", 0.0))
