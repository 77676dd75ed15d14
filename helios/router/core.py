"""The router's logic as a plain class: auth, model lookup, PD orchestration, stream relay.

It reads only what routing needs from a request (`model`, `stream`) and forwards the raw
body to an engine, which answers with vLLM's own serving layer; a stream's SSE bytes are
relayed without being decoded. Engines are reached through `EngineClient`, so the Serve
ingress passes handles in and unit tests pass a fake engine: nothing here needs Ray.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import random
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from helios.api.bodies import parse_json_object
from helios.engine.http import FORWARDED_HEADERS, REPLICA_HEADER, EngineHTTPRequest, EngineHTTPResponse
from helios.errors import (
    AuthenticationFailed,
    EngineUnavailable,
    HeliosError,
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
)
from helios.observability import tracing
from helios.observability.logs import get_logger, log_event, request_context
from helios.observability.metrics import ROUTER_RETRIES
from helios.router.admission import AdmissionGate, KeyLimits, estimated_tokens
from helios.router.breaker import breakers_for
from helios.router.request_metrics import RequestTimer
from helios.router.routing_policy import RoutingHints, hints_for

logger = get_logger("router.core")

# The OpenAI routes forwarded to a model's engine (vLLM answers them), by path.
ENGINE_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize")
# Fields the prefill side of a disaggregated model does not need: it only computes the prompt's KV.
_PREFILL_DROPS = ("stream_options", "logprobs", "top_logprobs", "prompt_logprobs", "echo", "min_tokens",
                  "n", "best_of", "return_token_ids", "response_format", "structured_outputs")


T = TypeVar("T")


class EngineStream(ABC):
    """A streamed engine answer: the head with the first body bytes, then more bytes.

    `first` raises `EngineUnavailable` when the replica died (or could not be reached)
    before answering: the router retries those."""

    @abstractmethod
    async def first(self) -> EngineHTTPResponse: ...

    @abstractmethod
    def rest(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    def cancel(self) -> None:
        """Stop the engine's request (the client went away)."""


class EngineClient(ABC):
    """How the router reaches one engine deployment (a Serve handle, or a fake in unit tests).

    `call` raises `EngineUnavailable` when the replica died (or could not be reached)
    before answering: the router retries those. `key` names the deployment for the
    replicas' circuit breakers, which its request router shares (empty: no breakers)."""

    key: str = ""

    @abstractmethod
    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse: ...

    @abstractmethod
    def stream(self, req: EngineHTTPRequest) -> EngineStream: ...


@dataclass
class ModelRoute:
    """Where one model's requests go: its engine, and for a disaggregated model its prefill side too."""

    engine: EngineClient  # unified, or a disaggregated model's decode side
    prefill: EngineClient | None = None


@dataclass
class RouterResponse:
    """What the ingress writes back: a whole body, or a stream of bytes already in SSE form."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    media_type: str | None = None


# Looks up a model that is not in the config (registry + on-demand start); None: unknown model.
Resolver = Callable[[str], Awaitable[ModelRoute | None]]


@dataclass(frozen=True)
class RetryPolicy:
    """How a request whose replica died before any output is retried (on another or the restarted replica).

    Nothing has reached the client yet, so a retry is invisible to it; the deadline is
    long enough by default for Serve to restart a lone replica."""

    deadline_s: float = 120.0
    first_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    async def backoffs(self) -> AsyncIterator[float]:
        """Sleep before each retry (doubling, with jitter) until the deadline; yields the seconds left."""
        deadline = time.monotonic() + self.deadline_s
        backoff = self.first_backoff_s
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(backoff * random.uniform(0.5, 1.0), left))
            yield deadline - time.monotonic()
            backoff = min(backoff * 2, self.max_backoff_s)


@dataclass
class RouterCore:
    """Routes OpenAI requests by `model` to engines; the Serve ingress only adapts HTTP to it."""

    routes: dict[str, ModelRoute]
    api_keys: list[bytes] = field(default_factory=list)
    resolver: Resolver | None = None
    on_use: Callable[[str], None] | None = None  # counts a request for the registry's usage statistics
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    admission: Callable[[str], AdmissionGate] | None = None  # makes a model's gate (None: no queue bound)
    limits: KeyLimits | None = None  # per-API-key request and token rates
    gates: dict[str, AdmissionGate] = field(default_factory=dict)
    session_affinity: bool = False  # route by `x-session-id` / `user` too
    breaker: dict[str, float] = field(default_factory=dict)  # `breakers_for` settings: failures, cooldown_s
    name: str = ""  # this router replica, the `router` tag of its gauges

    # -- edge checks -------------------------------------------------------------

    def authorize(self, headers: Mapping[str, str]) -> None:
        """Check the bearer key against the configured API keys (none configured: open)."""
        if not self.api_keys:
            return
        given = _bearer(headers).encode()
        if not given or not any(hmac.compare_digest(given, k) for k in self.api_keys):
            raise AuthenticationFailed("Missing or invalid API key: send 'Authorization: Bearer <key>'")

    async def route(self, model: str) -> ModelRoute:
        """The engines of `model`: a config model's, or one the resolver finds (404 if nobody knows it)."""
        route = self.routes.get(model)
        if route is None and self.resolver is not None:
            route = await self.resolver(model)
        if route is None:
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        if self.on_use is not None:
            self.on_use(model)
        return route

    def _model_of(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None and len(self.routes) == 1:
            return next(iter(self.routes))  # as vLLM's server does: `model` may be left out with one model
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model: a model id (a non-empty string) is required", param="model")
        return model

    # -- the request path ------------------------------------------------------------

    async def forward(self, path: str, headers: Mapping[str, str], raw: bytes, request_id: str) -> RouterResponse:
        """Send one OpenAI request to its model's engine and shape the answer for the client.

        Admission first: the key's rate limits, then a slot in the model's bounded queue,
        held until the answer (or the stream) ends. Every answer is counted and timed
        (`request_metrics`), refusals included."""
        timer = RequestTimer(path, self.name, headers, request_id)
        with request_context(request_id, tracing.trace_id(timer.span)):
            return await self._timed(timer, path, headers, raw, request_id)

    async def _timed(self, timer: RequestTimer, path: str, headers: Mapping[str, str], raw: bytes,
                     request_id: str) -> RouterResponse:
        try:
            body = parse_json_object(raw)
            timer.model = model = self._model_of(body)
            resp = await self._admitted(model, path, headers, raw, body, request_id, timer)
        except HeliosError as exc:
            timer.refused(exc)
            raise
        except BaseException:
            timer.answered(500)
            raise
        if resp.stream is None:
            timer.answered(resp.status)
        else:
            resp.stream = timer.stream(resp.stream)
        return resp

    async def _admitted(self, model: str, path: str, headers: Mapping[str, str], raw: bytes, body: dict[str, Any],
                        request_id: str, timer: RequestTimer) -> RouterResponse:
        route = await self.route(model)
        if self.limits is not None:  # an open API has one shared limit: made-up keys must not dodge it
            self.limits.check(_bearer(headers) if self.api_keys else "", estimated_tokens(raw, body))
        gate = self._gate(model)
        if gate is None:
            return await self._send(route, path, headers, raw, body, request_id, timer.span)
        with timer.queued(gate):
            await gate.acquire()
        try:
            resp = await self._send(route, path, headers, raw, body, request_id, timer.span)
        except BaseException:
            gate.release(finished=False)
            raise
        if resp.stream is None:
            gate.release()
        else:
            slot = _Slot(gate)
            resp.stream = _released(resp.stream, slot)
            # A stream the server never starts (the client left before the head was sent) runs no
            # `finally`: give its slot back when it is collected, on the loop that owns the gate.
            loop = asyncio.get_running_loop()
            weakref.finalize(resp.stream, lambda: loop.is_closed() or loop.call_soon_threadsafe(slot.release))
        return resp

    def _gate(self, model: str) -> AdmissionGate | None:
        if self.admission is None:
            return None
        gate = self.gates.get(model)
        if gate is None:
            gate = self.gates[model] = self.admission(model)
        return gate

    async def _send(self, route: ModelRoute, path: str, headers: Mapping[str, str], raw: bytes, body: dict[str, Any],
                    request_id: str, parent: Any = None) -> RouterResponse:
        fwd = [(k, v) for k, v in headers.items() if k.lower() in FORWARDED_HEADERS]
        fwd.append(("x-request-id", request_id))
        hints = hints_for(body, headers.get("x-session-id"), self.session_affinity)
        if route.prefill is not None and path in ("/v1/completions", "/v1/chat/completions"):
            with tracing.span("helios.prefill", parent, **{"helios.request_id": request_id}) as span:
                decode = await self._prefill(route.prefill, path, body, tracing.headers_for(span, fwd), request_id,
                                             hints)
            if isinstance(decode, RouterResponse):  # the prefill side refused: its answer is the client's
                return decode
            raw = decode
        span = tracing.start("helios.decode" if route.prefill is not None else "helios.generate", parent,
                             **{"helios.request_id": request_id})
        req = EngineHTTPRequest(path=path, body=raw, request_id=request_id, headers=tracing.headers_for(span, fwd),
                                routing=hints)
        try:
            if body.get("stream") is not True:
                resp = await self._retrying(route.engine, lambda: route.engine.call(req), request_id)
                tracing.finish(span, status=resp.status, **{"helios.replica": resp.header(REPLICA_HEADER)})
                return _whole(resp, request_id)
            stream, first = await self._retrying(route.engine, lambda: _open(route.engine, req), request_id,
                                                 head=lambda opened: opened[1])
        except BaseException as exc:
            tracing.finish(span, exc)
            raise
        if span is not None:
            span.set_attribute("helios.replica", first.header(REPLICA_HEADER) or "")
        if first.status != 200:  # an error answered before any token: its own status, whole
            rest = [chunk async for chunk in stream.rest()]
            first.body += b"".join(rest)
            tracing.finish(span, status=first.status)
            return _whole(first, request_id)
        return RouterResponse(200, {**_head(first, request_id), "cache-control": "no-cache"},
                              stream=relay(first.body, stream, request_id, span), media_type="text/event-stream")

    async def _prefill(self, prefill: EngineClient, path: str, body: dict[str, Any], headers: list[tuple[str, str]],
                       request_id: str, hints: RoutingHints) -> bytes | RouterResponse:
        """Run the prompt on a prefill replica (one token, KV saved), as vLLM's disaggregation proxy does;
        return the decode request's body, carrying the prefill's `kv_transfer_params` (or, when the
        prefill side answers with an error, that answer for the client).

        A decode side that cannot find the blocks recomputes them (and counts it), so this
        never changes the tokens, only who computes them."""
        pre = {k: v for k, v in body.items() if k not in _PREFILL_DROPS}
        pre.update(stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        if "max_completion_tokens" in body:
            pre["max_completion_tokens"] = 1
        pre_headers = [(k, v) for k, v in headers if k != "x-request-id"] + [("x-request-id", request_id + "-prefill")]
        pre_req = EngineHTTPRequest(path=path, body=json.dumps(pre).encode(), request_id=request_id + "-prefill",
                                    headers=pre_headers, routing=hints)
        resp = await self._retrying(prefill, lambda: prefill.call(pre_req), request_id)
        if resp.status != 200:
            return _whole(resp, request_id)
        params = json.loads(resp.body).get("kv_transfer_params")
        return json.dumps({**body, "kv_transfer_params": params}).encode()


    async def _retrying(self, engine: EngineClient, attempt: Callable[[], Awaitable[T]], request_id: str,
                        head: Callable[[T], EngineHTTPResponse] = lambda r: r) -> T:  # type: ignore[assignment,return-value]
        """`attempt()`, again after each `EngineUnavailable` (a replica, or its engine, that died before
        answering) until the retry deadline; then 503 with Retry-After.

        Every answer and every dead engine is reported to that replica's breaker (a 5xx answer
        counts as a failure but is not retried: it may be the request's own fault; an engine known
        to be dead opens the breaker at once); with every replica's breaker open the answer is 503 at once."""
        breakers = breakers_for(engine.key, **self.breaker) if engine.key else None
        backoffs: AsyncIterator[float] | None = None
        tries = 0
        while True:
            if breakers is not None and (wait := breakers.all_open()) is not None:
                raise ServiceUnavailable("Every replica of this model is failing its requests; retry later.",
                                         retry_after_s=math.ceil(wait) or 1)
            tries += 1
            try:
                result = await attempt()
            except EngineUnavailable as exc:
                error = exc.message
                if breakers is not None and exc.replica:
                    breakers.report(exc.replica, ok=False, dead=exc.dead)
            else:
                resp = head(result)
                replica = resp.header(REPLICA_HEADER)
                if breakers is not None and replica:
                    breakers.report(replica, resp.status < 500)
                if tries > 1:
                    log_event(logger, "retry_succeeded", request_id=request_id, attempts=tries, status=resp.status)
                return result
            backoffs = backoffs or self.retry.backoffs()
            try:
                left = await anext(backoffs)
            except StopAsyncIteration:
                log_event(logger, "retries_exhausted", request_id=request_id, attempts=tries, error=error)
                raise ServiceUnavailable("The model's replicas are not answering; retry shortly.",
                                         retry_after_s=max(int(self.retry.max_backoff_s), 1)) from None
            ROUTER_RETRIES.inc(deployment=engine.key)
            log_event(logger, "retry", request_id=request_id, attempt=tries + 1, error=error,
                      seconds_left=round(left, 1))


class _Slot:
    """A stream's admission slot, given back once."""

    def __init__(self, gate: AdmissionGate) -> None:
        self.gate, self.held = gate, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()


async def _released(stream: AsyncIterator[bytes], slot: _Slot) -> AsyncIterator[bytes]:
    """The stream, giving its admission slot back when it ends (finished, failed or abandoned)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        slot.release()


def _bearer(headers: Mapping[str, str]) -> str:
    """The request's bearer token ("" without one); with no API keys configured every client shares one limit."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _open(engine: EngineClient, req: EngineHTTPRequest) -> tuple[EngineStream, EngineHTTPResponse]:
    """Start a stream and wait for its head and first bytes (cancelled in the engine if that fails)."""
    stream = engine.stream(req)
    try:
        return stream, await stream.first()
    except BaseException:
        stream.cancel()
        raise


def _whole(resp: EngineHTTPResponse, request_id: str) -> RouterResponse:
    """A whole engine answer for the client; a 5xx shows only the request id (details are logged)."""
    if resp.status >= 500:
        log_event(logger, "engine_error_response", request_id=request_id, status=resp.status, body=resp.body[:2000])
        err = HeliosError("engine error")
        return RouterResponse(resp.status, {"x-request-id": request_id}, json.dumps(err.to_body(request_id)).encode(),
                              media_type="application/json")
    return RouterResponse(resp.status, _head(resp, request_id), resp.body,
                          media_type=resp.header("content-type") or "application/json")


def _head(resp: EngineHTTPResponse, request_id: str) -> dict[str, str]:
    """The response headers the client gets: its request id, and which replica answered."""
    replica = resp.header(REPLICA_HEADER)
    return {"x-request-id": request_id, **({REPLICA_HEADER: replica} if replica else {})}


def error_event(body: dict[str, Any]) -> bytes:
    """An in-band SSE error (the 200 is already sent), then the stream's end, as vLLM's server does."""
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


async def relay(first: bytes, stream: EngineStream, request_id: str, span: Any = None) -> AsyncIterator[bytes]:
    """The engine's SSE bytes as they come; a client that goes away cancels the engine request.
    `span`, the engine call's trace span, ends with the stream."""
    finished = False
    try:
        if first:
            yield first
        async for chunk in stream.rest():
            yield chunk
        finished = True
    except Exception as exc:  # noqa: BLE001 - the 200 is already sent: report in-band
        err = exc if isinstance(exc, HeliosError) else HeliosError("stream failed")
        log_event(logger, "stream_failed", request_id=request_id, error=repr(exc))
        finished = True
        yield error_event(err.to_body(request_id))
    finally:
        tracing.finish(span, cancelled=not finished or None)
        if not finished:
            stream.cancel()
            log_event(logger, "stream_cancelled", request_id=request_id)


def new_request_id(headers: Mapping[str, str]) -> str:
    """The client's x-request-id, or a new one."""
    return headers.get("x-request-id") or uuid.uuid4().hex
