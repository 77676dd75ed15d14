"""Where Helios's placements land on a multi-node Ray cluster, simulated on one host.

`ray.cluster_utils.Cluster` starts real raylets that advertise GPUs and MIG slices they do not
have; the placement groups and actors built from `placement_for` are then placed by Ray's
real scheduler, and the state API says on which node each bundle and actor sits. (No engine
starts: the GPUs are not real. The vLLM arguments each replica would get are checked in
tests/engine/test_placement.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helios.config import parse_args
from helios.engine.placement import placement_for, warm_first

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]


def model(deployment: dict, **engine: object):
    return parse_args({"models": [{"id": "m", "source": "demo://tiny", "engine": engine,
                                   "deployment": {"num_cpus": 0.5, **deployment}}]}).models[0]


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, str]]:
    """A CPU head, a node with two GPUs, two nodes with one GPU each, a node with two MIG slices."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    names = {"two_gpus": {"num_cpus": 4, "num_gpus": 2}, "one_gpu_a": {"num_cpus": 4, "num_gpus": 1},
             "one_gpu_b": {"num_cpus": 4, "num_gpus": 1}, "mig": {"num_cpus": 4, "resources": {"mig-1g.10gb": 2}}}
    for name, args in names.items():
        cluster.add_node(**{**args, "resources": {**args.get("resources", {}), f"is_{name}": 1}})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ids = {}
        for n in ray.nodes():
            for name in names:
                if n["Alive"] and f"is_{name}" in n["Resources"]:
                    ids[n["NodeID"]] = name
        yield ids
    finally:
        ray.shutdown()
        cluster.shutdown()


def _wait_all_gpus_free(timeout_s: float = 60) -> None:
    """Until an earlier test's actors and placement groups have given their GPUs back (asynchronous)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0) < ray.cluster_resources().get("GPU", 0):
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def _bundle_nodes(placement, names: dict[str, str]) -> list[str]:
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    pg = placement_group(placement.bundles, strategy=placement.strategy)
    ray.get(pg.ready(), timeout=60)
    try:
        table = placement_group_table(pg)
        return [names[table["bundles_to_node_id"][i]] for i in range(len(placement.bundles))]
    finally:
        remove_placement_group(pg)


def test_tensor_parallel_bundles_land_on_one_node(nodes: dict[str, str]) -> None:
    _wait_all_gpus_free()
    where = _bundle_nodes(placement_for(model({"accelerator": "gpu"}, tensor_parallel_size=2)), nodes)
    assert where[1] == where[2] == "two_gpus"  # both GPU ranks together, on the only node with two


def test_pipeline_stages_spread_over_nodes_when_one_cannot_hold_them(nodes: dict[str, str]) -> None:
    import ray

    _wait_all_gpus_free()
    blocker = ray.remote(num_gpus=2, resources={"is_two_gpus": 1})(_Sleeper).remote()  # the two-GPU node is busy
    ray.get(blocker.ready.remote(), timeout=60)
    try:
        where = _bundle_nodes(placement_for(model({"accelerator": "gpu"}, pipeline_parallel_size=2)), nodes)
        assert sorted(where[1:]) == ["one_gpu_a", "one_gpu_b"]  # a gang: both stages or neither
    finally:
        ray.kill(blocker)


class _Sleeper:
    def ready(self) -> bool:
        return True

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _actor_node(placement, names: dict[str, str]) -> tuple[str, object]:
    import ray

    opts = placement.actor_options
    actor = ray.remote(_Sleeper).options(num_cpus=opts.get("num_cpus", 1), num_gpus=opts.get("num_gpus", 0),
                                         resources=opts.get("resources", {})).remote()
    return names[ray.get(actor.node.remote(), timeout=60)], actor


def test_two_fractional_gpu_models_share_one_gpu(nodes: dict[str, str]) -> None:
    import ray

    half = placement_for(model({"accelerator": "gpu", "gpu_fraction": 0.5}))
    _wait_all_gpus_free()
    blockers = [_actor_node(placement_for(model({"accelerator": "gpu"})), nodes)[1] for _ in range(3)]
    try:  # three whole GPUs taken: one GPU is left, and both halves must fit on it
        (a, x), (b, y) = _actor_node(half, nodes), _actor_node(half, nodes)
        assert a == b
        ray.kill(x)
        ray.kill(y)
    finally:
        for actor in blockers:
            ray.kill(actor)


def test_a_mig_model_lands_only_where_that_slice_is(nodes: dict[str, str]) -> None:
    import ray

    where, actor = _actor_node(placement_for(model({"accelerator": "mig-1g.10gb"})), nodes)
    assert where == "mig"
    ray.kill(actor)


class Where:
    """A stand-in replica: the GPUs are simulated, so no engine; Serve places it by the engine's options."""

    async def __call__(self, hold_s: float) -> str:
        import asyncio

        await asyncio.sleep(hold_s)  # an ongoing request, which Serve's autoscaler counts
        return "done"


def _serve_replica_nodes(app: str, names: dict[str, str], count: int, timeout_s: float = 90) -> list[str]:
    """Where the app's replicas run once `count` of them are alive."""
    import time

    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        where = sorted(names[a.node_id] for a in actors if a.class_name == f"ServeReplica:{app}:Where")
        if len(where) >= count or time.monotonic() > deadline:
            return where
        time.sleep(0.5)


def test_a_scale_up_prefers_the_node_whose_ram_tier_holds_the_model(nodes: dict[str, str]) -> None:
    """Serve's own scheduler spreads replicas over nodes; with the registry's warm view (the model in
    one_gpu_b's RAM tier, in two_gpus's NVMe tier) each scale-up lands where the blobs are, and only
    when the warm node is full does the next go to the next-warmest."""
    from ray import serve

    _wait_all_gpus_free()
    ids = {name: node for node, name in nodes.items()}
    warm = [[ids["one_gpu_b"]], [ids["two_gpus"]]]  # RegistryCore.warm_nodes' shape
    options = warm_first(placement_for(model({"accelerator": "gpu", "gpu_fraction": 0.5})), warm).deployment_options()
    autoscaling = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                   "upscale_delay_s": 0, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
                   "look_back_period_s": 1}
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(serve.deployment(Where).options(autoscaling_config=autoscaling, max_ongoing_requests=4,
                                                           **options).bind(), name="warm", route_prefix=None)
        seen = [_serve_replica_nodes("warm", nodes, 1)]
        held = [handle.remote(120)]
        for replicas in (2, 3):  # Serve's autoscaler wants a replica per request held (the target is 1)
            held.append(handle.remote(120))
            seen.append(_serve_replica_nodes("warm", nodes, replicas))
        assert seen == [["one_gpu_b"], ["one_gpu_b", "one_gpu_b"], ["one_gpu_b", "one_gpu_b", "two_gpus"]]
        for response in held:
            response.cancel()
    finally:
        serve.shutdown()
