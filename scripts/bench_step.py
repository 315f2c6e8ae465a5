#!/usr/bin/env python
"""Seconds per training step of a config, split into render+encode, teacher and backward.

    python scripts/bench_step.py --config configs/demo_cpu.yaml --out docs/bench_step_cpu.json
    python scripts/bench_step.py --config configs/demo_cpu.yaml estimator.noise_draws=1 --out k1.json

Runs `--warmup` steps, then times `--steps` steps of `Trainer.train_step` (median and mean) and
`--split` separately timed steps for the split. Writes JSON with the machine, torch and threads.
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
    from carv3d.cameras import view_labels
    from carv3d.train import Trainer

    setup_logging()
    cfg = load_config(args.config, [*args.overrides, "train.progress=false"], args.prompt)
    trainer = Trainer(cfg)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step()
    times = []
    for _ in range(args.steps):
        sync()
        started = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - started)

    # The split, on separately timed copies of the step's parts.
    split = {"render": [], "encode": [], "teacher": [], "backward": []}
    for _ in range(max(3, args.steps // 3)):
        cameras = trainer.camera_sampler.sample(int(cfg.estimator.upstream_samples), trainer.host_generator, trainer.device)
        labels = view_labels(cameras, cfg.camera.front_half_angle, cfg.camera.overhead_elevation)
        sync(); t0 = time.perf_counter()
        out = trainer.renderer(trainer.field, cameras, generator=trainer.device_generator, shading="albedo")
        sync(); t1 = time.perf_counter()
        x = trainer.teacher.encode(out.rgb)
        sync(); t2 = time.perf_counter()
        result = trainer.estimator.estimate(x, trainer._predict_noise_for(labels), trainer.device_generator, trainer.step)
        sync(); t3 = time.perf_counter()
        result.surrogate.backward()
        sync(); t4 = time.perf_counter()
        trainer.optimizer.zero_grad(set_to_none=True)
        for key, seconds in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            split[key].append(seconds)

    report = {
        "config": args.config, "overrides": args.overrides, "command": " ".join(sys.argv),
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name(0) if trainer.device.type == "cuda" else "cpu",
        "noise_draws": trainer.estimator.noise_draws, "steps_timed": args.steps,
        "seconds_per_step_median": statistics.median(times), "seconds_per_step_mean": statistics.fmean(times),
        "steps_per_second": 1.0 / statistics.median(times),
        "split_seconds_median": {k: statistics.median(v) for k, v in split.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
