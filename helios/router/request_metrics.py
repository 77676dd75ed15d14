"""Counting and timing each OpenAI request at the router (see `helios.observability.metrics`).

Time to first token is measured from the request's arrival to the first output event the
router relays; inter-token latency is the gap between relayed chunks divided by the
output events (`data: ` lines) in the later one, since vLLM may batch several into one
chunk when its consumer lags. Refusals are counted by reason as well as by status.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from helios.errors import HeliosError, RateLimited, ServiceUnavailable
from helios.observability import tracing
from helios.observability.metrics import (
    ROUTER_IN_FLIGHT,
    ROUTER_ITL,
    ROUTER_LATENCY,
    ROUTER_QUEUED,
    ROUTER_REJECTED,
    ROUTER_REQUESTS,
    ROUTER_TTFT,
)

if TYPE_CHECKING:
    from helios.router.admission import AdmissionGate

# model -> requests this router process holds now (the in-flight gauge's value)
_IN_FLIGHT: dict[str, int] = {}


def queue_depth_gauge(model: str, router: str) -> Callable[[int], None]:
    """An `AdmissionGate`'s `on_depth`: its model's admission-queue gauge on this router replica."""
    return lambda depth: ROUTER_QUEUED.set(depth, model=model, router=router)


class RequestTimer:
    """One request's clock and labels; `answered` / `refused` / `stream` end it exactly once."""

    def __init__(self, endpoint: str, router: str = "", headers: Mapping[str, str] | None = None,
                 request_id: str | None = None) -> None:
        self.started = time.perf_counter()
        self.endpoint = endpoint
        self.router = router
        self._model = ""
        # The request's root span (under the client's traceparent, if any); None untraced.
        self.span = tracing.start("helios.request", headers, server=True, **{
            "http.route": endpoint, "helios.request_id": request_id, "helios.router": router or None})
        self._held = False
        self._timed_out_in_queue = False

    @property
    def model(self) -> str:
        return self._model

    @model.setter
    def model(self, model: str) -> None:
        self._model = model
        if self.span is not None:
            self.span.set_attribute("helios.model", model)

    def _hold(self) -> None:
        if self.model and not self._held:
            self._held = True
            _IN_FLIGHT[self.model] = n = _IN_FLIGHT.get(self.model, 0) + 1
            ROUTER_IN_FLIGHT.set(n, model=self.model, router=self.router)

    def _done(self, status: int) -> None:
        if self._held:
            self._held = False
            _IN_FLIGHT[self.model] = n = max(_IN_FLIGHT.get(self.model, 1) - 1, 0)
            ROUTER_IN_FLIGHT.set(n, model=self.model, router=self.router)
        ROUTER_REQUESTS.inc(model=self.model, endpoint=self.endpoint, status=status)
        ROUTER_LATENCY.observe(time.perf_counter() - self.started, model=self.model, endpoint=self.endpoint)
        tracing.finish(self.span, **{"http.status_code": status})

    @contextlib.contextmanager
    def queued(self, gate: AdmissionGate) -> Iterator[None]:
        """Around waiting for an admission slot: the request is in flight (the gate shows the queue's
        depth itself, through `queue_depth_gauge`)."""
        self._hold()
        span = tracing.start("helios.admission", self.span)
        try:
            yield
        except ServiceUnavailable:
            self._timed_out_in_queue = True
            raise
        finally:
            tracing.finish(span, **{"helios.queued_behind": gate.queued})

    def answered(self, status: int) -> None:
        self._done(status)

    def refused(self, exc: HeliosError) -> None:
        """Count an error answer; one refused before any engine answered also by its reason."""
        reason = None
        if isinstance(exc, RateLimited):
            reason = "overloaded" if exc.code == "model_overloaded" else "rate_limited"
        elif isinstance(exc, ServiceUnavailable):
            reason = "queue_timeout" if self._timed_out_in_queue else "unavailable"
        if reason is not None:
            ROUTER_REJECTED.inc(model=self.model, reason=reason)
        self._done(exc.status_code)

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Relay a 200 stream, timing its first output and the gaps after it."""
        self._hold()
        tags = {"model": self.model, "endpoint": self.endpoint}
        last: float | None = None
        try:
            async for chunk in chunks:
                now = time.perf_counter()
                if last is None:
                    ROUTER_TTFT.observe(now - self.started, **tags)
                else:
                    ROUTER_ITL.observe((now - last) / max(chunk.count(b"data: "), 1), **tags)
                last = now
                yield chunk
        finally:
            self._done(200)
