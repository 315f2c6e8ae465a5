"""`carv3d variance`: what each estimator buys, measured at a frozen scene.

For every estimator of a grid — (R, K) pairs × timestep methods — draw M parameter-space gradients
ĝ at the same frozen parameters θ, and report

    Var  = tr Cov(ĝ) = Σ_i Var(ĝ_i)        (Welford, over all field parameters)
    cost = median wall-clock seconds per ĝ (render + encode + teacher + backward, synchronised);
           with ``clock="cpu"`` (CPU devices only) the process's CPU seconds instead, which other work
           on a shared machine does not inflate (run single-threaded: spin-waiting threads count)
    ECM  = (Var_base · cost_base) / (Var · cost)     base: uniform t, R = 2, K = 1
    RE   = Var_uniform(R, K) / Var                   same (R, K), uniform independent t

A guidance that trains a part of its own each step (VSD's LoRA) pays that training in every training
step, once per render: the cost of each draw includes it (the step runs the guidance's update and
the guidance's state is put back untimed afterwards, so every draw sees the same fixed LoRA), and
each row reports the median seconds of it (``guidance_training_seconds``).
    bias z = (‖d‖² − Var/M) / (sqrt(2 Σ_i Var_i²) / M),   d = mean − ref

With ``--window W`` each row also reports the variance of the mean of W consecutive draws, times W:

    Var_W = W · tr Cov( (1/W) Σ_{j<W} ĝ_{nW+j} )

which equals Var for independent draws and is smaller when consecutive draws are negatively
correlated — what camera strata that continue across steps do (a cycle of S strata over S steps).
Training averages consecutive gradients too (Adam's moments), so Var_W is the number that shows
that gain; a single-draw Var cannot.

where ref is the pooled mean of all draws of all estimators (all are unbiased for the same
expectation, so pooling gives the most precise reference). For an unbiased estimator d has mean 0
and covariance ≈ Cov/M, so ‖d‖² has mean Var/M and (with a diagonal covariance) standard deviation
sqrt(2 Σ Var_i²)/M: the bias z is then of order ±1 (a little negative, because the estimator's own
draws are part of the reference); a bias b adds ‖b‖² to the numerator and grows linearly in M.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from carv3d.errors import CheckpointError
from carv3d.estimator import build_estimator
from carv3d.io import atomic_path

# Timestep methods: (proposal, stratified t). "carv" adds camera stratification across renders.
METHODS: dict[str, dict[str, Any]] = {
    "uniform": {"proposal": "uniform", "stratified": False},
    "is": {"proposal": "teacher-weight", "stratified": False},
    "stratified": {"proposal": "uniform", "stratified": True},
    "is+stratified": {"proposal": "teacher-weight", "stratified": True},
    "adaptive": {"proposal": "adaptive", "stratified": True},
}
# The paper's baseline (2, 1), render reuse at R = 1, and the carv preset's own R = 2 with K = 16.
DEFAULT_RK = ((2, 1), (1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (2, 16))
BASELINE = ("uniform", 2, 1)
# What a gradient's cost is read from: wall-clock seconds, or this process's CPU seconds (CPU devices).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class GradientStats:
    """Running mean and variance of flattened gradients (Welford), plus the costs."""

    count: int = 0
    mean: Optional[torch.Tensor] = None
    m2: Optional[torch.Tensor] = None
    seconds: list[float] = dc_field(default_factory=list)
    guidance_seconds: list[float] = dc_field(default_factory=list)

    def update(self, grad: torch.Tensor, seconds: float, guidance_seconds: float = 0.0) -> None:
        self.guidance_seconds.append(guidance_seconds)
        grad = grad.double()
        self.count += 1
        if self.mean is None:
            self.mean = grad.clone()
            self.m2 = torch.zeros_like(grad)
        else:
            delta = grad - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (grad - self.mean)
        self.seconds.append(seconds)

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)

    @property
    def trace(self) -> float:
        return float(self.variance.sum())

    @property
    def cost(self) -> float:
        return _median_after_first(self.seconds)

    @property
    def guidance_cost(self) -> float:
        """Median seconds of the guidance's own training per draw (0 for SDS and CSD)."""
        return _median_after_first(self.guidance_seconds) if self.guidance_seconds else 0.0


def _median_after_first(seconds: list[float]) -> float:
    values = sorted(seconds[1:] or seconds)  # the first draw of an estimator warms caches
    return values[len(values) // 2]


class WindowMeans:
    """Variance of the means of consecutive windows of W draws, scaled by W (see the module docstring)."""

    def __init__(self, window: int):
        self.window = int(window)
        self.stats = GradientStats()
        self._sum: Optional[torch.Tensor] = None
        self._filled = 0

    def update(self, grad: torch.Tensor) -> None:
        grad = grad.double()
        self._sum = grad.clone() if self._sum is None else self._sum + grad
        self._filled += 1
        if self._filled == self.window:
            self.stats.update(self._sum / self.window, 0.0)
            self._sum, self._filled = None, 0

    @property
    def scaled_trace(self) -> Optional[float]:
        """W · tr Cov(window mean), or None with fewer than two complete windows."""
        return self.window * self.stats.trace if self.stats.count >= 2 else None


class FrozenScene:
    """The training step (:class:`carv3d.step.DistillationStep`) at fixed parameters: a gradient oracle.

    Each grid cell swaps in its own estimator and camera sampler; the scene, teacher and the
    step's generators are shared, and nothing updates the scene (no optimiser, no scene hooks).

    ``guidance_training_cost``: each draw also runs the guidance's own training step (VSD's LoRA),
    timed with the draw as a training step pays it, and then puts the guidance's state back
    (untimed), so every draw sees the same fixed guidance. False: the training is left out of the
    cost (what ``carv3d variance`` measured before; an equal-wall-clock comparison needs it in).
    """

    def __init__(self, cfg: DictConfig, device: torch.device, scene_state: Optional[dict] = None, seed: int = 0,
                 guidance_state: Optional[dict] = None, guidance_training_cost: bool = True, clock: str = "wall"):
        from carv3d.estimator.timing import StepTimer
        from carv3d.step import DistillationStep

        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
        if clock == "cpu" and device.type != "cpu":
            raise ValueError("clock 'cpu' (the process's CPU time) measures CPU work only; on a GPU use 'wall'")
        self.cfg, self.device, self.seed, self.clock = cfg, device, seed, clock
        self.guidance_training_cost = bool(guidance_training_cost)
        self._guidance_snapshot: Optional[dict] = None
        self.last_guidance_seconds = 0.0
        self.step = DistillationStep.from_config(cfg, device, scene_state=scene_state)
        if clock == "cpu":
            self.step.timer = StepTimer(device, clock=CLOCKS[clock])
        self.step.host_generator.manual_seed(seed)
        self.step.device_generator.manual_seed(seed + 1)
        self.teacher = self.step.teacher
        self.params = self.step.parameters()
        # The guidance's trainable parts (VSD's LoRA) as the run left them; held fixed while measuring.
        self.guidance = self.step.estimator.guidance
        if guidance_state:
            try:
                self.guidance.load_state_dict(guidance_state)
            except (KeyError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"the run's guidance state does not fit guidance.type {cfg.guidance.type} "
                                      f"({str(err).splitlines()[0][:200]}).") from None

    def warm_up_guidance(self, steps: int) -> None:
        """Train the guidance's own parts (VSD's LoRA) for ``steps`` steps at the frozen scene, so that
        an initial scene is measured with a particle model fitted to its renders (the scene does not move)."""
        self._guidance_snapshot = None
        for i in range(int(steps)):
            self.step(i, frozen=True, update_guidance=True)
            for p in self.params:
                p.grad = None

    @property
    def trains_guidance(self) -> bool:
        """Whether a draw runs (and pays) the guidance's own training: asked for, and the guidance has a
        trainable state (VSD; SDS and CSD have none)."""
        return self.guidance_training_cost and bool(self.guidance.state_dict())

    def camera_sampler(self, stratified_cameras: bool):
        from carv3d.cameras import CameraSampler

        sampler = CameraSampler.from_config(self.cfg.camera)
        sampler.stratified = stratified_cameras
        return sampler

    def gradient(self, estimator, cameras_sampler, n_renders: int, step: int) -> tuple[torch.Tensor, float]:
        """One parameter-space gradient draw and its synchronised wall-clock cost (with the guidance's
        own training step when :attr:`trains_guidance`; its seconds alone: :attr:`last_guidance_seconds`)."""
        train_guidance = self.trains_guidance
        if train_guidance and self._guidance_snapshot is None:
            self._guidance_snapshot = copy.deepcopy(self.guidance.state_dict())
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.step.timer.reset()
        now = CLOCKS[self.clock]
        sync()
        started = now()
        self.step.estimator, self.step.camera_sampler = estimator, cameras_sampler
        for p in self.params:
            p.grad = None
        self.step(step, n_renders, frozen=True, update_guidance=train_guidance)
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        sync()
        seconds = now() - started
        self.last_guidance_seconds = self.step.timer.seconds("particle") if train_guidance else 0.0
        if train_guidance:  # the same fixed guidance for the next draw (a copy: the optimiser updates in place)
            self.guidance.load_state_dict(copy.deepcopy(self._guidance_snapshot))
        return grad.detach(), seconds


def make_estimator(cfg: DictConfig, scene: FrozenScene, method: str, R: int, K: int):
    est_cfg = OmegaConf.merge(cfg.estimator, {"upstream_samples": R, "noise_draws": K, **METHODS[method]})
    estimator = build_estimator(est_cfg, scene.teacher.alphas_cumprod, scene.device, cfg.guidance,
                                getattr(scene.guidance, "particle", None))
    estimator.guidance = scene.guidance  # every cell shares the one guidance (VSD: the same fixed LoRA)
    return estimator


def measure(cfg: DictConfig, scene: FrozenScene, methods: Sequence[str], rk: Sequence[tuple[int, int]], draws: int,
            pilot: int, camera_stratified: bool = False, progress: bool = True, window: int = 0) -> dict[str, Any]:
    """Run the grid and return the report (see the module docstring); ``window`` ≥ 2 adds Var_W."""
    runs: dict[tuple[str, int, int], GradientStats] = {}
    windows: dict[tuple[str, int, int], WindowMeans] = {}
    jobs = [(m, r, k) for (r, k) in rk for m in methods]
    if BASELINE not in jobs:
        jobs.insert(0, BASELINE)
    for m in {m for m, _, _ in jobs}:
        for r, k in {(r, k) for _, r, k in jobs}:
            if ("uniform", r, k) not in jobs:
                jobs.append(("uniform", r, k))
    total = sum(draws + (pilot if m == "adaptive" else 0) for m, _, _ in jobs)
    bar = tqdm(total=total, desc="carv3d variance", unit="grad", disable=not progress, dynamic_ncols=True)
    cameras: dict[tuple[str, int, int], str] = {}
    for method, R, K in jobs:
        estimator = make_estimator(cfg, scene, method, R, K)
        # Camera strata are part of CARV (the carv preset's camera.stratified): the plain rows keep
        # independent cameras, so "without CARV" is the plain estimator whatever --camera-stratified says.
        stratify = camera_stratified and draws_use_carv(method, K)
        cameras[(method, R, K)] = "stratified" if stratify else "independent"
        sampler = scene.camera_sampler(stratify)
        step = 0
        if method == "adaptive":  # learn the proposal at this θ, then freeze it
            estimator.adaptive_refresh_every = max(1, pilot // 4)
            for _ in range(pilot):
                scene.gradient(estimator, sampler, R, step)
                step += 1
                bar.update(1)
            estimator.adaptive_refresh_every = 10**9
        stats, windowed = GradientStats(), WindowMeans(window) if window >= 2 else None
        for _ in range(draws):
            grad, seconds = scene.gradient(estimator, sampler, R, step)
            stats.update(grad, seconds, getattr(scene, "last_guidance_seconds", 0.0))
            if windowed is not None:
                windowed.update(grad)
            step += 1
            bar.update(1)
        runs[(method, R, K)] = stats
        if windowed is not None:
            windows[(method, R, K)] = windowed
        bar.set_postfix(method=method, R=R, K=K, var=f"{stats.trace:.3g}")
    bar.close()

    total_count = sum(s.count for s in runs.values())
    reference = sum(s.mean * s.count for s in runs.values()) / total_count
    base = runs[BASELINE]
    rows = []
    for (method, R, K), s in runs.items():
        var_i = s.variance
        distance2 = float((s.mean - reference).pow(2).sum())
        spread = float(var_i.pow(2).sum().mul(2).sqrt()) / s.count
        uniform = runs[("uniform", R, K)]
        rows.append({
            "method": method, "upstream_samples": R, "noise_draws": K, "draws": s.count, "cameras": cameras[(method, R, K)],
            "variance": s.trace, "cost_seconds": s.cost, "guidance_training_seconds": s.guidance_cost,
            "ecm": (base.trace * base.cost) / (s.trace * s.cost) if s.trace > 0 else math.nan,
            "relative_efficiency": uniform.trace / s.trace if s.trace > 0 else math.nan,
            "bias_z": (distance2 - s.trace / s.count) / spread if spread > 0 else math.nan,
            **({"window_variance": windows[(method, R, K)].scaled_trace,
                "windows": windows[(method, R, K)].stats.count} if (method, R, K) in windows else {}),
        })
    rows.sort(key=lambda r: (r["upstream_samples"], r["noise_draws"], list(METHODS).index(r["method"])))
    report = {
        "guidance": str(getattr(cfg.guidance, "type", "sds")),
        "guidance_training_in_cost": bool(getattr(scene, "trains_guidance", False)),
        "clock": getattr(scene, "clock", "wall"),
        "reference_gradient_norm": float(reference.norm()),
        "n_parameters": int(reference.numel()),
        "baseline": {"method": BASELINE[0], "upstream_samples": BASELINE[1], "noise_draws": BASELINE[2]},
        "camera_stratified": camera_stratified,
        "window": window if window >= 2 else None,
        "rows": rows,
        "variance_split": variance_split(rows),
    }
    report["with_and_without_carv"] = with_and_without_carv(rows)
    return report


def draws_use_carv(method: str, noise_draws: int) -> bool:
    """Timestep method ``method`` with K = ``noise_draws`` is "with CARV" when it uses any part of it:
    more than one draw per render, or a timestep proposal or stratification other than uniform
    independent t. "Without CARV" is the plain estimator, uniform t with K = 1 (R = 1 is
    threestudio's SDS and VSD; R = 2 the paper's baseline and the ECM's)."""
    return method != "uniform" or int(noise_draws) > 1


def uses_carv(row: dict[str, Any]) -> bool:
    """A row of the report: :func:`draws_use_carv` of its method and K."""
    return draws_use_carv(row["method"], row["noise_draws"])


def with_and_without_carv(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best row with CARV (highest ECM) against the plain rows without it: its ECM against uniform
    t at R = 2, K = 1 (the report's baseline) and, when measured, against uniform t at R = 1, K = 1."""
    plain = {int(r["upstream_samples"]): r for r in rows if not uses_carv(r)}
    carv = [r for r in rows if uses_carv(r) and math.isfinite(r["ecm"])]
    if not carv:
        return {}
    best = max(carv, key=lambda r: r["ecm"])
    out: dict[str, Any] = {"best": dict(best)}
    for R, row in sorted(plain.items()):
        out[f"ecm_vs_uniform_R{R}_K1"] = (row["variance"] * row["cost_seconds"]) / (best["variance"] * best["cost_seconds"])
    return out


def variance_split(rows: list[dict[str, Any]]) -> dict[str, float]:
    """σ_b², σ_w² of the uniform estimator from Var(R, K) = σ_b²/R + σ_w²/(R·K), least squares over
    every measured (R, K) of it (``{}`` when they cannot separate the two).

    ``ecm_bound_from_reuse`` = 1 + σ_w²/σ_b² is what reuse alone can buy against (R, K) = (2, 1):
    the ECM of K → ∞ when extra teacher draws are free. It is reached by R = 1 when renders dominate
    the cost (it pays one render where the baseline pays two), and by R = 2 when the step is
    launch-bound (cost flat in R and K, as on the H200 with the embedded teacher, where R = 1 tops
    out at half of it). Past it only a smaller σ_b² helps (camera strata across the renders).
    """
    # the two-level model holds for independent cameras; strata change the between-render term
    points = [(r["upstream_samples"], r["noise_draws"], r["variance"]) for r in rows
              if r["method"] == "uniform" and r.get("cameras", "independent") == "independent"]
    A = torch.tensor([[1.0 / R, 1.0 / (R * K)] for R, K, _ in points], dtype=torch.float64).reshape(-1, 2)
    if len(points) < 2 or torch.linalg.matrix_rank(A) < 2:
        return {}
    ys = torch.tensor([v for _, _, v in points], dtype=torch.float64)
    sigma_b2, sigma_w2 = torch.linalg.lstsq(A, ys.unsqueeze(1)).solution.squeeze(1).tolist()
    return {"sigma_b2": sigma_b2, "sigma_w2": sigma_w2,
            "ecm_bound_from_reuse": 1.0 + sigma_w2 / sigma_b2 if sigma_b2 > 0 else math.inf}


def plot(report: dict[str, Any], path: Path) -> None:
    """Log-log variance against cost per gradient, one line per method, each (R, K) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for method in METHODS:
        rows = [r for r in report["rows"] if r["method"] == method and r["upstream_samples"] == 1]
        if not rows:
            continue
        ax.plot([r["cost_seconds"] for r in rows], [r["variance"] for r in rows], "o-", label=method)
        for r in rows:
            ax.annotate(f"K={r['noise_draws']}", (r["cost_seconds"], r["variance"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for r in report["rows"]:
        if r["upstream_samples"] > 1:
            ax.plot(r["cost_seconds"], r["variance"], "k*", markersize=10)
            ax.annotate(f"{r['method']} R={r['upstream_samples']},K={r['noise_draws']}", (r["cost_seconds"], r["variance"]),
                        fontsize=7, xytext=(3, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per gradient")
    ax.set_ylabel("tr Cov of the parameter gradient")
    guidance = str(report.get("guidance", "sds"))
    ax.set_title(f"{GUIDANCE_NAMES.get(guidance, guidance)}: estimator variance against cost (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


FEW_DRAWS = 32  # below this many gradients per estimator, variances, bias z-scores and the split are noise


def mark_few_draws(report: dict[str, Any], threshold: int = FEW_DRAWS) -> dict[str, Any]:
    """Flag estimates whose draws are too few to trust: ``"few_draws": true`` on each such row and on
    the report (any row), with the threshold. Returns the report, changed in place."""
    for row in report.get("rows", []):
        row["few_draws"] = int(row["draws"]) < threshold
    report["few_draws"] = any(row["few_draws"] for row in report.get("rows", []))
    report["few_draws_threshold"] = threshold
    return report


def _split_line(split: dict[str, Any]) -> str:
    """σ_b², σ_w² and the ECM bound; a negative variance or an infinite bound (what a fit to noisy
    variances gives) is "n/a (too few draws)"."""
    na = "n/a (too few draws)"

    def variance(value: float) -> str:
        return f"{value:.4g}" if math.isfinite(value) and value >= 0 else na

    bound = split["ecm_bound_from_reuse"]
    usable = math.isfinite(bound) and split["sigma_b2"] > 0 and split["sigma_w2"] >= 0
    return (f"σ_b² ≈ {variance(split['sigma_b2'])}, σ_w² ≈ {variance(split['sigma_w2'])}, "
            f"ECM bound from reuse alone ≈ {f'{bound:.2f}' if usable else na}")


GUIDANCE_NAMES = {"sds": "SDS", "csd": "CSD", "vsd": "VSD"}


def title_line(report: dict[str, Any]) -> str:
    """What was measured: the guidance (and VSD's LoRA), with CARV against without it, and what the
    cost includes."""
    guidance = str(report.get("guidance", "sds"))
    name = GUIDANCE_NAMES.get(guidance, guidance)
    base = report.get("baseline") or {"method": BASELINE[0], "upstream_samples": BASELINE[1], "noise_draws": BASELINE[2]}
    line = (f"{name} (guidance.type {guidance}) with and without CARV: ECM against {name} without CARV "
            f"({base['method']} t, R = {base['upstream_samples']}, K = {base['noise_draws']})")
    lora = report.get("guidance_state_source")
    if lora:
        line += f"; LoRA: {lora}, held fixed"
    if report.get("guidance_training_in_cost"):
        line += "; cost includes the LoRA's training step, as in training"
    if report.get("clock") == "cpu":
        line += "; cost in CPU seconds of this process"
    return line


def carv_line(report: dict[str, Any]) -> str:
    """The best estimator with CARV against the plain ones without it ("" when the grid has none)."""
    best = (report.get("with_and_without_carv") or {}).get("best")
    if not best:
        return ""
    name = GUIDANCE_NAMES.get(str(report.get("guidance", "sds")), str(report.get("guidance", "sds")))
    parts = [f"{name} with CARV, best: {best['method']} R = {best['upstream_samples']}, K = {best['noise_draws']}: "
             f"ECM {best['ecm']:.2f} against {name} without CARV (uniform t, K = 1, R = 2)"]
    vs1 = report["with_and_without_carv"].get("ecm_vs_uniform_R1_K1")
    if vs1 is not None:
        parts.append(f"{vs1:.2f} against R = 1")
    return ", ".join(parts)


def format_table(report: dict[str, Any]) -> str:
    window = report.get("window")
    strata = bool(report.get("camera_stratified"))  # then say which rows had camera strata
    extra = (" cameras |" if strata else "") + (f" W·Var, W = {window} |" if window else "")
    lines = [title_line(report) + "\n",
             "| method | R | K | Var | ms/grad | ECM | RE | bias z |" + extra,
             "|---|---|---|---|---|---|---|---|" + ("---|" if strata else "") + ("---|" if window else "")]
    for r in report["rows"]:
        cell = f" {r.get('cameras', 'independent')} |" if strata else ""
        if window:
            cell += f" {r['window_variance']:.4g} |" if r.get("window_variance") is not None else " — |"
        lines.append(f"| {r['method']} | {r['upstream_samples']} | {r['noise_draws']} | {r['variance']:.4g} | "
                     f"{1000 * r['cost_seconds']:.1f} | {r['ecm']:.2f} | {r['relative_efficiency']:.2f} | {r['bias_z']:.2f} |"
                     + cell)
    best = carv_line(report)
    if best:
        lines.append("\n" + best)
    split = report.get("variance_split") or {}
    if split:
        lines.append("\n" + _split_line(split))
    few = [r for r in report["rows"] if r.get("few_draws")]
    if few:
        threshold = report.get("few_draws_threshold", FEW_DRAWS)
        lines.append(f"\ncaveat: {min(int(r['draws']) for r in few)} draws per estimator (< {threshold}): Var, ECM, RE "
                     f"and above all the bias z-scores and the σ split are too noisy to trust; rerun with "
                     f"--draws {threshold} or more.")
    return "\n".join(lines)
