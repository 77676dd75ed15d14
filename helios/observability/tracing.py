"""OpenTelemetry traces of a request's whole path: router, prefill, KV, decode, vLLM.

Each process that takes part makes its own tracer from the environment Helios gives it
(`tracing_env`: the OTLP endpoint and sample ratio of `observability.tracing`), and the
context travels as W3C `traceparent` headers: from the client to the router, from the
router's engine-call span to the engine replica (a header of the forwarded request), from
the replica's span to vLLM (which starts its own request span under it and hands the
headers to its engine core, where the KV connector's spans join). Sampling is decided once,
at the root (`ParentBased`), so a trace is whole or absent.

Off (no endpoint) it costs one dictionary lookup per call: `span()` yields None.
Spans carry model, version, replica, node and token counts, never prompt text.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

ENDPOINT_ENV = "HELIOS_OTLP_TRACES_ENDPOINT"
RATIO_ENV = "HELIOS_TRACE_SAMPLE_RATIO"
TRACE_HEADERS = ("traceparent", "tracestate")

_lock = threading.Lock()
_tracer: Any = None
_configured = False


def tracing_env(endpoint: str | None, sample_ratio: float) -> dict[str, str]:
    """The environment that turns tracing on in a Helios process (empty: tracing off)."""
    if not endpoint:
        return {}
    return {ENDPOINT_ENV: endpoint, RATIO_ENV: str(sample_ratio)}


def endpoint() -> str | None:
    return os.environ.get(ENDPOINT_ENV) or None


def tracer() -> Any:
    """This process's tracer, made on first use; None when tracing is off."""
    global _tracer, _configured
    if _configured:
        return _tracer
    with _lock:
        if not _configured:
            url = endpoint()
            if url:
                _tracer = _make_tracer(url, float(os.environ.get(RATIO_ENV, "1.0")))
            _configured = True
    return _tracer


def _make_tracer(url: str, ratio: float) -> Any:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": "helios", "host.name": socket.gethostname(),
                                "process.pid": os.getpid()})
    # Helios's own provider, not the global one: vLLM sets the global provider for its spans.
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, insecure=True),
                                                   schedule_delay_millis=500))
    atexit.register(provider.shutdown)
    return provider.get_tracer("helios")


def _carrier(headers: Mapping[str, str] | list[tuple[str, str]] | None) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    return {k.lower(): v for k, v in items if k.lower() in TRACE_HEADERS}


def start(name: str, parent: Mapping[str, str] | list[tuple[str, str]] | Any = None, server: bool = False,
          start_ns: int | None = None, **attributes: Any) -> Any:
    """Start a span (end it with `finish`): under `parent` (a span, or headers carrying a
    traceparent), else a root. None when tracing is off."""
    t = tracer()
    if t is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if parent is None or isinstance(parent, (Mapping, list)):
        ctx = TraceContextTextMapPropagator().extract(_carrier(parent)) if parent else None
    else:
        ctx = trace.set_span_in_context(parent)
    kind = trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL
    return t.start_span(name, context=ctx, kind=kind, start_time=start_ns,
                        attributes={k: v for k, v in attributes.items() if v is not None})


def finish(span: Any, error: BaseException | None = None, **attributes: Any) -> None:
    if span is None:
        return
    for k, v in attributes.items():
        if v is not None:
            span.set_attribute(k, v)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


@contextlib.contextmanager
def span(name: str, parent: Any = None, server: bool = False, **attributes: Any) -> Iterator[Any]:
    """`start` ... `finish` around a block (errors mark the span)."""
    s = start(name, parent, server, **attributes)
    if s is None:
        yield None
        return
    try:
        yield s
    except BaseException as exc:
        finish(s, exc)
        raise
    finish(s)


def headers_for(span: Any, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` with their trace headers replaced by `span`'s context (unchanged without a span)."""
    if span is None:
        return headers
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS] + list(carrier.items())


def trace_id(span: Any) -> str | None:
    """The span's trace id as 32 hex digits (for log lines), or None."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
