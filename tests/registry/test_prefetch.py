"""The registry's prefetch rounds without Ray: usage -> plan -> blobs in the RAM tier and hints on disk."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from helios.config import StorageConfig
from helios.registry.catalog import VersionRecord
from helios.registry.core import RegistryCore, store_source
from helios.registry.usage import UsageBook, UsageLog
from helios.storage.eviction import CostAwarePolicy
from helios.storage.manifest import Manifest
from helios.storage.node_ops import apply_to_store
from helios.storage.store import ModelStore
from helios.storage.tiers import HINTS_NAME, LocalTier, read_hints, write_hints
from tests.registry.conftest import HOUR, periodic, ram_store_config
from tests.storage.conftest import random_bytes, write_model

MODEL = "org/nightly"


@pytest.fixture
def cfg(tmp_path: Path) -> StorageConfig:
    return ram_store_config(tmp_path / "store")


@pytest.fixture
def store(cfg: StorageConfig, tmp_path: Path) -> ModelStore:
    return ModelStore.from_config(cfg, tmp_path)


@pytest.fixture
def manifest(store: ModelStore, tmp_path: Path) -> Manifest:
    """A model pushed to the remote and cached on NVMe (not in RAM)."""
    m = store.push(write_model(tmp_path / "src", random_bytes(3 << 20)), MODEL, "v1")
    store.ensure_local(MODEL, "v1", tier="nvme")
    assert store.holders(m) == ["nvme", "remote"]
    return m


def registered(
    store: ModelStore, manifest: Manifest, book: UsageBook | None = None, saved: dict | None = None
) -> RegistryCore:
    core = RegistryCore(usage=book, store=store, prefetch_interval_s=30, prefetch_state=saved)
    record = VersionRecord(
        version=manifest.version, source=store_source(MODEL, manifest.version),
        manifest_digest=manifest.digest(), created=manifest.created,
    )
    core.put(MODEL, record, make_default=True)
    return core


def decide(core: RegistryCore, now: float):
    defaults, tiers, replicas = core.prefetch_inputs()
    return core.prefetch.decide(now, core.prefetch_targets(defaults, tiers), replicas)


def test_a_periodic_model_is_prewarmed_into_the_ram_tier_from_nvme(
    store: ModelStore, manifest: Manifest, cfg: StorageConfig, tmp_path: Path
) -> None:
    core = registered(store, manifest)
    start = time.time() - 12 * HOUR
    core.record_requests({MODEL: periodic(start)})
    next_burst = start + 12 * HOUR

    early = decide(core, next_burst - 1800)  # half an hour before: nothing to do yet
    assert early.cluster.plan.prewarm == [] and early.empty

    due = decide(core, next_burst - 20)
    assert [p.model_id for p in due.cluster.plan.prewarm] == [MODEL]
    assert due.cluster.plan.prewarm[0].source == "nvme"
    digests = {f.sha256 for f in manifest.files}
    assert set(due.cluster.keep_alive) == digests  # and kept alive until the burst has come
    assert all(until > next_burst for until in due.cluster.keep_alive.values())

    node = ModelStore.from_config(cfg, tmp_path)  # the node's own store, as its Ray task builds it
    result = apply_to_store(node, due.hints(), due.prewarms_for("n1", ["n1"]), core.prefetch.planner.prewarm_from,
                            report=due.report())
    assert result["tiers"] == {MODEL: "ram"}  # what the node now holds, for the next round to plan on

    ram = Path(cfg.tiers[0].path)  # type: ignore[union-attr]
    src = tmp_path / "src"
    for f in manifest.files:
        assert (ram / "blobs" / f.sha256).read_bytes() == (src / f.name).read_bytes()
    [done] = result["prewarmed"]
    assert done["sources"] == {"nvme": manifest.total_bytes}  # from NVMe, not the remote
    keep, idle = read_hints(ram / HINTS_NAME)
    assert keep == due.cluster.keep_alive and idle == {}

    status = core.prefetch.finish(due, {"n1": result}, seconds=0.5)
    assert [p["model"] for p in status["prewarmed"]] == [MODEL]
    assert status["prewarmed"][0]["nodes"]["n1"]["fetched_bytes"] == manifest.total_bytes
    assert [k["model"] for k in core.status()["prefetch"]["keep_alive"]] == [MODEL]

    after = decide(core, next_burst - 10)  # next round: the model is in RAM now, so kept alive, not fetched
    assert after.cluster.plan.prewarm == [] and set(after.cluster.keep_alive) == digests


def test_a_restarted_registry_keeps_its_histograms(store: ModelStore, manifest: Manifest, tmp_path: Path) -> None:
    first = registered(store, manifest)
    start = time.time() - 12 * HOUR
    first.record_requests({MODEL: periodic(start)})
    log = UsageLog(tmp_path / "usage")
    log.flush(first.usage)

    book = UsageBook()
    UsageLog(tmp_path / "usage").load(book)
    again = registered(store, manifest, book)
    assert again.prefetch.planner.usage[MODEL].histogram.gaps == first.prefetch.planner.usage[MODEL].histogram.gaps
    assert [p.model_id for p in decide(again, start + 12 * HOUR - 20).cluster.plan.prewarm] == [MODEL]


def test_each_node_is_planned_on_what_its_own_tiers_hold(store: ModelStore, manifest: Manifest) -> None:
    """The registry's node has the model in RAM; of two replica nodes, one has it in RAM too, the other
    only on NVMe: the second prewarms it, the first keeps it alive (the cluster-wide view alone,
    "in RAM", would prewarm it nowhere)."""
    store.ensure_local(MODEL, "v1", tier="ram")
    core = registered(store, manifest)
    start = time.time() - 12 * HOUR
    core.record_requests({MODEL: periodic(start)})
    next_burst = start + 12 * HOUR
    assert decide(core, next_burst - 20).cluster.plan.prewarm == []  # no node reported yet: the cluster-wide view

    first = decide(core, next_burst - 60)
    core.prefetch.finish(first, {"n1": {"tiers": {MODEL: "ram"}, "prewarmed": []},
                                 "n2": {"tiers": {MODEL: "nvme"}, "prewarmed": []}}, seconds=0.1)
    due = decide(core, next_burst - 20)
    assert due.prewarms_for("n1", ["n1", "n2"]) == []
    assert [m["model_id"] for m in due.prewarms_for("n2", ["n1", "n2"])] == [MODEL]
    digests = {f.sha256 for f in manifest.files}
    assert set(due.hints("n1")["keep_alive"]) == digests and set(due.hints("n2")["keep_alive"]) == digests
    status = core.prefetch.finish(due, {}, seconds=0.1)
    assert status["nodes"]["n2"]["prewarm"] == [MODEL] and status["nodes"]["n1"]["keep_alive"] == [MODEL]
    assert [p["model"] for p in status["prewarmed"]] == [MODEL]


def test_saved_histograms_outlast_the_bounded_history(store: ModelStore, manifest: Manifest, tmp_path: Path) -> None:
    """A busy model's retained history holds only its last burst; the saved histogram holds every
    burst, so the restarted registry still knows the hour between them."""
    first = registered(store, manifest, UsageBook(history=5))
    start = time.time() - 12 * HOUR
    first.record_requests({MODEL: periodic(start)})
    UsageLog(tmp_path / "usage").flush(first.usage)
    saved = json.loads(json.dumps(first.prefetch.state()))
    assert first.prefetch.state() is None  # taken: nothing new to save until the next request

    def restarted(saved: dict | None) -> RegistryCore:
        book = UsageBook(history=5)
        UsageLog(tmp_path / "usage").load(book)
        return registered(store, manifest, book, saved)

    due = start + 12 * HOUR - 20
    assert [p.model_id for p in decide(restarted(saved), due).cluster.plan.prewarm] == [MODEL]
    assert restarted(saved).prefetch.planner.usage[MODEL].histogram.gaps == len(periodic(start)) - 1
    assert restarted(None).prefetch.planner.usage[MODEL].histogram.gaps == 4  # rebuilt from the last burst
    assert decide(restarted(None), due).cluster.plan.prewarm == []  # ...which lack the long gaps


def test_batches_from_several_routers_count_every_gap(store: ModelStore, manifest: Manifest) -> None:
    core = registered(store, manifest)
    t0 = time.time() - 1
    core.record_requests({MODEL: [t0, t0 + 0.2, t0 + 0.4]})  # one router's batch...
    core.record_requests({MODEL: [t0 + 0.1, t0 + 0.3, t0 + 0.5]})  # ...and another's, for the same second
    assert core.status()["prefetch"]["pending_stamps"] == 6  # not yet settled
    decide(core, time.time() + 10)  # a round settles what is old enough
    assert core.prefetch.planner.usage[MODEL].histogram.gaps == 5
    assert core.status()["prefetch"]["dropped_stamps"] == {"future": 0, "late": 0}


def test_stamps_from_the_future_are_dropped(store: ModelStore, manifest: Manifest) -> None:
    core = registered(store, manifest)
    now = time.time()
    core.record_requests({MODEL: [now - 100, now + 3 * HOUR, now - 90]})
    usage = core.prefetch.planner.usage[MODEL]
    assert usage.last == pytest.approx(now - 90) and usage.histogram.gaps == 1
    assert core.status()["prefetch"]["dropped_stamps"]["future"] == 1


def test_a_corrupt_manifest_leaves_only_its_model_out(store: ModelStore, manifest: Manifest) -> None:
    core = registered(store, manifest)
    core.record_requests({MODEL: periodic(time.time() - 12 * HOUR), "org/broken": periodic(time.time() - 12 * HOUR)})
    defaults, tiers, _ = core.prefetch_inputs()
    broken = VersionRecord(version="v1", source=store_source("org/broken", "v1"), created=time.time())

    def resolve(model_id: str, version: str, source: str) -> Manifest:
        if model_id == "org/broken":
            Manifest.model_validate_json(b'{"not": "a manifest"}')  # raises, as a torn file would
        return core._stored_manifest(model_id, version, source)

    targets = core.prefetch.targets([*defaults, ("org/broken", broken)], tiers, resolve)
    assert list(targets) == [MODEL]


def test_a_deleted_model_leaves_the_planner(store: ModelStore, manifest: Manifest) -> None:
    core = registered(store, manifest)
    core.record_requests({MODEL: periodic(time.time() - 12 * HOUR)})
    core.delete(MODEL)
    assert MODEL not in core.prefetch.planner.usage


def test_a_node_with_the_model_only_on_the_remote_does_not_prewarm_it(
    store: ModelStore, manifest: Manifest, tmp_path: Path
) -> None:
    other = ModelStore.from_config(ram_store_config(tmp_path / "other", "lru"), tmp_path)
    other.tier("remote").put_manifest(manifest)  # shares nothing local: its NVMe is empty
    for f in manifest.files:
        other.tier("remote").write(f.sha256, [store.tier("nvme").open(f.sha256).read()])
    result = apply_to_store(other, {"keep_alive": {}, "idle": {}}, [manifest.model_dump(mode="json")])
    assert result["prewarmed"][0]["skipped"].startswith("not on")
    assert not list((tmp_path / "other" / "ram" / "blobs").iterdir())
    assert (tmp_path / "other" / "ram" / HINTS_NAME).exists()


def test_a_model_the_store_cannot_resolve_is_left_out(store: ModelStore, tmp_path: Path) -> None:
    core = RegistryCore(store=store, prefetch_interval_s=30)
    record = VersionRecord(version="local", source=str(tmp_path / "nowhere"), created=time.time())
    core.put("org/dir", record, make_default=True)
    core.record_requests({"org/dir": periodic(time.time() - 12 * HOUR)})
    defaults, tiers, _ = core.prefetch_inputs()
    assert core.prefetch_targets(defaults, tiers) == {}
    assert core.status()["prefetch"]["enabled"] is True


def test_no_ram_tier_means_no_rounds(tmp_path: Path) -> None:
    from tests.registry.conftest import store_section

    nvme_only = ModelStore.from_config(StorageConfig.model_validate(store_section(tmp_path / "s")), tmp_path)
    assert not RegistryCore(store=nvme_only, prefetch_interval_s=30).prefetch.enabled
    assert not RegistryCore(prefetch_interval_s=30).prefetch.enabled


# -- hints on disk, read by another process's tier ----------------------------------------


def blob(tier: LocalTier, fill: int) -> str:
    data = bytes([fill]) * (1 << 20)
    digest = hashlib.sha256(data).hexdigest()
    tier.write(digest, [data])
    return digest


def cost_tier(root: Path) -> LocalTier:
    """A 2 MiB RAM tier with the cost policy, as one replica process holds it."""
    return LocalTier("ram", root, 2 << 20, CostAwarePolicy("nvme"))


@pytest.mark.parametrize("hinted", [False, True])
def test_a_kept_alive_blob_outlives_a_more_used_unhinted_one(tmp_path: Path, hinted: bool) -> None:
    tier = cost_tier(tmp_path / "ram")
    cold = blob(tier, 1)
    hot = blob(tier, 2)
    for _ in range(5):
        tier.touch(hot)  # `hot` is used more: without hints, `cold` goes first
    if hinted:  # the registry, another process, writes the file; this tier reads it before evicting
        write_hints(tier.root, keep_alive={cold: time.time() + 600}, idle={})
    blob(tier, 3)
    survivor, victim = (cold, hot) if hinted else (hot, cold)
    assert tier.blob_path(survivor).read_bytes() == bytes([1 if hinted else 2]) * (1 << 20)
    assert not tier.blob_path(victim).exists()


def test_an_idle_hint_sends_a_blob_out_first(tmp_path: Path) -> None:
    tier = cost_tier(tmp_path / "ram")
    old = blob(tier, 1)
    idle = blob(tier, 2)
    for _ in range(5):
        tier.touch(idle)
    write_hints(tier.root, keep_alive={}, idle={idle: time.time() + 600})
    blob(tier, 3)
    assert tier.blob_path(old).exists() and not tier.blob_path(idle).exists()


def test_a_malformed_hints_file_is_no_hint(tmp_path: Path) -> None:
    tier = cost_tier(tmp_path / "ram")
    (tier.root / HINTS_NAME).write_text(json.dumps({"keep_alive": {"x": "soon"}, "idle": [1]}))
    assert read_hints(tier.root / HINTS_NAME) == ({}, {})
    (tier.root / HINTS_NAME).write_text("{not json")
    cold = blob(tier, 1)
    hot = blob(tier, 2)
    tier.touch(hot)
    blob(tier, 3)  # evicts as if there were no file
    assert not tier.blob_path(cold).exists() and tier.blob_path(hot).exists()
