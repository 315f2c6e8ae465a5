"""Every command block of README.md runs as printed, shortened only where a CPU run must be short.

Each fenced block that is not Python or YAML carries a marker on the line above it::

    <!-- readme-run: cli -->         run here, line by line, in a scratch folder (this test)
    <!-- readme-run: transcript -->  the ``$`` command runs here; its output must be the printed one
    <!-- readme-run: layout -->      the run-folder listing: every entry exists in a run the cli blocks made
    <!-- readme-run: setup (...) --> install commands: scripts/bench_setup.py runs them on a fresh clone
    <!-- readme-run: gpu (...) -->   needs a CUDA machine: the reason is stated in the marker

A new block without a marker fails :func:`test_every_command_block_says_where_it_runs`. The
shortening is the one table :data:`SHORTER` below: fewer steps, draws, frames and runs, and the
tiny random Stable Diffusion folder where a config asks for SD weights; the commands, flags and
files are otherwise the README's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-run: ([^>]*?) -->\n)?```(\w*)\n(.*?)```", re.S)

# Appended to every `carv3d train` that starts a run: a few steps, small outputs.
SHORT_TRAIN = ("train.steps=4 train.val_every=2 train.checkpoint_every=2 train.val_resolution=32 "
               "train.turntable_frames=4 export.resolution=48 export.faces=3000 export.texture_size=64")


def shorter(line: str, tiny_sd: Path) -> str:
    """The README line as this test runs it (see :data:`SHORTER`)."""
    for pattern, replacement in SHORTER:
        line = re.sub(pattern, replacement.replace("{tiny_sd}", str(tiny_sd)), line)
    return line


SHORTER: list[tuple[str, str]] = [
    # Installing an extra of this checkout: the extra exists in setup.cfg (this test must not change
    # its own environment; installing is bench_setup.py's part).
    (r'^pip install -e "\.\[(\w+)\]"$', "python -c \"import configparser, sys; c = configparser.ConfigParser(); "
                                      f"c.read('{ROOT / 'setup.cfg'}'); "
                                      "sys.exit('\\1' not in c['options.extras_require'])\""),
    # An SD config on the tiny SD folder (the README's CPU recipe), then every new run shortened.
    (r"--config configs/((?:\w+_)?sd21)\.yaml", r"--config configs/\1.yaml teacher.pretrained={tiny_sd} teacher.resolution=64 "
                                                 "render.width=32 render.height=32 render.samples_per_ray=16"),
    (r"^(carv3d train (?!--resume|--help-config).*)$", rf"\1 {SHORT_TRAIN}"),
    (r"(--resume \S+) train\.steps=\d+", r"\1 train.steps=6"),
    (r"--resolution 256", "--resolution 48"),
    (r"--frames \d+", "--frames 4"),
    (r"(carv3d variance .*)--draws \d+", r"\1--draws 3 --rk 1x1,1x2 --methods uniform,is+stratified"),
    (r"(scripts/bench_variance\.py .*)--early \d+ --late \d+", r"\1--early 2 --late 3 --draws 3 --pilot 2 "
                                                               r"--rk 1x1,1x2 --methods uniform,is+stratified"),
    (r"--out docs/variance\.json", "--out variance_bench.json"),
    (r"scripts/bench_speed\.py --channels-last --out \S+", "scripts/bench_speed.py --device cpu --quick --tiny --out speed.json"),
    (r"configs/sweeps/presets_seeds\.yaml", "short_sweeps/presets_seeds.yaml"),
    (r"--address HEAD:6379", ""),  # a local Ray instead of a cluster's head
    (r"train\.steps=500", "train.steps=5"),
]


def blocks() -> list[tuple[str, str, str]]:
    """(marker, language, body) of every fenced block of the README, in order."""
    return [(marker or "", language, body) for marker, language, body in BLOCK.findall(README.read_text())]


def test_every_command_block_says_where_it_runs():
    kinds = {"cli", "transcript", "layout"}
    unmarked = [body.splitlines()[0] for marker, language, body in blocks()
                if language not in ("python", "yaml") and not marker]
    assert not unmarked, f"README blocks without a readme-run marker: {unmarked}"
    for marker, language, body in blocks():
        if marker and marker not in kinds:
            kind, _, where = marker.partition(" ")
            assert kind in ("setup", "gpu") and where.startswith("(") and len(where) > 10, marker
    assert sum(marker == "cli" for marker, _, _ in blocks()) >= 5


def commands(kind: str) -> list[str]:
    lines = []
    for marker, _, body in blocks():
        if marker == kind:
            for line in body.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line:
                    lines.append(line)
    return lines


def short_sweep(folder: Path) -> None:
    """configs/sweeps/presets_seeds.yaml with one seed and one prompt (2 runs), a few steps each."""
    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "presets_seeds.yaml").read_text())
    spec["grid"] = {"estimator.preset": spec["grid"]["estimator.preset"], "train.seed": [0], "prompt": ["a red cube"]}
    spec["overrides"] = {"train.steps": 2, "train.val_every": 0, "train.checkpoint_every": 2,
                         "train.turntable_frames": 2, "train.val_resolution": 32, "export.at_end": False}
    (folder / "short_sweeps").mkdir()
    (folder / "short_sweeps" / "presets_seeds.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def run(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    for name in ("configs", "scripts"):
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    return folder, env


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 27 commands: 3 min 40 s on 2 quiet cores, 37 min when shared with 4 other jobs
def test_the_readme_commands_run_as_printed(scratch, tiny_sd_path):
    """The cli blocks in order; `runs/a_red_cube-...` is the first run they made, as a user would
    paste it. Then the run-folder listing is checked against that run."""
    folder, env = scratch
    short_sweep(folder)
    first_run = None
    ran = []
    for line in commands("cli"):
        line = shorter(line, tiny_sd_path)
        if first_run is not None:
            line = re.sub(r"runs/a_red_cube-[\w.-]*\.\.\.|runs/a_red_cube-\d{8}-\d{6}", str(first_run), line)
        started = time.perf_counter()
        result = run(line, folder, env)
        ran.append(line)
        print(f"{time.perf_counter() - started:6.1f} s  {line}", flush=True)
        assert result.returncode == 0, f"README command failed: {line}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        if first_run is None and line.startswith("carv3d train"):
            first_run = sorted((folder / "runs").glob("a_red_cube-*"))[0]
    assert first_run is not None and any("sweep" in line for line in ran)

    # What the commands promised, checked on their outputs.
    status = json.loads((first_run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 6  # trained 4, resumed to 6
    assert (first_run / "variance.json").is_file() and (first_run / "evaluation.json").is_file()
    assert (folder / "variance.json").is_file() and (folder / "variance.png").is_file()
    summary = folder / "runs" / "sweeps" / "presets-seeds" / "summary.csv"
    assert summary.is_file() and summary.read_text().count("finished") == 2

    # The run-folder listing of the README names what a run holds.
    listing = next(body for marker, _, body in blocks() if marker == "layout")
    names = re.findall(r"^  (\S+)\s", listing, re.M)  # entries sit at two spaces; their notes further in
    assert {"config.yaml", "run.json", "metrics.jsonl", "checkpoints/", "validation/", "turntable.mp4", "mesh/"} <= set(names)
    for name in names:
        if name == "run.lock":  # held only while a process trains the run
            assert not (first_run / name).exists()
            continue
        assert (first_run / name.rstrip("/")).exists(), f"README's run listing names {name}, the run has no such entry"
    assert {p.name for p in (first_run / "mesh").iterdir()} >= {"mesh.glb", "mesh.obj", "mesh.ply"}


def test_the_printed_error_is_the_error(scratch):
    """The transcript's `$` command prints exactly the README's line (and exits non-zero)."""
    folder, env = scratch
    body = next(body for marker, _, body in blocks() if marker == "transcript")
    command, *expected = body.strip().splitlines()
    assert command.startswith("$ ")
    result = run(command[2:], folder, env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == expected
