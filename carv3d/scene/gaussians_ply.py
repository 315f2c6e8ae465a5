"""Gaussian splats as the standard 3DGS ``.ply`` (the file SuperSplat, gsplat's viewer and the Inria
viewers open), written and read back.

One ``vertex`` element per Gaussian, binary little-endian float32 properties in this order (Inria's
``GaussianModel.save_ply``)::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 … f_rest_{3K−1}  opacity  scale_0 scale_1 scale_2  rot_0 … rot_3

- normals are zeros (the layout has them; splats carry none);
- ``f_dc_c`` is the degree-0 SH coefficient of channel c; ``f_rest`` holds the K = (d+1)² − 1 higher
  coefficients channel-major (all of red, then green, then blue);
- ``opacity`` is the logit of the opacity and ``scale_k`` the log of the scale, as stored in training;
- ``rot`` is the quaternion (w, x, y, z), not necessarily normalised.

The file is written atomically: a failure leaves no partial file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from carv3d.errors import OutputPathError, UserError
from carv3d.io import atomic_path, reporting_full_disk

SPLAT_FILE = "splats.ply"


class SplatFileError(UserError):
    """A file that is not a 3DGS splat PLY this module can read."""


def property_names(n_rest: int) -> list[str]:
    """The vertex properties in file order for ``n_rest`` = 3K ``f_rest`` values."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(n_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def splat_rows(means: torch.Tensor, log_scales: torch.Tensor, quats: torch.Tensor, opacity_logits: torch.Tensor,
               sh_dc: torch.Tensor, sh_rest: torch.Tensor) -> np.ndarray:
    """(N, 17 + 3K) float32 rows in file order. sh_dc (N, 1, 3), sh_rest (N, K, 3)."""
    n = means.shape[0]
    columns = [means, torch.zeros_like(means), sh_dc.reshape(n, 3),
               sh_rest.transpose(1, 2).reshape(n, -1),  # channel-major
               opacity_logits.reshape(n, 1), log_scales, quats]
    return torch.cat([c.detach().float().cpu() for c in columns], dim=1).numpy()


def write_splats(path: Union[str, Path], means: torch.Tensor, log_scales: torch.Tensor, quats: torch.Tensor,
                 opacity_logits: torch.Tensor, sh_dc: torch.Tensor, sh_rest: torch.Tensor,
                 overwrite: bool = False) -> Path:
    """Write the splat PLY (module docstring). Raises :class:`OutputPathError` for an existing file
    without ``overwrite``, :class:`~carv3d.errors.DiskFullError` on a full disk (no partial file)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputPathError(f"'{path}' already exists; pass --overwrite to replace it or --out to write elsewhere.")
    if path.is_dir():
        raise OutputPathError(f"'{path}' is a folder; cannot write the splats there.")
    rows = splat_rows(means, log_scales, quats, opacity_logits, sh_dc, sh_rest)
    names = property_names(rows.shape[1] - 17)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {rows.shape[0]}"]
    header += [f"property float {name}" for name in names] + ["end_header"]
    data = ("\n".join(header) + "\n").encode("ascii") + np.ascontiguousarray(rows, dtype="<f4").tobytes()
    with reporting_full_disk(path, "no partial splat file was left behind"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return path


def read_splats(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a splat PLY written by carv3d, gsplat or the Inria code (binary little-endian float
    properties, any order, normals optional) into ``means`` (N, 3), ``log_scales`` (N, 3), ``quats``
    (N, 4), ``opacity_logits`` (N,), ``sh_dc`` (N, 1, 3) and ``sh_rest`` (N, K, 3).

    Raises:
        SplatFileError: the file is missing, not such a PLY, or lacks a property.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SplatFileError(f"cannot read '{path}': {err.strerror or err}.") from None
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise SplatFileError(f"'{path}' is not a PLY file (no 'ply' ... 'end_header' header).")
    lines = raw[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise SplatFileError(f"'{path}' is not a binary little-endian PLY; splat files are.")
    count, names = None, []
    for line in lines:
        parts = line.split()
        if parts[:2] == ["element", "vertex"] and len(parts) == 3:
            count = int(parts[2])
        elif parts[:1] == ["element"] and count is not None:
            raise SplatFileError(f"'{path}' has elements after 'vertex'; a splat PLY has only vertices.")
        elif parts[:1] == ["property"]:
            if len(parts) != 3 or parts[1] not in ("float", "float32"):
                raise SplatFileError(f"'{path}' has a property '{line}'; splat PLYs have float properties only.")
            names.append(parts[2])
    if count is None:
        raise SplatFileError(f"'{path}' has no vertex element.")
    body = raw[end + len(b"end_header\n"):]
    if len(body) < count * 4 * len(names):
        raise SplatFileError(f"'{path}' is truncated: {count} vertices need {count * 4 * len(names)} bytes, "
                             f"it has {len(body)}.")
    rows = np.frombuffer(body, dtype="<f4", count=count * len(names)).reshape(count, len(names))
    column = {name: i for i, name in enumerate(names)}
    needed = property_names(0)[:3] + property_names(0)[6:]
    missing = [name for name in needed if name not in column and name not in ("nx", "ny", "nz")]
    if missing:
        raise SplatFileError(f"'{path}' lacks the splat properties {missing}.")
    rest = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    if len(rest) % 3:
        raise SplatFileError(f"'{path}' has {len(rest)} f_rest values per splat; a multiple of 3 is needed.")

    def take(*keys: str) -> torch.Tensor:
        return torch.from_numpy(rows[:, [column[k] for k in keys]].astype(np.float32))

    return {
        "means": take("x", "y", "z"),
        "log_scales": take("scale_0", "scale_1", "scale_2"),
        "quats": take("rot_0", "rot_1", "rot_2", "rot_3"),
        "opacity_logits": take("opacity")[:, 0],
        "sh_dc": take("f_dc_0", "f_dc_1", "f_dc_2").reshape(count, 1, 3),
        "sh_rest": (take(*rest).reshape(count, 3, len(rest) // 3).transpose(1, 2).contiguous()
                    if rest else torch.zeros(count, 0, 3)),
    }
