"""Structured logs: one event name and key=value fields per line, greppable and parseable."""

from __future__ import annotations

import logging
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or "=" in text or not text) else text


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event key=value ...`; fields keep their call order."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s", event, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))


def get_logger(name: str) -> logging.Logger:
    """A module logger; inside Serve replicas Ray attaches its own handlers to `ray.serve`."""
    return logging.getLogger(f"ray.serve.helios.{name}")
