"""carv3d: text-to-3D by score distillation with the CARV variance-reduced estimator.

``carv3d.__version__`` is the installed distribution's version (package metadata); in a source tree
that is not installed it is read from ``setup.cfg``, the one place the version is written.
"""

from __future__ import annotations


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("carv3d")
    except metadata.PackageNotFoundError:
        pass
    import configparser
    from pathlib import Path

    parser = configparser.ConfigParser()
    parser.read(Path(__file__).resolve().parents[1] / "setup.cfg", encoding="utf-8")
    return parser.get("metadata", "version", fallback="0+unknown")


__version__ = _version()

__all__ = ["__version__"]
