"""The replica-choice policy without Ray: prefix and session affinity, the load bound, power of two."""

from __future__ import annotations

import random

from helios.router.routing_policy import (
    PREFIX_BLOCK_CHARS,
    PrefixAffinityPolicy,
    RoutingHints,
    hints_for,
    prefix_hashes,
    prompt_text,
    replica_load,
)

SYSTEM = "You are a helpful assistant. " * 40  # > 4 blocks


def chat(system: str, user: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_prompts_sharing_blocks_share_hashes() -> None:
    a = prefix_hashes(prompt_text(chat(SYSTEM, "what is ray?")))
    b = prefix_hashes(prompt_text(chat(SYSTEM, "tell me a story")))
    c = prefix_hashes(prompt_text(chat("Another system prompt. " * 40, "what is ray?")))
    shared = len(SYSTEM) // PREFIX_BLOCK_CHARS
    assert a[:shared] == b[:shared] and len(a) >= shared
    assert not set(a) & set(c)
    assert prefix_hashes("x" * (PREFIX_BLOCK_CHARS - 1)) == ()  # a partial block is not shared yet
    assert prompt_text({"prompt": ["first", "second"]}) == "first"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert prompt_text({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) == "<user>hi"
    assert prompt_text({"messages": "bad"}) == "" and prompt_text({}) == ""


def test_a_shared_prefix_goes_back_to_its_replica() -> None:
    policy = PrefixAffinityPolicy(rng=random.Random(0))
    loads = {"r1": 0, "r2": 0, "r3": 0}
    first = hints_for(chat(SYSTEM, "one"), None, False)
    ranks = policy.rank(loads, first)
    chosen = ranks[0][0]
    policy.record(first, chosen)
    for user in ("two", "three", "four"):
        hints = hints_for(chat(SYSTEM, user), None, False)
        assert policy.rank(loads, hints)[0] == [chosen]
        policy.record(hints, chosen)
    assert policy.matched == 3 and policy.balanced == 1


def test_affinity_gives_way_to_load_past_the_imbalance() -> None:
    policy = PrefixAffinityPolicy(imbalance=4, rng=random.Random(0))
    hints = hints_for(chat(SYSTEM, "x"), None, False)
    policy.record(hints, "r1")
    assert policy.rank({"r1": 4, "r2": 0}, hints)[0] == ["r1"]
    ranks = policy.rank({"r1": 5, "r2": 0}, hints)
    assert ranks[0] == ["r2", "r1"]  # by load: the less loaded first


def test_without_a_match_the_less_loaded_of_two_comes_first_and_every_replica_is_ranked() -> None:
    policy = PrefixAffinityPolicy(rng=random.Random(1))
    loads = {f"r{i}": i for i in range(5)}
    ranks = policy.rank(loads, RoutingHints())
    assert len(ranks[0]) == 2 and loads[ranks[0][0]] <= loads[ranks[0][1]]
    assert sorted(r for rank in ranks for r in rank) == sorted(loads)
    assert policy.rank({}, RoutingHints()) == []


def test_a_dead_replica_is_forgotten_and_sessions_stick() -> None:
    policy = PrefixAffinityPolicy(rng=random.Random(0))
    hints = hints_for({"prompt": "short", "user": "alice"}, None, True)
    assert hints.session == "alice" and hints.prefix_hashes == ()
    assert hints_for({"prompt": "short", "user": "alice"}, "s-1", True).session == "s-1"  # the header wins
    assert hints_for({"prompt": "short", "user": "alice"}, None, False).session is None
    policy.record(hints, "r2")
    assert policy.rank({"r1": 0, "r2": 1, "r3": 0}, hints)[0] == ["r2"]
    policy.forget("r2")
    assert policy.rank({"r1": 0, "r3": 0}, hints)[0] != ["r2"]
    assert policy.sessions == {} and policy.owners == {}


def test_memory_is_bounded() -> None:
    policy = PrefixAffinityPolicy(max_entries=10)
    for i in range(50):
        policy.record(RoutingHints(prefix_hashes=(i,), session=f"s{i}"), "r1")
    assert len(policy.owners) == 10 and len(policy.sessions) == 10
    assert 49 in policy.owners and 0 not in policy.owners


def test_a_report_taken_mid_request_stops_counting_what_finished_since() -> None:
    busy = {"unfinished": 1, "running": 1, "waiting": 0, "kv_cache_usage": 0.25, "at": 100.0}
    assert replica_load(0, 0, busy, finished_since_report=0) == 1 + 4 * 0.25  # nothing known to have ended
    assert replica_load(0, 0, busy, finished_since_report=1) == 0  # it ended: idle, its KV freed
    assert replica_load(1, 1, busy, finished_since_report=1) == 1 + 4 * 0.25  # ours is running there now
    many = {"unfinished": 5, "running": 3, "waiting": 2, "kv_cache_usage": 0.5}
    assert replica_load(0, None, many, finished_since_report=2) == 3 + 4 * 0.5  # other handles' requests stay
    assert replica_load(2, 4, {}, finished_since_report=0) == 4  # Serve's queue length when it knows more
