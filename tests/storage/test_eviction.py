"""Eviction policies are pure: told about inserts and hits, they return a plan (no disks, but for the
last tests, which put the cost-aware policy in a tier, in config and in the store)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from helios.config import DEFAULT_BANDWIDTH, ConfigError, StorageConfig, parse_args
from helios.storage.eviction import POLICIES, CostAwarePolicy, EvictionPolicy, LRUPolicy
from helios.storage.store import ModelStore
from helios.storage.tiers import LocalTier


@pytest.fixture(params=sorted(POLICIES))
def policy(request: pytest.FixtureRequest) -> EvictionPolicy:
    return POLICIES[request.param]()


# -- the contract every policy keeps ----------------------------------------------------


def test_plan_frees_at_least_what_is_needed(policy: EvictionPolicy) -> None:
    for i, size in enumerate([10, 20, 30, 40]):
        policy.on_insert(f"b{i}", size, now=float(i))
    victims = policy.plan(45)
    sizes = {"b0": 10, "b1": 20, "b2": 30, "b3": 40}
    assert sum(sizes[v] for v in victims) >= 45
    assert len(set(victims)) == len(victims)


def test_plan_never_names_a_protected_blob(policy: EvictionPolicy) -> None:
    for i in range(4):
        policy.on_insert(f"b{i}", 10, now=float(i))
    victims = policy.plan(1000, protected={"b0", "b2"})
    assert set(victims) == {"b1", "b3"}


def test_removed_blobs_are_forgotten(policy: EvictionPolicy) -> None:
    policy.on_insert("a", 10, 0.0)
    policy.on_insert("b", 10, 1.0)
    policy.on_remove("a")
    assert policy.known() == {"b": 10}
    assert policy.plan(10) == ["b"]


def test_nothing_needed_plans_nothing(policy: EvictionPolicy) -> None:
    policy.on_insert("a", 10, 0.0)
    assert policy.plan(0) == []


# -- LRU itself -------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_first() -> None:
    lru = LRUPolicy()
    for i in range(3):
        lru.on_insert(f"b{i}", 10, now=float(i))
    lru.on_hit("b0", now=10.0)  # b0 is now the most recent
    assert lru.plan(10) == ["b1"]
    assert lru.plan(25) == ["b1", "b2", "b0"]


# -- the cost-aware policy --------------------------------------------------------------

GB = 10**9
BW = {"ram": 10e9, "nvme": 2e9, "remote": 0.2e9}


def test_cost_policy_evicts_the_blob_cheapest_to_fetch_again_where_lru_evicts_the_oldest() -> None:
    # "small" is only on the remote (5 s/GB to refetch); "big", newer, is still on NVMe (0.5 s/GB).
    where = {"small": "remote", "big": "nvme"}
    cost = CostAwarePolicy("nvme", BW, locate=where.get)
    lru = LRUPolicy()
    for p in (cost, lru):
        p.on_insert("small", 1 * GB, now=0.0)
        p.on_insert("big", 10 * GB, now=1.0)
    assert lru.plan(1 * GB) == ["small"]
    assert cost.plan(1 * GB) == ["big"]
    assert cost.cost_s("big") < cost.cost_s("small") * 10  # 5 s for 10 GB vs 5 s for 1 GB


def test_cost_policy_keeps_often_used_blobs_over_newer_ones() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("hot", GB, now=0.0)
    for t in range(1, 5):
        cost.on_hit("hot", now=float(t))
    cost.on_insert("once", GB, now=10.0)
    assert cost.plan(GB) == ["once"]


def test_kept_alive_blobs_are_planned_last_and_only_until_their_deadline() -> None:
    clock = [0.0]
    cost = CostAwarePolicy("remote", BW, clock=lambda: clock[0])
    for i in range(3):
        cost.on_insert(f"b{i}", GB, now=0.0)
    cost.on_hit("b1", now=1.0)  # b0 is now the cheapest to lose
    cost.set_keepalive(["b0"], until=100.0)
    assert "b0" not in cost.plan(2 * GB)
    assert cost.plan(3 * GB)[-1] == "b0"  # only when nothing else frees enough
    clock[0] = 101.0
    assert cost.plan(GB) == ["b0"]


def test_kept_alive_protected_blobs_are_never_planned() -> None:
    cost = CostAwarePolicy("remote", BW)
    for i in range(3):
        cost.on_insert(f"b{i}", GB, now=0.0)
    cost.set_keepalive(["b0", "b1"], until=float("inf"))
    assert cost.plan(10 * GB, protected={"b0", "b2"}) == ["b1"]


def test_idle_hint_plans_a_blob_first_until_it_is_used_again() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("a", GB, now=0.0)
    cost.on_insert("b", GB, now=0.0)
    for t in range(5):
        cost.on_hit("b", now=float(t))
    cost.set_idle(["b"], until=float("inf"))
    assert cost.plan(GB) == ["b"]
    cost.on_hit("b", now=6.0)  # the prediction was wrong
    assert cost.plan(GB) == ["a"]


def test_inflation_rises_to_the_evicted_priority_so_new_blobs_outrank_stale_ones() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("old", GB, now=0.0)
    cost.on_hit("old", now=1.0)  # f = 2, priority 10 s/GB
    cost.on_insert("x", GB, now=2.0)  # f = 1, priority 5 s/GB
    victim = cost.plan(GB)
    assert victim == ["x"]
    evicted_priority = cost.priority("x")
    cost.on_remove("x")
    assert cost.inflation == evicted_priority
    cost.on_insert("new", GB, now=3.0)  # enters above the floor: as many uses as "old", more recent
    cost.on_hit("new", now=4.0)
    assert cost.priority("new") > cost.priority("old")
    assert cost.plan(GB) == ["old"]


def test_an_evicted_blob_that_comes_back_keeps_its_use_count() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("a", GB, now=0.0)
    for t in range(1, 4):
        cost.on_hit("a", now=float(t))
    cost.on_remove("a")
    cost.on_insert("a", GB, now=10.0)
    cost.on_insert("b", GB, now=11.0)
    assert cost.plan(GB) == ["b"]


def test_admission_refuses_a_blob_that_would_push_out_more_used_ones_until_it_is_asked_for_often() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("hot", 2 * GB, now=0.0)
    for t in range(1, 4):
        cost.on_hit("hot", now=float(t))
    assert cost.admit("newcomer", GB, need=0)  # room enough: always
    assert not cost.admit("newcomer", GB, need=GB)
    tries = 1
    while not cost.admit("newcomer", GB, need=GB):
        tries += 1
        assert tries < 10
    assert tries > 1


def test_admission_counts_uses_of_a_blob_the_tier_does_not_hold() -> None:
    """A model served from RAM is used while NVMe lacks it: those uses count when its copy is offered."""
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("resident", GB, now=0.0)
    cost.on_hit("resident", now=1.0)
    assert not cost.admit("busy", GB, need=GB)  # offered once, used twice already here
    for t in range(2, 6):
        cost.on_hit("busy", now=float(t))  # its RAM copy's uses reach this tier too
    assert cost.recent_uses("busy") > cost.recent_uses("resident")
    assert cost.admit("busy", GB, need=GB)


def test_a_past_burst_does_not_freeze_the_tier() -> None:
    """Residents' recent uses decay with the tier's accesses: 40 uses long ago do not keep out a
    blob offered now, where comparing eviction priorities (which only rise with use, while the
    inflation value stands still as long as nothing is evicted) refused it about 40 times."""
    cost = CostAwarePolicy("remote", BW, memory=2.0)
    cost.on_insert("old_burst", GB, now=0.0)
    for t in range(40):
        cost.on_hit("old_burst", now=float(t))
    for t in range(30):  # the node goes on loading other models (served from RAM, not held here)
        cost.on_hit(f"other-{t % 3}", now=100.0 + t)
    assert cost.recent_uses("old_burst") < 0.01
    assert cost.admit("new", GB, need=GB)


def test_recent_uses_survive_a_restart() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("a", GB, now=0.0)
    for t in range(3):
        cost.on_hit("a", now=float(t))
        cost.on_hit("absent", now=float(t))
    again = CostAwarePolicy("remote", BW)
    assert again.restore(cost.state())
    assert again.recent_uses("a") == pytest.approx(cost.recent_uses("a"))
    assert again.recent_uses("absent") == pytest.approx(cost.recent_uses("absent"))
    assert again.recent_uses("absent") > 2


def test_kv_blocks_neither_age_blob_counts_nor_are_free_to_push_out() -> None:
    """KV blocks share the tier: their churn does not advance the clock blobs' uses decay on (nor
    lengthen the half-life), and a block in use is weighed by its own cost, not taken as worthless."""
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("blob", GB, now=0.0)
    cost.on_hit("blob", now=1.0)
    before = cost.recent_uses("blob")
    for i in range(500):
        cost.on_insert(f"kv:{i}", 1 << 20, now=2.0)
        cost.on_hit(f"kv:{i}", now=2.0)
    assert cost.recent_uses("blob") == before
    assert cost.recent_uses("kv:0") == pytest.approx(2.0)
    kv = CostAwarePolicy("nvme", {**BW, "recompute": 1e6})  # recomputing a block is slow: it is worth keeping
    kv.on_insert("kv:hot", GB, now=0.0)
    for t in range(5):
        kv.on_hit("kv:hot", now=float(t))
    assert not kv.admit("cold-blob", GB, need=GB)


def test_a_state_saved_before_recent_uses_starts_from_the_use_counts() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("hot", GB, now=0.0)
    for t in range(6):
        cost.on_hit("hot", now=float(t))
    old_state = {k: v for k, v in cost.state().items() if k not in ("accesses", "recent")}
    again = CostAwarePolicy("remote", BW)
    assert again.restore(old_state)
    assert again.recent_uses("hot") == 7  # not zero: the first fill after an upgrade does not push it out
    assert not again.admit("newcomer", GB, need=GB)


def test_measured_bandwidth_moves_the_refetch_cost_and_small_fetches_are_ignored() -> None:
    cost = CostAwarePolicy("remote", BW)
    cost.on_insert("a", GB, now=0.0)
    before = cost.cost_s("a")
    cost.observe_bandwidth("remote", 1 << 20, 10.0)  # 1 MiB: latency, not bandwidth
    assert cost.cost_s("a") == before
    cost.observe_bandwidth("remote", 2 * GB, 1.0)  # 2 GB/s measured, 10x the configured figure
    assert cost.cost_s("a") < before


def test_lru_ignores_the_optional_hints() -> None:
    lru = LRUPolicy()
    lru.on_insert("a", 10, 0.0)
    lru.on_insert("b", 10, 1.0)
    lru.set_keepalive(["a"], until=float("inf"))
    lru.observe_bandwidth("remote", 1 << 30, 1.0)
    assert lru.admit("c", 10, need=10)
    assert lru.plan(10) == ["a"]
    assert isinstance(LRUPolicy.for_tier("nvme", BW), LRUPolicy)


# -- the policy in a tier, and in config -------------------------------------------------


def _write(tier: LocalTier, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    tier.write(digest, [data])
    return digest


def test_a_tier_with_the_cost_policy_evicts_by_use_not_by_age(tmp_path: Path) -> None:
    kib = 1024
    tiers = {name: LocalTier("nvme", tmp_path / name, capacity=3 * kib, policy=POLICIES[name]()) for name in POLICIES}
    evicted = {}
    for name, tier in tiers.items():
        hot = _write(tier, os.urandom(kib))
        for _ in range(3):
            tier.touch(hot)
        newer = _write(tier, os.urandom(kib))
        tier.touch(newer)
        once = _write(tier, os.urandom(kib))  # full now
        _write(tier, os.urandom(kib))  # one has to go
        evicted[name] = {k: tier.stat(d) is None for k, d in (("hot", hot), ("newer", newer), ("once", once))}
    assert evicted["lru"] == {"hot": True, "newer": False, "once": False}  # the least recently used
    assert evicted["cost"] == {"hot": False, "newer": False, "once": True}  # the least used


def _args(tiers: list[dict]) -> dict:
    return {"models": [{"id": "m", "source": "demo://tiny"}], "storage": {"tiers": tiers}}


def test_config_accepts_the_cost_policy_and_bandwidths_with_units() -> None:
    args = parse_args(_args([
        {"kind": "ram", "capacity": "1GiB", "eviction": "cost", "bandwidth": "8GB/s"},
        {"kind": "nvme", "capacity": "4GiB", "eviction": "cost"},
        {"kind": "remote", "url": "s3://b/p", "bandwidth": "100MB"},
    ]))
    ram, nvme, remote = args.storage.tiers
    assert (ram.eviction, ram.bytes_per_s()) == ("cost", 8 * 10**9)
    assert nvme.bytes_per_s() == DEFAULT_BANDWIDTH["nvme"]
    assert remote.bytes_per_s() == 10**8


@pytest.mark.parametrize(
    ("tier", "key"),
    [
        ({"kind": "ram", "capacity": "1GiB", "eviction": "lfu"}, "storage.tiers.0.ram.eviction"),
        ({"kind": "ram", "capacity": "1GiB", "bandwidth": "fast"}, "storage.tiers.0.ram.bandwidth"),
        ({"kind": "ram", "capacity": "1GiB", "bandwidth": "0GB/s"}, "storage.tiers.0.ram.bandwidth"),
    ],
)
def test_config_rejects_a_bad_policy_or_bandwidth_naming_the_key(tier: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(_args([tier]))
    assert key in str(info.value)


def test_store_gives_each_tier_a_policy_that_knows_where_refetches_come_from(tmp_path: Path) -> None:
    cfg = StorageConfig.model_validate({"tiers": [
        {"kind": "ram", "path": str(tmp_path / "ram"), "capacity": "1MiB", "eviction": "cost"},
        {"kind": "nvme", "path": str(tmp_path / "nvme"), "capacity": "1MiB", "eviction": "cost", "bandwidth": "3GB/s"},
        {"kind": "remote", "url": f"file://{tmp_path / 'remote'}"},
    ]})
    store = ModelStore.from_config(cfg, tmp_path)
    ram, nvme = store.local
    assert isinstance(ram.policy, CostAwarePolicy) and ram.policy.refetch_from == "nvme"
    assert nvme.policy.refetch_from == "remote" and ram.policy.bandwidths["nvme"] == 3e9
    digest = _write(ram, b"x" * 1000)
    assert store.refetch_source(ram, digest) == "remote"
    nvme.write(digest, [b"x" * 1000])
    assert store.refetch_source(ram, digest) == "nvme"
    assert ram.policy.cost_s(digest) == pytest.approx(ram.policy.latency_s + 1000 / 3e9)
