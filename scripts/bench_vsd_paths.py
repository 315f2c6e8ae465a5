#!/usr/bin/env python
"""Cost of a VSD training step against an SDS step, for VSD's two ways of calling the U-Net.

    python scripts/bench_vsd_paths.py --out docs/bench_vsd_paths_cpu.json            # CPU, the demo config (~5 min)
    python scripts/bench_vsd_paths.py --device cuda --config configs/vsd_world.yaml --out vsd_paths_gpu.json

For each of ``sds``, ``vsd`` with ``guidance.fused_call=true`` (one mixed-batch U-Net call through
peft's ``adapter_names``) and with ``fused_call=false`` (the teacher's own call, then the LoRA
copy's), it builds the Trainer of ``--config`` at a fixed K, runs one untimed step, then times
``--steps`` steps and records the mean ms per step and the Trainer's section split (render,
teacher, particle, backward, optimizer). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

VARIANTS = {
    "sds": [],
    "vsd_fused": ["guidance.type=vsd", "guidance.fused_call=true"],
    "vsd_separate": ["guidance.type=vsd", "guidance.fused_call=false"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo_cpu.yaml"))
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--draws", type=int, default=4, help="K, fixed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="bench_vsd_paths.json")
    args = parser.parse_args(argv)

    import torch

    from carv3d.config import load_config
    from carv3d.log import setup_logging
    from carv3d.train import Trainer

    setup_logging()
    report = {"command": " ".join(["scripts/bench_vsd_paths.py"] + (argv if argv is not None else sys.argv[1:])),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "torch": torch.__version__,
              "device": args.device, "config": args.config, "noise_draws": args.draws, "steps": args.steps, "results": {}}
    for name, overrides in VARIANTS.items():
        cfg = load_config(args.config, overrides + [f"estimator.noise_draws={args.draws}", f"train.device={args.device}",
                                                     "train.progress=false", "train.tensorboard=false"], args.prompt)
        trainer = Trainer(cfg)
        trainer.train_step()
        trainer.timing_metrics()  # reset: the split covers the timed steps
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - started) / args.steps
        split = {k.replace("time_", "").replace("_ms", ""): round(v, 1) for k, v in trainer.timing_metrics().items()}
        report["results"][name] = {"ms_per_step": round(ms, 1), "split_ms": split}
        print(f"{name}: {ms:.0f} ms/step {split}", flush=True)
        del trainer
    sds = report["results"]["sds"]["ms_per_step"]
    report["relative_to_sds"] = {name: round(r["ms_per_step"] / sds, 2) for name, r in report["results"].items()}
    from carv3d.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report["relative_to_sds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
