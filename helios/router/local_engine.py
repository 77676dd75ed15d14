"""An engine in the router's own process: `router.colocate_engine`.

A request for the colocated model goes from the router's HTTP server straight into vLLM's
serving layer in the same event loop: no Ray call, no second replica's wrappers, no
serialisation. On a node whose CPUs the engine shares (a CPU node, or a small GPU node) that
hop was most of what Helios cost over vLLM's own server (benchmarks/overhead.py).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.errors import ServiceUnavailable
from helios.router.core import EngineClient, EngineStream


class LocalEngineStream(EngineStream):
    """A streamed answer of the in-process engine server (`ModelServer.stream` or a pooled host's)."""

    def __init__(self, parts: AsyncIterator[EngineHTTPResponse | bytes]) -> None:
        self.parts = parts

    async def first(self) -> EngineHTTPResponse:
        try:
            head = await anext(self.parts)
        except StopAsyncIteration:
            raise ServiceUnavailable("The engine ended the stream before any output; retry") from None
        assert isinstance(head, EngineHTTPResponse)
        return head

    async def rest(self) -> AsyncIterator[bytes]:
        async for part in self.parts:
            yield part  # type: ignore[misc]

    def cancel(self) -> None:
        # Closing the server's stream aborts the request in vLLM; the caller is synchronous.
        aclose = getattr(self.parts, "aclose", None)
        if aclose is not None:
            asyncio.get_running_loop().create_task(aclose())


class LocalEngine(EngineClient):
    """The colocated model's engine server, called directly; what the router asks an engine
    replica by handle (`info`, `openapi`, health) it asks this the same way."""

    def __init__(self, server: Any, remote: bool = False) -> None:
        self.server = server
        self.remote = remote  # in a pooled host (one Ray call away): this process is then only the router

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        return await self.server.call(req)

    def stream(self, req: EngineHTTPRequest) -> EngineStream:
        return LocalEngineStream(self.server.stream(req))

    async def info(self) -> dict[str, Any]:
        return await _maybe_await(self.server.info())

    async def openapi(self) -> dict[str, Any]:
        return await _maybe_await(self.server.openapi())

    async def num_unfinished_requests(self) -> int:
        return await _maybe_await(self.server.num_unfinished_requests())

    async def check_health(self) -> None:
        await self.server.check_health()

    def shutdown(self) -> None:
        self.server.shutdown()


async def _maybe_await(value: Any) -> Any:
    """A server in this process answers at once, one in a pooled host with an awaitable."""
    return await value if inspect.isawaitable(value) else value
