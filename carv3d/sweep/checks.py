"""Checks on a whole sweep that need more than one run's config: its size, and its prompts.

- Size: a sweep's runs are a product of its axes, so one extra axis can turn 100 runs into 10⁴.
  Checking that many configs takes minutes and training them days, so a sweep above
  :data:`MAX_RUNS` is refused at once, before anything is checked, unless the limit is raised
  (``carv3d sweep --max-runs N``, ``run_sweep(..., max_runs=N)``).
- Prompts: a closed-vocabulary teacher (the embedded one) refuses a prompt with a word it was not
  trained on ("a red teapot") only when a run loads it. The vocabulary is a small JSON file next to
  the weights, so each distinct (teacher, prompt) pair is checked here, before any run starts,
  without loading the teacher.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from carv3d.errors import PromptError
from carv3d.teacher.loading import closed_vocabulary
from carv3d.sweep.errors import SweepError

MAX_RUNS = 1000
# Measured on one CPU core: resolving one run's config (carv3d.sweep.spec.run_config) takes about 7 ms,
# so 10⁴ runs take over a minute to check (a minute and a half with the prompts and the plan).
SECONDS_PER_RUN_CHECK = 0.007


def count_runs(grid: dict[str, list[Any]], zipped: dict[str, list[Any]]) -> int:
    """``product(len(axis) for grid axes) × zip length``, without expanding anything."""
    rows = len(next(iter(zipped.values()))) if zipped else 1
    return math.prod(len(values) for values in grid.values()) * rows


def check_size(grid: dict[str, list[Any]], zipped: dict[str, list[Any]], max_runs: Optional[int], where: str) -> int:
    """Return the number of runs; raise :class:`SweepError` when it is above ``max_runs`` (None: no limit)."""
    count = count_runs(grid, zipped)
    if max_runs is not None and count > max_runs:
        factors = [f"{key}: {len(values)}" for key, values in grid.items()]
        if zipped:
            factors.append(f"zip rows: {len(next(iter(zipped.values())))}")
        minutes = count * SECONDS_PER_RUN_CHECK / 60
        raise SweepError(
            f"{where}: the sweep has {count:,} runs ({' × '.join(factors)}), more than the limit of {max_runs:,}. "
            f"Checking their configs alone takes about {max(minutes, 1):.0f} min and each run trains for minutes, "
            f"so a grid this large is usually a mistake. Split it into smaller sweeps, or raise the limit with "
            f"--max-runs {count} (run_sweep(..., max_runs={count}))."
        )
    return count


def check_prompts(runs: Iterable[tuple[str, DictConfig]], locate: Callable[[str, str], str]) -> None:
    """Check every run's prompt and negative prompt against its teacher's closed vocabulary.

    Args:
        runs: (run name, resolved config) pairs.
        locate: ``(run name, config key) -> "FILE:LINE"`` where the sweep sets that key for that run.

    Raises:
        SweepError: the first run whose prompt has a word its teacher does not know, with the
            line that sets the prompt, the unknown words and the words the teacher knows.
    """
    vocabularies: dict[str, tuple[Any, str]] = {}
    checked: set[tuple[str, str, str]] = set()
    for name, cfg in runs:
        pretrained = str(OmegaConf.select(cfg, "teacher.pretrained", default="") or "")
        prompt = str(cfg.prompt)
        negative = str(OmegaConf.select(cfg, "teacher.negative_prompt", default="") or "")
        if not pretrained or (pretrained, prompt, negative) in checked:
            continue
        checked.add((pretrained, prompt, negative))
        if pretrained not in vocabularies:
            vocabularies[pretrained] = closed_vocabulary(pretrained)
        vocabulary, folder = vocabularies[pretrained]
        if vocabulary is None:
            continue
        for key, text, what in (("prompt", prompt, "prompt"),
                                ("teacher.negative_prompt", negative, "negative prompt (teacher.negative_prompt)")):
            try:
                vocabulary.check(text, what, folder)
            except PromptError as err:
                raise SweepError(f"{locate(name, key)}: run '{name}': {err}") from None
