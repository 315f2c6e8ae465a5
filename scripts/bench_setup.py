#!/usr/bin/env python
"""Wall clock of the README's two commands on a fresh clone: `make demo` (install + demo run),
then `make test` (the test tools on top of that install, then the suite). Writes JSON.

    python scripts/bench_setup.py --out docs/bench_setup_cpu.json

The clone is made from this checkout's HEAD into a temporary folder; nothing installed by hand is
used (the Makefile builds its own .venv there). The README's other install blocks (marked
``<!-- readme-run: setup (...) -->``; tests/test_readme_commands.py runs the rest) run here too:
the PATH block on that clone after `make install`, the manual install block on a second fresh
clone; each one's exit code and seconds are in the JSON under ``readme_blocks``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, int]:
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(cmd, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - started, code


SETUP_BLOCK = re.compile(r"<!-- readme-run: setup \(([^>]*)\) -->\n```\n(.*?)```", re.S)


def readme_setup_blocks() -> list[list[str]]:
    """The command lines (comments dropped) of each setup block of the README, in order."""
    text = (REPO_ROOT / "README.md").read_text()
    return [[line for line in (re.sub(r"\s+#.*$", "", raw).strip() for raw in body.splitlines()) if line]
            for _, body in SETUP_BLOCK.findall(text)]


def run_block(lines: list[str], cwd: Path, log: Path, then: str = "") -> dict:
    """The block's lines as one bash script (stopping at the first failure), then ``then``."""
    script = "set -e\n" + "\n".join(lines) + ("\n" + then if then else "") + "\n"
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(["bash", "-c", script], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT).returncode
    return {"lines": lines, "then": then, "exit": code, "seconds": round(time.perf_counter() - started, 1),
            "log_tail": log.read_text().strip().splitlines()[-3:]}


def other_setup_blocks(tmp: Path, clone: Path) -> list[dict]:
    """The README's setup blocks beyond `make demo` / `make test`, run as printed."""
    results = []
    for lines in readme_setup_blocks():
        if all(line.startswith(("make ", "bash scripts/run_gpu_checks.sh")) for line in lines):
            results.append({"lines": lines, "covered_by": "make_demo / make_test above; make test-blender installs bpy "
                            "(~1 GB) and is its own run (docs/BENCHMARKS.md); run_gpu_checks.sh needs a GPU"})
        elif lines[0].startswith("source .venv/bin/activate"):
            # After `make install`: the activated shell finds carv3d on PATH (the check is the `then`).
            results.append(run_block(lines, clone, tmp / "path_block.log", then="carv3d --version && python -c 'import carv3d'"))
        elif lines[0].startswith("python3 -m venv"):
            second = tmp / "manual"
            subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(second)], check=True)
            results.append(run_block(lines, second, tmp / "manual_install.log", then=".venv/bin/carv3d --version"))
        else:
            results.append({"lines": lines, "exit": None, "note": "not recognised by bench_setup.py: add it"})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_setup.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="carv3d-fresh-") as tmp:
        clone = Path(tmp) / "carv3d"
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        # `make demo` from a fresh clone is `make install` then the demo run; timed as the two halves.
        install_s, install_rc = timed(["make", "install"], clone, Path(tmp) / "install.log")
        run_s, demo_rc = timed(["make", "demo"], clone, Path(tmp) / "demo.log")
        demo_s, demo_rc = install_s + run_s, install_rc or demo_rc
        runs = sorted((clone / "runs").glob("*/run.json"))
        run = json.loads(runs[-1].read_text()) if runs else {}
        # `make test` after that: the test tools (the [dev] extra, npm validator), then the suite.
        dev_s, dev_rc = timed(["make", "install-dev"], clone, Path(tmp) / "install_dev.log")
        suite_s, test_rc = timed(["make", "test"], clone, Path(tmp) / "test.log")
        test_s, test_rc = dev_s + suite_s, dev_rc or test_rc
        tail = (Path(tmp) / "test.log").read_text().strip().splitlines()[-1:]
        blocks = other_setup_blocks(Path(tmp), clone)
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected)", " ".join(tail))}
    report = {
        "commit": commit, "machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "make_demo_seconds": demo_s, "make_demo_exit": demo_rc,
        "install_seconds": install_s, "demo_run_seconds": run_s,
        "demo_training_seconds": run.get("elapsed_seconds"), "demo_steps": run.get("step"),
        "make_test_seconds": test_s, "make_test_exit": test_rc,
        "test_tools_install_seconds": dev_s, "test_suite_seconds": suite_s, "tests": counts, "command": " ".join(sys.argv),
        "readme_blocks": blocks,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    blocks_ok = all(block.get("exit") in (0, None) and "note" not in block for block in blocks)
    return 0 if demo_rc == 0 and test_rc == 0 and blocks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
