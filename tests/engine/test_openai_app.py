"""The in-process ASGI bridge to vLLM's app, on small ASGI apps: coalescing, errors, disconnects."""

from __future__ import annotations

import asyncio
import json

from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.engine.openai_app import OpenAIApp, openai_error_body

REQ = EngineHTTPRequest(path="/v1/completions", body=b'{"stream":true}', request_id="r")


def sse_app(n: int, gap_s: float, seen: dict | None = None):
    """An ASGI app streaming `n` SSE events `gap_s` apart, then [DONE]; records a disconnect."""

    async def app(scope, receive, send):
        assert (await receive())["body"] == b'{"stream":true}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        try:
            for i in range(n):
                await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
                await asyncio.sleep(gap_s)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except asyncio.CancelledError:
            if seen is not None:
                seen["cancelled"] = True
            raise

    return app


async def collect(app: OpenAIApp, slow_consumer_s: float = 0.0) -> list:
    parts = []
    async for part in app.stream(REQ):
        parts.append(part)
        await asyncio.sleep(slow_consumer_s)
    return parts


def test_stream_is_coalesced_and_loses_nothing() -> None:
    parts = asyncio.run(collect(OpenAIApp(sse_app(40, 0.005), stream_interval_s=0.05)))
    head, rest = parts[0], parts[1:]
    assert isinstance(head, EngineHTTPResponse) and head.status == 200 and head.body == b"data: 0\n\n"
    body = head.body + b"".join(rest)
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(40)) + b"data: [DONE]\n\n"
    assert len(rest) <= 40 * 0.005 / 0.05 + 3  # about one message per interval, not one per event


def test_a_slow_reader_still_gets_the_end_of_the_stream() -> None:
    parts = asyncio.run(collect(OpenAIApp(sse_app(10, 0.0), stream_interval_s=0.0), slow_consumer_s=0.02))
    assert b"".join(p.body if isinstance(p, EngineHTTPResponse) else p for p in parts).endswith(b"data: [DONE]\n\n")


def test_closing_the_stream_cancels_the_app() -> None:
    seen: dict = {}

    async def go() -> None:
        gen = OpenAIApp(sse_app(1000, 0.01, seen), stream_interval_s=0.01).stream(REQ)
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(go())
    assert seen == {"cancelled": True}


def test_error_response_keeps_its_status_in_openai_shape() -> None:
    async def app(scope, receive, send):
        body = json.dumps({"error": {"message": "1 validation error: {'loc': 'body.messages'}", "type": "Bad Request",
                                     "param": "body.messages", "code": 400}}).encode()
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    for resp in (asyncio.run(OpenAIApp(app, 0.05).call(REQ)), asyncio.run(collect(OpenAIApp(app, 0.05)))[0]):
        assert resp.status == 400
        assert json.loads(resp.body)["error"] == {"message": "1 validation error: {'loc': 'body.messages'}",
                                                  "type": "invalid_request_error", "param": "messages", "code": None}


def test_a_stream_that_starts_with_an_error_gets_its_status() -> None:
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        event = json.dumps({"error": {"message": "Token id 99999 is out of vocabulary", "type": "BadRequestError",
                                      "param": None, "code": 400}})
        await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    (resp,) = asyncio.run(collect(OpenAIApp(app, 0.05)))
    assert resp.status == 400 and json.loads(resp.body)["error"]["type"] == "invalid_request_error"


def test_context_length_errors_get_openais_code() -> None:
    body = json.dumps({"error": {"message": "This model's maximum context length is 2048 tokens. (parameter=input_tokens)",
                                 "type": "BadRequestError", "param": "input_tokens", "code": 400}}).encode()
    err = json.loads(openai_error_body(400, body))["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "input_tokens"
