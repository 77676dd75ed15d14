"""Cache operations run on a chosen node, or on every node: preload, evict, status.

Each local tier is a directory on one node, so an admin's "preload model X into RAM"
has to run there. A Ray task pinned to the node (hard node affinity) builds the
node's `ModelStore` from the same storage config the replicas use and acts on it;
the caller gathers one answer per node. Tasks take no CPU slot: they are I/O and
must not wait behind engine replicas for a logical CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from helios.config import StorageConfig
from helios.errors import HeliosError, InvalidRequest
from helios.storage.manifest import Manifest
from helios.storage.store import ModelStore
from helios.storage.tiers import LOCAL_KINDS, LocalTier, write_hints


def alive_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def _store(storage: dict[str, Any], cache_root: str) -> ModelStore:
    return ModelStore.from_config(StorageConfig.model_validate(storage), Path(cache_root))


def preload(storage: dict[str, Any], cache_root: str, model_id: str, version: str | None, tier: str | None) -> dict[str, Any]:
    """Bring a version into `tier` on this node (default: the fastest local tier)."""
    local = _store(storage, cache_root).ensure_local(model_id, version, tier)
    return {"model": model_id, "version": local.manifest.version, "tier": local.tier, "bytes": local.manifest.total_bytes,
            "fetched_bytes": local.fetched_bytes, "sources": local.sources, "seconds": round(local.timings["fetch_s"], 3)}


def evict(storage: dict[str, Any], cache_root: str, model_id: str | None, version: str | None, tier: str | None) -> dict[str, Any]:
    """Drop a version (or a model, or everything) from this node's local tiers."""
    freed = _store(storage, cache_root).evict(model_id, version, tier)
    return {"model": model_id, "version": version, "tier": tier, "freed_bytes": freed}


def status(storage: dict[str, Any], cache_root: str) -> dict[str, Any]:
    """Per local tier on this node: bytes used, capacity, and which versions it holds whole."""
    store = _store(storage, cache_root)
    tiers = {}
    for t in store.local:
        held = [m for m in t.manifests() if t.has_all(m)]
        tiers[t.kind] = {
            "path": str(t.root),
            "bytes": t.used(),
            "capacity": t.capacity,
            "models": {m.model_id: sorted(v.version for v in held if v.model_id == m.model_id) for m in held},
            "model_bytes": {m.model_id: m.total_bytes for m in held},
        }
    return {"tiers": tiers}


def ram_tier(store: ModelStore | None) -> LocalTier | None:
    return next((t for t in store.local if t.kind == "ram"), None) if store else None


def held_locally(store: ModelStore, manifest: Manifest) -> list[str]:
    """Kinds of the store's local tiers that hold every blob of the version (stats, no network)."""
    return [t.kind for t in store.local if t.has_all(manifest)]


def fastest_kind(kinds: Iterable[str]) -> str:
    """The fastest local kind among `kinds`; "remote" when there is none (the store's durable copy)."""
    kinds = set(kinds)
    return next((k for k in LOCAL_KINDS if k in kinds), "remote")


def apply_to_store(
    store: ModelStore, hints: Mapping[str, Mapping[str, float]], manifests: Iterable[Mapping[str, Any]],
    prewarm_from: Iterable[str] = ("nvme", "ssd"), report: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One node's share of a round: publish the hints in its RAM tier, bring each manifest's version
    into RAM if a local tier in `prewarm_from` holds it (never from the remote), and say, for each
    manifest in `report`, the fastest of this node's tiers holding all of it ("remote": none here),
    which the next round plans this node on."""
    ram = ram_tier(store)
    if ram is None:
        return {"error": "no ram tier on this node"}
    path = write_hints(ram.root, hints.get("keep_alive", {}), hints.get("idle", {}))
    allowed = set(prewarm_from)
    done = []
    for data in manifests:
        manifest = Manifest.model_validate(data)
        item: dict[str, Any] = {"model": manifest.model_id, "version": manifest.version}
        held = held_locally(store, manifest)
        if "ram" in held:
            done.append({**item, "skipped": "already in ram"})
            continue
        if not allowed & set(held):
            done.append({**item, "skipped": f"not on {'/'.join(sorted(allowed))} here"})
            continue
        try:
            local = store.localize(manifest, "ram")
        except HeliosError as exc:  # a full RAM tier: the round goes on with the next model
            done.append({**item, "error": f"{type(exc).__name__}: {exc}"})
            continue
        done.append({**item, "bytes": manifest.total_bytes, "fetched_bytes": local.fetched_bytes,
                     "sources": local.sources, "seconds": round(local.timings["fetch_s"], 3)})
    tiers = {}
    for data in report:
        try:
            manifest = Manifest.model_validate(data)
            tiers[manifest.model_id] = fastest_kind(held_locally(store, manifest))
        except (ValueError, OSError):  # a manifest or tier this node cannot read: no report for it
            continue
    return {"hints": str(path), "prewarmed": done, "tiers": tiers}


def apply_on_node(
    storage: dict[str, Any], cache_root: str, hints: dict[str, dict[str, float]], manifests: list[dict[str, Any]],
    prewarm_from: list[str], report: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The Ray task body: this node's store from the shared storage config, then `apply_to_store`."""
    from helios.config import StorageConfig

    store = ModelStore.from_config(StorageConfig.model_validate(storage), Path(cache_root))
    return apply_to_store(store, hints, manifests, prewarm_from, report or ())


OPS = {"preload": preload, "evict": evict, "status": status}


def _run_op(op: str, storage: dict[str, Any], cache_root: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return OPS[op](storage, cache_root, **kwargs)


async def on_nodes(
    op: str, storage: dict[str, Any], cache_root: str, node_id: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Run `op` on one node or every alive node; node id -> result (or {"error": ...})."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if node_id is not None:
        if node_id not in nodes:
            raise InvalidRequest(f"node_id: no alive node {node_id!r}", param="node_id")
        nodes = [node_id]
    task = ray.remote(num_cpus=0, max_retries=0)(_run_op)
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(op, storage, cache_root, kwargs)
        for n in nodes
    ]
    results = await asyncio.gather(*refs, return_exceptions=True)
    errors = [getattr(r, "cause", None) or r for r in results if isinstance(r, BaseException)]
    if errors and len(errors) == len(results) and isinstance(errors[0], HeliosError):
        raise errors[0]  # failed everywhere for one reason (unknown model, full tier): say so plainly
    out: dict[str, Any] = {}
    for n, r in zip(nodes, results):
        out[n] = {"error": str(getattr(r, "cause", None) or r)} if isinstance(r, BaseException) else r
    return out
