#!/usr/bin/env python
"""Seconds per training step of a config, split into render+encode, teacher and backward.

    python scripts/bench_step.py --config configs/demo_cpu.yaml --out docs/bench_step_cpu.json
    python scripts/bench_step.py --config configs/demo_cpu.yaml estimator.noise_draws=1 --out k1.json

Runs `--warmup` steps, then times `--steps` steps of `Trainer.train_step` (median and mean) and
the split comes from the step's own section timers. Writes JSON with the machine, torch and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo_cpu.yaml")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="bench_step.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    import torch

    from carv3d.config import load_config
    from carv3d.log import setup_logging
    from carv3d.train import Trainer

    setup_logging()
    cfg = load_config(args.config, [*args.overrides, "train.progress=false"], args.prompt)
    trainer = Trainer(cfg)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step()
    trainer.timing_metrics()  # reset the section timers: the split covers the timed steps only
    times = []
    for _ in range(args.steps):
        sync()
        started = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - started)

    # The split: the step's own section timers over the timed steps (no second copy of the step).
    split = {k.replace("time_", "").replace("_ms", ""): v / 1000.0 for k, v in trainer.timing_metrics().items()}

    report = {
        "config": args.config, "overrides": args.overrides, "command": " ".join(sys.argv),
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name(0) if trainer.device.type == "cuda" else "cpu",
        "noise_draws": trainer.estimator.noise_draws, "steps_timed": args.steps,
        "seconds_per_step_median": statistics.median(times), "seconds_per_step_mean": statistics.fmean(times),
        "steps_per_second": 1.0 / statistics.median(times),
        "split_seconds_mean": split,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
