"""Helios's Prometheus metrics, recorded through Ray's own metrics pipeline.

Every Helios process that runs inside Ray (router and engine replicas, the registry, node
tasks) records with `ray.util.metrics`; Ray's metrics agent on each node exports them with
Ray's `ray_` prefix (`ray_helios_router_requests_total`), so a Prometheus that scrapes the
Ray cluster (KubeRay's convention, port 8080) sees every node's series, and the ingress's
`GET /metrics` serves the head's export for a single-node scrape. Outside Ray (the CLI, unit
tests) recording is a no-op, so library code records unconditionally.

The catalogue is this module's constants: one place to read what Helios exports. Counter
names end in `_total` themselves: Ray then exports them only as Prometheus counters (without
it, Ray adds a deprecated gauge of the same name beside each).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

# Seconds: sub-millisecond relay gaps up to multi-minute generations and cold starts.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
TOKEN_GAP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0]
START_BUCKETS = [0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0]


def metrics_enabled() -> bool:
    """`HELIOS_METRICS=0` in the cluster's environment turns Helios's and vLLM's metrics off
    (to measure what they cost: benchmarks/overhead.py)."""
    return os.environ.get("HELIOS_METRICS", "1").lower() not in ("0", "false", "no", "off")


TOKEN_LATENCY_ENV = "HELIOS_ENGINE_TOKEN_LATENCY"


def metrics_env(engine_token_latency: bool) -> dict[str, str]:
    """The environment that carries `observability.engine_token_latency` to the engine replicas."""
    return {TOKEN_LATENCY_ENV: "1"} if engine_token_latency else {}


def engine_token_latency() -> bool:
    """Whether this engine replica exports vLLM's per-token inter-token histogram."""
    return os.environ.get(TOKEN_LATENCY_ENV) == "1"


def _ray_ready() -> bool:
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to find out it is not running
    return ray is not None and ray.is_initialized()


class _Metric:
    """One metric, made in Ray on first use inside a Ray worker; a no-op elsewhere."""

    kind = ""

    def __init__(self, name: str, description: str, tags: tuple[str, ...], boundaries: list[float] | None = None) -> None:
        self.name, self.description, self.tags, self.boundaries = name, description, tags, boundaries
        self._metric: Any = None
        self._recorders: dict[tuple, Callable[[float], None]] = {}
        self._off = not metrics_enabled()
        self._lock = threading.Lock()

    def _get(self) -> Any:
        if self._metric is None and not self._off:
            with self._lock:
                if self._metric is None:
                    if not _ray_ready():
                        return None  # not yet: a replica may record before Ray's worker is connected
                    from ray.util import metrics

                    cls = getattr(metrics, self.kind)
                    extra = {"boundaries": self.boundaries} if self.boundaries else {}
                    self._metric = cls(self.name, description=self.description, tag_keys=self.tags, **extra)
        return self._metric

    def _tags(self, tags: dict[str, Any]) -> dict[str, str]:
        return {k: str(tags.get(k, "")) for k in self.tags}

    def _record(self, value: float, tags: dict[str, Any]) -> None:
        """Record through a recorder bound to this tag set (made once per set: see `recorder`)."""
        key = tuple(tags.get(k, "") for k in self.tags)
        rec = self._recorders.get(key)
        if rec is None:
            if (m := self._get()) is None:
                return
            rec = self._recorders[key] = recorder(m, self._tags(tags))
        rec(value)


def recorder(metric: Any, tags: dict[str, str]) -> Callable[[float], None]:
    """`metric`'s record bound to `tags`, checked once, and deferred: the value is kept here and
    recorded into Ray by `FLUSHER` within `FLUSH_S` (a counter's steps summed, a gauge's last
    value, every histogram value). Ray's public `observe` / `set` / `inc` merge, type-check and
    validate the tags on every call, which profiled as more than half of what a streamed
    token's metrics cost the router; and each of Ray's records releases the GIL around its C++
    call, so on a replica's event loop every record could hand the loop's thread to Ray's own
    threads. The values Ray exports are the same, at most `FLUSH_S` later."""
    final = {**metric._default_tags, **tags}
    metric._validate_tags(final)
    if getattr(metric, "_discard_metric", False):
        return lambda value: None  # a name Ray will not export: its public calls record nothing either
    raw = getattr(metric, "_metric", None)
    if raw is None or not hasattr(raw, "record"):  # an unknown Ray: its public call, whichever the kind has
        public = next(getattr(metric, name) for name in ("observe", "set", "inc") if hasattr(metric, name))
        record: Callable[[float], None] = lambda value: public(value, tags=final)
    else:
        raw_record = raw.record
        record = lambda value: raw_record(value, tags=final)
    kind = type(metric).__name__
    slot = (_CounterSlot if kind == "Counter" else _GaugeSlot if kind == "Gauge" else _HistogramSlot)(record)
    return slot.add


class _Slot:
    """One bound recorder's values since the last flush."""

    __slots__ = ("pending", "record")

    def __init__(self, record: Callable[[float], None]) -> None:
        self.record = record
        self.pending: Any = None

    def add(self, value: float) -> None:
        with FLUSHER.lock:
            if self.pending is None:
                FLUSHER.dirty.append(self)
                self.pending = self._first(value)
            else:
                self.pending = self._more(self.pending, value)
        FLUSHER.ensure_running()

    def take(self) -> list[float]:
        """The values to record now (called under the flusher's lock)."""
        pending, self.pending = self.pending, None
        return pending if isinstance(pending, list) else [pending]

    @staticmethod
    def _first(value: float) -> Any:
        return value

    @staticmethod
    def _more(pending: Any, value: float) -> Any:
        raise NotImplementedError


class _CounterSlot(_Slot):
    __slots__ = ()

    @staticmethod
    def _more(pending: Any, value: float) -> Any:
        return pending + value  # the steps since the last flush, summed: Ray's counter adds them alike


class _GaugeSlot(_Slot):
    __slots__ = ()

    @staticmethod
    def _more(pending: Any, value: float) -> Any:
        return value  # a gauge exports its last value


class _HistogramSlot(_Slot):
    __slots__ = ()

    @staticmethod
    def _first(value: float) -> Any:
        return [value]

    @staticmethod
    def _more(pending: Any, value: float) -> Any:
        pending.append(value)
        return pending


FLUSH_S = 1.0


class _Flusher:
    """Records every slot's pending values into Ray once per `FLUSH_S`, from one daemon thread per
    process (started on first use; a forked child starts its own), and once more at exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dirty: list[_Slot] = []
        self._thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        if self._thread is None:
            with self.lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="helios-metrics-flush", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            self.flush()

    def flush(self) -> None:
        """Record everything pending now."""
        with self.lock:
            dirty, self.dirty = self.dirty, []
            batches = [(slot.record, slot.take()) for slot in dirty]
        for record, values in batches:
            with contextlib.suppress(Exception):  # a metric must never fail its process (Ray gone at exit)
                for value in values:
                    record(value)

    def _after_fork(self) -> None:
        """In a forked child: no flusher thread yet, nothing of the parent's to record twice."""
        self.lock = threading.Lock()
        for slot in self.dirty:
            slot.pending = None
        self.dirty = []
        self._thread = None


FLUSHER = _Flusher()
os.register_at_fork(after_in_child=FLUSHER._after_fork)
atexit.register(FLUSHER.flush)


class Counter(_Metric):
    kind = "Counter"

    def inc(self, value: float = 1.0, **tags: Any) -> None:
        if value > 0:
            self._record(float(value), tags)


class Gauge(_Metric):
    kind = "Gauge"

    def set(self, value: float, **tags: Any) -> None:
        self._record(float(value), tags)


class Histogram(_Metric):
    kind = "Histogram"

    def observe(self, value: float, **tags: Any) -> None:
        self._record(max(float(value), 0.0), tags)


# -- router --------------------------------------------------------------------------------
ROUTER_REQUESTS = Counter("helios_router_requests_total", "OpenAI requests answered, by model, endpoint and HTTP status.",
                          ("model", "endpoint", "status"))
ROUTER_LATENCY = Histogram("helios_router_request_duration_seconds",
                           "Arrival to the last byte of the answer (a stream's end), by model and endpoint.",
                           ("model", "endpoint"), LATENCY_BUCKETS)
ROUTER_TTFT = Histogram("helios_router_time_to_first_token_seconds",
                        "Arrival to the first streamed output of a streamed request, by model.",
                        ("model", "endpoint"), LATENCY_BUCKETS)
ROUTER_ITL = Histogram("helios_router_inter_token_latency_seconds",
                       "Gap between streamed outputs, per output event, after the first, by model.",
                       ("model", "endpoint"), TOKEN_GAP_BUCKETS)
ROUTER_IN_FLIGHT = Gauge("helios_router_requests_in_flight",
                         "Requests this router replica holds now (queued or answering), by model.", ("model", "router"))
ROUTER_QUEUED = Gauge("helios_router_queue_depth",
                      "Requests waiting for an admission slot in this router replica, by model.", ("model", "router"))
ROUTER_REJECTED = Counter("helios_router_rejected_requests_total",
                          "Requests refused before reaching an engine, by model and reason "
                          "(rate_limited, overloaded, queue_timeout, unavailable).", ("model", "reason"))
ROUTER_RETRIES = Counter("helios_router_retries_total", "Engine calls retried (the replica died before answering), by "
                         "engine deployment.", ("deployment",))
ON_DEMAND_STARTS = Counter("helios_router_on_demand_starts_total", "On-demand model starts, by model and outcome.",
                           ("model", "outcome"))
ON_DEMAND_START_SECONDS = Histogram("helios_router_on_demand_start_seconds",
                                    "Seconds from an on-demand model's first request to its app running.",
                                    ("model",), START_BUCKETS)

# -- engine replicas -------------------------------------------------------------------------
ENGINE_START_SECONDS = Gauge("helios_engine_start_seconds",
                             "Phases of the replica's last start: fetch (weights into the tier), engine "
                             "(vLLM's start incl. load), total.", ("model", "role", "phase", "replica"))
ENGINE_STARTS = Counter("helios_engine_starts_total", "Engine replica starts, by model and role.", ("model", "role"))

# -- model cache (storage tiers) -------------------------------------------------------------
CACHE_LOOKUPS = Counter("helios_cache_lookups_total",
                        "Blob lookups of a model's load, by the tier asked and the result: hit (it held the blob) "
                        "or miss.", ("model", "tier", "result"))
CACHE_READ_BYTES = Counter("helios_cache_read_bytes_total", "Bytes read from a tier to fill another, by model.",
                           ("model", "tier"))
CACHE_WRITTEN_BYTES = Counter("helios_cache_written_bytes_total", "Bytes written into a tier, by model.",
                              ("model", "tier"))
CACHE_TRANSFER_SECONDS = Histogram("helios_cache_transfer_seconds",
                                   "Seconds to move one blob between tiers, by source and target.",
                                   ("source", "target"), LATENCY_BUCKETS)
CACHE_EVICTIONS = Counter("helios_cache_evictions_total", "Blobs evicted, by tier and reason (capacity, admin).",
                          ("tier", "reason"))
CACHE_EVICTED_BYTES = Counter("helios_cache_evicted_bytes_total", "Bytes evicted, by tier and reason.", ("tier", "reason"))
CACHE_CORRUPT = Counter("helios_cache_corrupt_blobs_total", "Blobs whose bytes did not match their digest, by tier.",
                        ("tier",))
CACHE_USED_BYTES = Gauge("helios_cache_used_bytes", "Bytes a local tier holds, by node and tier.", ("node", "tier"))
CACHE_CAPACITY_BYTES = Gauge("helios_cache_capacity_bytes", "A local tier's capacity, by node and tier.",
                             ("node", "tier"))

# -- registry ----------------------------------------------------------------------------------
REGISTRY_MODELS = Gauge("helios_registry_models", "Models the registry knows.", ())
REGISTRY_VERSIONS = Gauge("helios_registry_versions", "Model versions the registry knows.", ())
REGISTRY_USAGE = Counter("helios_registry_requests_total", "Requests the routers reported, by model.", ("model",))
REGISTRY_PREFETCH = Counter("helios_registry_prefetch_decisions_total",
                            "Prefetch planner decisions, by kind (prewarm, keep_alive, idle).", ("kind",))
REGISTRY_PERSIST_FAILURES = Counter("helios_registry_persist_failures_total", "Registry state saves that failed.", ())
