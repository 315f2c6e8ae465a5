#!/usr/bin/env python
"""The README's first command as a new user runs it: wall clock, peak memory and world quality. Writes JSON.

    python scripts/bench_first_command.py --out docs/first_command_cpu.json

Runs ``carv3d train --prompt PROMPT`` (the default config; on a CPU it takes the demo's sizes for
every key not set) in a temporary folder, then ``carv3d evaluate`` on the run, and records the
train command's wall clock, its peak resident memory (the whole process) and the evaluation's
headline numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def carv3d(*args: str, cwd: Path) -> tuple[float, int, str]:
    """Run ``python -m carv3d.cli ARGS`` in its own process; (seconds, exit code, output tail)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "carv3d.cli", *args], cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - started, proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--out", default="first_command.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="carv3d-first-") as tmp:
        work = Path(tmp)
        train_s, train_rc, train_tail = carv3d("train", "--prompt", args.prompt, "train.run_name=first", cwd=work)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
        run_dir = work / "runs" / "first"
        evaluation, eval_rc, eval_tail = None, None, ""
        if train_rc == 0:
            _, eval_rc, eval_tail = carv3d("evaluate", str(run_dir), "--out", str(work / "evaluation.json"), cwd=work)
            if eval_rc == 0:
                evaluation = json.loads((work / "evaluation.json").read_text())
        status = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    report = {
        "command": f'carv3d train --prompt "{args.prompt}"', "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "train_seconds": round(train_s, 1), "train_exit": train_rc,
        "training_seconds": status.get("elapsed_seconds"), "steps": status.get("step"),
        "peak_rss_gb": round(peak_gb, 3), "evaluate_exit": eval_rc,
        "silhouette_iou": evaluation and evaluation.get("silhouette_iou"),
        "best_match": evaluation and evaluation.get("best_match"),
        "psnr": evaluation and evaluation.get("psnr"),
        "train_output_tail": train_tail if train_rc else "", "evaluate_output_tail": eval_tail if eval_rc else "",
        "script": "scripts/bench_first_command.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if train_rc == 0 and eval_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
