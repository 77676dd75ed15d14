"""Structured logs: one event name and key=value fields per line, greppable and parseable."""

from __future__ import annotations

import logging
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    return repr(text) if (" " in text or "=" in text or not text) else text


def log_event(
    logger: logging.Logger, event: str, level: int = logging.INFO, *, flush: bool = False, **fields: Any
) -> None:
    """Log `event key=value ...`; fields keep their call order.

    `flush` writes it out at once: with RAY_SERVE_THROUGHPUT_OPTIMIZED, Serve buffers up to
    1000 records per replica before writing its log file, so a lifecycle event (an engine
    started, how long it took) would otherwise wait for hundreds of request lines."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s", event, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))
        if flush:
            node: logging.Logger | None = logger
            while node is not None:
                for handler in node.handlers:
                    handler.flush()
                node = node.parent if node.propagate else None


def get_logger(name: str) -> logging.Logger:
    """A module logger; inside Serve replicas Ray attaches its own handlers to `ray.serve`."""
    return logging.getLogger(f"ray.serve.helios.{name}")
