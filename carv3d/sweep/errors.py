"""The error every sweep check raises (its own module so that every sweep module can import it)."""

from __future__ import annotations

from carv3d.errors import UserError


class SweepError(UserError):
    """A sweep file that cannot be run as written, or a sweep backend that cannot start."""
