"""What crosses Ray between the router and an engine replica: an HTTP request and its answer as bytes.

The router never decodes a body it forwards; the engine replica runs it through vLLM's own
OpenAI app and returns status, headers and body bytes. Plain dataclasses: they pickle
cheaply and need neither FastAPI nor vLLM to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Headers vLLM's handlers read; whatever else a client sent stays at the router.
FORWARDED_HEADERS = frozenset({"content-type", "accept", "traceparent", "tracestate"})
REPLICA_HEADER = "x-helios-replica"  # which engine replica answered: for operators following a request


@dataclass(slots=True)
class EngineHTTPRequest:
    """One OpenAI request for an engine replica: the route, the headers vLLM reads, the raw body."""

    path: str
    body: bytes
    request_id: str
    method: str = "POST"
    headers: list[tuple[str, str]] = field(default_factory=list)
    routing: Any = None  # the router's RoutingHints (prefix hashes, session), read by its request router

    @property
    def messages(self) -> Any:
        """The chat messages, or a completion's prompt: what Ray's own `PrefixCacheAffinityRouter` reads
        from a request (`deployment.request_router: ray_prefix`). Parses the body: only that router asks."""
        import json

        try:
            body = json.loads(self.body)
        except ValueError:
            return ""
        if not isinstance(body, dict):
            return ""
        return body.get("messages") or body.get("prompt") or ""


@dataclass(slots=True)
class EngineHTTPResponse:
    """The head of an engine's answer and its first (for a unary call: whole) body.

    A streamed answer sends this first, then further body bytes as plain `bytes`."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)
