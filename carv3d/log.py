"""The `carv3d` logger: one place that decides how messages look."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("carv3d")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (test capture, tqdm redirects)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def quiet_dependencies() -> None:
    """Silence dependency chatter users cannot act on (weight-loading bars, optional-backend notes)."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # transformers missing or changed: its messages are cosmetic
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[carv3d] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
