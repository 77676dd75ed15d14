"""vLLM's own OpenAI server app, run in the engine replica without a socket.

vLLM's `build_app` / `init_app_state` build exactly the FastAPI app that
`python -m vllm.entrypoints.openai.api_server` serves (completions, chat, tokenization,
embeddings and pooling when the runner pools, tool and reasoning parsers, structured
outputs, its validation and error bodies). Ray Serve LLM builds the same app. Helios calls
it in-process through ASGI: the router's bytes go in, status, headers and body bytes come
out, and a stream's body is coalesced into at most one Ray message per stream interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import types
from collections.abc import AsyncIterator
from typing import Any

from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.observability.logs import get_logger, log_event

logger = get_logger("engine.openai_app")


def server_args(engine_args: Any, frontend: dict[str, Any]) -> argparse.Namespace:
    """The flat namespace vLLM's server parses from its command line: frontend flags, then engine args.

    Built from the dataclasses behind vLLM's parser, as Ray Serve LLM does, so a field
    vLLM adds gets its default here too."""
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    return argparse.Namespace(**(vars(FrontendArgs(**frontend)) | vars(engine_args)))


async def build_openai_app(engine: Any, args: argparse.Namespace) -> Any:
    """vLLM's FastAPI app with its serving state initialised over `engine` (a started AsyncLLM)."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    tasks = tuple(await engine.get_supported_tasks())
    state = State()
    await init_app_state(engine, state, args, supported_tasks=tasks)
    app = build_app(args, supported_tasks=tasks, model_config=engine.model_config)
    app.state._state.update(state._state)
    for plugin in getattr(app.state, "endpoint_plugins", []):
        await plugin.init_state(engine, app.state, args)
    # vLLM's engine-error handler flips `should_exit` on the uvicorn server it expects; there
    # is none here (Serve restarts the replica through its health check), but the read must work.
    app.state.server = types.SimpleNamespace()
    return app


class ASGICall:
    """One request through an ASGI app, its response read back as messages on a queue.

    `receive` gives the body once and then waits: a cancelled call reports
    `http.disconnect`, which vLLM's handlers take as the client leaving (they abort)."""

    def __init__(self, app: Any, req: EngineHTTPRequest) -> None:
        self.req = req
        self.messages: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        self._sent_body = False
        self._gone = asyncio.Event()
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers]
        headers.append((b"content-length", str(len(req.body)).encode()))
        path, _, query = req.path.partition("?")
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": query.encode(), "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
        }
        self.task = asyncio.get_running_loop().create_task(self._run(app, scope))

    async def _run(self, app: Any, scope: dict[str, Any]) -> None:
        try:
            await app(scope, self._receive, self._send)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported to the reader, which answers 500
            self.messages.put_nowait(exc)
        finally:
            self.messages.put_nowait(None)

    async def _receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self.req.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.messages.put_nowait(message)

    async def next_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The app's next ASGI message; None when it has finished; a `flush` message after `timeout`."""
        try:
            msg = self.messages.get_nowait()
        except asyncio.QueueEmpty:
            try:
                async with asyncio.timeout(timeout):
                    msg = await self.messages.get()
            except TimeoutError:
                return {"type": "flush"}
        if isinstance(msg, BaseException):
            raise msg
        return msg

    async def cancel(self) -> None:
        """The client went away: tell the handler, then stop it (both abort the request in vLLM)."""
        self._gone.set()
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def _head(msg: dict[str, Any]) -> tuple[int, list[tuple[str, str]]]:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
    return int(msg["status"]), [(k, v) for k, v in headers if k.lower() != "content-length"]


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error"}
_CONTEXT = re.compile(r"maximum context length|context length is", re.IGNORECASE)
_PARAM_IN_MESSAGE = re.compile(r"'loc': '(?:body\.)?([A-Za-z0-9_.]+)'")


def openai_error_body(status: int, body: bytes) -> bytes:
    """vLLM's ErrorResponse as OpenAI's error body: an OpenAI `type`, `param` naming the field
    (`messages`, not `body.messages`), a string `code` (`context_length_exceeded`) or null."""
    try:
        err = json.loads(body)["error"]
        message = str(err["message"])
    except (ValueError, KeyError, TypeError):
        return body
    param = err.get("param")
    if isinstance(param, str):
        param = param.removeprefix("body.")
    elif (found := _PARAM_IN_MESSAGE.search(message)) is not None:
        param = found.group(1)
    code = "context_length_exceeded" if _CONTEXT.search(message) else None
    if status == 404 and param == "model":
        code = "model_not_found"
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def early_stream_error(body: bytes) -> tuple[tuple[int, list[tuple[str, str]]], bytes, bool]:
    """(head, body, done) of the error response that a stream's first error event stands for."""
    event = body.split(b"\n\n", 1)[0].removeprefix(b"data: ")
    try:
        code = json.loads(event)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        code = None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return (status, [("content-type", "application/json")]), openai_error_body(status, event), True


class OpenAIApp:
    """Answers `EngineHTTPRequest`s with vLLM's app: whole, or as a coalesced stream."""

    def __init__(self, app: Any, stream_interval_s: float) -> None:
        self.app = app
        self.stream_interval_s = stream_interval_s

    def openapi(self) -> dict[str, Any]:
        return self.app.openapi()

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        """The whole response (for a request that does not stream)."""
        first: EngineHTTPResponse | None = None
        chunks: list[bytes] = []
        async for part in self.stream(req, interval_s=None):
            if isinstance(part, EngineHTTPResponse):
                first = part
            else:
                chunks.append(part)
        assert first is not None
        if chunks:
            first.body += b"".join(chunks)
        return first

    async def stream(self, req: EngineHTTPRequest, interval_s: float | None = -1.0) -> AsyncIterator[
            EngineHTTPResponse | bytes]:
        """The response head with its first body bytes (awaited, so an early error keeps its status),
        then body bytes at most once per `interval_s` (the replica's stream interval by default; None:
        everything at the end), the last the moment the app finishes. Closing this aborts in vLLM."""
        interval = self.stream_interval_s if interval_s is not None and interval_s < 0 else interval_s
        call = ASGICall(self.app, req)
        loop = asyncio.get_running_loop()
        head: tuple[int, list[tuple[str, str]]] | None = None
        buf: list[bytes] = []
        sent_head, done = False, False
        send_at = loop.time()
        try:
            while not done:
                timeout = None
                if sent_head and buf and interval is not None:
                    timeout = max(send_at - loop.time(), 0.0)
                msg = await call.next_message(timeout)
                if msg is None:
                    done = True
                elif msg["type"] == "http.response.start":
                    head = _head(msg)
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        buf.append(msg["body"])
                    done = not msg.get("more_body", False)
                if head is None:
                    continue
                if not sent_head and (buf or done):
                    body = b"".join(buf)
                    if head[0] >= 400 and done:
                        body = openai_error_body(head[0], body)
                    elif body.startswith(b'data: {"error"'):
                        # A stream whose first event is an error: answer with its status, not a 200.
                        head, body, done = early_stream_error(body)
                    yield EngineHTTPResponse(head[0], head[1], body)
                    if done:
                        break
                    buf, sent_head, send_at = [], True, loop.time() + (interval or 0.0)
                elif buf and (done or (interval is not None and loop.time() >= send_at)):
                    yield b"".join(buf)
                    buf, send_at = [], loop.time() + (interval or 0.0)
            if head is None:
                raise RuntimeError("vLLM's app returned no response")
        except BaseException as exc:
            if not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                log_event(logger, "openai_app_failed", request_id=req.request_id, path=req.path, error=repr(exc))
            raise
        finally:
            if not call.task.done():
                await call.cancel()
