"""The Khronos glTF validator, run through node on an exported .glb/.gltf file.

The validator is the npm package ``gltf-validator`` (the official validator compiled to
JavaScript). carv3d's ``package.json`` pins it; ``npm ci`` in the repository root installs it into
``node_modules/``. The package is looked up, in order, in ``$CARV3D_GLTF_VALIDATOR`` (a folder that
contains ``node_modules``), the repository root of this checkout, and the current directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Union

from carv3d.errors import UserError

PACKAGE = "gltf-validator"

_SCRIPT = r"""
const fs = require('fs');
const path = require('path');
const validator = require(process.argv[1]);
const file = process.argv[2];
validator.validateBytes(new Uint8Array(fs.readFileSync(file)), {
  uri: path.basename(file),
  maxIssues: 1000,
  externalResourceFunction: (uri) => new Promise((resolve, reject) => {
    fs.readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)),
                (err, data) => err ? reject(err.toString()) : resolve(new Uint8Array(data)));
  }),
}).then((report) => { process.stdout.write(JSON.stringify(report)); })
  .catch((error) => { process.stderr.write(String(error)); process.exit(3); });
"""


class ValidatorUnavailableError(UserError):
    """node or the gltf-validator npm package is not installed."""


def _search_roots() -> list[Path]:
    roots = []
    if os.environ.get("CARV3D_GLTF_VALIDATOR"):
        roots.append(Path(os.environ["CARV3D_GLTF_VALIDATOR"]))
    roots.append(Path(__file__).resolve().parents[2])  # the checkout root (editable installs)
    roots.append(Path.cwd())
    return roots


def find_validator() -> Optional[Path]:
    """The folder of the installed ``gltf-validator`` package, or None."""
    for root in _search_roots():
        candidate = root / "node_modules" / PACKAGE
        if (candidate / "package.json").is_file():
            return candidate
    return None


def validator_available() -> bool:
    """True when both ``node`` and the ``gltf-validator`` package can be found."""
    return shutil.which("node") is not None and find_validator() is not None


def validate_gltf(path: Union[str, Path], timeout_s: float = 120.0) -> dict:
    """Validate a .glb or .gltf file with the Khronos glTF validator.

    Args:
        path: the file.
        timeout_s: how long node may take.

    Returns:
        The validator's report as a dict; ``report["issues"]["numErrors"]`` is the error count and
        ``report["issues"]["messages"]`` lists each issue (code, message, severity 0 = error,
        1 = warning, 2 = info, 3 = hint, pointer).

    Raises:
        ValidatorUnavailableError: node or the npm package is missing (says how to install it).
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the validator itself failed (not the file being invalid).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file to validate: {path}")
    node = shutil.which("node")
    package = find_validator()
    if node is None or package is None:
        missing = "node" if node is None else f"the npm package {PACKAGE}"
        raise ValidatorUnavailableError(
            f"cannot run the glTF validator: {missing} is not installed. Install Node.js, then run "
            f"`npm ci` in the carv3d repository root (or set CARV3D_GLTF_VALIDATOR to a folder "
            f"holding node_modules/{PACKAGE})."
        )
    result = subprocess.run([node, "-e", _SCRIPT, str(package), str(path.resolve())],
                            capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"the glTF validator failed on {path}: {result.stderr.strip()[:2000]}")
    return json.loads(result.stdout)


def error_messages(report: dict) -> list[str]:
    """The report's errors (severity 0) as ``CODE at POINTER: message`` strings."""
    return [f"{m.get('code')} at {m.get('pointer', '')}: {m.get('message')}"
            for m in report.get("issues", {}).get("messages", []) if m.get("severity") == 0]
