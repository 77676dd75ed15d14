"""The registry actor on a real Ray cluster: its state survives kills, restarts and re-creation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helios.config import StorageConfig
from helios.errors import ModelNotFound, ModelVersionNotFound
from helios.registry import get_or_create_registry, get_registry
from helios.storage.store import ModelStore
from tests.conftest import drop_registry, wait_registry_gone
from tests.registry.conftest import store_section

pytestmark = pytest.mark.integration

TINY_WEIGHT_BYTES = 9_987_072  # see test_profile.py
TINY_KV_PER_TOKEN = 4_096


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def state(tmp_path: Path) -> dict[str, Any]:
    """Arguments of a registry whose state, store and cache live in this test's tmp_path."""
    return {
        "state_dir": str(tmp_path / "registry"),
        "storage": store_section(tmp_path / "store"),
        "cache_root": str(tmp_path / "cache"),
        "settings": {"sync_interval_s": 0, "miss_sync_interval_s": 0},
    }


@pytest.fixture
def registry(ray_cluster: None, state: dict[str, Any]) -> Iterator[Any]:
    assert get_registry() is None
    handle = get_or_create_registry(**state)
    yield handle
    drop_registry()


def _restarted(reg: Any, old_pid: int) -> dict:
    """The status of the instance Ray started after the kill (the kill is asynchronous)."""
    import ray

    deadline = time.monotonic() + 60
    while (status := ray.get(reg.status.remote()))["pid"] == old_pid:
        if time.monotonic() > deadline:
            raise TimeoutError("the registry was not restarted")
        time.sleep(0.2)
    return status


def _populate(ray: Any, reg: Any, model_dir: Path, now: float) -> None:
    ray.get(reg.register.remote("org/a", "v1", str(model_dir), pinned=True, deploy={"engine": {"dtype": "float32"}}))
    ray.get(reg.register.remote("org/a", "v2", str(model_dir)))
    ray.get(reg.set_default.remote("org/a", "v2"))
    ray.get(reg.register.remote("org/b", "v1", str(model_dir)))
    ray.get(reg.set_scale.remote("org/b", 1, 3))
    ray.get(reg.record_requests.remote({"org/a": [now - 30, now - 20, now - 10], "org/b": [now - 120]}))


def _check(ray: Any, reg: Any, now: float) -> None:
    models = {m["id"]: m for m in ray.get(reg.list_models.remote())}
    assert set(models) == {"org/a", "org/b"}
    a, b = models["org/a"], models["org/b"]
    assert a["default_version"] == "v2" and a["pinned"] and a["deploy"] == {"engine": {"dtype": "float32"}}
    assert [v["version"] for v in a["versions"]] == ["v2", "v1"]
    assert a["versions"][0]["profile"]["weight_bytes"] == TINY_WEIGHT_BYTES
    assert b["scale"] == {"min_replicas": 1, "max_replicas": 3, "explicit": True} and not b["pinned"]
    usage = ray.get(reg.usage.remote("org/a"))
    assert usage["requests_total"] == 3 and usage["last_used"] == now - 10
    assert usage["inter_arrival_s"] == [10.0, 10.0]
    assert usage["rpm"] == 3.0  # the three requests of the last minute (this test takes seconds)
    assert ray.get(reg.usage.remote("org/b"))["rpm"] == 0.0


def test_a_second_app_with_other_settings_is_told_what_the_running_registry_keeps(
    registry: Any, state: dict[str, Any]
) -> None:
    import ray

    from helios.registry.actor import config_differences

    status = ray.get(registry.status.remote())
    assert status["settings"]["sync_interval_s"] == 0 and status["storage"] == state["storage"]
    assert config_differences(status, state["storage"], state["settings"]) == []
    other = {**state["settings"], "prefetch_interval_s": 5}
    assert config_differences(status, None, other) == ["prefetch_interval_s", "storage"]
    again = get_or_create_registry(**{**state, "settings": other})  # the same actor, as before
    assert ray.get(again.status.remote())["pid"] == status["pid"]


def test_state_survives_a_kill_that_ray_restarts(registry: Any, tiny_model_dir: Path) -> None:
    import ray

    now = time.time()
    _populate(ray, registry, tiny_model_dir, now)
    ray.get(registry.persist.remote())
    before = ray.get(registry.status.remote())

    ray.kill(registry, no_restart=False)
    after = _restarted(registry, before["pid"])
    assert after["started"] > before["started"]
    _check(ray, registry, now)
    assert ray.get(get_registry().status.remote())["pid"] == after["pid"]  # still the one named actor


def test_a_registry_killed_for_good_is_recreated_from_disk(
    ray_cluster: None, state: dict[str, Any], tiny_model_dir: Path
) -> None:
    import ray

    reg = get_or_create_registry(**state)
    now = time.time()
    _populate(ray, reg, tiny_model_dir, now)
    ray.get(reg.persist.remote())
    drop_registry()

    reg = get_or_create_registry(**state)
    try:
        _check(ray, reg, now)
    finally:
        drop_registry()


def test_usage_is_written_as_parquet(registry: Any, state: dict[str, Any]) -> None:
    import pyarrow.parquet as pq
    import ray

    ray.get(registry.record_requests.remote({"org/a": [1.0, 2.0, 3.0]}))
    ray.get(registry.persist.remote())
    parts = sorted((Path(state["state_dir"]) / "usage").glob("*.parquet"))
    assert parts
    table = pq.read_table(parts[-1])
    assert table.column("model_id").to_pylist() == ["org/a"] * 3 and table.column("time").to_pylist() == [1, 2, 3]
    assert (Path(state["state_dir"]) / "catalog.json").exists()


def test_a_model_pushed_to_the_store_is_found(registry: Any, state: dict[str, Any], tiny_model_dir: Path) -> None:
    import ray

    store = ModelStore.from_config(StorageConfig.model_validate(state["storage"]), Path(state["cache_root"]))
    store.push(tiny_model_dir, "org/pushed", "v1")
    got = ray.get(registry.resolve.remote("org/pushed"))  # a miss looks in the store
    assert got["source"] == "store://org/pushed:v1" and got["profile"]["kv_bytes_per_token"] == TINY_KV_PER_TOKEN

    store.push(tiny_model_dir, "org/listed", "v7")
    ids = [m["id"] for m in ray.get(registry.list_models.remote())]
    assert ids == ["org/listed", "org/pushed"]
    assert ray.get(registry.memory_needed.remote("org/listed", 1000, 2)) == TINY_WEIGHT_BYTES + 4096 * 1000 * 2


def test_unknown_ids_raise_model_not_found_through_ray(registry: Any, tiny_model_dir: Path) -> None:
    import ray

    with pytest.raises(ModelNotFound) as info:
        ray.get(registry.resolve.remote("nobody"))
    assert "nobody" in str(info.value)
    ray.get(registry.register.remote("org/a", "v1", str(tiny_model_dir)))
    with pytest.raises(ModelVersionNotFound):
        ray.get(registry.resolve.remote("org/a", "v9"))
    with pytest.raises(ModelNotFound):
        ray.get(registry.delete.remote("nobody"))
    with pytest.raises(ModelNotFound):
        ray.get(registry.usage.remote("nobody"))


def test_deleting_the_default_version_falls_back_to_the_newest(registry: Any, tiny_model_dir: Path) -> None:
    import ray

    for v in ("v1", "v2", "v3"):
        ray.get(registry.register.remote("m", v, str(tiny_model_dir)))
    ray.get(registry.set_default.remote("m", "v2"))
    ray.get(registry.delete.remote("m", "v2"))
    assert ray.get(registry.resolve.remote("m"))["version"] == "v3"
    ray.get(registry.delete.remote("m"))
    assert ray.get(registry.list_models.remote()) == []


def test_warm_view_reports_replicas_and_tiers(registry: Any, tiny_model_dir: Path) -> None:
    import ray

    ray.get(registry.register.remote("m", "v1", str(tiny_model_dir)))
    ray.get(registry.set_replica.remote("m", "r1", "node-a", True, "v1"))
    ray.get(registry.set_replica.remote("m", "r2", "node-b", True, "v1"))
    ray.get(registry.set_replica.remote("m", "r2", "node-b", False))
    ray.get(registry.set_tiers.remote("node-a", {"m": {"ram": 100, "nvme": 100}, "other": {"ram": 5}}))
    warm = ray.get(registry.list_models.remote())[0]["warm"]
    assert [(r["replica_id"], r["node_id"], r["version"]) for r in warm["replicas"]] == [("r1", "node-a", "v1")]
    assert warm["tiers"] == {"node-a": {"ram": 100, "nvme": 100}}
    ray.get(registry.record_cache.remote("node-a", "ram", {"nvme": 100}))
    assert ray.get(registry.cache_stats.remote()) == {
        "node-a": {"ram": {"hits": 0, "misses": 1, "bytes_served": 0},
                   "nvme": {"hits": 1, "misses": 0, "bytes_served": 100}}
    }


def test_usage_is_flushed_on_its_own(ray_cluster: None, state: dict[str, Any]) -> None:
    import ray

    reg = get_or_create_registry(**{**state, "settings": {"flush_interval_s": 0.2}})
    try:
        ray.get(reg.record_requests.remote({"m": [1.0]}))
        usage_dir = Path(state["state_dir"]) / "usage"
        deadline = time.monotonic() + 60
        while not list(usage_dir.glob("part-*.parquet")):
            assert time.monotonic() < deadline, "the flush thread wrote nothing"
            time.sleep(0.2)
    finally:
        drop_registry()


def test_a_graceful_exit_saves_pending_usage(ray_cluster: None, state: dict[str, Any]) -> None:
    import ray

    slow = {**state, "settings": {"flush_interval_s": 3600}}
    reg = get_or_create_registry(**slow)
    ray.get(reg.record_requests.remote({"m": [1.0, 2.0]}))
    reg.__ray_terminate__.remote()
    wait_registry_gone()

    reg = get_or_create_registry(**slow)
    try:
        assert ray.get(reg.usage.remote("m"))["requests_total"] == 2
    finally:
        drop_registry()


def test_a_prefetch_round_prewarms_a_periodic_model_into_ram_on_the_node(ray_cluster: None, tmp_path: Path) -> None:
    import ray

    from tests.registry.conftest import HOUR, periodic, ram_store_config
    from tests.storage.conftest import random_bytes, write_model

    cfg = ram_store_config(tmp_path / "store")
    store = ModelStore.from_config(cfg, tmp_path)
    manifest = store.push(write_model(tmp_path / "src", random_bytes(2 << 20)), "org/nightly", "v1")
    store.ensure_local("org/nightly", "v1", tier="nvme")
    settings = {"sync_interval_s": 0, "miss_sync_interval_s": 0, "prefetch_interval_s": 3600}  # rounds on demand
    reg = get_or_create_registry(
        tmp_path / "registry", cfg.model_dump(mode="json"), tmp_path / "cache", settings
    )
    try:
        assert ray.get(reg.sync.remote()) == 1
        start = time.time() - 12 * HOUR + 600  # an hourly job whose next burst is ten minutes away
        ray.get(reg.record_requests.remote({"org/nightly": periodic(start)}))
        status = ray.get(reg.prefetch_now.remote(wait_s=120))
        [prewarm] = status["prewarmed"]
        [(_node, done)] = prewarm["nodes"].items()
        assert done["sources"] == {"nvme": manifest.total_bytes}
        ram = tmp_path / "store" / "ram"
        for f in manifest.files:
            assert (ram / "blobs" / f.sha256).read_bytes() == (tmp_path / "src" / f.name).read_bytes()
        hints = json.loads((ram / "hints.json").read_bytes())
        assert set(hints["keep_alive"]) == {f.sha256 for f in manifest.files}
        assert ray.get(reg.status.remote())["prefetch"]["keep_alive"][0]["model"] == "org/nightly"
        saved = json.loads((tmp_path / "registry" / "prefetch.json").read_bytes())  # the round saved them
        assert saved["org/nightly"]["histogram"]["gaps"] == len(periodic(start)) - 1
    finally:
        drop_registry()


def test_a_node_busy_prewarming_still_gets_the_rounds_hints(ray_cluster: None, tmp_path: Path) -> None:
    import ray

    from helios.registry.prefetch import Decision, NodeDispatcher, NodePlan
    from helios.storage.node_ops import alive_nodes
    from helios.storage.prefetch import PrefetchPlan
    from tests.registry.conftest import ram_store_config

    cfg = ram_store_config(tmp_path / "store")
    dispatcher = NodeDispatcher(cfg.model_dump(mode="json"), str(tmp_path / "cache"), ["nvme"])
    [node] = alive_nodes()

    @ray.remote(num_cpus=0)
    def long_prewarm() -> None:
        time.sleep(120)

    blocker = long_prewarm.remote()
    dispatcher._inflight[node] = (blocker, time.time())  # last round's prewarm, still copying
    try:
        digest = "ab" * 32
        decision = Decision(time.time(), {}, NodePlan(PrefetchPlan(), keep_alive={digest: time.time() + 600}))
        results = dispatcher.run(decision, wait_s=0)
        assert "busy_since" in results[node]
        path = tmp_path / "store" / "ram" / "hints.json"
        deadline = time.monotonic() + 60
        while not path.exists():
            assert time.monotonic() < deadline, "the busy node got no hints"
            time.sleep(0.2)
        assert set(json.loads(path.read_bytes())["keep_alive"]) == {digest}
    finally:
        ray.cancel(blocker, force=True)
