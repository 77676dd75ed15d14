"""The node cache's local socket: how processes that are not Ray workers report to it.

vLLM's engine-core and worker processes (where the KV connector writes and reads blocks)
are started by the engine, not by Ray, so they cannot call the node cache actor. They
report the same events a Ray process batches (`node_cache.Event`: inserts, hits, removals),
and their KV counters (cumulative, per store handle), over a Unix socket the actor listens on,
one JSON object per line, never waiting for an answer: reporting costs a `send` per batch on
the engine's hot path, not a file rewritten every engine step. A reader (the replica's metrics
exporter, a test) asks for the summed counters with a query line and gets one line back. The socket lives in
Linux's abstract namespace (no file, no path-length limit, gone when its process is), named
after the tier directories it keeps, so a restarted keeper takes the same name back and
clients reconnect on their own.

A client that cannot reach the keeper says so (`reachable`), and its store keeps its own
budget meanwhile, as a `LocalTier` does when the actor cannot be reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from helios.observability.logs import get_logger, log_event

logger = get_logger("storage.report_socket")

BATCH = 256  # events one client sends in a message at most
RETRY_S = 5.0  # a client that found no keeper tries again after this
SEND_TIMEOUT_S = 0.2  # past this a send gives up (the connection is dropped, its batch lost)
MAX_LINE = 8 << 20  # a message longer than this is a broken client: its connection is dropped


def socket_name(tier_roots: Iterable[str | os.PathLike]) -> str:
    """The abstract socket name for a set of tier directories (the same on every restart)."""
    key = "\n".join(str(Path(r).expanduser().resolve()) for r in tier_roots)
    return f"helios-node-cache-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _address(name: str) -> str:
    return "\0" + name  # Linux abstract namespace


def _same_user(conn: socket.socket) -> bool:
    """Whether the connected process runs as this process's user (or root)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


Handler = Callable[[str, Sequence[Any], "dict[str, Any] | None"], None]
"""handle(client, events, counters): counters is {"name": ..., "values": {...}} or None."""


class ReportServer:
    """Accepts clients on the abstract socket `name`: reports go to `handle`, queries to `query`,
    whose answer is written back on the same connection."""

    def __init__(self, name: str, handle: Handler,
                 query: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.name = name
        self._handle = handle
        self._query = query
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(_address(name))  # OSError (EADDRINUSE) when another keeper has it: the caller decides
        self._sock.listen(64)
        self._closed = threading.Event()
        self.messages = 0
        self.dropped = 0
        threading.Thread(target=self._accept, name="helios-cache-socket", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                log_event(logger, "node_cache_accept_failed", error=str(exc))  # e.g. out of descriptors
                time.sleep(0.5)
                continue
            if not _same_user(conn):  # the abstract namespace has no file permissions: check the peer
                self.dropped += 1
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="helios-cache-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                if self._closed.is_set():
                    return
                if len(line) > MAX_LINE:
                    self.dropped += 1
                    return
                try:
                    msg = json.loads(line)
                    if "query" in msg:
                        answer = self._query(msg) if self._query is not None else None
                        conn.sendall((json.dumps({"answer": answer}) + "\n").encode())
                        continue
                    client, events = str(msg["client"]), list(msg.get("events", []))
                    counters = msg.get("counters")
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.dropped += 1  # not ours: skip it, keep the connection
                    continue
                except OSError:
                    return
                try:
                    self._handle(client, events, counters if isinstance(counters, dict) else None)
                    self.messages += 1
                except Exception as exc:  # noqa: BLE001 - one bad report must not stop the keeper hearing others
                    self.dropped += 1
                    log_event(logger, "node_cache_report_failed", client=client, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class ReportClient:
    """One process's batched reports to the keeper on `name`; thread-safe, never blocks on the keeper."""

    def __init__(self, name: str, client: str | None = None) -> None:
        self.name = name
        self.client = client or f"{socket.gethostname()}:{os.getpid()}"
        self._sock: socket.socket | None = None
        self._events: list[Any] = []
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._counters: dict[str, Any] | None = None  # the latest snapshot not yet sent
        self._pid = os.getpid()
        self.reachable = True  # until a send says otherwise
        self.sent = 0

    @property
    def connected(self) -> bool:
        return self._sock is not None and os.getpid() == self._pid

    def add(self, event: Sequence[Any]) -> None:
        with self._lock:
            self._events.append(list(event))
            full = len(self._events) >= BATCH
        if full:
            self.flush()

    def set_counters(self, name: str, values: dict[str, float]) -> None:
        """The handle's cumulative counters, sent with the next flush (the newest snapshot wins)."""
        with self._lock:
            self._counters = {"name": name, "values": dict(values)}

    def flush(self) -> bool:
        """Send what is batched; False (and the events dropped: counts, not bytes) when the keeper is away."""
        with self._lock:
            events, self._events = self._events, []
            counters, self._counters = self._counters, None
            if not events and counters is None:
                return self.reachable
            if os.getpid() != self._pid:  # a forked child must not share its parent's connection
                self._sock, self._pid = None, os.getpid()
            if self._sock is None and not self._connect():
                if counters is not None:
                    self._counters = self._counters or counters
                return False
            msg: dict[str, Any] = {"client": self.client, "events": events}
            if counters is not None:
                msg["counters"] = counters
            data = (json.dumps(msg) + "\n").encode()
            try:
                assert self._sock is not None
                self._sock.sendall(data)
            except OSError as exc:
                self._lost(exc)
                if counters is not None:  # a snapshot is cumulative: keep the newest for next time
                    self._counters = self._counters or counters
                return False
            self.sent += len(events)
            return True

    def _connect(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SEND_TIMEOUT_S)  # a keeper that stops reading must not stall the engine's step
        try:
            sock.connect(_address(self.name))
        except OSError as exc:
            sock.close()
            self._lost(exc)
            return False
        self._sock = sock
        if not self.reachable:
            log_event(logger, "node_cache_socket_back", socket=self.name)
        self.reachable = True
        return True

    def _lost(self, exc: OSError) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._retry_at = time.monotonic() + RETRY_S
        if self.reachable:
            log_event(logger, "node_cache_socket_unreachable", socket=self.name, error=str(exc))
        self.reachable = False

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.close()
                self._sock = None


def query(name: str, request: dict[str, Any], timeout_s: float = 5.0) -> Any:
    """Ask the keeper on `name` (e.g. `{"query": "kv_stats", "prefix": ...}`); OSError when it is away."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(_address(name))
        sock.sendall((json.dumps(request) + "\n").encode())
        with sock.makefile("rb") as lines:
            line = lines.readline()
    if not line:
        raise OSError(f"node cache socket {name}: no answer")
    return json.loads(line)["answer"]
