"""Helios's request router for engine deployments, on Ray Serve's own extension point.

Replicas whose circuit breaker is open (`helios.router.breaker`) are left out.

Serve calls `choose_replicas` for each request a handle sends; the ranks come from
`PrefixAffinityPolicy` (prefix and session affinity, bounded by load, then power of two
choices), and Serve itself probes each rank's queue lengths and skips full replicas, as
its default router does. The request's routing hints were computed once by the router
(`EngineHTTPRequest.routing`), so nothing here parses a body.

Load per replica (`routing_policy.replica_load`) is the larger of what this handle has in
flight there, Serve's cached queue length, and the requests the replica's engine last reported
(`EngineDeployment.record_routing_stats`: unfinished, and vLLM's scheduler's running plus
waiting, less this handle's requests that finished there since the report was taken), plus
`KV_WEIGHT` times its KV-cache use (0..1): of two replicas equally busy, the one whose cache
is nearly full would preempt or queue the next long prompt.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from helios.router.breaker import breakers_for
from helios.router.routing_policy import PrefixAffinityPolicy, RoutingHints, replica_load

FINISHED_KEPT = 1024  # completion times kept per replica: more than finish within one stats period
EARLY_KEPT = 4096  # completions seen before their routing: settled by it, or (a rejected attempt) dropped

# This process's affinity policies by "app/deployment" (one request router per deployment handle).
POLICIES: dict[str, PrefixAffinityPolicy] = {}


class HeliosRequestRouter(FIFOMixin, RequestRouter):
    """Prefix/session affinity first, then load: see `helios.router.routing_policy`."""

    def initialize_state(self, imbalance: float = 8.0, **_: Any) -> None:
        self.policy = PrefixAffinityPolicy(imbalance=imbalance)
        POLICIES[f"{self._deployment_id.app_name}/{self._deployment_id.name}"] = self.policy  # for /admin/routing
        # The router core reports each answer to these breakers; an open one takes no requests.
        self.breakers = breakers_for(f"{self._deployment_id.app_name}/{self._deployment_id.name}")
        self.in_flight: dict[ReplicaID, int] = {}
        self.requests: dict[str, ReplicaID] = {}  # internal request id -> its replica
        self.routed_at: dict[str, float] = {}  # internal request id -> wall time it was routed
        self.finished: dict[ReplicaID, deque[tuple[float, float]]] = {}  # (routed, finished) wall times, by finish
        self.early: OrderedDict[str, ReplicaID] = OrderedDict()  # request id -> replica it finished on, unrouted

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new replica set: the breakers forget gone replicas and know new ones now (with
        every known breaker open the router answers 503 without asking here, so waiting for the
        next `choose_replicas` would keep a replacement idle until the dead one's cooldown ends)."""
        super().update_replicas(replicas)
        self._track_breakers()
        current = {r.replica_id for r in replicas}
        for table in (getattr(self, "in_flight", {}), getattr(self, "finished", {})):  # {}: before initialize_state
            for gone in [r for r in table if r not in current]:
                del table[gone]

    def _track_breakers(self) -> None:
        """The breakers follow the replica set where it changes (here and when an actor dies), not
        on every request."""
        breakers = getattr(self, "breakers", None)  # None: called before initialize_state
        if breakers is not None:
            breakers.track(r.replica_id.unique_id for r in self.curr_replicas.values())

    def _load(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        return replica_load(self.in_flight.get(replica.replica_id, 0),
                            self.replica_queue_len_cache.get(replica.replica_id), stats,
                            self._finished_since(replica.replica_id, stats.get("at")))

    def _finished_since(self, replica_id: ReplicaID, at: float | None) -> int:
        """This handle's requests the replica's report counted (routed before it was taken) that
        finished after."""
        if at is None:
            return 0
        count = 0
        for routed, finished in reversed(self.finished.get(replica_id, ())):
            if finished <= at:
                break
            count += routed <= at
        return count

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self._load(by_id[rid]) for rid in self.breakers.available(by_id)}
        ranks = self.policy.rank(loads, _hints(pending_request))
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Serve calls this once the replica accepted the request; a short call may have finished
        already (Serve's completion callback is registered first and can run first)."""
        request_id = pending_request.metadata.internal_request_id
        self.policy.record(_hints(pending_request), replica_id.unique_id)
        self.breakers.routed(replica_id.unique_id)
        if self.early.pop(request_id, None) == replica_id:  # over already: nothing is in flight
            return
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        self.requests[request_id] = replica_id
        self.routed_at[request_id] = time.time()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Counted where it was routed. A completion before its routing is kept for
        `on_request_routed`; one of an attempt retried elsewhere changes nothing."""
        routed_to = self.requests.get(internal_request_id)
        if routed_to is None:
            self.early[internal_request_id] = replica_id
            while len(self.early) > EARLY_KEPT:  # rejected attempts are never routed: the oldest go
                self.early.popitem(last=False)
            return
        if routed_to != replica_id:
            return
        del self.requests[internal_request_id]
        routed = self.routed_at.pop(internal_request_id, 0.0)
        if replica_id in self.in_flight:
            self.in_flight[replica_id] = max(self.in_flight[replica_id] - 1, 0)
        if replica_id in self.curr_replicas:  # not for a replica that is gone
            self.finished.setdefault(replica_id, deque(maxlen=FINISHED_KEPT)).append((routed, time.time()))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._track_breakers()
        self.policy.forget(replica_id.unique_id)
        self.in_flight.pop(replica_id, None)
        self.finished.pop(replica_id, None)


def _hints(pending_request: PendingRequest | None) -> RoutingHints:
    """The hints the router attached to the request (none for calls that are not OpenAI requests)."""
    if pending_request is None or not pending_request.args:
        return RoutingHints()
    routing = getattr(pending_request.args[0], "routing", None)
    return routing if isinstance(routing, RoutingHints) else RoutingHints()
