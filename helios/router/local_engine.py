"""An engine in the router's own process: `router.colocate_engine`.

A request for the colocated model goes from the router's HTTP server straight into vLLM's
serving layer in the same event loop: no Ray call, no second replica's wrappers, no
serialisation. On a node whose CPUs the engine shares (a CPU node, or a small GPU node) that
hop was most of what Helios cost over vLLM's own server (benchmarks/overhead.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from helios.engine.deployment import maybe_await
from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.errors import EngineUnavailable, ServiceUnavailable
from helios.observability.logs import get_logger, log_event
from helios.router.core import EngineClient, EngineStream

logger = get_logger("router.local_engine")
RESTART_RETRY_AFTER_S = 30  # what a client waits for Serve to replace a replica whose engine died
_closing: set[asyncio.Task] = set()  # closes in flight, held until done (the loop keeps only weak references)


def _unavailable(exc: EngineUnavailable) -> ServiceUnavailable:
    """A dead in-process engine does not come back in this replica (Serve's health check replaces
    the replica): answer 503 now instead of retrying it until the retry deadline."""
    return ServiceUnavailable(f"{exc.message}; the replica is being replaced, retry shortly",
                              retry_after_s=RESTART_RETRY_AFTER_S)


class LocalEngineStream(EngineStream):
    """A streamed answer of the in-process engine server (`ModelServer.stream` or a pooled host's)."""

    def __init__(self, parts: AsyncIterator[EngineHTTPResponse | bytes]) -> None:
        self.parts = parts

    async def first(self) -> EngineHTTPResponse:
        try:
            head = await anext(self.parts)
        except StopAsyncIteration:
            raise ServiceUnavailable("The engine ended the stream before any output; retry") from None
        except EngineUnavailable as exc:
            raise _unavailable(exc) from None
        assert isinstance(head, EngineHTTPResponse)
        return head

    async def rest(self) -> AsyncIterator[bytes]:
        async for part in self.parts:
            yield part  # type: ignore[misc]

    def cancel(self) -> None:
        """Close the server's stream, which aborts the request in vLLM (the caller is synchronous).
        A stream already closing (running its `finally`) or finished needs nothing more."""
        parts = self.parts
        if getattr(parts, "ag_running", False) or getattr(parts, "ag_frame", None) is None:
            return
        task = asyncio.get_running_loop().create_task(parts.aclose())  # type: ignore[attr-defined]
        _closing.add(task)
        task.add_done_callback(_closed)


def _closed(task: asyncio.Task) -> None:
    _closing.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log_event(logger, "stream_close_failed", error=repr(exc))


class LocalEngine(EngineClient):
    """The colocated model's engine server, called directly; what the router asks an engine
    replica by handle (`info`, `openapi`, health) it asks this the same way."""

    def __init__(self, server: Any, remote: bool = False) -> None:
        self.server = server
        self.remote = remote  # in a pooled host (one Ray call away): this process is then only the router

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        try:
            return await self.server.call(dataclasses.replace(req))  # the server rewrites its trace headers
        except EngineUnavailable as exc:
            raise _unavailable(exc) from None

    def stream(self, req: EngineHTTPRequest) -> EngineStream:
        return LocalEngineStream(self.server.stream(dataclasses.replace(req)))

    async def info(self) -> dict[str, Any]:
        return await maybe_await(self.server.info())

    async def openapi(self) -> dict[str, Any]:
        return await maybe_await(self.server.openapi())

    async def num_unfinished_requests(self) -> int:
        return await maybe_await(self.server.num_unfinished_requests())

    async def check_health(self) -> None:
        await self.server.check_health()

    def shutdown(self) -> None:
        self.server.shutdown()
