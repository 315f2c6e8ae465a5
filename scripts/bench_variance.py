#!/usr/bin/env python
"""Estimator variance and cost at an early and a late checkpoint of a real run.

Trains one run (the given config and prompt) to ``--early`` steps, measures every estimator of
`carv3d variance` at that frozen scene, continues the run to ``--late`` steps and measures again,
with and without camera stratification. Writes one JSON file (and the variance plots beside it).

    python scripts/bench_variance.py --prompt "a red cube" --early 100 --late 600 --draws 32 --out docs/variance.json
    python scripts/bench_variance.py ... --cameras stratified --resume --out docs/variance.json   # add phases
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO_ROOT))


def summarize(phases: dict) -> dict:
    """Best ECM per phase, and camera-stratified estimators against the plain-camera baseline."""
    summary = {}
    for phase in ("early", "late"):
        plain, strat = phases.get(phase), phases.get(f"{phase}_camera_stratified")
        if not plain:
            continue
        best = max(plain["rows"], key=lambda r: r["ecm"])
        entry = {"best": best}
        if strat:
            base = next(r for r in plain["rows"] if (r["method"], r["upstream_samples"], r["noise_draws"]) == ("uniform", 2, 1))
            cross = [{**r, "ecm_vs_plain_baseline": base["variance"] * base["cost_seconds"] / (r["variance"] * r["cost_seconds"])}
                     for r in strat["rows"]]
            entry["best_camera_stratified"] = max(cross, key=lambda r: r["ecm_vs_plain_baseline"])
        summary[phase] = entry
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--early", type=int, default=100, help="steps before the early measurement")
    parser.add_argument("--late", type=int, default=600, help="steps before the late measurement")
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--pilot", type=int, default=16)
    parser.add_argument("--rk", default="2x1,1x1,1x2,1x4,1x8,1x16")
    parser.add_argument("--methods", default="uniform,is,stratified,is+stratified,adaptive")
    parser.add_argument("--cameras", choices=("plain", "stratified", "both"), default="plain",
                        help="camera sampling of the measured estimators (stratified: azimuth strata across renders)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the phases already in --out and measure only the missing ones (the run is retrained "
                             "with the same seed, so a long grid can be split over several time-limited calls)")
    parser.add_argument("--workdir", default="runs/bench_variance")
    parser.add_argument("--out", default="variance_bench.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    import torch

    from carv3d.checkpoint import latest_checkpoint, load_checkpoint
    from carv3d.config import load_config
    from carv3d.log import setup_logging
    from carv3d.train import resume, train
    from carv3d.commands.variance import parse_rk
    from carv3d.step import guidance_state as checkpoint_guidance_state
    from carv3d.step import scene_state as checkpoint_scene_state
    from carv3d.variance import FrozenScene, format_table, measure, plot

    setup_logging()
    name = f"variance-{int(time.time())}"
    cfg = load_config(args.config, [*args.overrides, f"train.steps={args.early}", f"train.output_dir={args.workdir}",
                                     f"train.run_name={name}", "train.val_every=0", "export.at_end=false",
                                     "train.turntable_frames=0"], args.prompt)
    started = time.perf_counter()
    run_dir = train(cfg)
    timings = {"train_early_s": time.perf_counter() - started}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.resume and out.exists() else None
    report = {"prompt": args.prompt, "config": args.config, "overrides": args.overrides, "draws": args.draws,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "command": " ".join(sys.argv), "phases": {}}
    if previous:
        report["phases"] = previous["phases"]
        report["commands"] = [*previous.get("commands", [previous["command"]]), report["command"]]
    states = {}
    # Plain cameras first at both checkpoints, then camera stratification; the JSON is rewritten
    # after every measurement so a time limit keeps what was measured.
    camera_modes = {"plain": [False], "stratified": [True], "both": [False, True]}[args.cameras]
    plan = [(phase, mode) for mode in camera_modes for phase in ("early", "late")]
    for phase, camera_stratified in plan:
        if f"{phase}{'_camera_stratified' if camera_stratified else ''}" in report["phases"]:
            continue  # measured by an earlier call (--resume)
        if phase not in states:
            if phase == "late":
                started = time.perf_counter()
                resume(run_dir, [f"train.steps={args.late}"])
                timings["train_late_s"] = time.perf_counter() - started
            states[phase] = load_checkpoint(latest_checkpoint(run_dir), map_location=device)
        state = states[phase]
        run_cfg = load_config(run_dir / "config.yaml")
        scene = FrozenScene(run_cfg, device, checkpoint_scene_state(state), seed=0,
                            guidance_state=checkpoint_guidance_state(state))  # VSD: the run's LoRA
        started = time.perf_counter()
        result = measure(run_cfg, scene, args.methods.split(","), parse_rk(args.rk), args.draws, args.pilot,
                         camera_stratified=camera_stratified)
        result["seconds"] = time.perf_counter() - started
        result["step"] = int(state["step"])
        key = f"{phase}{'_camera_stratified' if camera_stratified else ''}"
        report["phases"][key] = result
        plot(result, out.with_name(f"{out.stem}_{key}.png"))
        print(f"\n## {key} (step {state['step']})\n{format_table(result)}", flush=True)
        report["timings"] = timings
        report["summary"] = summarize(report["phases"])
        out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
