"""The warm view: which replica on which node has which model loaded, and which tiers cache its blobs.

Routing prefers a replica that already holds a model and placement prefers a node whose
tiers already cache it; both ask the registry, and replicas and node cache agents tell it.
The view is saved with the catalog so a restarted registry still knows the cluster until
the next reports refresh it; every entry carries the time it was reported.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helios.observability.logs import get_logger, log_event
from helios.storage.tiers import atomic_write_bytes

logger = get_logger("registry.warm")


class ReplicaEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str
    version: str | None = None
    updated: float = Field(default_factory=time.time)


class WarmState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: dict[str, dict[str, ReplicaEntry]] = Field(
        default_factory=dict, description="model id -> replica id -> where it runs"
    )
    tiers: dict[str, dict[str, dict[str, int]]] = Field(
        default_factory=dict, description="node id -> model id -> tier kind -> bytes cached"
    )
    tiers_updated: dict[str, float] = Field(default_factory=dict, description="node id -> when it last reported")
    loads: dict[str, dict[str, dict[str, int]]] = Field(
        default_factory=dict, description="node id -> tier kind -> {hits, misses, bytes_served} of replica loads"
    )


class WarmView:
    """Replica and tier reports, replaced wholesale per replica and per node."""

    def __init__(self, state: WarmState | None = None) -> None:
        self.state = state or WarmState()

    def set_replica(self, model_id: str, replica_id: str, node_id: str, loaded: bool, version: str | None) -> None:
        replicas = self.state.replicas.setdefault(model_id, {})
        if loaded:
            replicas[replica_id] = ReplicaEntry(node_id=node_id, version=version)
        else:
            replicas.pop(replica_id, None)
        if not replicas:
            del self.state.replicas[model_id]

    def set_tiers(self, node_id: str, view: dict[str, dict[str, int]]) -> None:
        """Replace what one node caches: model id -> tier kind -> bytes (models with nothing cached dropped)."""
        clean = {m: {k: int(b) for k, b in kinds.items() if int(b) > 0} for m, kinds in view.items()}
        self.state.tiers[node_id] = {m: kinds for m, kinds in clean.items() if kinds}
        self.state.tiers_updated[node_id] = time.time()

    def record_load(self, node_id: str, tier: str, sources: dict[str, int]) -> None:
        """Count one replica load into `tier`: a hit there when it supplied every byte, else a miss;
        each other tier that supplied bytes served them (a hit one level down)."""
        kinds = self.state.loads.setdefault(node_id, {})

        def bump(kind: str, key: str, n: int = 1) -> None:
            counts = kinds.setdefault(kind, {"hits": 0, "misses": 0, "bytes_served": 0})
            counts[key] += n

        served = {k: int(b) for k, b in sources.items() if int(b) > 0}
        bump(tier, "hits" if set(served) <= {tier} else "misses")
        for kind, size in served.items():
            if kind != tier:
                bump(kind, "hits")
            bump(kind, "bytes_served", size)

    def forget(self, model_id: str) -> None:
        self.state.replicas.pop(model_id, None)

    def of(self, model_id: str) -> dict:
        """{replicas: [{replica_id, node_id, version, updated}], tiers: {node_id: {tier kind: bytes}}}."""
        replicas = [
            {"replica_id": rid, **entry.model_dump()}
            for rid, entry in sorted(self.state.replicas.get(model_id, {}).items())
        ]
        tiers = {node: models[model_id] for node, models in sorted(self.state.tiers.items()) if model_id in models}
        return {"replicas": replicas, "tiers": tiers}

    def counts(self) -> dict[str, int]:
        return {"replicas": sum(len(r) for r in self.state.replicas.values()), "nodes": len(self.state.tiers)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.state.model_dump_json(indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> WarmView:
        """The saved view, or an empty one: reports rebuild it, so a bad file only costs a little warmth."""
        if not path.exists():
            return cls()
        try:
            return cls(WarmState.model_validate_json(path.read_bytes()))
        except (ValidationError, ValueError, OSError) as exc:
            log_event(logger, "warm_view_unreadable", path=str(path), error=str(exc)[:500])
            return cls()
