"""One cache per node: every process's hits reach one policy per tier, the keeper survives a
restart from what is on disk, and room granted to one writer is not granted twice.

The cluster tests run the store in two Ray actors (two worker processes on one node) against
a file:// remote, as replicas and node tasks do; the keeper is the real node cache actor."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from helios.errors import TierFull
from helios.storage.eviction import POLICIES, CostAwarePolicy
from helios.storage.tiers import LocalTier
from tests.storage.conftest import storage_config, write_model

MIB = 1 << 20


# -- without Ray: the pieces the keeper is made of ----------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_policy_restored_from_its_state_plans_as_before(name: str) -> None:
    before = POLICIES[name]()
    for i, size in enumerate((10, 20, 30, 40)):
        before.on_insert(f"b{i}", size, now=float(i))
    for _ in range(3):
        before.on_hit("b0", now=10.0)
    after = POLICIES[name]()
    assert after.restore(before.state())
    assert after.known() == before.known()
    assert after.plan(60) == before.plan(60)
    assert not POLICIES[name]().restore({"blobs": "nonsense"})


def test_room_held_for_one_writer_is_not_given_to_another(tmp_path: Path) -> None:
    tier = LocalTier("ram", tmp_path / "ram", capacity=3 * MIB)
    tier.make_room(2 * MIB, {"a"}, digest="a")  # a is being written: nothing is on disk yet
    with pytest.raises(TierFull):
        tier.make_room(2 * MIB, {"b"}, digest="b")
    tier.make_room(2 * MIB, {"a"}, digest="a")  # asking again for the same blob holds it once
    data = os.urandom(MIB)
    tier.write(hashlib.sha256(data).hexdigest(), [data])  # 1 MiB still fits beside a's 2 MiB
    tier.delete("a")  # the writer gave up: its room comes back
    tier.make_room(2 * MIB, {"b"}, digest="b")


def test_a_tier_saves_its_counts_and_a_new_keeper_takes_them_back(tmp_path: Path) -> None:
    tier = LocalTier("ram", tmp_path / "ram", capacity=3 * MIB, policy=CostAwarePolicy("nvme"))
    blobs = [os.urandom(MIB) for _ in range(3)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    for d, b in zip(digests, blobs):
        tier.write(d, [b])
    for _ in range(5):
        tier.touch(digests[0])  # the most used...
    tier.touch(digests[1])  # ...but not the most recently used
    tier.save_state()
    fresh = LocalTier("ram", tmp_path / "ram", capacity=3 * MIB, policy=CostAwarePolicy("nvme"))
    assert fresh.load_state()
    assert fresh.plan(2 * MIB) == [digests[2], digests[1]]
    cold = LocalTier("ram", tmp_path / "ram", capacity=3 * MIB, policy=CostAwarePolicy("nvme"))
    assert cold.plan(2 * MIB) == [digests[2], digests[0]]  # without the counts, by file time


# -- under Ray: two processes, one keeper --------------------------------------------------


class StoreProcess:
    """A Ray worker process that uses the store as a replica does."""

    def __init__(self, storage: dict[str, Any], cache_root: str) -> None:
        self.storage, self.cache_root = storage, cache_root

    def load(self, model: str, times: int = 1) -> int:
        from helios.config import StorageConfig
        from helios.storage.store import ModelStore

        store = ModelStore.from_config(StorageConfig.model_validate(self.storage), Path(self.cache_root))
        assert store.local[0].shared is not None  # under Ray the tiers report to the node cache
        for _ in range(times):
            store.ensure_local(model, tier="ram")
        return os.getpid()


@pytest.fixture(scope="module")
def cluster():
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def node(cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three 1 MiB models in a file:// remote, a RAM tier that holds two, a bigger NVMe tier."""
    from helios.storage.store import ModelStore

    root = tmp_path_factory.mktemp("node")
    cfg = storage_config(root, f"file://{root / 'remote'}", tiers=[
        {"kind": "ram", "path": str(root / "ram"), "capacity": "2.5MiB", "eviction": "cost"},
        {"kind": "nvme", "path": str(root / "nvme"), "capacity": "64MiB", "eviction": "cost"},
    ])
    pusher = ModelStore.from_config(cfg, root, shared=False)
    for name in ("hot", "newer", "third"):
        pusher.push(write_model(root / "src" / name, os.urandom(MIB), config="{}"), name, "v1")
    storage = cfg.model_dump(mode="json")
    procs = [cluster.remote(StoreProcess).options(num_cpus=0).remote(storage, str(root)) for _ in range(2)]
    return {"root": root, "storage": storage, "procs": procs}


def _ram_holds(root: Path, model: str) -> bool:
    from helios.storage.manifest import Manifest

    manifest = next((root / "nvme" / "manifests").glob(f"*{model}*/v1.json"))
    digests = {f.sha256 for f in Manifest.from_json(manifest.read_bytes()).files}
    return all((root / "ram" / "blobs" / d).exists() for d in digests)


def _keeper(ray: Any, node: dict[str, Any]) -> Any:
    from helios.storage.node_cache import NAMESPACE, actor_name

    name = actor_name(node["storage"], str(node["root"]), ray.get_runtime_context().get_node_id())
    return ray.get_actor(name, namespace=NAMESPACE)


def _wait_for(fn, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception:  # the actor is restarting
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.5)


def test_a_blob_one_process_uses_is_kept_over_a_colder_one_another_fetched(cluster, node) -> None:
    ray, (a, b), root = cluster, node["procs"], node["root"]
    pid_a = ray.get(a.load.remote("hot", times=5))  # fetched, then used four more times
    pid_b = ray.get(b.load.remote("newer"))  # fetched once, later than hot's last use
    assert pid_a != pid_b
    keeper = _keeper(ray, node)
    _wait_for(lambda: ray.get(keeper.stats.remote())["tiers"]["ram"]["counters"].get("hits", 0) >= 4)
    ray.get(b.load.remote("third"))  # the RAM tier holds two: one has to go
    assert _ram_holds(root, "hot") and _ram_holds(root, "third")
    assert not _ram_holds(root, "newer")  # a process keeping its own policy would have dropped hot (oldest file)
    stats = ray.get(keeper.stats.remote())
    assert {f"{os.uname().nodename}:{pid_a}", f"{os.uname().nodename}:{pid_b}"} <= set(stats["clients"])
    assert stats["tiers"]["ram"]["counters"]["evictions"] == 1


def test_a_killed_keeper_comes_back_with_its_tiers_and_counts(cluster, node) -> None:
    ray, root = cluster, node["root"]
    keeper = _keeper(ray, node)
    before = ray.get(keeper.stats.remote())
    ray.get(keeper.save.remote())
    old_pid = ray.get(keeper.pid.remote())
    ray.kill(keeper, no_restart=False)
    _wait_for(lambda: ray.get(keeper.pid.remote()) != old_pid)
    after = ray.get(keeper.stats.remote())
    assert after["restored"] == {"ram": True, "nvme": True}
    for kind in ("ram", "nvme"):
        assert after["tiers"][kind]["used"] == before["tiers"][kind]["used"] > 0
        assert after["tiers"][kind]["blobs"] == before["tiers"][kind]["blobs"]
    assert _ram_holds(root, "hot") and _ram_holds(root, "third")
    # hot's five uses survived the restart: the restarted keeper would evict third first
    third = {p.name for p in (root / "ram" / "blobs").iterdir()} - _digests(root, "hot")
    assert ray.get(keeper.victims_for.remote("ram", 1)) == sorted(third)[:1]
    # and the processes go on through it
    ray.get(node["procs"][0].load.remote("newer"))
    assert _ram_holds(root, "newer") and _ram_holds(root, "hot")


def _digests(root: Path, model: str) -> set[str]:
    from helios.storage.manifest import Manifest

    manifest = next((root / "nvme" / "manifests").glob(f"*{model}*/v1.json"))
    return {f.sha256 for f in Manifest.from_json(manifest.read_bytes()).files}
