"""scripts/compile_imports.py: what `make install` byte-compiles instead of pip."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from carv3d.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_imports.py"


def _load_script():
    return load_script("compile_imports")


def test_every_listed_third_party_module_exists():
    """A stale name (a module a dependency dropped) would be skipped silently at install time."""
    missing = [name for name in _load_script().LAZY_THIRD_PARTY if importlib.util.find_spec(name) is None]
    assert not missing


@pytest.mark.slow
def test_writes_bytecode_for_carv3d_and_lazy_imports_even_with_pythondontwritebytecode(tmp_path):
    """Run as `make install` does, but with the cache redirected: the modules a run imports lazily
    (export, the CLIP text encoder, trimesh) get bytecode even where PYTHONDONTWRITEBYTECODE is set."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(tmp_path))
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    compiled = {p.name.split(".")[0] + "/" + p.parent.name for p in tmp_path.rglob("*.pyc")}
    for module in ("train/carv3d", "from_scene/export", "modeling_clip/clip", "load/exchange"):
        assert module in compiled, module
