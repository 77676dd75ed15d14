"""The registry as a named, detached Ray actor: one per cluster, restarted by Ray, state on disk.

`RegistryCore` holds the logic; this wrapper adds what an actor needs: a lock (it is a
threaded actor, so a slow store listing or profile read runs outside the lock while other
calls go on), persistence, a thread that flushes usage every few seconds, and one that runs
a prefetch round every `prefetch_interval_s` (`prefetch.py`: keep-alive hints and prewarms
into RAM on every node, planned from each model's inter-arrival histogram).

Files under the state directory (default `<cache root>/registry`):
- `catalog.json`: models, versions, profiles, defaults, scale; rewritten atomically after every change;
- `warm.json`: the warm view, saved with the periodic flush;
- `usage/`: request timestamps as Parquet (`part-*.parquet` per flush, compacted into `base.parquet`).

A killed registry loses at most the last `flush_interval_s` of usage; the catalog of every
completed call survives. Ray restarts it (`max_restarts=-1`) with the same arguments, and
`__init__` reads the files back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from helios.config import StorageConfig, default_cache_root
from helios.errors import HeliosError, ModelNotFound
from helios.observability.logs import get_logger, log_event
from helios.observability.metrics import (
    REGISTRY_MODELS,
    REGISTRY_PERSIST_FAILURES,
    REGISTRY_PREFETCH,
    REGISTRY_USAGE,
    REGISTRY_VERSIONS,
)
from helios.registry.catalog import Catalog
from helios.registry.core import RegistryCore
from helios.registry.prefetch import NodeDispatcher
from helios.registry.profile import ResourceProfile
from helios.registry.usage import UsageBook, UsageLog
from helios.registry.warm import WarmView
from helios.storage.manifest import Manifest
from helios.storage.store import ModelStore
from helios.storage.tiers import atomic_write_bytes

logger = get_logger("registry.actor")

REGISTRY_NAME = "helios-registry"
REGISTRY_NAMESPACE = "helios"
CATALOG_NAME = "catalog.json"
WARM_NAME = "warm.json"
PREFETCH_NAME = "prefetch.json"  # the planner's inter-arrival histograms
USAGE_DIR = "usage"


class RegistrySettings(BaseModel):
    """Timings and bounds of the registry (defaults suit a cluster; tests shorten them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flush_interval_s: float = Field(2.0, gt=0, description="How often new usage and the warm view are saved.")
    sync_interval_s: float = Field(5.0, ge=0, description="Least time between two store listings by list_models.")
    miss_sync_interval_s: float = Field(1.0, ge=0, description="Least time between two store lookups of one id.")
    profile_retry_s: float = Field(10.0, ge=0, description="Least time between attempts at a missing profile.")
    usage_window_s: float = Field(60.0, gt=0, description="Window of the requests-per-minute rate.")
    usage_history: int = Field(4096, ge=2, description="Request timestamps kept per model.")
    usage_compact_after: int = Field(64, ge=2, description="Usage part files that trigger a compaction.")
    prefetch_interval_s: float = Field(
        30.0, ge=0, description="How often keep-alive and prewarm into RAM are planned (0: never; needs a RAM tier)."
    )


def default_state_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / "registry"


class Registry:
    """The Ray actor. Every method returns plain JSON-able data; unknown ids raise ModelNotFound."""

    def __init__(
        self,
        state_dir: str,
        storage: dict[str, Any] | None = None,
        cache_root: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.settings = RegistrySettings.model_validate(settings or {})
        s = self.settings
        self._lock = threading.RLock()
        self._catalog_path = self.state_dir / CATALOG_NAME
        self._warm_path = self.state_dir / WARM_NAME
        self._prefetch_path = self.state_dir / PREFETCH_NAME
        restored = self._catalog_path.exists()
        book = UsageBook(s.usage_window_s, s.usage_history)
        self._usage_log = UsageLog(self.state_dir / USAGE_DIR, s.usage_compact_after)
        events = self._usage_log.load(book)
        root = Path(cache_root).expanduser() if cache_root else default_cache_root()
        self.store_error: str | None = None
        self._storage = storage
        self._root = root
        self.core = RegistryCore(
            Catalog.load(self._catalog_path),
            book,
            WarmView.load(self._warm_path),
            self._open_store(storage, root),
            root,
            s.sync_interval_s,
            s.miss_sync_interval_s,
            s.profile_retry_s,
            s.prefetch_interval_s,
            _bandwidths(storage),
            _load_json(self._prefetch_path),
        )
        self.started = time.time()
        self.last_persisted: float | None = None
        self._warm_dirty = False
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="helios-registry-flush", daemon=True)
        self._flusher.start()
        self._prefetch_lock = threading.Lock()  # one round at a time (the loop, or prefetch_now)
        self._dispatcher: NodeDispatcher | None = None
        self._last_round_empty = False  # so the first round clears hints a previous instance left
        if self.core.prefetch.enabled:
            loop = threading.Thread(target=self._prefetch_loop, name="helios-registry-prefetch", daemon=True)
            loop.start()
        log_event(
            logger, "registry_started", state_dir=str(self.state_dir), restored=restored,
            models=len(self.core.catalog.models), usage_events=events, store=self.core.store is not None,
            pid=os.getpid(),
        )

    def _open_store(self, storage: dict[str, Any] | None, cache_root: Path) -> ModelStore | None:
        """The model store, or None (and the reason in status) when the storage section cannot open one."""
        if not storage:
            return None
        try:
            return ModelStore.from_config(StorageConfig.model_validate(storage), cache_root)
        except Exception as exc:  # noqa: BLE001 - a bad storage section must not stop the catalog from being served
            self.store_error = f"{type(exc).__name__}: {exc}"
            log_event(logger, "registry_store_unavailable", error=self.store_error)
            return None

    # --- catalog ---
    def register(
        self,
        model_id: str,
        version: str,
        source: str,
        manifest: dict[str, Any] | None = None,
        make_default: bool = False,
        deploy: dict[str, Any] | None = None,
        pinned: bool = False,
        scale: dict[str, int] | None = None,
    ) -> dict:
        """Add (or update) a version and return its record; its profile is computed once, here."""
        parsed = Manifest.model_validate(manifest) if manifest is not None else None
        with self._lock:
            record = self.core.reusable(model_id, version, source, parsed)
        if record is None:
            record = self.core.new_record(model_id, version, source, parsed, pinned)  # reads files, unlocked
        elif pinned and not record.pinned:
            record = record.model_copy(update={"pinned": True})
        with self._lock:
            out = self.core.put(model_id, record, make_default, deploy, scale)
            self._save_catalog()
        return out

    def delete(self, model_id: str, version: str | None = None) -> None:
        """Drop a model or one version from the catalog (the store keeps its files, and a sync will not
        add them back); a version pushed to the store but not yet listed is looked up first."""
        with self._lock:
            catalog = self.core.catalog
            known = model_id in catalog.models if version is None else catalog.has(model_id, version)
        if not known:
            self._sync(model_id)  # the store, unlocked
        with self._lock:
            self.core.delete(model_id, version)
            self._save_catalog()
            if model_id not in self.core.catalog.models:
                self._usage_log.compact(self.core.usage)  # its history leaves the files too
                self._warm_dirty = True

    def set_default(self, model_id: str, version: str) -> dict:
        with self._lock:
            out = self.core.set_default(model_id, version)
            self._save_catalog()
        return out

    def resolve(self, model_id: str, version: str | None = None) -> dict:
        """The version record (default version when None); a miss looks in the store first."""
        try:
            with self._lock:
                out = self.core.version_dict(model_id, version)
        except ModelNotFound:
            if not self._sync(model_id):
                raise
            with self._lock:
                out = self.core.version_dict(model_id, version)
        if out["profile"] is None and self._retry_profiles(model_id):
            with self._lock:
                out = self.core.version_dict(model_id, version)
        return out

    def list_models(self) -> list[dict]:
        """Every model with versions, usage, warm view and scale (syncs with the store when due)."""
        self._sync()
        self._retry_profiles()
        with self._lock:
            return self.core.list_models()

    def sync(self, force: bool = True) -> int:
        """Register versions pushed to the store since the last sync; returns how many were added."""
        return self._sync(force=force)

    def memory_needed(
        self,
        model_id: str,
        context_len: int | None = None,
        batch: int = 1,
        version: str | None = None,
        kv_dtype: str | None = None,
    ) -> int:
        """Bytes of weights plus KV for `batch` sequences of `context_len` tokens (default: max_model_len)."""
        resolved = self.resolve(model_id, version)
        with self._lock:
            return self.core.memory_needed(model_id, context_len, batch, resolved["version"], kv_dtype)

    def placement_hints(self, model_id: str, context_len: int | None = None, kv_dtype: str | None = None) -> dict:
        """What placing a new replica of `model_id` needs from the registry: the nodes that hold it,
        warmest first (`RegistryCore.warm_nodes`), and its memory need for one sequence at
        `context_len` (None while it has no profile, or is not registered yet)."""
        with self._lock:
            warm = self.core.warm_nodes(model_id)
            try:
                need: int | None = self.core.memory_needed(model_id, context_len, 1, None, kv_dtype)
            except HeliosError:
                need = None
        return {"warm_nodes": warm, "memory_need": need}

    def report_profile(self, model_id: str, version: str, profile: dict[str, Any]) -> dict:
        """A profile computed where the files are (`profile_from_dir` in a replica), for a version the
        registry could not read itself (a directory that exists only on another node); a version that
        has one keeps it."""
        parsed = ResourceProfile.model_validate(profile)
        with self._lock:
            out = self.core.report_profile(model_id, version, parsed)
            self._save_catalog()
        return out

    def set_scale(self, model_id: str, min_replicas: int, max_replicas: int) -> dict:
        with self._lock:
            out = self.core.set_scale(model_id, min_replicas, max_replicas)
            self._save_catalog()
        return out

    def scale(self, model_id: str) -> dict:
        with self._lock:
            return self.core.scale(model_id)

    # --- usage ---
    def record_requests(self, counts: dict[str, list[float]]) -> None:
        """Add request timestamps (unix seconds) per model id; saved by the next flush."""
        with self._lock:
            self.core.record_requests(counts)
        for model, stamps in counts.items():
            REGISTRY_USAGE.inc(len(stamps), model=model)

    def usage(self, model_id: str | None = None) -> dict:
        with self._lock:
            return self.core.usage_of(model_id)

    def expected_starts(self, horizon_s: float) -> dict[str, float]:
        with self._lock:
            return self.core.expected_starts(horizon_s)

    # --- warm view ---
    def set_replica(
        self, model_id: str, replica_id: str, node_id: str, loaded: bool, version: str | None = None
    ) -> None:
        with self._lock:
            self.core.warm.set_replica(model_id, replica_id, node_id, loaded, version)
            self._warm_dirty = True

    def set_tiers(self, node_id: str, view: dict[str, dict[str, int]]) -> None:
        """Replace one node's cache report: model id -> tier kind -> bytes cached there."""
        with self._lock:
            self.core.warm.set_tiers(node_id, view)
            self._warm_dirty = True

    def record_cache(self, node_id: str, tier: str, sources: dict[str, int]) -> None:
        """Count a replica load into `tier` on a node; `sources` is tier kind -> bytes taken from it
        (LocalModel.sources)."""
        with self._lock:
            self.core.warm.record_load(node_id, tier, sources)
            self._warm_dirty = True

    def cache_stats(self) -> dict:
        """node id -> tier kind -> {hits, misses, bytes_served} of replica loads (kept across restarts)."""
        with self._lock:
            return {node: {k: dict(c) for k, c in kinds.items()} for node, kinds in self.core.warm.state.loads.items()}

    def warm(self, model_id: str) -> dict:
        with self._lock:
            return self.core.warm.of(model_id)

    # --- prefetch ---
    def prefetch_now(self, wait_s: float | None = None) -> dict:
        """Run one prefetch round now (the loop runs them every `prefetch_interval_s`) and return it
        as status() shows it; waits up to `wait_s` (default: the interval) for the nodes."""
        if not self.core.prefetch.enabled:
            return self.core.prefetch.status()
        with self._prefetch_lock:
            started = time.monotonic()
            with self._lock:
                defaults, tiers, replicas = self.core.prefetch_inputs()
            targets = self.core.prefetch_targets(defaults, tiers)  # the store, unlocked
            with self._lock:
                decision = self.core.prefetch.decide(time.time(), targets, replicas)
            plan = decision.cluster.plan
            for kind, items in (("keep_alive", plan.keep_alive), ("prewarm", plan.prewarm), ("idle", plan.idle)):
                REGISTRY_PREFETCH.inc(len(items), kind=kind)
            results, error = {}, None
            try:  # the nodes, unlocked
                if self._dispatcher is None:
                    self._dispatcher = NodeDispatcher(
                        self._storage or {}, str(self._root), self.core.prefetch.planner.prewarm_from
                    )
                wait = self.settings.prefetch_interval_s if wait_s is None else wait_s
                # A round with nothing to say still goes out once, so nodes drop the last round's hints.
                quiet = decision.empty and self._last_round_empty
                results = self._dispatcher.collect(0) if quiet else self._dispatcher.run(decision, wait)
                self._last_round_empty = decision.empty
            except Exception as exc:  # noqa: BLE001 - Ray unreachable: the plan stands in status, the next round tries again
                error = f"{type(exc).__name__}: {exc}"
                log_event(logger, "prefetch_dispatch_failed", error=error)
            with self._lock:
                self.core.prefetch.finish(decision, results, time.monotonic() - started, error)
                status = self.core.prefetch.status()
            self._save_prefetch()
            return status

    # --- state ---
    def status(self) -> dict:
        with self._lock:
            return {
                **self.core.status(),
                "state_dir": str(self.state_dir),
                "started": self.started,
                "last_persisted": self.last_persisted,
                "store_error": self.store_error,
                "pid": os.getpid(),
                "settings": self.settings.model_dump(mode="json"),
                "storage": self._storage,
            }

    def persist(self) -> None:
        """Save everything now: catalog, warm view and pending usage."""
        with self._lock:
            self._save_catalog()
            self.core.warm.save(self._warm_path)
            self._warm_dirty = False
            self._usage_log.flush(self.core.usage)
            self._save_prefetch()
            self.last_persisted = time.time()

    def __ray_shutdown__(self) -> None:
        """Ray calls this on a graceful exit: save what the flush thread has not yet."""
        self._stop.set()
        self.persist()

    # --- internals ---
    def _save_prefetch(self) -> None:
        """Save the planner's histograms when they changed: after each round and in `persist` (the
        usage history alone is bounded, so a busy model's older long gaps would be lost on restart).
        A crash loses at most the last round's updates, which the usage log replays on restart."""
        with self._lock:
            state = self.core.prefetch.state()
        if state is not None:
            atomic_write_bytes(self._prefetch_path, json.dumps(state).encode())

    def _save_catalog(self) -> None:
        self.core.catalog.save(self._catalog_path)
        self.last_persisted = time.time()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            try:
                with self._lock:
                    if self._warm_dirty:
                        self.core.warm.save(self._warm_path)
                        self._warm_dirty = False
                    if self._usage_log.flush(self.core.usage):
                        self.last_persisted = time.time()
            except Exception as exc:  # noqa: BLE001 - a full disk must not kill the thread; the next tick tries again
                REGISTRY_PERSIST_FAILURES.inc()
                log_event(logger, "registry_flush_failed", error=f"{type(exc).__name__}: {exc}")
            self._export_counts()

    def _export_counts(self) -> None:
        """The catalogue's size as gauges (every flush tick: cheap, and right after a restart)."""
        with self._lock:
            models = list(self.core.catalog.models.values())
        REGISTRY_MODELS.set(len(models))
        REGISTRY_VERSIONS.set(sum(len(m.versions) for m in models))

    def _prefetch_loop(self) -> None:
        wait = self.settings.prefetch_interval_s
        while not self._stop.wait(wait):
            started = time.monotonic()
            try:
                self.prefetch_now()
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the thread; the next round tries again
                log_event(logger, "prefetch_failed", error=f"{type(exc).__name__}: {exc}")
            # Rounds start every interval, however long one took: the planner's windows assume it.
            wait = max(0.0, self.settings.prefetch_interval_s - (time.monotonic() - started))

    def _sync(self, model_id: str | None = None, force: bool = False) -> int:
        with self._lock:
            due = self.core.sync_due(model_id) or (force and self.core.store is not None)
        if not due:
            return 0
        manifests = self.core.store_manifests(model_id)  # the store, unlocked
        with self._lock:
            todo = self.core.unknown(manifests)
        found = [(m, self.core.synced_record(m)) for m in todo]  # headers, unlocked
        with self._lock:
            added = sum(self.core.add_synced(m, r) for m, r in found)
            if added:
                self._save_catalog()
        return added

    def _retry_profiles(self, model_id: str | None = None) -> bool:
        with self._lock:
            todo = self.core.profiles_to_retry(model_id)
        results = [(m, r, *self.core.retry_profile(m, r)) for m, r in todo]  # files, unlocked
        with self._lock:
            changed = [self.core.set_profile(m, r, p, e) for m, r, p, e in results]
            if any(changed):
                self._save_catalog()
        return any(changed)


def _load_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (then it is rebuilt)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        if path.exists():
            log_event(logger, "registry_state_unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return None


def _bandwidths(storage: dict[str, Any] | None) -> dict[str, float] | None:
    """Read bytes/s per tier kind from the storage section (what prefetch weighs a fetch by)."""
    try:
        cfg = StorageConfig.model_validate(storage) if storage else None
    except ValueError:  # _open_store reports a bad section
        return None
    return {t.kind: float(t.bytes_per_s()) for t in cfg.tiers} if cfg else None


def get_or_create_registry(
    state_dir: str | os.PathLike[str] | None = None,
    storage: dict[str, Any] | StorageConfig | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    settings: dict[str, Any] | None = None,
):
    """The cluster's registry actor, started if there is none yet (needs `ray.init` first).

    Detached, so it outlives the app that started it; on the head node, whose disk holds its
    state; restarted by Ray after a crash or kill (`max_restarts=-1`), and calls made while
    it restarts are retried on the new instance (`max_task_retries=-1`: every method is safe
    to repeat, except that a repeated `record_requests` may count a batch twice)."""
    import ray

    root = Path(cache_root).expanduser() if cache_root else None
    path = Path(state_dir).expanduser() if state_dir else default_state_dir(root)
    if isinstance(storage, StorageConfig):
        storage = storage.model_dump(mode="json")
    handle = (
        ray.remote(Registry)
        .options(
            name=REGISTRY_NAME,
            namespace=REGISTRY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=8,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
            scheduling_strategy="DEFAULT",  # not inside the caller's placement group
        )
        .remote(str(path), storage, str(root) if root else None, settings)
    )
    status = ray.get(handle.status.remote())
    if Path(status["state_dir"]) != path:
        log_event(logger, "registry_state_dir_differs", running=status["state_dir"], requested=str(path))
    # One registry per cluster, started by the first app: a later app's settings do not apply to it.
    # Say so, naming what differs, rather than let a changed interval or storage pass unnoticed.
    differs = config_differences(status, storage, settings)
    if differs:
        log_event(logger, "registry_config_differs", level=logging.WARNING, differs=differs,
                  hint="the running registry keeps the config it started with; kill helios-registry to apply")
    return handle


def config_differences(
    status: dict[str, Any], storage: dict[str, Any] | None, settings: dict[str, Any] | None
) -> list[str]:
    """Which of the requested settings (and whether the storage section) differ from what the running
    registry (its `status()`) uses; [] when they agree."""
    wanted = RegistrySettings.model_validate(settings or {}).model_dump(mode="json")
    running = status.get("settings") or {}
    differs = sorted(k for k in (settings or {}) if running.get(k) != wanted[k])
    if (status.get("storage") or None) != (storage or None):
        differs.append("storage")
    return differs


def get_registry():
    """The running registry actor, or None when no app has started one."""
    import ray

    try:
        return ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
    except ValueError:
        return None
