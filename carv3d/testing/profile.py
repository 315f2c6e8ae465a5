"""The top kernels of a training step under ``torch.profiler``, split by the step's sections.

Used by ``scripts/bench_speed.py --profile`` (and formatted for docs/BENCHMARKS.md by
``scripts/tables.py profile``). On CUDA a "kernel" is a device activity (kernel, memcpy, memset;
kernels replayed from a CUDA graph included) and its time is device time; on a CPU it is an operator
(``aten::mm``, ...) and its time is the operator's self CPU time.

Which section of the step (render / encode / teacher / particle / backward / optimizer, the
sections of :class:`carv3d.estimator.timing.StepTimer` that :class:`carv3d.step.DistillationStep`
times) a kernel belongs to: :func:`annotated_sections` wraps the step's timer so that each section
also opens a ``record_function`` range named ``carv3d.<section>``. A kernel's section is the range
that contains the start of the host operator that launched it (on CUDA, the operator the profiler
links the kernel to; on a CPU, the operator itself). Time containment rather than the call tree,
because the backward runs on autograd's own thread on CUDA while the host waits in
``loss.backward()`` inside the ``carv3d.backward`` range. Anything outside every range (zeroing the
gradients, the estimator's arithmetic between teacher calls, the guard) is ``other``; a kernel the
profiler could not link to a host operator is ``unlinked``.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator, Optional

RANGE_PREFIX = "carv3d."
OTHER, UNLINKED = "other", "unlinked"


class AnnotatedTimer:
    """A step timer whose sections are also ``record_function`` ranges (``carv3d.<section>``).

    Delegates everything else to the wrapped :class:`~carv3d.estimator.timing.StepTimer`, so the
    section clocks keep running while the profiler watches.
    """

    def __init__(self, timer: Any) -> None:
        self.wrapped = timer

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        from torch.profiler import record_function

        with record_function(RANGE_PREFIX + name), self.wrapped(name):
            yield

    def __getattr__(self, item: str) -> Any:
        return getattr(self.wrapped, item)


@contextmanager
def annotated_sections(step: Any) -> Iterator[None]:
    """While open, ``step``'s sections (a :class:`carv3d.step.DistillationStep`) are profiler ranges."""
    original = step.timer
    step.timer = AnnotatedTimer(original)
    try:
        yield
    finally:
        step.timer = original


# ------------------------------------------------------------------ names
_CALL_ARGS = re.compile(r"\((?:[^()]|\([^()]*\))*\)\s*$")
_NAMESPACES = re.compile(r"(?:\(anonymous namespace\)::|\b[A-Za-z_]\w*::)+")


def short_kernel_name(name: str, max_len: int = 72) -> str:
    """A kernel's name for a table: no ``void``, no parameter list, no namespaces, at most ``max_len``.

    ``void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, ...>(int, ...)``
    → ``vectorized_elementwise_kernel<4, CUDAFunctor_add<Half>, ...>``.
    """
    text = " ".join(str(name).split())
    if text.startswith("void ") or "<" in text or "(" in text:  # a C++ kernel signature; `aten::mm` stays
        text = text[5:] if text.startswith("void ") else text
        stripped = _CALL_ARGS.sub("", text)
        text = stripped if stripped.strip() else text
        text = _NAMESPACES.sub("", text).strip()
    if len(text) > max_len:
        text = text[: max_len - 1].rstrip() + "…"
    return text or str(name)[:max_len]


# ------------------------------------------------------------------ the table
def _section_ranges(events: list[Any]) -> tuple[list[float], list[float], list[str]]:
    ranges = sorted((e.time_range.start, e.time_range.end, e.name[len(RANGE_PREFIX):])
                    for e in events if str(e.name).startswith(RANGE_PREFIX))
    return [r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]


def _section_at(t: float, starts: list[float], ends: list[float], names: list[str]) -> str:
    i = bisect.bisect_right(starts, t) - 1
    # sections are disjoint in time, but look one back too in case two touch
    for j in (i, i - 1):
        if 0 <= j < len(starts) and starts[j] <= t <= ends[j]:
            return names[j]
    return OTHER


# Ranges that libraries open (Inductor's compiled graphs, the profiler's steps): on CUDA the profiler
# also shows them on the device, spanning their kernels; counting them would count the kernels twice.
_RANGE_NAMES = (RANGE_PREFIX, "ProfilerStep", "## Call CompiledFxGraph", "Torch-Compiled Region", "CompiledFunction")


def _is_annotation(event: Any) -> bool:
    return bool(getattr(event, "is_user_annotation", False)) or str(event.name).startswith(_RANGE_NAMES)


# Host-side CUDA runtime / driver calls (cudaLaunchKernel, cuLaunchKernel, ...): never a kernel's launcher.
_RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]")


def kineto_links(prof: Any) -> dict[int, int]:
    """Device activity id → the id of the host operator it is linked to, from the profiler's raw
    Kineto events.

    ``FunctionEvent`` carries ``linked_correlation_id`` only in recent torch releases; before that
    the link stopped at the raw ``_KinetoEvent`` (whose ``correlation_id()`` is the ``FunctionEvent``'s
    ``id``). :func:`kernel_summary` reads this map when its events lack the attribute. Empty when
    the raw events are not reachable.
    """
    from torch.autograd import DeviceType

    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return {}
    links = {}
    for event in results.events():
        linked = int(event.linked_correlation_id())
        if linked > 0 and event.device_type() != DeviceType.CPU:
            links[int(event.correlation_id())] = linked
    return links


def kernel_summary(events: list[Any], device_type: str, steps: int, step_ms: float, top: int = 10,
                   links: Optional[dict[int, int]] = None) -> dict[str, Any]:
    """The top-``top`` kernels by self device time (CPU: self CPU time) from a profiler's ``events()``.

    Args:
        events: ``profile.events()`` (``FunctionEvent`` list) of ``steps`` profiled steps.
        device_type: ``"cuda"`` or ``"cpu"``: what a kernel is (module docstring).
        steps: how many steps the profile covers.
        step_ms: the wall clock of one profiled step (profiler overhead included), the 100 % of
            ``percent_of_step``.
        links: device activity id → host operator id (:func:`kineto_links`), for events without a
            ``linked_correlation_id`` attribute (older torch); without either, a kernel is ``unlinked``.

    Returns:
        ``kernels`` (rows: ``name`` (short), ``name_full``, ``calls``, ``total_ms``, ``ms_per_step``,
        ``percent_of_step``, ``section`` (where most of its time is), ``sections_ms`` (ms per step by
        section), ``launchers_ms`` (its three costliest launching operators, with their input shapes
        when the profile recorded them, ms per step)), ``kernel_ms_per_step`` (all kernels), ``kernels_distinct``, ``sections_ms_per_step``
        (all kernels' time by section), ``top_percent_of_step`` (the rows' sum), ``step_ms``, ``steps``.
    """
    from torch.autograd import DeviceType

    cuda = device_type == "cuda"
    starts, ends, names = _section_ranges(events)
    links = links or {}

    def linked_id(event: Any) -> int:
        linked = getattr(event, "linked_correlation_id", None)
        return links.get(event.id, 0) if linked is None else int(linked)

    by_id = {}
    if cuda:  # host operators by id; runtime calls share the id space (CUPTI's counter), so never them
        by_id = {e.id: e for e in events if e.device_type == DeviceType.CPU and not _RUNTIME_CALL.match(str(e.name))
                 and not getattr(e, "linked_correlation_id", 0)}
    table: dict[str, dict[str, Any]] = {}
    by_section: dict[str, float] = {}
    for event in events:
        if _is_annotation(event):
            continue
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            us = float(event.time_range.end - event.time_range.start)
            launcher = by_id.get(linked_id(event))
            section = UNLINKED if launcher is None else _section_at(launcher.time_range.start, starts, ends, names)
        else:
            if event.device_type != DeviceType.CPU or getattr(event, "is_python_function", False):
                continue
            us = float(event.self_cpu_time_total)
            section = _section_at(event.time_range.start, starts, ends, names)
            launcher = event
        if us <= 0:
            continue
        row = table.setdefault(event.name, {"calls": 0, "us": 0.0, "sections": {}, "launchers": Counter()})
        row["calls"] += 1
        row["us"] += us
        row["sections"][section] = row["sections"].get(section, 0.0) + us
        if launcher is not None:  # which operator, on which input shapes (with record_shapes), spends it
            shapes = getattr(launcher, "input_shapes", None)
            row["launchers"][f"{launcher.name} {shapes}" if shapes else str(launcher.name)] += us
        by_section[section] = by_section.get(section, 0.0) + us
    steps = max(int(steps), 1)
    rows = []
    for full, row in sorted(table.items(), key=lambda item: -item[1]["us"])[:top]:
        per_step = row["us"] / 1000.0 / steps
        rows.append({
            "name": short_kernel_name(full), "name_full": full[:400], "calls": row["calls"],
            "calls_per_step": row["calls"] / steps, "total_ms": row["us"] / 1000.0, "ms_per_step": per_step,
            "percent_of_step": 100.0 * per_step / step_ms if step_ms > 0 else None,
            "section": max(row["sections"], key=row["sections"].get),
            "sections_ms": {k: v / 1000.0 / steps for k, v in sorted(row["sections"].items())},
            "launchers_ms": {k: v / 1000.0 / steps for k, v in row["launchers"].most_common(3)},
        })
    total = sum(r["us"] for r in table.values()) / 1000.0 / steps
    return {
        "what": "device kernels by self device time" if cuda else "CPU operators by self CPU time",
        "steps": steps, "step_ms": step_ms, "kernel_ms_per_step": total,
        "kernel_percent_of_step": 100.0 * total / step_ms if step_ms > 0 else None,
        "kernels_distinct": len(table), "kernels": rows,
        "top_percent_of_step": sum(r["percent_of_step"] or 0.0 for r in rows),
        "sections_ms_per_step": {k: v / 1000.0 / steps for k, v in sorted(by_section.items())},
    }


def profile_markdown(profile: dict[str, Any]) -> str:
    """``profile`` (the ``profile`` object of bench_speed's JSON) as a markdown table for docs/BENCHMARKS.md."""
    unit = "device" if profile.get("device", "").startswith("cuda") else "CPU"
    launchers = any(row.get("launchers_ms") for row in profile["kernels"])  # profiles since 2026-12-06 18:15
    lines = [f"| # | kernel | section | calls / step | ms / step | % of step |" + (" launched by (most time) |" if launchers else ""),
             "|---|---|---|---|---|---|" + ("---|" if launchers else "")]
    for i, row in enumerate(profile["kernels"], 1):
        name = row["name"].replace("|", "\\|")
        pct = "—" if row.get("percent_of_step") is None else f"{row['percent_of_step']:.1f}"
        line = f"| {i} | `{name}` | {row['section']} | {row['calls_per_step']:.1f} | {row['ms_per_step']:.3f} | {pct} |"
        if launchers:
            top = next(iter(row.get("launchers_ms") or {}), "—").replace("|", "\\|")
            line += f" {top if len(top) <= 90 else top[:89] + '…'} |"
        lines.append(line)
    sections = ", ".join(f"{k} {v:.2f}" for k, v in profile.get("sections_ms_per_step", {}).items())
    lines.append("")
    lines.append(f"{profile.get('config', 'step')}: {profile['steps']} profiled steps of {profile['step_ms']:.1f} ms "
                 f"(wall clock under the profiler; {profile.get('unprofiled_step_ms', float('nan')):.1f} ms without it); "
                 f"{unit} time of all {profile['kernels_distinct']} kernels {profile['kernel_ms_per_step']:.2f} ms "
                 f"per step, the top {len(profile['kernels'])} {profile['top_percent_of_step']:.1f} % of the step. "
                 f"Kernel ms per step by section: {sections or '—'}.")
    return "\n".join(lines)
