"""A real OTLP/gRPC trace receiver for tests: OpenTelemetry's own protobuf service over grpcio.

Exporters in any process (router and engine replicas, vLLM's engine core) send it spans
exactly as they would send them to an OpenTelemetry Collector."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    service: str = ""


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OTLPReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OTLPReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)

    def Export(self, request: Any, context: Any) -> Any:
        got = []
        for rs in request.resource_spans:
            service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                    {a.key: _value(a.value) for a in s.attributes}, service))
        with self._lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: set[str], timeout_s: float = 90,
                 counts: dict[str, int] | None = None) -> list[Span]:
        """The trace's spans once every name in `names` has arrived, and at least `counts[name]` of
        those named there (each process's exporter batches for seconds, on its own schedule)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            seen = [s.name for s in spans]
            if names <= set(seen) and all(seen.count(n) >= k for n, k in (counts or {}).items()):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans of {trace_id}: got {sorted(s.name for s in spans)}, want {sorted(names)}")
            time.sleep(0.5)
