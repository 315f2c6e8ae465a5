"""The fault-injection script (scripts/fault_injection.py) in its quick form: kill -9, SIGINT, SIGTERM,
a full disk, a read-only output folder, bad checkpoints, two resumes and stale temporaries against
the real command line, each followed by the checks a user relies on (see the script's doc)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_quick_fault_injection_trial_passes(tmp_path):
    out = tmp_path / "faults.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_injection.py"), "--quick", "--out", str(out),
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=1200)
    assert out.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(out.read_text())
    failures = json.dumps(summary["failures"], indent=1)
    assert summary["all_passed"] and result.returncode == 0, failures
    kinds = summary["kinds"]
    for kind in ("kill -9", "SIGINT", "SIGTERM", "disk full", "read-only", "bad checkpoint", "two resumes",
                 "stale temporaries"):
        assert kinds[kind]["trials"] >= 1 and kinds[kind]["failed"] == 0, kind
    assert summary["kill_9"]["kills"] >= 4 and summary["kill_9"]["unreadable_checkpoints"] == 0
    assert summary["kill_9"]["bit_identical"] == summary["kill_9"]["runs_finished"] >= 1


def test_fault_injection_script_has_help():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_injection.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout and "--out" in result.stdout
