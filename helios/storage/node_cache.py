"""One cache per node: the actor that keeps every local tier's budget, policy and counters.

Without it each process (every replica, each node task, the CLI) rebuilt a policy from the
tier's directory, so use counts started at zero everywhere and `cost` ran close to LRU. Now
every process on a node reports to one keeper per node and storage config:

- processes still move every byte themselves (ranged reads, writes, atomic renames, mmap);
- they report hits, inserts, removals and observed bandwidths in batches, not waited on;
- they ask for room before writing a blob (and whether an optional fill copy may come in),
  and the keeper answers after doing the evictions its one policy per tier chose, holding
  the room for that blob until it arrives, so two writers cannot both take it;
- the keeper writes its policies' counts next to the blobs (`cache_state.json`) and a
  restarted keeper (Ray restarts it) rebuilds from them and from the directories;
- the registry's prefetch rounds (keep-alive and idle hints, prewarms) are calls on it;
- KV blocks share the tiers (`kv:<key>` in each tier's policy): vLLM's engine processes, which
  are not Ray workers, report their block inserts and hits over a local socket
  (`report_socket.py`, `kv_endpoint`), and the keeper evicts whatever its policy ranks lowest,
  KV or blob, when their reports take a tier over its budget; KV leaving RAM spills to NVMe.

`NodeCache` is the plain class (tested without Ray); `NodeCacheService` is the thin actor,
found per node by name (`node_cache_handle`); `NodeCacheAccounts` is what a process's
`LocalTier`s talk to (`TierAccounts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from helios.config import StorageConfig
from helios.errors import HeliosError, StorageError
from helios.observability.logs import get_logger, log_event
from helios.storage.tiers import LocalTier, TierAccounts, is_kv

logger = get_logger("storage.node_cache")

NAMESPACE = "helios"
NAME_PREFIX = "helios-node-cache"
BATCH = 256  # events a process sends in one report at most
CALL_TIMEOUT_S = 60.0
SAVE_EVERY_S = 1.0
RESYNC_S = 10.0  # how often the keeper rescans tiers that KV writers report to
ENFORCE_HEADROOM = 64 << 20
_KV_NAME = re.compile(r"^kv:[0-9a-f]{32}$")


def _kv_event(event: Event) -> bool:
    """A well-formed KV event from the socket: insert / hit / remove of `kv:<32 hex>` in a tier."""
    try:
        op, _, name = event[0], event[1], event[2]
    except (IndexError, TypeError, KeyError):
        return False
    return op in ("insert", "hit", "remove") and isinstance(name, str) and bool(_KV_NAME.match(name))

Event = Sequence[Any]
"""("hit", kind, digest, now) | ("insert", kind, digest, size, now) | ("remove", kind, digest)
| ("bandwidth", kind, source, nbytes, seconds)"""


class NodeCache:
    """Every local tier of one storage config on this node, one policy each, for all its processes."""

    def __init__(self, storage: dict[str, Any], cache_root: str, save_every_s: float = SAVE_EVERY_S) -> None:
        from helios.storage.store import ModelStore

        self.store = ModelStore.from_config(StorageConfig.model_validate(storage), Path(cache_root), shared=False)
        self.tiers: dict[str, LocalTier] = {t.kind: t for t in self.store.local}
        self.counters: dict[str, Counter[str]] = {kind: Counter() for kind in self.tiers}
        self.clients: set[str] = set()
        self.started = time.time()
        self.restored = {kind: t.load_state() for kind, t in self.tiers.items()}
        self._dirty: set[str] = set()
        self._saved_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._saver = threading.Thread(target=self._save_loop, args=(save_every_s,), name="helios-cache-save",
                                       daemon=True)
        self._saver.start()
        self._socket: Any = None
        self.kv_counters: dict[str, dict[str, float]] = {}  # KV store handle -> its cumulative counters
        log_event(logger, "node_cache_started", tiers=sorted(self.tiers), restored=self.restored,
                  blobs={k: len(t.policy.known()) for k, t in self.tiers.items()})

    # -- what processes send ------------------------------------------------------------

    def report(self, client: str, events: Sequence[Event]) -> None:
        """Hits, inserts, removals and bandwidths one process saw, in its order."""
        with self._lock:
            self.clients.add(client)
            for event in events:
                self._apply(event)

    def make_room(
        self, client: str, events: Sequence[Event], kind: str, size: int, protected: Collection[str],
        digest: str | None,
    ) -> list[str]:
        """Apply `events`, then evict until `size` more bytes fit in `kind`: the victims (already gone)."""
        tier = self._tier(kind)
        self.report(client, events)
        victims = tier.make_room(size, set(protected), digest)  # the tier's own lock orders concurrent callers
        self._evicted(kind, "room_asked", victims)
        return victims

    def _evicted(self, kind: str, reason: str, victims: Sequence[str]) -> None:
        """Count one eviction round (`reason`: what asked for it) and its victims."""
        with self._lock:
            self.counters[kind][reason] += 1
            self.counters[kind]["evictions"] += len(victims)
            if victims:
                self._dirty.add(kind)

    def admit(self, client: str, events: Sequence[Event], kind: str, digest: str, size: int) -> bool:
        tier = self._tier(kind)
        self.report(client, events)
        answer = tier.admit(digest, size)
        with self._lock:
            self.counters[kind]["admitted" if answer else "refused"] += 1
            self._dirty.add(kind)  # a refusal remembers the blob's count
        return answer

    def _apply(self, event: Event) -> None:
        op, kind = event[0], event[1]
        tier = self.tiers.get(kind)
        if tier is None:
            return
        if op == "hit":
            tier.record_hit(event[2], float(event[3]))
        elif op == "insert":
            tier.record_insert(event[2], int(event[3]), float(event[4]))
        elif op == "remove":
            tier.record_remove(event[2])
        elif op == "bandwidth":
            tier.observe_bandwidth(event[2], int(event[3]), float(event[4]))
        else:
            return
        self.counters[kind][op + "s"] += 1
        self._dirty.add(kind)

    # -- KV blocks, reported over the local socket ------------------------------------------

    def serve_socket(self) -> str | None:
        """Listen for reports from processes outside Ray (vLLM's engine processes); the socket's name,
        or None when another keeper of the same directories holds it."""
        from helios.storage.report_socket import ReportServer, socket_name

        if self._socket is None:
            name = socket_name(t.root for t in self.tiers.values())
            try:
                self._socket = ReportServer(name, self.report_and_enforce, self._query)
            except OSError as exc:
                log_event(logger, "node_cache_socket_taken", socket=name, error=str(exc))
                return None
        return self._socket.name

    def kv_endpoint(self) -> dict[str, Any]:
        """Where a KV store on this node puts its blocks and reports them (`config.NodeKVTiers`)."""
        name = self.serve_socket()
        if name is None:
            raise StorageError("the node cache's report socket is held by another keeper of the same tiers")
        return {"socket": name, "tiers": {k: str(t.root) for k, t in self.tiers.items()},
                "capacity": {k: t.capacity for k, t in self.tiers.items()}}

    def report_and_enforce(self, client: str, events: Sequence[Event], counters: dict[str, Any] | None = None) -> None:
        """Apply a socket report, then bring every tier it added to back under its budget: a writer
        that reports after writing (KV blocks) does not ask for room first, so the keeper evicts
        after. The socket takes anyone on the host, so only KV events for well-formed block names
        are applied: nothing it says can touch a model blob or a path outside a tier."""
        events = [e for e in events if _kv_event(e)]
        self.report(client, events)
        if counters is not None:
            values = {str(k): float(v) for k, v in dict(counters.get("values") or {}).items()}
            with self._lock:
                self.kv_counters[str(counters.get("name"))] = values
        for kind in {e[1] for e in events if e and e[0] == "insert"}:
            self.enforce(kind)

    def kv_stats(self, prefix: str = "") -> dict[str, dict[str, float]]:
        """The KV counters of every store handle whose name starts with `prefix` (one engine's
        instance name gives its scheduler and workers), by handle."""
        with self._lock:
            return {name: dict(v) for name, v in self.kv_counters.items() if name.startswith(prefix)}

    def _query(self, msg: dict[str, Any]) -> Any:
        if msg.get("query") == "kv_stats":
            return self.kv_stats(str(msg.get("prefix", "")))
        return None

    def enforce(self, kind: str) -> list[str]:
        """Evict by the tier's policy while it holds more than its capacity; the victims."""
        tier = self.tiers.get(kind)
        if tier is None:
            return []
        if tier.tracked_bytes() <= tier.capacity:
            return []
        try:  # with some headroom, so the next few reports do not each scan and sort the tier again
            victims = tier.make_room(min(tier.capacity // 50, ENFORCE_HEADROOM))
        except StorageError as exc:  # everything left is reserved for blobs being written: next report
            log_event(logger, "node_cache_over_budget", tier=kind, error=str(exc))
            return []
        self._evicted(kind, "enforced", victims)
        return victims

    def _tier(self, kind: str) -> LocalTier:
        tier = self.tiers.get(kind)
        if tier is None:
            raise StorageError(f"no {kind} tier in this node cache (have: {', '.join(self.tiers)})")
        return tier

    # -- what an operator or a test reads -----------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per tier: bytes used (and reserved for blobs being written), capacity, policy, blobs
        known, counters; the processes heard from; when the counts were last saved."""
        tiers = {}
        for kind, t in self.tiers.items():
            used = t.sync_policy()  # the policy now knows exactly what is on disk, KV included
            with self._lock:
                counters = dict(self.counters[kind])
            known = t.policy.known()
            kv = [size for digest, size in known.items() if is_kv(digest)]
            tiers[kind] = {"path": str(t.root), "used": used, "capacity": t.capacity,
                           "policy": type(t.policy).__name__, "blobs": len(known) - len(kv),
                           "kv_blocks": len(kv), "kv_bytes": sum(kv), "counters": counters}
        with self._lock:
            clients = sorted(self.clients)
        return {"node": socket.gethostname(), "pid": os.getpid(), "started": self.started, "tiers": tiers,
                "clients": clients, "restored": self.restored, "saved_at": self._saved_at,
                "socket": self._socket.name if self._socket is not None else None}

    def victims_for(self, kind: str, need: int) -> list[str]:
        """What the tier's policy would evict first to free `need` bytes now (nothing is evicted)."""
        return self._tier(kind).plan(need)

    # -- persistence ----------------------------------------------------------------------

    def save(self) -> None:
        """Write every tier's counts that changed since the last save."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for kind in dirty:
            try:
                self.tiers[kind].save_state()
            except OSError as exc:  # a full or read-only disk: counts are lost on restart, bytes are not
                log_event(logger, "node_cache_save_failed", tier=kind, error=str(exc))
        self._saved_at = time.time()

    def _save_loop(self, every_s: float) -> None:
        synced = time.monotonic()
        while not self._stop.wait(every_s):
            self.save()
            if self._socket is not None and time.monotonic() - synced >= RESYNC_S:
                synced = time.monotonic()
                for kind, tier in self.tiers.items():  # blocks whose reports were lost (a restart) count too
                    try:
                        tier.sync_policy()
                        self.enforce(kind)
                    except Exception as exc:  # noqa: BLE001 - the next round tries again
                        log_event(logger, "node_cache_resync_failed", tier=kind, error=str(exc))

    def close(self) -> None:
        self._stop.set()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self.save()


class NodeCacheService:
    """The Ray actor around `NodeCache`: one per node and storage config, restarted by Ray."""

    def __init__(self, storage: dict[str, Any], cache_root: str) -> None:
        self.cache = NodeCache(storage, cache_root)
        self.cache.serve_socket()  # at once, so engine processes reconnect to a restarted keeper

    def kv_endpoint(self) -> dict[str, Any]:
        return self.cache.kv_endpoint()

    def report(self, client: str, events: list[Event]) -> None:
        self.cache.report(client, events)

    def make_room(self, client: str, events: list[Event], kind: str, size: int, protected: list[str],
                  digest: str | None) -> list[str]:
        return self.cache.make_room(client, events, kind, size, protected, digest)

    def admit(self, client: str, events: list[Event], kind: str, digest: str, size: int) -> bool:
        return self.cache.admit(client, events, kind, digest, size)

    def stats(self) -> dict[str, Any]:
        return self.cache.stats()

    def victims_for(self, kind: str, need: int) -> list[str]:
        return self.cache.victims_for(kind, need)

    def save(self) -> None:
        self.cache.save()

    def prefetch_round(self, hints: dict[str, dict[str, float]], manifests: list[dict[str, Any]],
                       prewarm_from: list[str], report: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """This node's share of a registry prefetch round, on the node's own tiers and policies."""
        from helios.storage.node_ops import apply_to_store

        return apply_to_store(self.cache.store, hints, manifests, prewarm_from, report or ())

    def pid(self) -> int:
        return os.getpid()


def actor_name(storage: dict[str, Any], cache_root: str, node_id: str) -> str:
    """One keeper per node and set of local tiers (two apps with the same tiers share it)."""
    local = [t for t in storage.get("tiers", []) if t.get("kind") != "remote"]
    key = json.dumps({"tiers": local, "cache_root": str(Path(cache_root).expanduser())}, sort_keys=True, default=str)
    return f"{NAME_PREFIX}-{node_id[:16]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def node_cache_handle(storage: dict[str, Any], cache_root: str, node_id: str | None = None) -> Any:
    """The node cache actor of `node_id` (default: this process's node), started if there is none."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    return ray.remote(NodeCacheService).options(
        name=actor_name(storage, cache_root, node_id), namespace=NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=16,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(storage, str(cache_root))


class NodeCacheAccounts(TierAccounts):
    """A process's side of the node cache: batches reports, asks for room and admission."""

    def __init__(self, cfg: StorageConfig, cache_root: Path) -> None:
        self._args = (cfg.model_dump(mode="json"), str(cache_root))
        self.client = f"{socket.gethostname()}:{os.getpid()}"
        self._handle: Any = None
        self._events: list[Event] = []
        self._lock = threading.Lock()

    def _actor(self) -> Any:
        if self._handle is None:
            self._handle = node_cache_handle(*self._args)
        return self._handle

    def hit(self, kind: str, digest: str, now: float) -> None:
        self._add(("hit", kind, digest, now))

    def inserted(self, kind: str, digest: str, size: int, now: float) -> None:
        self._add(("insert", kind, digest, size, now))

    def removed(self, kind: str, digest: str) -> None:
        self._add(("remove", kind, digest))

    def observe_bandwidth(self, kind: str, source: str, nbytes: int, seconds: float) -> None:
        self._add(("bandwidth", kind, source, nbytes, seconds))

    def _add(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)
            full = len(self._events) >= BATCH
        if full:
            self.flush()

    def _take(self) -> list[Event]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def flush(self) -> None:
        events = self._take()
        if not events:
            return
        try:
            self._actor().report.remote(self.client, events)  # ordered before this process's next call
        except Exception as exc:  # noqa: BLE001 - no cluster any more: the counts are lost, the bytes are not
            log_event(logger, "node_cache_unreachable", call="report", error=f"{type(exc).__name__}: {exc}")
            self._handle = None

    def make_room(self, kind: str, size: int, protected: Collection[str], digest: str | None) -> list[str] | None:
        return self._call("make_room", kind, size, sorted(protected), digest)

    def admit(self, kind: str, digest: str, size: int) -> bool | None:
        return self._call("admit", kind, digest, size)

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayTaskError

        events = self._take()
        try:
            ref = getattr(self._actor(), method).remote(self.client, events, *args)
            return ray.get(ref, timeout=CALL_TIMEOUT_S)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, HeliosError):
                raise cause from None  # the keeper's answer (a full tier), as the tier itself would say it
            log_event(logger, "node_cache_failed", call=method, error=str(exc)[:300])
        except Exception as exc:  # noqa: BLE001 - restarting, timed out, or no cluster: this call decides alone
            log_event(logger, "node_cache_unreachable", call=method, error=f"{type(exc).__name__}: {exc}"[:300])
            self._handle = None
        return None
