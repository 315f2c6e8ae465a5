"""The `carv3d` logger: one place that decides how messages look."""

from __future__ import annotations

import logging

logger = logging.getLogger("carv3d")


def setup_logging(level: int = logging.INFO) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[carv3d] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
