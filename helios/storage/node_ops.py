"""Cache operations run on a chosen node, or on every node: preload, evict, status.

Each local tier is a directory on one node, so an admin's "preload model X into RAM"
has to run there. A Ray task pinned to the node (hard node affinity) builds the
node's `ModelStore` from the same storage config the replicas use and acts on it;
the caller gathers one answer per node. Tasks take no CPU slot: they are I/O and
must not wait behind engine replicas for a logical CPU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from helios.config import StorageConfig
from helios.errors import HeliosError, InvalidRequest
from helios.storage.store import ModelStore


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
