"""The request router's own bookkeeping (what it counts in flight per replica), with Serve's replica and
request objects faked: Serve's constructor needs a running controller, and the order of its callbacks
is what is tested."""

from __future__ import annotations

import time
from types import SimpleNamespace

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve._private.request_router.common import ReplicaQueueLengthCache

from helios.router.replica_router import HeliosRequestRouter


def _router(*names: str) -> tuple[HeliosRequestRouter, dict[str, ReplicaID]]:
    router = HeliosRequestRouter.__new__(HeliosRequestRouter)
    router._deployment_id = DeploymentID(name="engine-fake", app_name="fake-app")
    ids = {n: ReplicaID(unique_id=n, deployment_id=router._deployment_id) for n in names}
    router._replicas = {rid: SimpleNamespace(replica_id=rid) for rid in ids.values()}
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    router.initialize_state()
    return router, ids


def _request(request_id: str) -> SimpleNamespace:
    """A fake of Serve's PendingRequest: what the router reads of it."""
    return SimpleNamespace(args=[], metadata=SimpleNamespace(internal_request_id=request_id))


def test_calls_that_finish_before_serve_reports_their_routing_leave_nothing_in_flight() -> None:
    """Serve registers the completion callback before it awaits the replica's acceptance, so a short
    call's completion can come first; counted anyway, every such call would stay in flight for good
    and steer all traffic to the other replica (CI: 24 short requests in a row on one replica)."""
    router, ids = _router("a", "b")
    for i in range(50):
        router.on_request_completed(ids["a"], f"r{i}")
        router.on_request_routed(_request(f"r{i}"), ids["a"], None)
    assert router.in_flight.get(ids["a"], 0) == 0 and not router.requests and not router.early


def test_a_request_counts_where_it_was_routed_until_it_finishes_there() -> None:
    router, ids = _router("a", "b")
    router.on_request_routed(_request("x"), ids["a"], None)
    assert router.in_flight[ids["a"]] == 1
    router.on_request_completed(ids["b"], "x")  # a late completion of an attempt elsewhere
    assert router.in_flight[ids["a"]] == 1
    router.on_request_completed(ids["a"], "x")
    assert router.in_flight[ids["a"]] == 0 and len(router.finished[ids["a"]]) == 1


def test_what_finished_after_a_report_that_counted_it_comes_off_the_reported_load() -> None:
    router, ids = _router("a")
    router.on_request_routed(_request("x"), ids["a"], None)
    time.sleep(0.01)
    at = time.time()  # the replica's report, taken while x ran: it counts x
    time.sleep(0.01)
    router.on_request_routed(_request("y"), ids["a"], None)  # not in the report
    router.on_request_completed(ids["a"], "x")
    assert router._finished_since(ids["a"], at) == 1
    stats = {"unfinished": 1, "running": 1, "waiting": 0, "kv_cache_usage": 0.5, "at": at}
    replica = SimpleNamespace(replica_id=ids["a"], routing_stats=stats)
    assert router._load(replica) == 1 + 4 * 0.5  # y is in flight here: the KV cache is in use
    router.on_request_completed(ids["a"], "y")
    assert router._finished_since(ids["a"], at) == 1 and router._load(replica) == 0
