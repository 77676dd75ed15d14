"""The node cache's local socket: how processes that are not Ray workers report to it.

vLLM's engine-core and worker processes (where the KV connector writes and reads blocks)
are started by the engine, not by Ray, so they cannot call the node cache actor. They
report the same events a Ray process batches (`node_cache.Event`: inserts, hits, removals)
over a Unix socket the actor listens on, one JSON object per line, never waiting for an
answer: reporting costs a `send` per batch on the engine's hot path. The socket lives in
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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from helios.observability.logs import get_logger, log_event

logger = get_logger("storage.report_socket")

BATCH = 256  # events one client sends in a message at most
RETRY_S = 5.0  # a client that found no keeper tries again after this
MAX_LINE = 8 << 20  # a message longer than this is a broken client: its connection is dropped


def socket_name(tier_roots: Iterable[str | os.PathLike]) -> str:
    """The abstract socket name for a set of tier directories (the same on every restart)."""
    key = "\n".join(str(Path(r).expanduser().resolve()) for r in tier_roots)
    return f"helios-node-cache-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _address(name: str) -> str:
    return "\0" + name  # Linux abstract namespace


class ReportServer:
    """Accepts clients on the abstract socket `name` and hands each message to `handle(client, events)`."""

    def __init__(self, name: str, handle: Callable[[str, Sequence[Any]], None]) -> None:
        self.name = name
        self._handle = handle
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
            except OSError:
                return
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
                    client, events = str(msg["client"]), list(msg["events"])
                except (ValueError, KeyError, TypeError):
                    self.dropped += 1  # not ours: skip it, keep the connection
                    continue
                try:
                    self._handle(client, events)
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

    def flush(self) -> bool:
        """Send what is batched; False (and the events dropped: counts, not bytes) when the keeper is away."""
        with self._lock:
            events, self._events = self._events, []
            if not events:
                return self.reachable
            if os.getpid() != self._pid:  # a forked child must not share its parent's connection
                self._sock, self._pid = None, os.getpid()
            if self._sock is None and not self._connect():
                return False
            data = (json.dumps({"client": self.client, "events": events}) + "\n").encode()
            try:
                assert self._sock is not None
                self._sock.sendall(data)
            except OSError as exc:
                self._lost(exc)
                return False
            self.sent += len(events)
            return True

    def _connect(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
