"""The colocated engine's client without Ray: a fake engine server (named as one) stands in for
`ModelServer`, answering as it does (a head, then bytes; `EngineUnavailable` once its engine died)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.errors import EngineUnavailable, ServiceUnavailable
from helios.router.core import ModelRoute, RetryPolicy, RouterCore
from helios.router.local_engine import LocalEngine

SSE = [("content-type", "text/event-stream")]


class FakeEngineServer:
    """Streams `chunks` after a head, one per loop turn; records aborts (the stream closed early)."""

    def __init__(self, chunks: int = 100, dead: bool = False) -> None:
        self.chunks, self.dead = chunks, dead
        self.aborted = 0
        self.seen: list[EngineHTTPRequest] = []

    def _check(self) -> None:
        if self.dead:
            raise EngineUnavailable("the replica's engine has died", replica="r1", dead=True)

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        self._check()
        self.seen.append(req)
        req.headers = [*req.headers, ("traceparent", "rewritten")]  # as ModelServer._span does
        return EngineHTTPResponse(200, [("content-type", "application/json")], b'{"ok":true}')

    async def stream(self, req: EngineHTTPRequest) -> AsyncIterator[EngineHTTPResponse | bytes]:
        self._check()
        finished = False
        try:
            yield EngineHTTPResponse(200, SSE, b"data: 0\n\n")
            for i in range(1, self.chunks):
                await asyncio.sleep(0)
                yield f"data: {i}\n\n".encode()
            finished = True
        finally:
            if not finished:
                await asyncio.sleep(0)  # vLLM's abort awaits too
                self.aborted += 1


def _core(server: FakeEngineServer) -> RouterCore:
    return RouterCore({"m": ModelRoute(LocalEngine(server))}, [], retry=RetryPolicy(deadline_s=5, first_backoff_s=0.01))


def _body(stream: bool) -> bytes:
    return b'{"model": "m", "prompt": "hi", "stream": ' + (b"true" if stream else b"false") + b"}"


def test_a_stream_the_client_leaves_is_closed_and_aborted_in_the_engine() -> None:
    server = FakeEngineServer()

    async def run() -> None:
        resp = await _core(server).forward("/v1/completions", {}, _body(True), "rid")
        assert resp.status == 200
        got = [await anext(resp.stream), await anext(resp.stream)]
        assert got == [b"data: 0\n\n", b"data: 1\n\n"]
        await resp.stream.aclose()  # the client went away
        for _ in range(10):  # the close runs as its own task
            await asyncio.sleep(0)

    asyncio.run(run())
    assert server.aborted == 1


def test_a_stream_read_to_its_end_is_not_aborted() -> None:
    server = FakeEngineServer(chunks=5)

    async def run() -> list[bytes]:
        resp = await _core(server).forward("/v1/completions", {}, _body(True), "rid")
        return [chunk async for chunk in resp.stream]

    assert len(asyncio.run(run())) == 5
    assert server.aborted == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_dead_in_process_engine_is_503_at_once_not_retried_in_place(stream: bool) -> None:
    server = FakeEngineServer(dead=True)

    async def run() -> None:
        await _core(server).forward("/v1/completions", {}, _body(stream), "rid")

    loop = asyncio.new_event_loop()
    try:
        started = loop.time()
        with pytest.raises(ServiceUnavailable) as info:
            loop.run_until_complete(run())
        assert loop.time() - started < 1  # the retry deadline is 5 s
    finally:
        loop.close()
    assert not isinstance(info.value, EngineUnavailable)
    assert int(info.value.headers["Retry-After"]) >= 1


def test_the_servers_header_rewrite_stays_on_its_own_copy() -> None:
    server = FakeEngineServer()
    req = EngineHTTPRequest(path="/v1/completions", body=b"{}", request_id="rid", headers=[("accept", "*/*")])
    asyncio.run(LocalEngine(server).call(req))
    assert req.headers == [("accept", "*/*")]
    assert server.seen[0].headers[-1] == ("traceparent", "rewritten")
