"""Logging set-up for entry points (CLIs, ServerApp, ClientApp). Library code only gets loggers."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Our packages only: Flower's own logger already has a handler, and a root handler would print
# every Flower line twice.
PACKAGES = ("lab", "strategies", "byzantine", "server", "client", "inversion", "unlearning", "bench")


def configure(level: str | int | None = None) -> None:
    """Idempotent: one stderr handler on the lab's package loggers, level from FL_LAB_LOG or INFO."""
    level = level or os.environ.get("FL_LAB_LOG", "INFO")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_fl_lab", False) for h in logger.handlers):
            handler._fl_lab = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False
