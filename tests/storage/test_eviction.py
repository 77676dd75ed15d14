"""Eviction policies are pure: told about inserts and hits, they return a plan (no disks here)."""

from __future__ import annotations

import pytest

from helios.storage.eviction import POLICIES, EvictionPolicy, LRUPolicy


@pytest.fixture(params=sorted(POLICIES))
def policy(request: pytest.FixtureRequest) -> EvictionPolicy:
    return POLICIES[request.param]()


# -- the contract every policy keeps ----------------------------------------------------


def test_plan_frees_at_least_what_is_needed(policy: EvictionPolicy) -> None:
    for i, size in enumerate([10, 20, 30, 40]):
        policy.on_insert(f"b{i}", size, now=float(i))
    victims = policy.plan(45)
    sizes = dict(b0=10, b1=20, b2=30, b3=40)
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
