#!/usr/bin/env python
"""How often `train.stop_when_converged` stops too early: its false-stop rate on the embedded world.

    python scripts/bench_convergence.py --config configs/demo_cpu.yaml --steps 1000 --parallel 2 --out docs/bench_convergence_cpu.json
    python scripts/bench_convergence.py --device cuda --parallel 6 --seeds 0,1,2 --steps 10000 --out bench_convergence_gpu.json

For every world prompt × seed the config is trained for ``--steps`` steps without stopping. At every
``train.converge_check_every`` steps the run's own detector (:class:`carv3d.convergence.ConvergenceDetector`,
the probes a run with ``train.stop_when_converged=true`` renders) records its change signal, and the
live scene is evaluated against the world's ground truth (:func:`carv3d.world.evaluate.evaluate_scene`,
16 held-out views at 64 px, the prompted object only). Neither touches the training's random streams,
so the recorded run is the run a user would get, up to the step the rule stops it.

The rule (:func:`carv3d.convergence.first_stop`) is then replayed on the recorded signals: with the
config's tolerance, patience and min_steps (the headline), and on a grid of tolerances and patiences
(``grid``) to show the trade-off. A **false stop** is a stop whose silhouette IoU is more than
``--margin`` (default 0.02) below the IoU at the end of the long run; a run the rule never stops
is not a false stop (it saves nothing). Saved: the steps after the stop, and the training seconds
after it minus the probe seconds spent up to it.

The JSON is rewritten after every finished run (``carv3d.io.atomic_write_text``). ``--replay FILE``
trains nothing: it applies the rule of ``--config`` and the overrides (e.g. other defaults) to the runs
recorded in FILE and writes the report again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_PROMPTS = ("a red cube", "a green torus", "a yellow duck", "a blue sphere", "an orange chair")
# Nothing written to disk, no outputs: only the steps, the probes and the evaluations.
BENCH_OVERRIDES = ("train.turntable_frames=0", "export.at_end=false", "train.progress=false",
                   "train.tensorboard=false", "train.val_every=0", "train.checkpoint_every=0",
                   "train.stop_when_converged=false")
GRID_TOLERANCES = (0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05)
GRID_PATIENCES = (1, 2, 3, 5)
SIGNALS = ("change", "shape")  # max(shape, colour) — the rule's — and the shape term alone, for comparison


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    steps: int
    config: Optional[str]
    device: str
    overrides: tuple


def record_run(job: Job) -> dict[str, Any]:
    """Train one (prompt, seed) for ``job.steps`` steps; at each check the detector's signal and the IoU."""
    try:
        import torch

        from carv3d.config import load_config
        from carv3d.convergence import ConvergenceDetector
        from carv3d.train import Trainer
        from carv3d.world.evaluate import evaluate_scene, truth_lighting_for

        overrides = [*BENCH_OVERRIDES, f"train.steps={job.steps}", f"train.seed={job.seed}",
                     f"train.device={job.device}", *job.overrides]
        cfg = load_config(job.config, overrides, job.prompt)
        trainer = Trainer(cfg)
        detector = ConvergenceDetector.from_config(cfg, trainer.device)
        lighting = truth_lighting_for(str(cfg.render.shading))
        checks: list[dict[str, Any]] = []
        eval_seconds = 0.0
        while trainer.step < job.steps:
            started = time.perf_counter()
            trainer.train_step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            trainer.elapsed_seconds += time.perf_counter() - started
            if not detector.due(trainer.step):
                continue
            check = detector.check(trainer.scene, trainer.step)
            started = time.perf_counter()
            trainer.scene.eval()
            try:
                result = evaluate_scene(trainer.scene, job.prompt, views=16, resolution=64, compare_all_objects=False,
                                        truth_lighting=lighting)
            finally:
                trainer.scene.train()
            eval_seconds += time.perf_counter() - started
            checks.append({"step": trainer.step, "t_train": round(trainer.elapsed_seconds, 3),
                           "probe_seconds": round(check.seconds, 3), "change": check.change, "shape": check.shape,
                           "colour": check.colour, "iou": result["silhouette_iou"],
                           "colour_error": result["masked_colour_error"]})
        return {"prompt": job.prompt, "seed": job.seed, "steps": job.steps, "device": str(trainer.device),
                "train_seconds": round(trainer.elapsed_seconds, 3), "probe_seconds": round(detector.probe_seconds, 3),
                "eval_seconds": round(eval_seconds, 3), "checks": checks,
                "rule": {"check_every": detector.check_every, "tolerance": detector.rule.tolerance,
                         "patience": detector.rule.patience, "min_steps": detector.rule.min_steps}}
    except Exception as err:  # reported by the parent; the other runs go on
        return {"prompt": job.prompt, "seed": job.seed, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-4000:]}


def replay(run: dict[str, Any], tolerance: float, patience: int, min_steps: int, margin: float,
           signal: str = "change") -> dict[str, Any]:
    """Where the rule stops this recorded run, and what that costs and saves."""
    from carv3d.convergence import first_stop

    checks = run["checks"]
    final = checks[-1]
    stop = first_stop([c["step"] for c in checks], [c[signal] for c in checks], tolerance, patience, min_steps)
    if stop is None:
        return {"stop_step": None, "iou_at_stop": None, "iou_final": final["iou"], "false_stop": False,
                "steps_saved": 0, "seconds_saved": 0.0}
    at = next(c for c in checks if c["step"] == stop)
    # Training seconds after the stop, less the probes a stopping run renders up to it.
    saved = final["t_train"] - at["t_train"] - at["probe_seconds"]
    return {"stop_step": stop, "iou_at_stop": at["iou"], "iou_final": final["iou"],
            "false_stop": final["iou"] - at["iou"] > margin, "steps_saved": run["steps"] - stop,
            "seconds_saved": round(saved, 3)}


def summarise(runs: list[dict[str, Any]], tolerance: float, patience: int, min_steps: int, margin: float,
              signal: str = "change") -> dict[str, Any]:
    rows = [replay(run, tolerance, patience, min_steps, margin, signal) for run in runs]
    stopped = [r for r in rows if r["stop_step"] is not None]
    total_steps = sum(run["steps"] for run in runs)
    total_seconds = sum(run["checks"][-1]["t_train"] for run in runs)
    return {"signal": signal, "tolerance": tolerance, "patience": patience, "min_steps": min_steps,
            "runs": len(rows), "stopped": len(stopped), "false_stops": sum(r["false_stop"] for r in rows),
            "false_stop_rate": sum(r["false_stop"] for r in rows) / len(rows) if rows else None,
            "steps_saved_fraction": round(sum(r["steps_saved"] for r in rows) / total_steps, 4) if total_steps else None,
            "seconds_saved_fraction": (round(sum(r["seconds_saved"] for r in rows) / total_seconds, 4)
                                       if total_seconds else None),
            "mean_iou_loss_at_stop": (round(sum(r["iou_final"] - r["iou_at_stop"] for r in stopped) / len(stopped), 4)
                                      if stopped else None)}


def report_of(runs: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    rule = runs[0]["rule"]
    per_run = [{"prompt": run["prompt"], "seed": run["seed"], "steps": run["steps"],
                "iou_max": max(c["iou"] for c in run["checks"]),
                **replay(run, rule["tolerance"], rule["patience"], rule["min_steps"], margin)} for run in runs]
    grid = [summarise(runs, tol, pat, rule["min_steps"], margin, signal)
            for signal in SIGNALS for pat in GRID_PATIENCES for tol in GRID_TOLERANCES]
    probe = sum(run["probe_seconds"] for run in runs)
    train = sum(run["train_seconds"] for run in runs)
    return {"headline": summarise(runs, rule["tolerance"], rule["patience"], rule["min_steps"], margin),
            "per_run": per_run, "probe_seconds_fraction_of_training": round(probe / train, 4) if train else None,
            "grid": grid}


def replay_file(recorded: Path, out: Path, args: argparse.Namespace) -> int:
    """``--replay``: the recorded runs of ``recorded`` under the rule of ``--config`` and the overrides."""
    from carv3d.config import load_config
    from carv3d.io import atomic_write_text

    report = json.loads(recorded.read_text())
    train = load_config(args.config, args.overrides).train
    rule = {"check_every": int(train.converge_check_every), "tolerance": float(train.converge_tolerance),
            "patience": int(train.converge_patience), "min_steps": int(train.converge_min_steps)}
    for run in report["runs"]:
        if run["rule"]["check_every"] != rule["check_every"]:
            raise SystemExit(f"{recorded} was recorded with checks every {run['rule']['check_every']} steps, not "
                             f"{rule['check_every']}: pass train.converge_check_every={run['rule']['check_every']}")
        run["rule"] = rule
    report.update(report_of(report["runs"], args.margin), margin=args.margin,
                  replayed=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    atomic_write_text(out, json.dumps(report, indent=1))
    print(json.dumps(report["headline"], indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config file (default: the built-in defaults)")
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="world prompt '<colour> <object>' (repeat); default: " + ", ".join(DEFAULT_PROMPTS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--steps", type=int, default=1000, help="steps of each long run (default 1000)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--margin", type=float, default=0.02,
                        help="a stop is false when the final IoU is more than this above the IoU at the stop")
    parser.add_argument("--parallel", type=int, default=1, help="runs side by side (worker processes)")
    parser.add_argument("--out", default="bench_convergence.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already recorded in --out (same settings) and record only the missing ones")
    parser.add_argument("--replay", default=None, metavar="FILE",
                        help="no training: the rule of --config and the overrides on the runs recorded in FILE")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. train.converge_tolerance=0.02)")
    args = parser.parse_args()
    if args.parallel < 1:
        raise SystemExit("--parallel must be at least 1")
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    import torch

    from carv3d.io import atomic_write_text
    from carv3d.log import setup_logging
    from carv3d.workers import run_in_workers

    setup_logging()
    prompts = args.prompts or list(DEFAULT_PROMPTS)
    out = Path(args.out)
    if args.replay:
        return replay_file(Path(args.replay), out, args)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "device": args.device, "config": args.config, "overrides": args.overrides, "steps": args.steps,
        "seeds": seeds, "margin": args.margin, "parallel": args.parallel,
        "false_stop": f"the final IoU (step {args.steps}) is more than {args.margin} above the IoU at the stop",
        "runs": []}
    if args.resume and out.exists():
        earlier = json.loads(out.read_text())
        for key in ("config", "overrides", "steps", "device"):
            if earlier[key] != report[key]:
                raise SystemExit(f"--resume: {out} was recorded with {key} {earlier[key]!r}, not {report[key]!r}")
        report["runs"] = [run for run in earlier["runs"] if run["prompt"] in prompts and run["seed"] in seeds]
        report["commands"] = [*earlier.get("commands", [earlier["command"]]), report["command"]]
    done = {(run["prompt"], run["seed"]) for run in report["runs"]}
    jobs = [Job(prompt, seed, args.steps, args.config, args.device, tuple(args.overrides))
            for prompt in prompts for seed in seeds if (prompt, seed) not in done]

    def on_result(run: dict[str, Any]) -> None:
        if "error" in run:
            print(f"[convergence] {run['prompt']} seed {run['seed']} failed: {run['error']}\n{run['traceback']}",
                  flush=True)
            return
        report["runs"].append(run)
        report["runs"].sort(key=lambda r: (prompts.index(r["prompt"]), r["seed"]))
        report.update(report_of(report["runs"], args.margin))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=1))
        mine = next(r for r in report["per_run"] if r["prompt"] == run["prompt"] and r["seed"] == run["seed"])
        print(f"[convergence] {run['prompt']} seed {run['seed']}: stop at {mine['stop_step']} (IoU {mine['iou_at_stop']}) "
              f"vs IoU {mine['iou_final']} at {run['steps']}; trained {run['train_seconds']:.0f} s, "
              f"probes {run['probe_seconds']:.1f} s", flush=True)

    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    run_in_workers(jobs, args.parallel, threads, on_result, worker=record_run)
    if report["runs"]:
        print(json.dumps(report["headline"], indent=2))
    return 0 if len(report["runs"]) == len(prompts) * len(seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
