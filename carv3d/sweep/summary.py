"""One results table for a sweep: ``summary.csv``, ``summary.md`` and a plot per numeric axis.

One row per run, read from the run directories (so the table is right even after runs were
resumed by hand) and from ``sweep_state.json`` (for runs that failed before a directory existed):

=====================  ==================================================================================
column                 from
=====================  ==================================================================================
run, <axis keys>       the sweep file
status                 the last attempt's failure if it failed, else run.json's status (``pending``: not run)
step, wall_clock_s     run.json: the step reached and the training loop's seconds (summed over resumes)
<metric>               the last row of metrics.jsonl: sds_gradient_norm, opacity_mean, loss_*, estimator stats
eval_<metric>          RUN_DIR/evaluation.json (``carv3d evaluate``), numeric leaves, nested keys joined by _
var_<method>_R<r>K<k>  RUN_DIR/variance.json (``carv3d variance --out RUN_DIR/variance.json``): the variance;
re_<method>_R<r>K<k>   and the relative efficiency of each row of the report
error                  the failure message
=====================  ==================================================================================

``summary.md`` shows the same rows with the headline columns (the CSV has them all) and lists the
errors under the table. For each axis whose values are all numbers, ``summary_<axis>.png`` plots
the headline metrics against it, one line per combination of the other axes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from carv3d.io import atomic_path, atomic_write_text
from carv3d.log import logger
from carv3d.run_dir import METRICS_FILE, read_status, slugify
from carv3d.sweep.spec import SweepSpec
from carv3d.sweep.state import RunResult

BASE_COLUMNS = ("run", "status", "step", "wall_clock_s")
HEADLINE_METRICS = ("sds_gradient_norm", "parameter_gradient_norm", "opacity_mean", "noise_draws")
PLOT_METRICS = ("wall_clock_s", "sds_gradient_norm", "opacity_mean")
MAX_EVAL_COLUMNS = 24


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten_numbers(data: Any, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten_numbers(value, f"{prefix}_{key}" if prefix else str(key)))
    elif _numeric(data):
        out[prefix] = float(data)
    return out


def _read_json(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("summary: %s is not valid JSON; its columns are left empty", path)
        return None


def last_metrics(run_dir: Path) -> dict[str, float]:
    """Numbers of the last row of ``metrics.jsonl`` (without ``step`` and ``elapsed_seconds``)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: use the one before
            continue
        return {k: float(v) for k, v in row.items() if _numeric(v) and k not in ("step", "elapsed_seconds")}
    return {}


def variance_columns(report: Any) -> dict[str, float]:
    """``var_<method>_R<r>K<k>`` and ``re_<method>_R<r>K<k>`` from a ``carv3d variance`` report."""
    columns: dict[str, float] = {}
    for row in (report or {}).get("rows", []) if isinstance(report, dict) else []:
        try:
            tag = f"{row['method']}_R{row['upstream_samples']}K{row['noise_draws']}"
        except (KeyError, TypeError):
            continue
        if _numeric(row.get("variance")):
            columns[f"var_{tag}"] = float(row["variance"])
        if _numeric(row.get("relative_efficiency")):
            columns[f"re_{tag}"] = float(row["relative_efficiency"])
    return columns


def collect_rows(spec: SweepSpec, results: dict[str, RunResult]) -> list[dict[str, Any]]:
    """One dict per run of the sweep, in the sweep's order (see the module doc for the columns)."""
    rows: list[dict[str, Any]] = []
    for run in spec.runs:
        run_dir = spec.run_dir(run)
        status = read_status(run_dir) if run_dir.is_dir() else {}
        result = results.get(run.name)
        row: dict[str, Any] = {"run": run.name}
        for key, value in run.axes.items():
            row[key] = value if _numeric(value) or isinstance(value, str) else json.dumps(value)
        if result is not None and result.status == "failed":
            row["status"] = "failed"
        else:
            row["status"] = status.get("status") or (result.status if result else "pending")
        row["step"] = status.get("step")
        row["wall_clock_s"] = status.get("elapsed_seconds")
        if run_dir.is_dir():
            row.update(last_metrics(run_dir))
            evaluation = _flatten_numbers(_read_json(run_dir / "evaluation.json"), "eval")
            row.update(dict(list(evaluation.items())[:MAX_EVAL_COLUMNS]))
            row.update(variance_columns(_read_json(run_dir / "variance.json")))
        row["error"] = result.error if result is not None and result.status != "finished" else ""
        rows.append(row)
    return rows


def _columns(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    fixed = ["run", *spec.axis_keys, "status", "step", "wall_clock_s"]
    extra = sorted({k for row in rows for k in row} - set(fixed) - {"error"},
                   key=lambda k: (k.startswith("eval_"), k.startswith(("var_", "re_")), k))
    return [*fixed, *extra, "error"]


def _markdown_columns(spec: SweepSpec, columns: list[str]) -> list[str]:
    keep = {"run", *spec.axis_keys, "status", "step", "wall_clock_s", *HEADLINE_METRICS}
    return [c for c in columns if c in keep or c.startswith(("loss_", "eval_", "re_"))]


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return buffer.getvalue()


def to_markdown(spec: SweepSpec, rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return _format(value).replace("|", "\\|").replace("\n", " ")

    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [f"# Sweep `{spec.name}`", "",
             f"Sweep file: `{spec.file}`" + (f"; base config: `{spec.base}`" if spec.base else ""), "",
             f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ""]
    if spec.overrides:
        lines += ["Every run: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in spec.overrides.items()), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    failed = [row for row in rows if row.get("error")]
    if failed:
        lines += ["", "## Errors", ""] + [f"- `{row['run']}` ({row['status']}): {row['error']}" for row in failed]
    lines += ["", "All columns, including every metric, are in summary.csv.", ""]
    return "\n".join(lines)


def numeric_axes(spec: SweepSpec) -> list[str]:
    """Axes whose values are all numbers (bools excluded), with at least two distinct values."""
    axes = {**spec.grid, **spec.zipped}
    return [key for key, values in axes.items() if all(_numeric(v) for v in values) and len(set(values)) >= 2]


def plot_axis(spec: SweepSpec, rows: list[dict[str, Any]], axis: str, path: Path) -> Optional[Path]:
    """Headline metrics against ``axis``: one line per combination of the other axes' values.

    Axes zipped with ``axis`` change with it, so they do not split lines. Only runs with a value
    are drawn; returns None (and writes nothing) when there is nothing to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partners = set(spec.zipped) if axis in spec.zipped else set()
    others = [k for k in spec.axis_keys if k != axis and k not in partners]
    metrics = [m for m in PLOT_METRICS if any(_numeric(r.get(m)) for r in rows)]
    metrics += [k for k in sorted({k for r in rows for k in r if k.startswith("eval_")})][:3]
    if not metrics:
        return None
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format(row.get(k))}" for k in others) or axis
        lines.setdefault(label, []).append(row)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, members in lines.items():
            points = sorted((r[axis], r[metric]) for r in members if _numeric(r.get(metric)))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        ax.set_xlabel(axis)
        ax.set_title(metric, fontsize=10)
        ax.grid(True, alpha=0.3)
    if 1 < len(lines) <= 12:
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"sweep {spec.name}: final values against {axis}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_summary(spec: SweepSpec, results: dict[str, RunResult]) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and the plots into the sweep directory; return their paths."""
    rows = collect_rows(spec, results)
    columns = _columns(spec, rows)
    directory = spec.directory
    written = {"csv": directory / "summary.csv", "md": directory / "summary.md"}
    atomic_write_text(written["csv"], to_csv(rows, columns))
    atomic_write_text(written["md"], to_markdown(spec, rows, _markdown_columns(spec, columns)))
    for axis in numeric_axes(spec):
        try:
            path = plot_axis(spec, rows, axis, directory / f"summary_{slugify(axis)}.png")
        except Exception as err:  # a plot must never lose the tables
            logger.warning("summary: could not plot %s: %s", axis, err)
            continue
        if path is not None:
            written[f"plot:{axis}"] = path
    return written
