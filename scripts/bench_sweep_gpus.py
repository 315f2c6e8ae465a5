#!/usr/bin/env python
"""A sweep on several GPUs, watched with nvidia-smi: one run per GPU at a time, every GPU busy. Writes JSON.

    python scripts/bench_sweep_gpus.py --gpus 0 --out OUT/sweep_1gpu.json                  # the baseline
    python scripts/bench_sweep_gpus.py --gpus 0,1 --baseline OUT/sweep_1gpu.json --out OUT/sweep_2gpu.json
    python scripts/bench_sweep_gpus.py --gpus 0,1 --backend ray --baseline ... --out OUT/sweep_2gpu_ray.json

It runs ``carv3d sweep SWEEP --backend B`` (default configs/sweeps/presets_seeds.yaml, 18 equal runs)
with ``CUDA_VISIBLE_DEVICES=GPUS`` in a fresh output folder, and samples every ``--sample-s`` seconds

- ``nvidia-smi --query-gpu=index,uuid,utilization.gpu,memory.used``: each card's load, and
- ``nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory``: which processes hold each card.

From the trace, for each GPU: the largest number of processes it held at once (one run per GPU
means at most 1; a process is a local worker or a Ray task), and the fraction of samples it held
one while runs remained — up to the *tail*, the first moment some GPU held its last process, after
which fewer runs remain than GPUs. With ``--baseline`` (the one-GPU JSON of the same sweep), the
wall clock is compared with ``baseline / N`` (the bar: ≤ 1.15×). The sweep's own summary.csv gives
each run's status. The trace, the sweep's exit code and its last log lines go into the JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GPU_QUERY = ["--query-gpu=index,uuid,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
APPS_QUERY = ["--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"]
BAR_RATIO = 1.15


def parse_gpus(text: str) -> list[dict[str, Any]]:
    """``nvidia-smi`` GPU rows (index, uuid, utilization %, memory MiB) → dicts."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[0].isdigit():
            rows.append({"index": int(parts[0]), "uuid": parts[1], "utilization": _number(parts[2]),
                         "memory_mib": _number(parts[3])})
    return rows


def parse_apps(text: str) -> list[dict[str, Any]]:
    """``nvidia-smi`` compute-app rows (pid, GPU uuid, memory MiB) → dicts."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            rows.append({"pid": int(parts[0]), "uuid": parts[1], "memory_mib": _number(parts[2]) if len(parts) > 2 else None})
    return rows


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]"


def occupancy(trace: list[dict[str, Any]], gpu_uuids: list[str]) -> dict[str, Any]:
    """Per GPU, from the samples (``t``, ``apps`` of each): the most processes held at once, and the
    fraction of samples up to the tail (the first GPU's last sample with a process) that held one.

    Returns ``per_gpu`` ({uuid: {max_processes, busy_fraction_before_tail, first_busy_s, last_busy_s}}),
    ``tail_s``, ``one_run_per_gpu`` (every max ≤ 1), ``every_gpu_busy_before_tail`` (min fraction).
    """
    last_busy = {u: None for u in gpu_uuids}
    first_busy = {u: None for u in gpu_uuids}
    most = {u: 0 for u in gpu_uuids}
    for sample in trace:
        held: dict[str, int] = {}
        for app in sample["apps"]:
            held[app["uuid"]] = held.get(app["uuid"], 0) + 1
        for uuid in gpu_uuids:
            count = held.get(uuid, 0)
            most[uuid] = max(most[uuid], count)
            if count:
                last_busy[uuid] = sample["t"]
                if first_busy[uuid] is None:
                    first_busy[uuid] = sample["t"]
    ends = [t for t in last_busy.values() if t is not None]
    tail = min(ends) if len(ends) == len(gpu_uuids) and ends else None
    start = min((t for t in first_busy.values() if t is not None), default=None)
    window = [s for s in trace if start is not None and tail is not None and start <= s["t"] <= tail]
    per_gpu = {}
    for uuid in gpu_uuids:
        busy = [any(a["uuid"] == uuid for a in s["apps"]) for s in window]
        per_gpu[uuid] = {"max_processes": most[uuid], "first_busy_s": first_busy[uuid], "last_busy_s": last_busy[uuid],
                         "busy_fraction_before_tail": (sum(busy) / len(busy)) if busy else None,
                         "samples_before_tail": len(busy)}
    fractions = [g["busy_fraction_before_tail"] for g in per_gpu.values()]
    return {"per_gpu": per_gpu, "first_busy_s": start, "tail_s": tail,
            "one_run_per_gpu": all(m <= 1 for m in most.values()),
            "every_gpu_busy_before_tail": min(fractions) if fractions and None not in fractions else None}


def gpu_load(trace: list[dict[str, Any]], gpu_uuids: list[str]) -> dict[str, Any]:
    """Per GPU over all samples: mean and highest utilisation (%) and the most memory held (MiB)."""
    load = {}
    for uuid in gpu_uuids:
        rows = [g for sample in trace for g in sample.get("gpus", []) if g.get("uuid") == uuid]
        use = [g["utilization"] for g in rows if g.get("utilization") is not None]
        memory = [g["memory_mib"] for g in rows if g.get("memory_mib") is not None]
        load[uuid] = {"samples": len(rows), "utilization_mean": sum(use) / len(use) if use else None,
                      "utilization_max": max(use, default=None), "memory_mib_max": max(memory, default=None)}
    return load


def summarize(path: Path) -> int:
    """Recompute a report's occupancy and load from its trace (after this script's summary grew)."""
    from carv3d.io import atomic_write_text

    report = json.loads(path.read_text())
    uuids = [g["uuid"] for g in report["gpus"]]
    report["occupancy"] = occupancy(report["trace"], uuids) if report.get("trace") else None
    report["load"] = gpu_load(report["trace"], uuids) if report.get("trace") else None
    atomic_write_text(path, json.dumps(report, indent=2))
    print(json.dumps({"occupancy": report["occupancy"], "load": report["load"]}, indent=1))
    return 0


def sample_loop(smi: str, started: float, trace: list[dict[str, Any]], stop: threading.Event, every: float) -> None:
    while not stop.is_set():
        t = time.perf_counter() - started
        try:
            gpus = parse_gpus(subprocess.run([smi, *GPU_QUERY], capture_output=True, text=True, timeout=10).stdout)
            apps = parse_apps(subprocess.run([smi, *APPS_QUERY], capture_output=True, text=True, timeout=10).stdout)
        except (OSError, subprocess.TimeoutExpired) as err:
            trace.append({"t": t, "error": str(err), "gpus": [], "apps": []})
        else:
            trace.append({"t": t, "gpus": gpus, "apps": apps})
        stop.wait(every)


def sweep_statuses(sweep_dir: Path) -> dict[str, int]:
    summary = sweep_dir / "summary.csv"
    if not summary.is_file():
        return {}
    counts: dict[str, int] = {}
    with summary.open(newline="") as handle:
        for row in csv.DictReader(handle):
            counts[row.get("status", "?")] = counts.get(row.get("status", "?"), 0) + 1
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, default=REPO_ROOT / "configs" / "sweeps" / "presets_seeds.yaml")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--gpus", help="CUDA_VISIBLE_DEVICES for the sweep, e.g. 0,1 (required unless --summarize)")
    parser.add_argument("--baseline", type=Path, help="this script's JSON of the same sweep on one GPU")
    parser.add_argument("--sample-s", type=float, default=1.0)
    parser.add_argument("--nvidia-smi", default="nvidia-smi",
                        help="the nvidia-smi to sample; none: no sampling (the sweep's wall clock only, e.g. on a CPU)")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="passed to carv3d sweep: N worker processes (round-robin over the GPUs; on one GPU or "
                             "none, N side by side)")
    parser.add_argument("--workdir", type=Path, help="where the sweep's runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--summarize", type=Path, metavar="JSON",
                        help="only recompute the occupancy and load of an existing report from its trace")
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.out is None or args.gpus is None:
        parser.error("--gpus and --out are required (unless --summarize)")

    from carv3d.io import atomic_write_text
    from carv3d.sweep.spec import load_sweep

    smi = None if args.nvidia_smi == "none" else shutil.which(args.nvidia_smi)
    if smi is None and args.nvidia_smi != "none":
        parser.error(f"{args.nvidia_smi} not found: this benchmark watches NVIDIA GPUs (--nvidia-smi none: no sampling)")
    spec = load_sweep(args.sweep)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="carv3d_sweep_gpus_"))
    workdir.mkdir(parents=True, exist_ok=True)
    sweep_file = workdir / args.sweep.name  # a copy whose output_dir is the work folder, base made absolute
    text = args.sweep.read_text()
    sweep_file.write_text(_with_output_dir(text, workdir / "sweeps", args.sweep.parent))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=args.gpus, PYTHONUNBUFFERED="1")
    visible = parse_gpus(subprocess.run([smi, *GPU_QUERY], capture_output=True, text=True, timeout=10).stdout) if smi else []
    chosen = [g for g in visible if str(g["index"]) in args.gpus.split(",")]
    trace: list[dict[str, Any]] = []
    stop = threading.Event()
    started = time.perf_counter()
    sampler = threading.Thread(target=sample_loop, args=(smi, started, trace, stop, args.sample_s), daemon=True)
    if smi:
        sampler.start()
    command = [sys.executable, "-m", "carv3d.cli", "sweep", str(sweep_file), "--backend", args.backend]
    if args.max_parallel:
        command += ["--max-parallel", str(args.max_parallel)]
    log = workdir / "sweep.log"
    with log.open("w") as handle:
        code = subprocess.call(command, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    stop.set()
    if smi:
        sampler.join(timeout=15)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sweep": str(args.sweep), "sweep_name": spec.name,
        "backend": args.backend, "gpus": chosen, "n_gpus": len(chosen), "max_parallel": args.max_parallel,
        "exit_code": code, "wall_s": wall, "runs": len(spec.runs),
        "statuses": sweep_statuses(workdir / "sweeps" / spec.name),
        "occupancy": occupancy(trace, [g["uuid"] for g in chosen]) if smi else None,
        "load": gpu_load(trace, [g["uuid"] for g in chosen]) if smi else None,
        "log_tail": log.read_text(errors="replace").splitlines()[-15:], "trace": trace,
    }
    if args.baseline:
        base = json.loads(args.baseline.read_text())
        ideal = float(base["wall_s"]) / max(len(chosen), 1)
        report["baseline"] = {"file": str(args.baseline), "wall_s": base["wall_s"], "n_gpus": base.get("n_gpus"),
                              "ideal_wall_s": ideal, "ratio": wall / ideal, "bar": BAR_RATIO, "met": wall <= BAR_RATIO * ideal}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2))
    occ = report["occupancy"] or {}
    print(f"sweep exit {code} in {wall:.0f} s on {len(chosen)} GPU(s); runs {report['statuses']}; one run per GPU: "
          f"{occ.get('one_run_per_gpu')}; least busy GPU before the tail: {occ.get('every_gpu_busy_before_tail')}"
          + (f"; {report['baseline']['ratio']:.2f}× the ideal {report['baseline']['ideal_wall_s']:.0f} s"
             if "baseline" in report else ""))
    return 0 if code == 0 else 1


def _with_output_dir(text: str, output_dir: Path, sweep_folder: Path) -> str:
    """The sweep file's text with ``output_dir`` replaced and a relative ``base`` made absolute."""
    import yaml

    data = yaml.safe_load(text)
    data["output_dir"] = str(output_dir)
    if data.get("base") and not Path(data["base"]).is_absolute():
        data["base"] = str((sweep_folder / data["base"]).resolve())
    return yaml.safe_dump(data, sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
