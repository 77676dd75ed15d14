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
    """One request through an ASGI app, its response gathered as it is sent.

    The app's `send` only appends (a list, one event set): no queue, task or timer per
    token, since vLLM sends one message per token. `receive` gives the body once and then
    waits: a cancelled call reports `http.disconnect`, which vLLM's handlers take as the
    client leaving (they abort)."""

    def __init__(self, app: Any, req: EngineHTTPRequest) -> None:
        self.req = req
        self.head: tuple[int, list[tuple[str, str]]] | None = None
        self.chunks: list[bytes] = []
        self.done = False
        self.error: BaseException | None = None
        self._sent_body = False
        self._gone = asyncio.Event()
        self._data = asyncio.Event()  # something arrived since the reader last took
        self._finished = asyncio.Event()
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
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which fails the request
            self.error = exc
        finally:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        self._finished.set()
        self._data.set()

    async def _receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self.req.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.head = _head(message)
        elif kind == "http.response.body":
            if message.get("body"):
                self.chunks.append(message["body"])
            if not message.get("more_body", False):
                self._finish()
        self._data.set()

    def take(self) -> bytes:
        """The body bytes sent since the last take."""
        body = b"".join(self.chunks)
        self.chunks.clear()
        return body

    async def wait_data(self) -> None:
        """Until there are body bytes to take or the response is over."""
        while not self.chunks and not self.done:
            self._data.clear()
            await self._data.wait()

    async def wait_finished(self, timeout: float | None) -> None:
        """Until the response is over, or `timeout` seconds (None: no limit)."""
        if self.done:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._finished.wait()
        except TimeoutError:
            pass

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


def early_stream_error(body: bytes) -> EngineHTTPResponse:
    """The whole error response that a stream's first error event stands for."""
    event = body.split(b"\n\n", 1)[0].removeprefix(b"data: ")
    try:
        code = json.loads(event)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        code = None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return EngineHTTPResponse(status, [("content-type", "application/json")], openai_error_body(status, event))


class OpenAIApp:
    """Answers `EngineHTTPRequest`s with vLLM's app: whole, or as a coalesced stream."""

    def __init__(self, app: Any, stream_interval_s: float) -> None:
        self.app = app
        self.stream_interval_s = stream_interval_s

    def openapi(self) -> dict[str, Any]:
        return self.app.openapi()

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        """The whole response (for a request that does not stream)."""
        call = ASGICall(self.app, req)
        try:
            await call.wait_finished(None)
        except BaseException:
            await call.cancel()
            raise
        if call.error is not None or call.head is None:
            self._failed(req, call.error)
        status, headers = call.head
        body = call.take()
        if status >= 400:
            body = openai_error_body(status, body)
        return EngineHTTPResponse(status, headers, body)

    @staticmethod
    def _failed(req: EngineHTTPRequest, error: BaseException | None) -> None:
        log_event(logger, "openai_app_failed", request_id=req.request_id, path=req.path, error=repr(error))
        raise RuntimeError(f"vLLM's app failed: {error!r}")

    async def stream(self, req: EngineHTTPRequest) -> AsyncIterator[EngineHTTPResponse | bytes]:
        """The response head with its first body bytes (awaited, so an early error keeps its status),
        then body bytes at most once per stream interval, the last the moment the app finishes.
        Closing this aborts the request in vLLM."""
        interval = self.stream_interval_s
        call = ASGICall(self.app, req)
        try:
            while call.head is None or not (call.chunks or call.done):
                if call.done:
                    self._failed(req, call.error)
                await call.wait_data()
            status, headers = call.head
            body = call.take()
            if status >= 400:
                await call.wait_finished(None)
                yield EngineHTTPResponse(status, headers, openai_error_body(status, body + call.take()))
                return
            if body.startswith(b'data: {"error"'):
                # A stream whose first event is an error: answer with its status, not a 200.
                yield early_stream_error(body)
                return
            yield EngineHTTPResponse(status, headers, body)
            while not call.done:
                if interval > 0:
                    await call.wait_finished(interval)  # at most one message per interval; the end at once
                await call.wait_data()
                if call.chunks:
                    yield call.take()
            if call.chunks:  # sent while the last message was on its way
                yield call.take()
            if call.error is not None:
                self._failed(req, call.error)
        finally:
            if not call.task.done():
                await call.cancel()
