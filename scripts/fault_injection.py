#!/usr/bin/env python
"""Fault injection: attack `carv3d train` and `carv3d export` as a user and an operator would.

Every trial runs the real command line (`carv3d ...` subprocesses with a tiny Stable-Diffusion-shaped
teacher, a few seconds of training each) and checks what a user would rely on afterwards:

- no unreadable checkpoint, and LATEST absent or naming a readable checkpoint of its own run;
- run.json truthful: its step and checkpoint agree with LATEST (one checkpoint behind at most after
  a kill -9, exactly after a clean stop), its status says finished / interrupted as it happened;
- the run resumes and finishes; after kill -9 the finished run is bit-identical (scene, optimiser,
  random generators) to an uninterrupted one, and no stale temporary is left;
- where an error is due, a clear one: exit code 2, one line ``carv3d <command>: error: ...``, no
  traceback.

Trials (``--quick`` runs a subset, marked *):

    kill -9*          SIGKILL at random moments: while starting, training, writing a checkpoint
                      (triggered when a checkpoint temporary appears) and writing the outputs;
                      checkpoint_every=1. Each killed run is resumed until it finishes.
    SIGINT*           Ctrl-C while training, during a validation sheet, during the final export,
                      twice in a row, and in the first two seconds of start-up.
    SIGTERM*          what schedulers and `docker stop` send: must behave like Ctrl-C.
    disk full*        while saving a checkpoint, and while `carv3d export` writes the mesh. As root,
                      a tiny tmpfs in a private mount namespace (a real ENOSPC); otherwise
                      RLIMIT_FSIZE (EFBIG, the same code path: carv3d treats both as a full disk).
    read-only*        a read-only output folder (new run) and a read-only run directory (resume). As
                      root, a read-only bind mount in a private mount namespace; otherwise chmod 555.
    bad checkpoint*   truncated*, random bytes, empty, a malicious pickle* (must not run), missing,
                      LATEST naming another run's checkpoint* and LATEST holding garbage: `--resume`
                      (and `carv3d export` where it matters) must refuse with a clean error.
    two resumes*      two `--resume` of one run at once: the second is refused, steps not doubled.
    stale temporaries* checkpoint temporaries left by a killed write are removed on resume.

Writes a JSON summary (counts per trial kind, pass/fail, every failed check with its reason) to
``--out``; exits 1 when a trial failed. Takes about 2 minutes with --quick and 6 to 8 minutes
without on 2 CPU cores.

Examples:
    python scripts/fault_injection.py --quick
    python scripts/fault_injection.py --out docs/fault_injection.json --kills 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS = 16  # steps of every reference run; checkpoint after each one
PROCESS_TIMEOUT = 240.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "fault_injection.json"), help="the JSON summary")
    parser.add_argument("--quick", action="store_true", help="a subset with 4 kills (about 2 minutes)")
    parser.add_argument("--kills", type=int, default=None, help="kill -9 moments (default 20, --quick 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--jobs", type=int, default=2, help="trials run at once (each is one CPU process)")
    parser.add_argument("--workdir", default=None, help="keep run directories and logs here (default: a temporary folder)")
    parser.add_argument("--only", action="append", default=None, metavar="TEXT",
                        help="run only the trials whose name contains TEXT (repeatable), e.g. --only 'bad checkpoint'")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="start no new trial after this many minutes; the ones left are listed as skipped")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- results
@dataclass
class Trial:
    """One attack and the checks made after it. Passed when every check passed."""

    kind: str
    name: str
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: Any, detail: str = "") -> bool:
        ok = bool(ok)
        self.checks[name] = self.checks.get(name, True) and ok
        if not ok:
            self.notes.append(f"{name}: {detail}"[:600])
        return ok

    def note(self, text: str) -> None:
        self.notes.append(text[:600])

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


# ---------------------------------------------------------------------------------------- the command line
class Carv3d:
    """Runs `carv3d` as a user would, each process's output in its own log file."""

    def __init__(self, workdir: Path, teacher: Path):
        self.workdir = workdir
        self.teacher = teacher
        exe = Path(sys.executable).with_name("carv3d")
        self.exe = [str(exe)] if exe.is_file() else [sys.executable, "-m", "carv3d.cli"]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(workdir / "mpl")}
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._lock = threading.Lock()

    def overrides(self, **extra: Any) -> list[str]:
        values = {"teacher.pretrained": str(self.teacher), "scene.grid.n_levels": 2, "scene.grid.log2_hashmap_size": 10,
                  "scene.grid.base_resolution": 8, "scene.mlp_width": 16, "render.width": 16, "render.height": 16,
                  "render.samples_per_ray": 8, "estimator.preset": "sds", "export.resolution": 16,
                  "export.threshold": 2.0, "export.texture_size": 64, "train.steps": STEPS, "train.val_every": 4,
                  "train.checkpoint_every": 1, "train.log_every": 1, "train.turntable_frames": 2,
                  "train.val_resolution": 16, "train.progress": False, "train.tensorboard": False}
        values.update(extra)
        return [f"{key}={value}" for key, value in values.items()]

    def train_args(self, output_dir: Path, name: str, **extra: Any) -> list[str]:
        return ["train", "--prompt", "a red cube",
                *self.overrides(**{"train.output_dir": str(output_dir), "train.run_name": name, **extra})]

    @staticmethod
    def resume_args(run_dir: Path, *overrides: str) -> list[str]:
        return ["train", "--resume", str(run_dir), *overrides]

    def start(self, args: list[str], label: str, wrap: Optional[Callable[[list[str]], list[str]]] = None,
              preexec: Optional[Callable[[], None]] = None) -> "Process":
        with self._lock:
            self._count += 1
            log = self.logs / f"{self._count:03d}-{label}.log"
        command = self.exe + args
        if wrap is not None:
            command = wrap(command)
        handle = log.open("w")
        popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                 preexec_fn=preexec)
        handle.close()
        return Process(popen, log, time.perf_counter())

    def run(self, args: list[str], label: str, **kwargs: Any) -> tuple[int, str]:
        process = self.start(args, label, **kwargs)
        return process.wait(), process.output()


@dataclass
class Process:
    popen: subprocess.Popen
    log: Path
    started: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = PROCESS_TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return -999  # reported as a timeout

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until(condition: Callable[[], bool], process: Optional[Process], timeout: float = 120.0,
               interval: float = 0.002) -> bool:
    """Poll ``condition`` until it holds (True), the process ends or the timeout passes (False)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if condition():
            return True
        if process is not None and not process.alive():
            return condition()
        time.sleep(interval)
    return False


# ---------------------------------------------------------------------------------------- run directory checks
def latest_step(run_dir: Path) -> int:
    """The step LATEST names (-1 when there is none or it is not a checkpoint name)."""
    try:
        name = (run_dir / "checkpoints" / "LATEST").read_text().strip()
        return int(name[len("step_"):-len(".pt")]) if name.startswith("step_") and name.endswith(".pt") else -1
    except (OSError, ValueError):
        return -1


def temporaries(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) if folder.is_dir() else []


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def check_checkpoints(trial: Trial, run_dir: Path) -> Optional[Path]:
    """No unreadable checkpoint; LATEST absent or valid. Returns the latest checkpoint (or None)."""
    from carv3d.checkpoint import latest_checkpoint, load_checkpoint
    from carv3d.errors import CheckpointError

    folder = run_dir / "checkpoints"
    unreadable = []
    for path in sorted(folder.glob("step_*.pt")) if folder.is_dir() else []:
        try:
            state = load_checkpoint(path)
            if int(state["step"]) != int(path.stem[len("step_"):]):
                unreadable.append(f"{path.name} holds step {state['step']}")
        except (CheckpointError, KeyError, ValueError) as err:
            unreadable.append(f"{path.name}: {err}")
    trial.check("no unreadable checkpoint", not unreadable, "; ".join(unreadable))
    if not (folder / "LATEST").exists():
        return None
    try:
        latest = latest_checkpoint(run_dir)
        load_checkpoint(latest)
    except CheckpointError as err:
        trial.check("LATEST valid", False, str(err))
        return None
    trial.check("LATEST valid", True)
    return latest


def check_status_after_crash(trial: Trial, run_dir: Path, latest: Optional[Path]) -> None:
    """After kill -9: run.json is at most one checkpoint behind LATEST and names an existing file."""
    status = read_json(run_dir / "run.json")
    if latest is None:
        trial.check("run.json truthful", int(status.get("step", 0) or 0) == 0,
                    f"no checkpoint, yet run.json says step {status.get('step')}")
        return
    step, at = int(status.get("step", -1) or 0), latest_step(run_dir)
    named = status.get("checkpoint")
    trial.check("run.json truthful", at - 1 <= step <= at and status.get("status") in ("running", "finished")
                and (named is None or (run_dir / "checkpoints" / str(named)).is_file()),
                f"run.json {json.dumps({k: status.get(k) for k in ('status', 'step', 'checkpoint')})} vs LATEST step {at}")


def check_status_after_stop(trial: Trial, run_dir: Path, expected: tuple[str, ...]) -> dict[str, Any]:
    """After a clean stop or finish: run.json's status is expected and its step/checkpoint equal LATEST's."""
    status = read_json(run_dir / "run.json")
    at = latest_step(run_dir)
    trial.check("run.json truthful", status.get("status") in expected and int(status.get("step", -1)) == at
                and status.get("checkpoint") == f"step_{at:07d}.pt",
                f"run.json {json.dumps({k: status.get(k) for k in ('status', 'step', 'checkpoint')})}, "
                f"LATEST step {at}, expected status {'/'.join(expected)}")
    return status


def check_clean_error(trial: Trial, rc: int, text: str, command: str, *must_say: str) -> None:
    """Exit code 2, no traceback, and exactly one ``carv3d <command>: error:`` line, the last one."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"carv3d {command}: error:")]
    trial.check("exit code 2", rc == 2, f"exit code {rc}; last lines: {' | '.join(lines[-3:])}")
    trial.check("no traceback", "Traceback" not in text, " | ".join(lines[-4:]))
    trial.check("one-line error", len(errors) == 1 and lines and lines[-1] == errors[0], " | ".join(lines[-3:]))
    for words in must_say:
        trial.check(f"message says {words!r}", errors and words in errors[0], errors[0] if errors else "no error line")


def check_clean_stop(trial: Trial, rc: int, text: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    trial.check("exit code 130", rc == 130, f"exit code {rc}; last lines: {' | '.join(lines[-3:])}")
    trial.check("no traceback", "Traceback" not in text, " | ".join(lines[-4:]))


def check_resume_finishes(trial: Trial, carv3d: Carv3d, run_dir: Path, label: str, *overrides: str) -> None:
    rc, text = carv3d.run(carv3d.resume_args(run_dir, *overrides), label)
    trial.check("resume finishes", rc == 0, f"exit code {rc}: {' | '.join(text.splitlines()[-3:])}")
    check_checkpoints(trial, run_dir)
    check_status_after_stop(trial, run_dir, ("finished",))


def same_training_state(a: Path, b: Path) -> tuple[bool, list[str], list[str]]:
    """Compare two checkpoints: (scene, optimiser and generators identical, keys that differ there, other keys that differ)."""
    import torch

    from carv3d.checkpoint import load_checkpoint

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}/{key}").items()}
        if isinstance(node, (list, tuple)):
            return {k: v for i, value in enumerate(node) for k, v in flat(value, f"{prefix}/{i}").items()}
        return {prefix: node}

    def equal(u: Any, v: Any) -> bool:
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor):
            if u.shape != v.shape or u.dtype != v.dtype:
                return False
            if u.is_floating_point():  # NaN equals NaN here: "bit-identical", not "numerically equal"
                return bool(torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(0.0), v.nan_to_num(0.0)))
            return bool(torch.equal(u, v))
        return u == v or (isinstance(u, float) and isinstance(v, float) and u != u and v != v)

    x, y = flat(load_checkpoint(a)), flat(load_checkpoint(b))
    differ = [key for key in sorted(set(x) | set(y)) if not equal(x.get(key), y.get(key))]
    state_keys = ("/scene", "/optimizer", "/host_generator", "/device_generator", "/step")
    core = [k for k in differ if k.startswith(state_keys)]
    volatile = ("elapsed", "timer", "seconds")
    other = [k for k in differ if k not in core and not any(word in k for word in volatile)]
    return not core, core, other


# ---------------------------------------------------------------------------------------- namespaces (as root)
def private_mounts_available() -> bool:
    """Whether this process may make a private mount namespace (root with unshare): a real read-only
    bind mount and a real tiny tmpfs, visible only to the child."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=4k tmpfs /mnt && umount /mnt"], capture_output=True)
    return probe.returncode == 0


def read_only_wrap(folder: Path) -> Callable[[list[str]], list[str]]:
    def wrap(command: list[str]) -> list[str]:
        q = shlex.quote(str(folder))
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"mount --bind {q} {q} && mount -o remount,bind,ro {q} && exec {shlex.join(command)}"]
    return wrap


def tmpfs_wrap(mount_point: Path, size_bytes: int, copy_in: Optional[Path], copy_out: Path) -> Callable[[list[str]], list[str]]:
    """Run the command with a ``size_bytes`` tmpfs at ``mount_point`` holding a copy of ``copy_in``;
    afterwards the tmpfs's contents are copied to ``copy_out`` (the tmpfs ends with the namespace)."""
    def wrap(command: list[str]) -> list[str]:
        m, out = shlex.quote(str(mount_point)), shlex.quote(str(copy_out))
        pages = max(1, -(-size_bytes // 4096))
        copy = f"cp -a {shlex.quote(str(copy_in))} {m}/ && " if copy_in is not None else ""
        script = (f"mount -t tmpfs -o size={pages * 4}k tmpfs {m} && {copy}"
                  f"{{ {shlex.join(command)}; rc=$?; }}; rm -rf {out}; mkdir -p {out}; cp -a {m}/. {out}/; exit $rc")
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
    return wrap


def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored so they fail, not kill)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def du(folder: Path) -> int:
    """Bytes ``folder`` takes on a tmpfs (whole 4 KiB pages per file)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------- the trials
class Attack:
    """The trials. Each copies the finished reference run (or starts its own) so that they are independent."""

    def __init__(self, carv3d: Carv3d, workdir: Path, kills: int, seed: int, quick: bool):
        self.carv3d = carv3d
        self.workdir = workdir
        self.kills = kills
        self.seed = seed
        self.quick = quick
        self.reference: Optional[Path] = None
        self.mounts = private_mounts_available()
        self.timing: dict[str, float] = {}
        self.deadline: Optional[float] = None

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def copy(self, name: str) -> Path:
        assert self.reference is not None
        target = self.workdir / "copies" / name
        shutil.copytree(self.reference, target)
        return target

    # -------------------------------------------------------------- reference
    def make_reference(self) -> Trial:
        trial = Trial("reference", "uninterrupted run")
        out = self.workdir / "reference"
        process = self.carv3d.start(self.carv3d.train_args(out, "run"), "reference")
        run_dir = out / "run"
        wait_until(lambda: latest_step(run_dir) >= 1, process, timeout=PROCESS_TIMEOUT)
        first = time.perf_counter() - process.started
        wait_until(lambda: latest_step(run_dir) >= STEPS, process, timeout=PROCESS_TIMEOUT)
        trained = time.perf_counter() - process.started
        rc = process.wait()
        self.timing = {"startup_s": first, "train_s": max(trained - first, 0.5),
                       "outputs_s": max(time.perf_counter() - process.started - trained, 0.2)}
        trial.note(f"timing: {json.dumps({k: round(v, 2) for k, v in self.timing.items()})}")
        trial.check("finishes", rc == 0, f"exit code {rc}: {process.output()[-500:]}")
        check_checkpoints(trial, run_dir)
        check_status_after_stop(trial, run_dir, ("finished",))
        self.reference = run_dir
        return trial

    # -------------------------------------------------------------- kill -9
    def kill_chain(self, chain: int, n_kills: int) -> list[Trial]:
        """Kill one run after another at random moments, resuming until each finishes."""
        rng = random.Random(self.seed * 1000 + chain)
        trials: list[Trial] = []
        out = self.workdir / f"kill-{chain}"
        run_index, kills = 0, 0
        run_dir: Optional[Path] = None
        while kills < n_kills or run_dir is not None:
            if self.past_deadline() and kills < n_kills:
                n_kills = kills  # no more kills: finish the run in hand
                trials.append(Trial("kill -9", f"chain {chain}: kills left out", data={"skipped": True}))
            if run_dir is None:
                run_index += 1
                run_dir = out / f"run{run_index}"
            # A run whose steps are all done was already killed at its end once: let it finish, so
            # that the kills spread over fresh runs' training instead of piling up at one run's end.
            finishing = kills >= n_kills or latest_step(run_dir) >= STEPS
            has_checkpoint = (run_dir / "checkpoints" / "LATEST").is_file()
            if run_dir.exists() and not has_checkpoint:
                trials.append(self._no_checkpoint_resume(run_dir))
                shutil.rmtree(run_dir)
            args = (self.carv3d.resume_args(run_dir) if run_dir.exists()
                    else self.carv3d.train_args(out, run_dir.name))
            if finishing:
                trial = Trial("kill -9", f"chain {chain} {run_dir.name}: resume to the end (from step {latest_step(run_dir)})")
                rc, text = self.carv3d.run(args, f"kill{chain}-finish")
                trial.check("resume finishes", rc == 0, f"exit code {rc}: {' | '.join(text.splitlines()[-3:])}")
                self._check_finished_run(trial, run_dir)
                trials.append(trial)
                run_dir = None
                continue
            mode = rng.choices(["training", "checkpoint write", "start-up", "outputs"], [0.45, 0.35, 0.1, 0.1])[0]
            if mode == "training" and latest_step(run_dir) >= STEPS - 1:
                mode = "outputs"  # no step left to interrupt: the end of the run is
            stale = set(temporaries(run_dir))
            process = self.carv3d.start(args, f"kill{chain}-{kills + 1}-{mode.replace(' ', '-')}")
            during_write = self._kill_at(process, run_dir, mode, rng)
            rc = process.wait()
            if rc == 0:  # it finished before the moment came: a finished run, checked like one
                trial = Trial("kill -9", f"chain {chain} {run_dir.name}: finished before the kill")
                self._check_finished_run(trial, run_dir)
                trials.append(trial)
                run_dir = None
                continue
            kills += 1
            trial = Trial("kill -9", f"chain {chain} kill {kills} ({mode}, step {latest_step(run_dir)})")
            trial.check("killed", rc == -signal.SIGKILL, f"exit code {rc}: {process.output()[-400:]}")
            left = sorted(set(temporaries(run_dir)) - stale)  # this kill's; a resume removes the older ones
            if during_write:
                trial.note("landed during a checkpoint write")
            if left:
                trial.note(f"temporaries left: {', '.join(left)}")
            latest = check_checkpoints(trial, run_dir) if run_dir.exists() else None
            if run_dir.exists():
                check_status_after_crash(trial, run_dir, latest)
            else:
                trial.check("no run directory before the run started", True)
            trial.data.update(kill=True, during_write=during_write, temporaries_left=len(left))
            trials.append(trial)
        return trials

    def _kill_at(self, process: Process, run_dir: Path, mode: str, rng: random.Random) -> bool:
        """SIGKILL at a moment of the given kind; returns whether a checkpoint write was in progress."""
        start_step = max(latest_step(run_dir), 0)
        before = set(temporaries(run_dir))  # a stale one from an earlier kill is not this process's write

        def writing() -> bool:
            return bool(set(temporaries(run_dir)) - before)

        def saved_at_end() -> bool:  # the end-of-run checkpoint, written by this process
            latest = run_dir / "checkpoints" / "LATEST"
            try:
                return latest_step(run_dir) >= STEPS and latest.stat().st_mtime >= started
            except OSError:
                return False

        started = time.time()
        if mode == "start-up":
            time.sleep(rng.uniform(0.2, self.timing["startup_s"]))
        elif mode == "checkpoint write":
            target = rng.randint(start_step, STEPS)  # the write after this step's checkpoint
            wait_until(lambda: latest_step(run_dir) >= target, process, timeout=PROCESS_TIMEOUT)
            wait_until(writing, process, timeout=10.0, interval=0.0005)
        elif mode == "outputs":
            wait_until(saved_at_end, process, timeout=PROCESS_TIMEOUT)
            time.sleep(rng.uniform(0.0, self.timing["outputs_s"]))
        else:
            target = rng.randint(start_step + 1, STEPS)
            wait_until(lambda: latest_step(run_dir) >= target, process, timeout=PROCESS_TIMEOUT)
            time.sleep(rng.uniform(0.0, self.timing["train_s"] / STEPS))
        during_write = writing()
        process.signal(signal.SIGKILL)
        return during_write

    def _no_checkpoint_resume(self, run_dir: Path) -> Trial:
        trial = Trial("kill -9", f"resume of {run_dir.name}, killed before its first checkpoint")
        rc, text = self.carv3d.run(self.carv3d.resume_args(run_dir), "resume-without-checkpoint")
        check_clean_error(trial, rc, text, "train")
        return trial

    def _check_finished_run(self, trial: Trial, run_dir: Path) -> None:
        latest = check_checkpoints(trial, run_dir)
        check_status_after_stop(trial, run_dir, ("finished",))
        left = temporaries(run_dir)
        trial.check("no stale temporaries after resume", not left, ", ".join(left))
        if latest is not None and self.reference is not None:
            from carv3d.checkpoint import latest_checkpoint

            same, core, other = same_training_state(latest, latest_checkpoint(self.reference))
            trial.check("bit-identical to the uninterrupted run", same, f"differs in {', '.join(core[:6])}")
            if other:
                trial.note(f"estimator statistics differ from the uninterrupted run: {', '.join(other[:6])}")

    # -------------------------------------------------------------- signals
    def signal_trial(self, name: str, signals: tuple[int, ...], when: str) -> Trial:
        kind = "SIGTERM" if signals[0] == signal.SIGTERM else "SIGINT"
        trial = Trial(kind, name)
        if when == "start-up":
            out = self.workdir / "signals" / name.replace(" ", "-")
            process = self.carv3d.start(self.carv3d.train_args(out, "run"), f"{kind}-{name}".replace(" ", "-"))
            time.sleep(random.Random(self.seed + 7).uniform(0.3, 2.0))
            process.signal(signals[0])
            rc = process.wait()
            text = process.output()
            trial.check("no traceback", "Traceback" not in text, " | ".join(text.splitlines()[-4:]))
            trial.check("exit code 130", rc == 130, f"exit code {rc}")
            run_dir = out / "run"
            if run_dir.exists():
                check_checkpoints(trial, run_dir)
            return trial
        run_dir = self.copy(name.replace(" ", "-"))
        extra = {"validation": ("train.val_every=4", "train.val_resolution=96"),
                 "export": ("export.texture_size=1024",)}.get(when, ())
        steps = STEPS + (2 if when == "export" else 24)
        started = time.time()
        process = self.carv3d.start(self.carv3d.resume_args(run_dir, f"train.steps={steps}", *extra),
                                    f"{kind}-{name}".replace(" ", "-"))
        landed = self._signal_at(process, run_dir, when, started)
        process.signal(signals[0])
        for sig in signals[1:]:
            time.sleep(0.3)
            process.signal(sig)
        rc = process.wait()
        text = process.output()
        trial.note(f"signal landed {landed}")
        if when == "export":
            trial.check("clean exit", rc in (0, 130), f"exit code {rc}")
            trial.check("no traceback", "Traceback" not in text, " | ".join(text.splitlines()[-4:]))
            check_checkpoints(trial, run_dir)
            status = check_status_after_stop(trial, run_dir, ("finished", "interrupted"))
            mesh = run_dir / "mesh" / "mesh.glb"
            rewritten = mesh.is_file() and mesh.stat().st_mtime > started
            trial.check("run.json lists the outputs not written", rewritten or status.get("outputs_failed"),
                        f"mesh not rewritten, yet outputs_failed = {status.get('outputs_failed')!r}")
            rc, text = self.carv3d.run(["export", str(run_dir), "--overwrite"], "export-after-sigint")
            trial.check("`carv3d export` makes the mesh afterwards", rc == 0 and mesh.is_file(),
                        f"exit code {rc}: {' | '.join(text.splitlines()[-2:])}")
            return trial
        check_clean_stop(trial, rc, text)
        check_checkpoints(trial, run_dir)
        check_status_after_stop(trial, run_dir, ("interrupted",))
        check_resume_finishes(trial, self.carv3d, run_dir, f"{kind}-resume")
        return trial

    def _signal_at(self, process: Process, run_dir: Path, when: str, started: float) -> str:
        if when == "validation":
            due: list[int] = []

            def validating() -> bool:  # the loop logs a step's metrics, then writes its validation sheet
                logged = [json.loads(line).get("step", 0) for line in
                          (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
                due.extend(s for s in logged if s > STEPS and s % 4 == 0)
                return bool(due)

            wait_until(validating, process, timeout=PROCESS_TIMEOUT, interval=0.001)
            sheet = run_dir / "validation" / f"step_{(due or [0])[0]:07d}.png"
            return "during validation" if due and not sheet.exists() else "after the validation sheet"
        if when == "export":
            turntable = run_dir / "turntable.mp4"
            wait_until(lambda: turntable.is_file() and turntable.stat().st_mtime > started, process,
                       timeout=PROCESS_TIMEOUT, interval=0.001)
            return "during the final mesh export" if process.alive() else "after the process ended"
        wait_until(lambda: latest_step(run_dir) >= STEPS + 3, process, timeout=PROCESS_TIMEOUT)
        return f"while training (step {latest_step(run_dir)})"

    # -------------------------------------------------------------- disk full
    def disk_full_checkpoint(self) -> Trial:
        trial = Trial("disk full", "while saving a checkpoint")
        run_dir = self.copy("disk-full-checkpoint")
        checkpoint_bytes = (run_dir / "checkpoints" / f"step_{STEPS:07d}.pt").stat().st_size
        args = self.carv3d.resume_args(run_dir, f"train.steps={STEPS + 3}", "train.val_every=0")
        if self.mounts:
            mount = self.workdir / "mnt-checkpoint"
            mount.mkdir()
            inner = mount / run_dir.name
            args = self.carv3d.resume_args(inner, f"train.steps={STEPS + 3}", "train.val_every=0")
            # Room for the logs and run.json, not for another checkpoint.
            wrap = tmpfs_wrap(mount, du(run_dir) + checkpoint_bytes // 2, run_dir, self.workdir / "from-tmpfs")
            rc, text = self.carv3d.run(args, "disk-full-checkpoint", wrap=wrap)
            shutil.rmtree(run_dir)
            shutil.copytree(self.workdir / "from-tmpfs" / run_dir.name, run_dir)
            trial.note("a tmpfs with less free space than one checkpoint (ENOSPC)")
            shown = inner
        else:
            rc, text = self.carv3d.run(args, "disk-full-checkpoint", preexec=file_size_limit(checkpoint_bytes // 2))
            trial.note("RLIMIT_FSIZE below one checkpoint's size (EFBIG stands in for ENOSPC)")
            shown = run_dir
        check_clean_error(trial, rc, text, "train", "could not write", "free", "intact",
                          f"carv3d train --resume {shown}")
        trial.check("no temporaries left", not temporaries(run_dir), ", ".join(temporaries(run_dir)))
        check_checkpoints(trial, run_dir)
        trial.check("LATEST still names the last checkpoint", latest_step(run_dir) == STEPS, f"LATEST {latest_step(run_dir)}")
        status = read_json(run_dir / "run.json")
        trial.check("run.json truthful", int(status.get("step", -1)) == latest_step(run_dir)
                    and status.get("status") != "finished", json.dumps(status)[:300])
        check_resume_finishes(trial, self.carv3d, run_dir, "disk-full-resume", f"train.steps={STEPS + 3}")
        return trial

    def disk_full_export(self) -> Trial:
        trial = Trial("disk full", "while `carv3d export` writes the mesh")
        run_dir = self.copy("disk-full-export")
        out = self.workdir / "disk-full-export-mesh"
        if self.mounts:
            mount = self.workdir / "mnt-export"
            mount.mkdir()
            wrap = tmpfs_wrap(mount, 8192, None, out)
            rc, text = self.carv3d.run(["export", str(run_dir), "--out", str(mount / "mesh")], "disk-full-export",
                                       wrap=wrap)
            trial.note("a tmpfs of 8 KiB (ENOSPC)")
            out = out / "mesh"
        else:
            rc, text = self.carv3d.run(["export", str(run_dir), "--out", str(out)], "disk-full-export",
                                       preexec=file_size_limit(4096))
            trial.note("RLIMIT_FSIZE of 4 KiB (EFBIG stands in for ENOSPC)")
        check_clean_error(trial, rc, text, "export", "could not write", "mesh", "free", "carv3d export")
        left = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        trial.check("no partial files", not left, ", ".join(left))
        rc, text = self.carv3d.run(["export", str(run_dir), "--out", str(self.workdir / "export-ok")], "export-ok")
        trial.check("export works once there is space", rc == 0, f"exit code {rc}")
        return trial

    # -------------------------------------------------------------- read-only
    def read_only_output(self) -> Trial:
        trial = Trial("read-only", "read-only output folder (new run)")
        folder = self.workdir / "read-only-output"
        folder.mkdir()
        args = self.carv3d.train_args(folder, "run")
        if self.mounts:
            rc, text = self.carv3d.run(args, "read-only-output", wrap=read_only_wrap(folder))
            trial.note("read-only bind mount (EROFS)")
        else:
            folder.chmod(0o555)
            rc, text = self.carv3d.run(args, "read-only-output")
            folder.chmod(0o755)
            trial.note("chmod 555 (EACCES)")
        check_clean_error(trial, rc, text, "train", "train.output_dir")
        trial.check("nothing written", not any(folder.iterdir()), str(list(folder.iterdir())))
        return trial

    def read_only_run_dir(self) -> Trial:
        trial = Trial("read-only", "read-only run directory (resume)")
        run_dir = self.copy("read-only-run")
        args = self.carv3d.resume_args(run_dir, f"train.steps={STEPS + 2}")
        if self.mounts:
            rc, text = self.carv3d.run(args, "read-only-run", wrap=read_only_wrap(run_dir))
        else:
            for path in [run_dir, *run_dir.rglob("*")]:
                path.chmod(0o555 if path.is_dir() else 0o444)
            rc, text = self.carv3d.run(args, "read-only-run")
            for path in [run_dir, *run_dir.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
        check_clean_error(trial, rc, text, "train")
        check_checkpoints(trial, run_dir)
        return trial

    # -------------------------------------------------------------- bad checkpoints
    def bad_checkpoint(self, variant: str) -> Trial:
        trial = Trial("bad checkpoint", variant)
        run_dir = self.copy(f"bad-{variant.replace(' ', '-')}")
        ckpt = run_dir / "checkpoints"
        latest = ckpt / f"step_{STEPS:07d}.pt"
        marker = self.workdir / f"pwned-{variant.replace(' ', '-')}"
        export_too = False
        if variant == "truncated":
            latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
            export_too = True
        elif variant == "random bytes":
            latest.write_bytes(random.Random(self.seed).randbytes(latest.stat().st_size))
        elif variant == "empty":
            latest.write_bytes(b"")
        elif variant == "malicious pickle":
            import torch

            class Exploit:
                def __reduce__(self):
                    return (os.system, (f"touch {shlex.quote(str(marker))}",))

            torch.save({"format_version": 1, "step": STEPS, "scene": Exploit()}, latest)
            export_too = True
        elif variant == "missing":
            latest.unlink()
        elif variant == "LATEST names another run's":
            other = self.copy("bad-other-run")
            (ckpt / "LATEST").write_text(f"../../{other.name}/checkpoints/step_{STEPS:07d}.pt\n")
            export_too = True
        elif variant == "LATEST garbage":
            (ckpt / "LATEST").write_bytes(b"\xff\xfe\x00garbage\n")
        rc, text = self.carv3d.run(self.carv3d.resume_args(run_dir, f"train.steps={STEPS + 2}"), f"bad-{variant}"
                                   .replace(" ", "-").replace("'", ""))
        check_clean_error(trial, rc, text, "train")
        if export_too:
            rc, text = self.carv3d.run(["export", str(run_dir), "--out", str(self.workdir / f"bad-export-{variant}")],
                                       "bad-export")
            check_clean_error(trial, rc, text, "export")
        trial.check("no code ran", not marker.exists(), f"{marker} exists")
        return trial

    # -------------------------------------------------------------- two resumes, stale temporaries
    def two_resumes(self) -> Trial:
        trial = Trial("two resumes", "two `--resume` of one run at once")
        run_dir = self.copy("two-resumes")
        steps = STEPS + 60
        first = self.carv3d.start(self.carv3d.resume_args(run_dir, f"train.steps={steps}"), "two-resumes-a")
        wait_until(lambda: latest_step(run_dir) > STEPS, first, timeout=PROCESS_TIMEOUT)
        rc, text = self.carv3d.run(self.carv3d.resume_args(run_dir, f"train.steps={steps}"), "two-resumes-b")
        check_clean_error(trial, rc, text, "train", "already being trained by process")
        rc_first = first.wait()
        trial.check("the first finishes", rc_first == 0, f"exit code {rc_first}")
        logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        repeated = sorted({s for s in logged if logged.count(s) > 1})
        trial.check("no step trained twice", not repeated, f"metrics.jsonl repeats steps {repeated[:10]}")
        check_checkpoints(trial, run_dir)
        check_status_after_stop(trial, run_dir, ("finished",))
        return trial

    def stale_temporaries(self) -> Trial:
        trial = Trial("stale temporaries", "left by a killed checkpoint write, removed on resume")
        run_dir = self.copy("stale-temporaries")
        planted = [run_dir / "checkpoints" / f".step_{STEPS + 1:07d}.tmp-abc123.pt",
                   run_dir / "checkpoints" / ".LATEST.tmp-def456"]
        for path in planted:
            path.write_bytes(b"half a write")
        check_resume_finishes(trial, self.carv3d, run_dir, "stale-temporaries", f"train.steps={STEPS + 1}")
        left = [p.name for p in planted if p.exists()]
        trial.check("stale temporaries removed", not left, ", ".join(left))
        return trial


# ---------------------------------------------------------------------------------------- main
def summarise(trials: list[Trial], args: argparse.Namespace, attack: Attack, seconds: float) -> dict[str, Any]:
    kinds: dict[str, dict[str, int]] = {}
    for trial in trials:
        entry = kinds.setdefault(trial.kind, {"trials": 0, "passed": 0, "failed": 0})
        entry["trials"] += 1
        entry["passed" if trial.passed else "failed"] += 1
    kills = [t for t in trials if t.data.get("kill")]
    finished = [t for t in trials if "bit-identical to the uninterrupted run" in t.checks]
    failed_checks: dict[str, int] = {}
    for trial in trials:
        for name, ok in trial.checks.items():
            if not ok:
                failed_checks[name] = failed_checks.get(name, 0) + 1
    return {
        "command": "python scripts/fault_injection.py" + (" --quick" if args.quick else "")
                   + (f" --kills {args.kills}" if args.kills is not None else "") + f" --seed {args.seed}"
                   + (f" --deadline-minutes {args.deadline_minutes:g}" if args.deadline_minutes is not None else "")
                   + "".join(f" --only {shlex.quote(text)}" for text in args.only or ()),
        "quick": args.quick,
        "seed": args.seed,
        "wall_seconds": round(seconds, 1),
        "all_passed": all(t.passed for t in trials),
        "kinds": kinds,
        "failed_checks": failed_checks,
        "kill_9": {"kills": len(kills), "during_checkpoint_write": sum(t.data["during_write"] for t in kills),
                   "temporaries_left": sum(t.data["temporaries_left"] > 0 for t in kills),
                   "unreadable_checkpoints": sum(not t.checks.get("no unreadable checkpoint", True) for t in kills),
                   "runs_finished": len(finished),
                   "bit_identical": sum(t.checks["bit-identical to the uninterrupted run"] for t in finished)},
        "methods": {"disk_full": "tmpfs in a private mount namespace (ENOSPC)" if attack.mounts
                    else "RLIMIT_FSIZE (EFBIG stands in for ENOSPC)",
                    "read_only": "read-only bind mount in a private mount namespace (EROFS)" if attack.mounts
                    else "chmod 555 (EACCES)"},
        "timing": {k: round(v, 2) for k, v in attack.timing.items()},
        "failures": [{"kind": t.kind, "name": t.name, "failed": [n for n, ok in t.checks.items() if not ok],
                      "notes": t.notes} for t in trials if not t.passed],
        "trials": [{**asdict(t), "passed": t.passed} for t in trials],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    kills = args.kills if args.kills is not None else (4 if args.quick else 20)
    began = time.perf_counter()
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="carv3d-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from carv3d.testing.tiny_teachers import build_tiny_stable_diffusion

    teacher = build_tiny_stable_diffusion(workdir / "teacher", seed=0)
    carv3d = Carv3d(workdir, teacher)
    attack = Attack(carv3d, workdir, kills, args.seed, args.quick)
    print(f"fault injection in {workdir} (private mounts: {'yes' if attack.mounts else 'no'})", flush=True)
    trials = [attack.make_reference()]
    skipped: list[Trial] = []
    if not trials[0].passed:
        print("the uninterrupted reference run failed; nothing else can be judged", file=sys.stderr)
    else:
        work: list[tuple[str, Callable[[], Any]]] = [
            (f"kill -9 chain {c}", lambda c=c: attack.kill_chain(c, kills // 2 + (c < kills % 2))) for c in range(2)]
        sig = [("while training", (signal.SIGINT,), "training"), ("SIGTERM while training", (signal.SIGTERM,), "training")]
        if not args.quick:
            sig += [("during validation", (signal.SIGINT,), "validation"),
                    ("during the final export", (signal.SIGINT,), "export"),
                    ("twice in a row", (signal.SIGINT, signal.SIGINT), "training"),
                    ("in the first seconds", (signal.SIGINT,), "start-up")]
        work += [(f"signal {s[0]}", lambda s=s: attack.signal_trial(*s)) for s in sig]
        work += [("disk full while saving a checkpoint", attack.disk_full_checkpoint),
                 ("read-only output folder", attack.read_only_output), ("two resumes", attack.two_resumes),
                 ("stale temporaries", attack.stale_temporaries)]
        variants = ["truncated", "malicious pickle", "LATEST names another run's"]
        if not args.quick:
            work += [("disk full during export", attack.disk_full_export),
                     ("read-only run directory", attack.read_only_run_dir)]
            variants += ["random bytes", "empty", "missing", "LATEST garbage"]
        work += [(f"bad checkpoint: {v}", lambda v=v: attack.bad_checkpoint(v)) for v in variants]
        if args.only:
            work = [(name, job) for name, job in work if any(text in name for text in args.only)]
        if args.deadline_minutes is not None:
            attack.deadline = began + 60 * args.deadline_minutes

        def perform(item: tuple[str, Callable[[], Any]]) -> Any:
            name, job = item
            if attack.past_deadline():
                return Trial("skipped", name, data={"skipped": True})
            return job()

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for result in pool.map(perform, work):
                for trial in result if isinstance(result, list) else [result]:
                    if trial.data.get("skipped"):
                        skipped.append(trial)
                        continue
                    trials.append(trial)
                    print(f"{'pass' if trial.passed else 'FAIL'}  {trial.kind}: {trial.name}"
                          + ("" if trial.passed else f"  — {'; '.join(trial.notes[:2])}"), flush=True)
    summary = summarise(trials, args, attack, time.perf_counter() - began)
    summary["skipped"] = [t.name for t in skipped]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    counts = ", ".join(f"{k}: {v['passed']}/{v['trials']}" for k, v in summary["kinds"].items())
    print(f"{'all trials passed' if summary['all_passed'] else 'SOME TRIALS FAILED'} ({counts}) in "
          f"{summary['wall_seconds']} s; summary in {out}; runs and logs in {workdir}")
    if not args.workdir and summary["all_passed"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
