"""`carv3d variance [RUN_DIR]`: variance and cost of each estimator at a frozen scene.

The measurement is :mod:`carv3d.variance`; this module parses the grid, picks the scene (a run's
latest checkpoint, or a config's initial scene), and writes the JSON report and its plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from carv3d.errors import ConfigError

NAME = "variance"
HELP = "measure estimator variance and cost at a frozen scene"
DESCRIPTION = "Variance and cost of each estimator at a frozen scene (a run's checkpoint or a config's initial scene)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from carv3d.variance import DEFAULT_RK, METHODS

    parser.add_argument("run_dir", nargs="?", help="a run directory (its latest checkpoint); omit to use --config/--prompt's initial scene")
    parser.add_argument("--config", help="config file for the initial scene")
    parser.add_argument("--prompt", help="prompt for the initial scene")
    parser.add_argument("--draws", type=int, default=32, help="gradients per estimator (M)")
    parser.add_argument("--pilot", type=int, default=16, help="gradients to learn the adaptive proposal before measuring")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {','.join(METHODS)}")
    parser.add_argument("--rk", default=",".join(f"{r}x{k}" for r, k in DEFAULT_RK), help="R x K pairs, e.g. 2x1,1x8")
    parser.add_argument("--camera-stratified", action="store_true", help="stratify camera azimuth across the renders and steps of the rows with CARV (the plain rows, uniform t with K = 1, keep independent cameras)")
    parser.add_argument("--window", type=int, default=0,
                        help="also report W·Var of the mean of W consecutive draws (e.g. 8: one cycle of camera strata)")
    parser.add_argument("--guidance-warmup", type=int, default=0,
                        help="guidance.type vsd: LoRA training steps at the frozen scene before measuring (a run "
                             "directory brings its own LoRA; the LoRA is held fixed while measuring)")
    parser.add_argument("--no-guidance-training-cost", dest="guidance_training_cost", action="store_false",
                        help="guidance.type vsd: leave the LoRA's training step out of each gradient's cost (by "
                             "default it is in, as every training step pays it; the LoRA is put back after it)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cost per gradient: wall-clock seconds, or (CPU device only) this process's CPU seconds, "
                             "which other work on a shared machine does not inflate; run it with OMP_NUM_THREADS=1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (and of the initial scene)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: the run's train.device)")
    parser.add_argument("--out", default=None,
                        help="JSON report path, a PNG plot is written beside it (default: RUN_DIR/variance.json with a "
                             "run directory, else ./variance.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. estimator.t_min=0.05")


def parse_rk(text: str) -> list[tuple[int, int]]:
    """``"2x1,1x8"`` → ``[(2, 1), (1, 8)]`` (R renders × K noise draws), each within the ranges of
    ``estimator.upstream_samples`` and ``estimator.noise_draws``."""
    from carv3d.config import MAX_NOISE_DRAWS, MAX_UPSTREAM_SAMPLES

    pairs = []
    for item in text.split(","):
        try:
            r, k = item.lower().split("x")
            pairs.append((int(r), int(k)))
        except ValueError:
            raise ConfigError(f"--rk expects pairs like 2x1,1x8 (R x K); got '{item}'.") from None
        if not (1 <= pairs[-1][0] <= MAX_UPSTREAM_SAMPLES and 1 <= pairs[-1][1] <= MAX_NOISE_DRAWS):
            raise ConfigError(f"--rk '{item}': R (renders) must be 1 to {MAX_UPSTREAM_SAMPLES} and K (noise draws) "
                              f"1 to {MAX_NOISE_DRAWS}, e.g. --rk 2x1,1x8.")
    return pairs


def check_options(args: argparse.Namespace) -> list[tuple[int, int]]:
    """Every number option in range, before anything is loaded or measured (a bad one used to surface
    minutes into the measurement, or never); returns the parsed ``--rk``."""
    from carv3d.config import MAX_SEED

    if args.draws < 2:
        raise ConfigError("--draws must be at least 2 to estimate a variance.")
    for option, value in (("--pilot", args.pilot), ("--window", args.window), ("--guidance-warmup", args.guidance_warmup)):
        if value < 0:
            raise ConfigError(f"{option} must be 0 or more, not {value}.")
    if args.window and args.draws < 2 * args.window:
        raise ConfigError(f"--window {args.window} needs --draws of at least {2 * args.window} (two windows).")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed {args.seed} is out of range; use 0 to {MAX_SEED} (as train.seed).")
    return parse_rk(args.rk)


def guidance_source(source: dict[str, Any], from_run: bool, warmup: int) -> str:
    """Where the LoRA measured with came from, in words (the table's title says it)."""
    words = []
    if from_run:
        words.append(f"the run's at step {source['step']}")
    if warmup:
        words.append(f"{warmup} warm-up steps at the frozen scene")
    return " + ".join(words) or "untrained (ε̂_φ = the teacher's conditional prediction)"


def variance_command(args: argparse.Namespace) -> str:
    """Check the arguments and the output path, build the frozen scene, measure, write the JSON report
    and its plot; returns the table."""
    import torch

    from carv3d.config import load_config
    from carv3d.devices import resolve_device
    from carv3d.io import atomic_write_text, check_output_file
    from carv3d.log import logger
    from carv3d.run_dir import require_run_dir
    from carv3d.variance import METHODS, FrozenScene, format_table, mark_few_draws, measure, plot

    if args.run_dir and "=" in args.run_dir and not Path(args.run_dir).exists():
        args.overrides = [args.run_dir, *args.overrides]  # argparse gave the first key=value to RUN_DIR
        args.run_dir = None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}.")
    rk = check_options(args)
    out = Path(args.out) if args.out else Path(args.run_dir or ".") / "variance.json"
    if args.run_dir and not args.out:
        require_run_dir(args.run_dir)  # a missing run is named as such, not as an unwritable report path
    check_output_file(out, args.overwrite)  # before the measurement, which takes minutes
    scene_state = guidance_state = None
    source: dict[str, Any]
    if args.run_dir:
        from carv3d.checkpoint import latest_checkpoint, load_checkpoint
        from carv3d.step import guidance_state as checkpoint_guidance_state
        from carv3d.step import scene_state as checkpoint_scene_state
        from carv3d.run_dir import load_run_config

        run_dir = require_run_dir(args.run_dir)
        cfg = load_run_config(run_dir, args.overrides)
        ckpt = latest_checkpoint(run_dir)
        state = load_checkpoint(ckpt)
        scene_state = checkpoint_scene_state(state)
        guidance_state = checkpoint_guidance_state(state)  # VSD: the run's LoRA
        source = {"run_dir": str(run_dir), "checkpoint": ckpt.name, "step": int(state["step"])}
    else:
        cfg = load_config(args.config, args.overrides, args.prompt)
        if not cfg.prompt.strip():  # say what this command needs, before the prompt check's generic message
            raise ConfigError("carv3d variance needs a run directory or a prompt (--prompt or prompt=...).")
        source = {"initial_scene": True, "config": args.config}
    device = resolve_device(args.device if args.device != "auto" else cfg.train.device)
    # The initial scene of a config is sized for the machine as `carv3d train` would size it (a run's
    # own config has every key set, so a run directory is measured as it trained).
    from carv3d.sizing import size_for_device

    size_for_device(cfg, device)
    if args.clock == "cpu" and device.type != "cpu":
        raise ConfigError(f"--clock cpu reads this process's CPU time, which does not see work on {device}; "
                          "use --clock wall there.")
    scene = FrozenScene(cfg, device, scene_state, seed=args.seed, guidance_state=guidance_state,
                        guidance_training_cost=args.guidance_training_cost, clock=args.clock)
    if args.guidance_warmup:
        scene.warm_up_guidance(args.guidance_warmup)
    report = measure(cfg, scene, methods, rk, args.draws, args.pilot,
                     camera_stratified=args.camera_stratified, window=args.window)
    report.update({"source": source, "prompt": cfg.prompt, "device": str(device),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "teacher": cfg.teacher.pretrained, "draws": args.draws, "pilot": args.pilot,
                   "guidance": cfg.guidance.type, "guidance_warmup": args.guidance_warmup})
    if scene.guidance.state_dict():  # VSD: which LoRA the gradients were drawn with
        report["guidance_state_source"] = guidance_source(source, guidance_state is not None, args.guidance_warmup)
    mark_few_draws(report)
    atomic_write_text(out, json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    logger.info("variance report: %s (plot %s)", out, out.with_suffix(".png"))
    return format_table(report)


def run(args: argparse.Namespace) -> int:
    print(variance_command(args))
    return 0
