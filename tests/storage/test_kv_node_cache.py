"""KV blocks and model blobs in one set of tiers: one RAM budget, one policy, evicted by cost.

The keeper is the real node cache (its plain class, as the actor runs it) listening on its real
local socket; the KV store is the one vLLM's engine processes use, reporting over that socket.
Bandwidths are scaled as in benchmarks/cache_live.py (a megabyte here stands for a gigabyte), so
a blob's fixed fetch latency weighs as it does at real model sizes."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helios.config import KVStoreConfig, NodeKVTiers
from helios.engine.kv_store import HEADER_SIZE, KVStore, store_stats
from helios.storage import report_socket
from helios.storage.node_cache import NodeCache
from helios.storage.report_socket import ReportServer

KIB, MIB = 1 << 10, 1 << 20
BLOCK = 256 * KIB


def storage(root: Path, policy: str, ram: int = 8 * MIB) -> dict:
    return {
        "tiers": [
            {"kind": "ram", "path": str(root / "ram"), "capacity": ram, "eviction": policy, "bandwidth": "20MB"},
            {"kind": "nvme", "path": str(root / "nvme"), "capacity": 64 * MIB, "eviction": policy, "bandwidth": "2MB"},
            {"kind": "remote", "url": f"file://{root / 'remote'}", "bandwidth": "200KB"},
        ],
        "kv_blocks": {"recompute_bytes_per_s": "1MB"},
    }


@pytest.fixture
def keeper(tmp_path: Path):
    made: list[NodeCache] = []

    def make(policy: str = "cost", **kw) -> NodeCache:
        cache = NodeCache(storage(tmp_path, policy, **kw), str(tmp_path / "cache"))
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def blob(tier, size: int) -> str:
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    tier.write(digest, [data])
    return digest


def kv_store(cache: NodeCache, name: str = "engine") -> KVStore:
    return KVStore(KVStoreConfig(node_tiers=NodeKVTiers.model_validate(cache.kv_endpoint())), stats_name=name)


def put_blocks(store: KVStore, n: int) -> dict[str, bytes]:
    blocks = {os.urandom(16).hex(): os.urandom(BLOCK) for _ in range(n)}
    for key, data in blocks.items():
        assert store.put(key, [data], len(data)) == len(data)
    store.flush_stats()
    return blocks


def on_disk(root: Path) -> int:
    return sum(p.stat().st_size for sub in ("blobs", "kv/blocks") for p in (root / sub).rglob("*") if p.is_file())


def wait_for(what: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "the node cache did not act on the reports in time"
        time.sleep(0.05)


def kv_in(cache: NodeCache, kind: str) -> set[str]:
    return {b.digest.removeprefix("kv:") for b in cache.tiers[kind].kv_blocks()}


def read_all(store: KVStore, blocks: dict[str, bytes]) -> dict[str, str]:
    """Each block's bytes read back through the store (whichever tier holds it): tier by key."""
    tiers = {}
    for key, data in blocks.items():
        buf = bytearray(len(data))
        tiers[key] = store.read_into(key, [buf], len(data))
        assert bytes(buf) == data, f"block {key[:8]} came back different from {tiers[key]}"
    return tiers


def test_blocks_land_in_the_tier_and_the_keeper_counts_them(keeper) -> None:
    cache = keeper()
    store = kv_store(cache)
    blocks = put_blocks(store, 4)
    assert store.dirs["ram"] == cache.tiers["ram"].root / "kv"
    wait_for(lambda: cache.tiers["ram"].tracked_bytes() == 4 * (BLOCK + HEADER_SIZE))
    assert kv_in(cache, "ram") == set(blocks)
    stats = cache.stats()["tiers"]["ram"]
    assert (stats["kv_blocks"], stats["kv_bytes"], stats["blobs"]) == (4, 4 * (BLOCK + HEADER_SIZE), 0)
    assert stats["counters"]["inserts"] == 4
    read_all(store, blocks)
    store.flush_stats()
    wait_for(lambda: cache.stats()["tiers"]["ram"]["counters"].get("hits", 0) == 4)


@pytest.mark.parametrize("policy", ["cost", "lru"])
def test_a_model_blob_pushes_out_stale_kv_not_a_model_that_must_come_from_s3(keeper, policy: str) -> None:
    """RAM holds a model blob whose only other copy is on the remote, and stale KV blocks. A new
    model blob needs room: by cost the KV goes (to NVMe, seconds cheaper to read back than the
    remote); LRU, blind to cost, throws out the older model blob instead."""
    cache = keeper(policy)
    ram = cache.tiers["ram"]
    old_model = blob(ram, 3 * MIB)
    store = kv_store(cache)
    blocks = put_blocks(store, 18)  # 4.5 MiB: RAM is nearly full, under its budget
    wait_for(lambda: ram.tracked_bytes() == 3 * MIB + 18 * (BLOCK + HEADER_SIZE))
    assert not kv_in(cache, "nvme")

    new_model = blob(ram, 2 * MIB)  # a model load asks the keeper for room

    assert on_disk(ram.root) <= ram.capacity
    assert ram.stat(new_model) is not None
    tiers = read_all(store, blocks)  # nothing lost: every block is in RAM or spilled to NVMe
    if policy == "cost":
        assert ram.stat(old_model) is not None, "the blob that would come back from S3 was evicted"
        spilled = {k for k, t in tiers.items() if t == "nvme"}
        assert len(spilled) >= 2 * MIB // BLOCK - 1
        assert spilled == kv_in(cache, "nvme")
    else:
        assert ram.stat(old_model) is None
        assert not kv_in(cache, "nvme")


def test_hot_kv_outlives_a_cold_model_blob_and_its_reports_keep_ram_in_budget(keeper) -> None:
    """A model blob used once (its copy still on NVMe) and KV blocks reused every request: as new
    KV keeps coming, the keeper's evictions age the cold blob out while the hot blocks stay, and
    the KV writers never take RAM past its budget for longer than one report."""
    cache = keeper("cost")
    ram, nvme = cache.tiers["ram"], cache.tiers["nvme"]
    data = os.urandom(3 * MIB)
    cold_model = hashlib.sha256(data).hexdigest()
    nvme.write(cold_model, [data])
    ram.write(cold_model, [data])
    store = kv_store(cache)
    hot = put_blocks(store, 8)
    for _ in range(6):
        read_all(store, hot)  # a shared system prompt: every request reads these
    store.flush_stats()
    wait_for(lambda: cache.stats()["tiers"]["ram"]["counters"].get("hits", 0) == 6 * len(hot))

    for _ in range(12):  # conversations that are never continued: 4 new blocks each
        put_blocks(store, 4)
        wait_for(lambda: on_disk(ram.root) <= ram.capacity)

    assert ram.stat(cold_model) is None, "the cold model blob was kept over hot KV"
    assert nvme.stat(cold_model) is not None  # only RAM's copy went
    assert set(hot) <= kv_in(cache, "ram"), "hot KV blocks were spilled"
    assert kv_in(cache, "nvme"), "stale KV was not spilled to NVMe"
    assert cache.stats()["tiers"]["ram"]["counters"]["enforced"] >= 1


def test_without_its_keeper_a_kv_store_keeps_the_budget_itself_and_reports_again_when_back(
    keeper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_socket, "RETRY_S", 0.2)
    cache = keeper("cost", ram=2 * MIB)
    model = blob(cache.tiers["ram"], MIB)  # a model's blob holds half the tier
    endpoint = cache.kv_endpoint()
    cache.close()  # the keeper is gone (restarting): its socket with it
    store = KVStore(KVStoreConfig(node_tiers=NodeKVTiers.model_validate(endpoint)), stats_name="engine")
    put_blocks(store, 12)  # 3 MiB into a 2 MiB tier
    assert not store.reports.reachable and store.keeps_own_budget
    assert on_disk(cache.tiers["ram"].root) <= 2 * MIB  # blocks within what the blob leaves
    assert cache.tiers["ram"].stat(model) is not None  # not the KV store's to evict
    assert len(kv_in(cache, "nvme")) >= 4  # spilled by the store itself

    store.count(lookups=5)
    store.flush_stats()  # counters go to a file meanwhile
    config = KVStoreConfig(node_tiers=NodeKVTiers.model_validate(endpoint))
    assert store_stats(config, "engine")["lookups"] == 5

    back = keeper("cost", ram=2 * MIB)  # the restarted keeper takes the same socket name
    assert back.kv_endpoint()["socket"] == endpoint["socket"]
    time.sleep(0.3)
    put_blocks(store, 1)
    wait_for(lambda: back.stats()["tiers"]["ram"]["counters"].get("inserts", 0) == 1)
    assert store.reports.reachable and not store.keeps_own_budget
    store.count(lookups=1)
    store.flush_stats()
    wait_for(lambda: back.kv_stats("engine").get("engine", {}).get("lookups") == 6)
    assert store_stats(config, "engine")["lookups"] == 6  # the file's 5 is the keeper's 6 by now


def test_kv_counters_go_to_the_keeper_not_to_files(keeper) -> None:
    cache = keeper()
    config = KVStoreConfig(node_tiers=NodeKVTiers.model_validate(cache.kv_endpoint()))
    sched, worker = KVStore(config, stats_name="eng1.scheduler"), KVStore(config, stats_name="eng1.worker7")
    other = KVStore(config, stats_name="eng2.scheduler")
    sched.count(lookups=3)
    worker.count(load_blocks=2)
    other.count(lookups=10)
    blocks = put_blocks(worker, 2)  # flushes
    for store in (sched, other):
        store.flush_stats()
    wait_for(lambda: len(cache.kv_stats()) == 3)
    assert not list((sched.dirs["ram"] / "stats").glob("*.json"))  # nothing rewritten per engine step
    assert store_stats(config, "eng1.") == {"lookups": 3, "load_blocks": 2, "put_blocks": 2,
                                             "put_bytes": 2 * BLOCK}
    read_all(worker, blocks)
    worker.flush_stats()
    wait_for(lambda: cache.kv_stats("eng1.worker7")["eng1.worker7"].get("hits_ram") == 2)
    assert store_stats(config, "eng2.")["lookups"] == 10


def test_the_socket_cannot_touch_model_blobs_or_paths_outside_the_tier(keeper) -> None:
    """Any process on the host can connect: what it reports applies to well-formed KV names only."""
    import json
    import socket as sk

    cache = keeper()
    ram = cache.tiers["ram"]
    model = blob(ram, MIB)
    outside = ram.root.parent / "precious"
    outside.write_bytes(b"keep me")
    lines = [{"client": "x", "events": [["remove", "ram", model], ["insert", "ram", "kv:../../precious", 1, 0.0],
                                        ["remove", "ram", "kv:../../precious"]]},
             {"client": "x", "events": [["hit", "ram", "kv:" + "ab" * 16, 0.0]]}]
    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
        s.connect("\0" + cache.kv_endpoint()["socket"])
        s.sendall(b"".join((json.dumps(m) + "\n").encode() for m in lines))
        wait_for(lambda: cache.stats()["tiers"]["ram"]["counters"].get("hits", 0) == 1)
    assert ram.policy.tracks(model) and ram.stat(model) is not None
    assert outside.read_bytes() == b"keep me"
    assert cache.stats()["tiers"]["ram"]["counters"].get("removes", 0) == 0


def test_a_bad_report_line_is_skipped_and_the_connection_kept(tmp_path: Path) -> None:
    import socket as sk

    got: list[tuple[str, list]] = []
    server = ReportServer(f"helios-test-{os.getpid()}", lambda c, e, _: got.append((c, list(e))))
    try:
        with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
            s.connect("\0" + server.name)
            s.sendall(b"not json\n" + b'{"client": "a", "events": [["hit", "ram", "d", 1.0]]}\n')
            wait_for(lambda: len(got) == 1)
        assert got == [("a", [["hit", "ram", "d", 1.0]])] and server.dropped == 1
    finally:
        server.close()


def test_kv_read_from_nvme_comes_back_to_ram_and_its_nvme_copy_stays_tracked(keeper) -> None:
    """RAM holds 4 blocks: of 8 written, the oldest spill to NVMe. Two of them read back are
    promoted into RAM (the keeper counts the inserts and keeps RAM in budget); when newer blocks
    push them out of RAM again, their NVMe copies are kept as they are, not copied again."""
    cache = keeper("lru", ram=4 * (BLOCK + HEADER_SIZE))
    ram, nvme = cache.tiers["ram"], cache.tiers["nvme"]
    store = kv_store(cache)
    blocks = put_blocks(store, 8)
    wait_for(lambda: len(kv_in(cache, "nvme")) >= 4 and on_disk(ram.root) <= ram.capacity)
    cold = kv_in(cache, "nvme")
    assert not cold & kv_in(cache, "ram")
    pick = set(sorted(cold)[:2])
    nvme_files = {k: nvme.blob_path("kv:" + k).stat().st_ino for k in pick}

    assert set(read_all(store, {k: blocks[k] for k in pick}).values()) == {"nvme"}
    store.flush_stats()
    wait_for(lambda: pick <= kv_in(cache, "ram") and on_disk(ram.root) <= ram.capacity)
    assert store.counters["promoted_blocks"] == 2
    assert pick <= kv_in(cache, "nvme")
    assert set(read_all(store, {k: blocks[k] for k in pick}).values()) == {"ram"}
    store.flush_stats()

    newer = put_blocks(store, 4)  # the promoted blocks are now the oldest in RAM
    wait_for(lambda: not pick & kv_in(cache, "ram") and on_disk(ram.root) <= ram.capacity)
    assert {k: nvme.blob_path("kv:" + k).stat().st_ino for k in pick} == nvme_files  # left RAM by a delete
    assert pick <= kv_in(cache, "nvme")
    assert set(read_all(store, {**blocks, **newer}).values()) <= {"ram", "nvme"}  # nothing lost
