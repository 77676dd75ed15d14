"""The model store: manifests and blobs across the tiers, as one object.

`push` hashes a model directory and writes it through to the durable tier;
`ensure_local` makes a version loadable on this node: every blob is taken from the
fastest tier that has it (verified on the way), promoted into the load tier, and
the slower local tiers in between are filled behind it so the next cold start on
this node needs no network.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from helios.config import RemoteTierConfig, StorageConfig, TransferConfig
from helios.errors import BlobNotFound, CorruptBlob, ModelVersionNotFound, StorageError
from helios.observability.logs import get_logger, log_event
from helios.observability.metrics import (
    CACHE_CAPACITY_BYTES,
    CACHE_CORRUPT,
    CACHE_EVICTED_BYTES,
    CACHE_EVICTIONS,
    CACHE_LOOKUPS,
    CACHE_READ_BYTES,
    CACHE_USED_BYTES,
    CACHE_WRITTEN_BYTES,
)
from helios.storage.arrivals import carried, mark_arrived, mark_failed, marker_name, wanted
from helios.storage.eviction import POLICIES
from helios.storage.manifest import FileEntry, Manifest, build_manifest, snapshot_digest
from helios.storage.tiers import LOCAL_KINDS, LocalTier, RemoteTier, Tier, is_kv
from helios.storage.transfer import Progress, ReadBudget, TransferResult, fetch_blob

logger = get_logger("storage.store")
_UPLOAD_BLOCK = 16 << 20
BLOBS_SIDE_BY_SIDE = 2  # blobs of one version fetched at once, sharing `transfer.concurrency` reads
FILL_NICE = 19  # a background fill's thread
# Model ids under which engines keep artefacts in the store (vLLM's compile caches, layout blobs):
# fetched by key, never listed as models to serve.
ENGINE_CACHE_PREFIX = "helios-engine-cache"  # vLLM's compile caches (storage/engine_cache.py)
LAYOUT_CACHE_PREFIX = "helios-layout-cache"  # weights in vLLM's layout (storage/layout_share.py)
ARTEFACT_PREFIXES = (f"{ENGINE_CACHE_PREFIX}/", f"{LAYOUT_CACHE_PREFIX}/")
FILL_WAIT_LIMIT_S = 600.0  # a background fill held for an engine start begins by then regardless


@dataclass
class LocalModel:
    """A model version ready to load: a directory of links into one local tier."""

    manifest: Manifest
    path: Path
    tier: str
    timings: dict[str, float] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)  # tier kind -> bytes taken from it
    fetched_bytes: int = 0  # bytes this call moved (0 when another process fetched them first)
    resumed_bytes: int = 0  # bytes an interrupted earlier transfer had already moved
    fill: threading.Thread | None = None  # filling slower local tiers, if run in the background
    arriving: Future[None] | None = None  # deferred files still being fetched (`localize(defer=...)`)
    # A background fill copies nothing before this is set: the engine loading the model sets it once
    # started, so the copy to slower tiers does not compete with the load for the disk and the cores.
    fill_after: threading.Event | None = None
    # Deferred files fetched only if the loader asks (`localize(only_if_wanted=...)`): set once the
    # engine has started, so a start that never asked ends the wait without fetching them.
    only_if_wanted: threading.Event | None = None

    @property
    def tier_root(self) -> Path:
        """The root of the tier the snapshot links into (snapshots/<model>/<version> below it)."""
        return self.path.parents[2]


def default_local_path(kind: str, cache_root: Path) -> Path:
    if kind == "ram":
        import getpass

        return Path("/dev/shm") / f"helios-{getpass.getuser()}"
    return cache_root / kind


class ModelStore:
    """Every tier of the cache, fastest first, the remote tier (if any) last."""

    def __init__(self, tiers: list[Tier], transfer: TransferConfig | None = None) -> None:
        order = {k: i for i, k in enumerate((*LOCAL_KINDS, "remote"))}
        self.tiers = sorted(tiers, key=lambda t: order[t.kind])
        self.local: list[LocalTier] = [t for t in self.tiers if isinstance(t, LocalTier)]
        self.remote: Tier | None = next((t for t in self.tiers if t.kind == "remote"), None)
        self.transfer = transfer or TransferConfig()
        if not self.local:
            raise StorageError("the store needs at least one local tier")

    @classmethod
    def from_config(cls, cfg: StorageConfig, cache_root: Path, shared: bool | None = None) -> ModelStore:
        """The tiers of `cfg` on this node. `shared`: keep their budgets in the node cache actor
        (default: when `storage.node_cache` is on and this process is part of a Ray cluster);
        the actor itself builds its store with False."""
        tiers: list[Tier] = []
        for t in cfg.tiers:
            if isinstance(t, RemoteTierConfig):
                tiers.append(RemoteTier(t.url, t.storage_options, t.reader))
            else:
                root = Path(t.path).expanduser() if t.path else default_local_path(t.kind, cache_root)
                tiers.append(LocalTier(t.kind, root, int(t.capacity)))
        store = cls(tiers, cfg.transfer)
        eviction = {t.kind: t.eviction for t in cfg.tiers if not isinstance(t, RemoteTierConfig)}
        bandwidths = {t.kind: float(t.bytes_per_s()) for t in cfg.tiers}
        bandwidths["recompute"] = float(cfg.kv_blocks.recompute_bytes_per_s)
        for i, t in enumerate(store.local):  # each policy learns where its evicted blobs would come back from
            slower = store.tiers[store.tiers.index(t) + 1 :]
            refetch_from = slower[0].kind if slower else t.kind
            t.policy = POLICIES[eviction[t.kind]].for_tier(refetch_from, bandwidths, partial(store.refetch_source, t))
            if hasattr(t.policy, "kv_weight"):
                t.policy.kv_weight = cfg.kv_blocks.weight
            t.kv_spill = store.local[1] if i == 0 and len(store.local) > 1 else None  # the KV store's two tiers
        if shared is None:
            shared = cfg.node_cache and _in_ray()
        if shared:
            from helios.storage.node_cache import NodeCacheAccounts

            accounts = NodeCacheAccounts(cfg, cache_root)
            for t in store.local:
                t.shared = accounts
        return store

    def flush_accounts(self) -> None:
        """Send the hits and inserts batched for the node cache now (no-op without one)."""
        for t in self.local:
            if t.shared is not None:
                t.shared.flush()
                return  # one accounts object serves every tier

    def tier(self, kind: str) -> Tier:
        for t in self.tiers:
            if t.kind == kind:
                return t
        raise StorageError(f"no {kind} tier configured (have: {', '.join(t.kind for t in self.tiers)})")

    def refetch_source(self, tier: LocalTier, digest: str) -> str | None:
        """The kind of tier a blob evicted from `tier` would come back from: the first slower local
        tier holding it, else the remote (None without one). Local stats only, no network.
        A KV block is spilled to the next local tier, or, from the last one, recomputed."""
        if is_kv(digest):
            return tier.kv_spill.kind if tier.kv_spill is not None else "recompute"
        for t in self.tiers[self.tiers.index(tier) + 1 :]:
            if not isinstance(t, LocalTier):
                return t.kind
            if t.stat(digest) is not None:
                return t.kind
        return None

    @property
    def durable(self) -> Tier:
        """Where pushes go: the remote tier, or the slowest local one without it."""
        return self.remote or self.local[-1]

    # --- catalog ---
    def versions(self, model_id: str) -> list[Manifest]:
        """Every known version of a model, newest first (a version in several tiers once)."""
        return sorted(self._known(model_id), key=lambda m: m.created, reverse=True)

    def models(self) -> list[Manifest]:
        """Every version of every model to serve (not the engines' artefacts the store also keeps)."""
        return sorted((m for m in self._known() if not m.model_id.startswith(ARTEFACT_PREFIXES)),
                      key=lambda m: (m.model_id, -m.created))

    def _known(self, model_id: str | None = None) -> list[Manifest]:
        """Manifests across the tiers, fastest tier's copy first, each (model, version) once."""
        seen: dict[tuple[str, str], Manifest] = {}
        for t in self.tiers:
            for m in t.manifests(model_id):
                seen.setdefault((m.model_id, m.version), m)
        return list(seen.values())

    def resolve(self, model_id: str, version: str | None = None) -> Manifest:
        """The manifest of `model_id:version`, or of its newest version."""
        found = self.versions(model_id)
        for m in found:
            if version is None or m.version == version:
                return m
        if not found:
            raise ModelVersionNotFound(f"model {model_id!r} is not in the store ({self._where()})")
        have = ", ".join(m.version for m in found)
        raise ModelVersionNotFound(f"model {model_id!r} has no version {version!r} (have: {have})")

    def find(self, model_id: str, version: str) -> Manifest | None:
        """`model_id:version`'s manifest from the fastest tier holding it, by direct lookups (no
        listing): how artefacts stored under a key (`engine_cache`, `layout_share`) are found."""
        for t in self.tiers:
            if (m := t.get_manifest(model_id, version)) is not None:
                return m
        return None

    def _where(self) -> str:
        return "searched " + ", ".join(t.describe() for t in self.tiers)

    # --- push ---
    def push(
        self, src_dir: Path, model_id: str, version: str, progress: Progress | None = None,
        select: Callable[[str], bool] | None = None,
    ) -> Manifest:
        """Hash a model directory (the files `select` accepts by relative name, default all) and write
        its new blobs and manifest to the durable tier."""
        src_dir = Path(src_dir)
        if not src_dir.is_dir():
            raise FileNotFoundError(f"{src_dir} is not a directory")
        manifest = build_manifest(src_dir, model_id, version, source=str(src_dir.resolve()), select=select)
        target = self.durable
        uploaded = 0
        for f in manifest.files:
            if target.stat(f.sha256) is None:
                target.write(f.sha256, _file_chunks(src_dir / f.name, progress))
                uploaded += f.size
            elif progress:
                progress(f.size)
        target.put_manifest(manifest)
        log_event(
            logger, "model_pushed", model=model_id, version=version, tier=target.kind,
            bytes=manifest.total_bytes, uploaded=uploaded, deduplicated=manifest.total_bytes - uploaded,
        )
        return manifest

    # --- pull ---
    def ensure_local(
        self,
        model_id: str,
        version: str | None = None,
        tier: str | None = None,
        progress: Progress | None = None,
        background_fill: bool = False,
    ) -> LocalModel:
        """Bring every blob of a version into `tier` (default: the fastest local tier) and link a snapshot."""
        return self.localize(self.resolve(model_id, version), tier, progress, background_fill)

    def localize(
        self,
        manifest: Manifest,
        tier: str | None = None,
        progress: Progress | None = None,
        background_fill: bool = False,
        defer: Callable[[str], bool] | None = None,
        fill_after: threading.Event | None = None,
        only_if_wanted: threading.Event | None = None,
    ) -> LocalModel:
        """`ensure_local` for a manifest the caller already resolved (no second catalog lookup).

        `defer`: file names that may still be arriving when this returns. When some of them are
        missing, the rest are brought first, the snapshot is linked with an arrivals marker and
        those files follow in a thread; `LocalModel.arriving` resolves (or raises) when they are in,
        and only then are the timings, sources and fill set (see `helios.storage.arrivals`).
        `fill_after`: a background fill waits for it (see `LocalModel.fill_after`).
        `only_if_wanted`: the deferred files are brought only when the loader asks for them
        (`arrivals.want`); setting the event says it will not (the engine started without them), and
        they stay where they are, the version not marked local in `tier`."""
        started = time.monotonic()
        target = self.tier(tier) if tier else self.local[0]
        if not isinstance(target, LocalTier):
            raise StorageError("models load from a local tier (ram, nvme or ssd)")
        protected = {f.sha256 for f in manifest.files}
        budget = ReadBudget(self.transfer.concurrency)  # shared: a blob's tail overlaps the next one's head
        later = [f for f in manifest.files if defer is not None and defer(f.name) and target.stat(f.sha256) is None]
        deferred = {f.name for f in later}
        now = [f for f in manifest.files if f.name not in deferred]

        def bring(files: list[FileEntry]) -> list[tuple[Tier, TransferResult | None]]:
            with ThreadPoolExecutor(BLOBS_SIDE_BY_SIDE, thread_name_prefix="helios-blob") as pool:
                return list(pool.map(
                    lambda f: self._bring(f.sha256, f.size, target, protected, progress, manifest.model_id, budget),
                    files))

        brought = bring(now)
        now_s = time.monotonic() - started
        carry = carried(target.snapshot_path(manifest.model_id, manifest.version))  # another start's fetch
        if not later:
            local = LocalModel(manifest, target.snapshot(manifest, carry=carry), target.kind, fill_after=fill_after)
            self._arrived(local, target, list(zip(now, brought, strict=True)), started, background_fill)
            return local
        marker = marker_name()
        local = LocalModel(manifest, target.snapshot(manifest, marker, carry=carry), target.kind,
                           fill_after=fill_after, only_if_wanted=only_if_wanted)
        log_event(logger, "model_weights_arriving", model=manifest.model_id, version=manifest.version,
                  tier=target.kind, files=len(later), bytes=sum(f.size for f in later))

        def rest() -> None:
            if only_if_wanted is not None and not _asked(local.path, only_if_wanted):
                mark_arrived(local.path / marker)
                local.timings["fetch_s"] = now_s
                for f, (src, _) in zip(now, brought, strict=True):
                    local.sources[src.kind] = local.sources.get(src.kind, 0) + f.size
                log_event(logger, "model_weights_not_fetched", model=manifest.model_id, version=manifest.version,
                          tier=target.kind, files=len(later), bytes=sum(f.size for f in later))
                return
            try:
                arrived = bring(later)
            except BaseException as exc:
                mark_failed(local.path / marker, f"{type(exc).__name__}: {exc}")
                raise
            mark_arrived(local.path / marker)
            self._arrived(local, target, list(zip(now + later, brought + arrived, strict=True)), started,
                          background_fill)

        local.arriving = Future()
        threading.Thread(target=_settle, args=(local.arriving, rest), name="helios-arriving", daemon=True).start()
        return local

    def _arrived(
        self, local: LocalModel, target: LocalTier, brought: list[tuple[FileEntry, tuple[Tier, TransferResult | None]]],
        started: float, background_fill: bool,
    ) -> None:
        """Every blob of `local` is in `target`: record where they came from, fill slower tiers, log it."""
        manifest = local.manifest
        for f, (src, result) in brought:
            local.sources[src.kind] = local.sources.get(src.kind, 0) + f.size
            if result is not None:
                local.fetched_bytes += result.fetched
                local.resumed_bytes += result.resumed_from
        target.put_manifest(manifest)
        fetch_s = time.monotonic() - started
        local.timings["fetch_s"] = fetch_s
        fill_tiers = [t for t in self.local if self.tiers.index(t) > self.tiers.index(target)]
        if set(local.sources) != {target.kind} and fill_tiers:
            if background_fill:
                args = (manifest, target, fill_tiers, local.fill_after)
                local.fill = threading.Thread(target=self._fill_behind, args=args, name="helios-fill", daemon=True)
                local.fill.start()
            else:
                self._fill(manifest, target, fill_tiers)
        self.flush_accounts()
        self.report_usage()
        log_event(
            logger, "model_local", model=manifest.model_id, version=manifest.version, tier=target.kind,
            seconds=round(fetch_s, 3), sources=local.sources, bytes=manifest.total_bytes,
        )

    def report_usage(self) -> None:
        """Each local tier's bytes held and capacity, as gauges of this node."""
        node = socket.gethostname()
        for t in self.local:
            CACHE_USED_BYTES.set(t.used(), node=node, tier=t.kind)
            CACHE_CAPACITY_BYTES.set(t.capacity, node=node, tier=t.kind)

    def _bring(
        self, digest: str, size: int, target: LocalTier, protected: set[str], progress: Progress | None,
        model: str = "", budget: ReadBudget | None = None,
    ) -> tuple[Tier, TransferResult | None]:
        """Get one blob into `target` from the fastest tier holding a good copy: (that tier, the transfer)."""
        if target.stat(digest) is not None:
            CACHE_LOOKUPS.inc(model=model, tier=target.kind, result="hit")
            for t in self.local[self.local.index(target) :]:
                t.touch(digest)  # slower copies too: their policies must see what is used, not only what was missed
            if progress:
                progress(size)
            return target, None
        CACHE_LOOKUPS.inc(model=model, tier=target.kind, result="miss")
        for src in self.tiers:
            if src is target or src.stat(digest) is None:
                continue
            try:
                result = fetch_blob(src, target, digest, size, self.transfer, progress, protected, budget)
            except CorruptBlob as exc:
                if src is self.remote:
                    raise
                CACHE_CORRUPT.inc(tier=src.kind)
                log_event(logger, "blob_corrupt", digest=digest[:12], tier=src.kind, error=str(exc))
                src.delete(digest)  # a bad local copy: drop it and take the next tier's
                continue
            if isinstance(src, LocalTier):
                src.touch(digest)
            _count_moved(model, src, target, result)
            if result.fetched and not result.waited_for_other:
                target.observe_bandwidth(src.kind, result.fetched, result.seconds)
            return src, result
        raise BlobNotFound(f"blob {digest[:12]} is in no tier ({self._where()})")

    def _fill_behind(self, *args: Any) -> None:
        """`_fill` on a background thread at the lowest CPU priority (its transfer threads inherit it): the
        copy is for later starts, never worth a served token."""
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILL_NICE)  # this thread only
        self._fill(*args)

    def _fill(
        self, manifest: Manifest, src: LocalTier, tiers: list[LocalTier], after: threading.Event | None = None
    ) -> None:
        """Copy a version from the tier it was loaded into down to slower local tiers (once `after` is set)."""
        if after is not None:
            after.wait(FILL_WAIT_LIMIT_S)
        protected = {f.sha256 for f in manifest.files}
        for t in tiers:
            try:
                for f in manifest.files:
                    if t.stat(f.sha256) is None and src.stat(f.sha256) is not None:
                        if not t.admit(f.sha256, f.size):
                            continue  # the tier's policy would rather keep what it has
                        _count_moved(manifest.model_id, src, t,
                                     fetch_blob(src, t, f.sha256, f.size, self.transfer, None, protected))
                if t.has_all(manifest):
                    t.put_manifest(manifest)
            except StorageError as exc:  # a full lower tier must not fail the load that already succeeded
                log_event(logger, "tier_fill_failed", model=manifest.model_id, tier=t.kind, error=str(exc))
        self.flush_accounts()

    # --- cache management ---
    def holders(self, manifest: Manifest) -> list[str]:
        """Tiers holding every blob of a version."""
        return [t.kind for t in self.tiers if all(t.stat(f.sha256) is not None for f in manifest.files)]

    def evict(self, model_id: str | None = None, version: str | None = None, tier: str | None = None) -> int:
        """Drop a version (or all versions, or everything) from local tiers; returns bytes freed.

        The plan is computed first: blobs still used by another version kept in the tier stay."""
        tiers = [self.tier(tier)] if tier else list(self.local)
        freed = 0
        for t in tiers:
            if not isinstance(t, LocalTier):
                raise StorageError("the remote tier is not a cache; delete from it with your storage tools")
            kept = t.manifests()
            if model_id is None:
                drop = kept
            else:
                drop = [m for m in kept if m.model_id == model_id and version in (None, m.version)]
            keep_digests = {f.sha256 for m in kept if m not in drop for f in m.files}
            plan = {f.sha256 for m in drop for f in m.files} - keep_digests
            if model_id is None:  # evicting everything also drops blobs no manifest names, and KV blocks
                plan |= {b.digest for b in t.blobs()} - keep_digests
                plan |= {b.digest for b in t.kv_blocks()}  # an engine reading one meanwhile recomputes it
            tier_freed = 0
            for digest in sorted(plan):
                info = t.stat(digest)
                tier_freed += info.size if info else 0
                t.delete(digest)
            freed += tier_freed
            CACHE_EVICTIONS.inc(len(plan), tier=t.kind, reason="admin")
            CACHE_EVICTED_BYTES.inc(tier_freed, tier=t.kind, reason="admin")
            for m in drop:
                t.delete_manifest(m.model_id, m.version)
            digests = {snapshot_digest(m.to_json()) for m in drop}  # the snapshot's manifest file holds to_json()
            freed += _drop_derived(t.root / "derived", digests, everything=model_id is None)
        self.flush_accounts()
        log_event(logger, "cache_evicted", model=model_id, version=version, tier=tier, bytes=freed)
        return freed


def _drop_derived(root: Path, digests: set[str], everything: bool = False) -> int:
    """Delete the derived blobs (`share_weights`, `layout_cache`) made from the evicted versions;
    returns bytes freed. An engine that maps one keeps its pages until it exits."""
    freed = 0
    for path in root.glob("*.safetensors") if root.is_dir() else []:
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                metadata = json.loads(f.read(header_len)).get("__metadata__") or {}
            size = path.stat().st_size
        except (OSError, ValueError, struct.error):
            continue  # being replaced, or not ours to judge
        if everything or metadata.get("model_digest") in digests:
            path.unlink(missing_ok=True)
            freed += size
    return freed


def _settle(future: Future[None], work: Callable[[], None]) -> None:
    """Run `work` and resolve `future` with its outcome (a thread's result, for whoever waits on it)."""
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits, who re-raises it
        future.set_exception(exc)
    else:
        future.set_result(None)


def _asked(snapshot: Path, done: threading.Event, poll_s: float = 0.02, limit_s: float = FILL_WAIT_LIMIT_S) -> bool:
    """Wait until the loader asks for the snapshot's deferred weights (True) or `done` is set without
    it having asked, or `limit_s` passes (False: a start that failed before it could say so)."""
    deadline = time.monotonic() + limit_s
    while not wanted(snapshot):
        if done.wait(poll_s) or time.monotonic() > deadline:
            return wanted(snapshot)  # it may have asked just before
    return True


def _in_ray() -> bool:
    """Whether this process is connected to a Ray cluster (without importing Ray when it is not)."""
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _count_moved(model: str, src: Tier, dst: Tier, result: TransferResult) -> None:
    """Bytes this process moved between tiers for a model (none when another process did the copy)."""
    CACHE_READ_BYTES.inc(result.fetched, model=model, tier=src.kind)
    CACHE_WRITTEN_BYTES.inc(result.fetched, model=model, tier=dst.kind)


def _file_chunks(path: Path, progress: Progress | None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(_UPLOAD_BLOCK):
            if progress:
                progress(len(data))
            yield data
