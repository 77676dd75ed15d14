"""Structured logs: one event name and key=value fields per line, greppable and parseable."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

# The request being served in this task (asyncio copies it into the tasks a request starts):
# every event logged meanwhile carries its id, and its trace id when the request is traced.
_REQUEST: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("helios_request", default=None)


@contextlib.contextmanager
def request_context(request_id: str, trace_id: str | None = None) -> Iterator[None]:
    fields = {"request_id": request_id, **({"trace_id": trace_id} if trace_id else {})}
    token = _REQUEST.set(fields)
    try:
        yield
    finally:
        _REQUEST.reset(token)


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
        context = _REQUEST.get()
        if context:
            fields = {**{k: v for k, v in context.items() if k not in fields}, **fields}
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
