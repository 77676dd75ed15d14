"""The node-local KV block store: keys, tiers, budgets, atomicity and counters (no engine)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from helios.engine.kv_store import HEADER_SIZE, KVStore, KVStoreConfig, block_keys, namespace, read_stats

BS = 4
LAYERS = 3
SLAB = 1024  # bytes per layer per block
PAYLOAD = LAYERS * SLAB


def slabs(seed: int) -> list[np.ndarray]:
    return [np.full(SLAB, (seed * 7 + layer) % 251, dtype=np.uint8) for layer in range(LAYERS)]


def make(tmp_path: Path, **kw) -> KVStore:
    cfg = {"root": tmp_path / "ram", "ram_bytes": 1 << 20, "nvme_path": tmp_path / "nvme", "nvme_bytes": 1 << 20, **kw}
    return KVStore(KVStoreConfig(**cfg), stats_name="t")


def test_keys_chain_block_aligned_prefixes() -> None:
    ns = namespace(model="m", block_size=BS)
    a = block_keys(ns, [1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    b = block_keys(ns, [1, 2, 3, 4, 5, 6, 7, 0, 9, 9, 9, 9], BS)
    assert len(a) == 2 and len(b) == 3  # only full blocks have keys
    assert a[0] == b[0] and a[1] != b[1]  # shared first block, diverging second
    c = block_keys(ns, [0, 0, 0, 0, 5, 6, 7, 8], BS)
    assert c[1] != a[1]  # same block tokens after a different prefix: a different key
    assert block_keys(namespace(model="m", block_size=BS, dtype="bf16"), [1, 2, 3, 4], BS)[0] != a[0]
    assert block_keys(ns, list(range(100)), BS, limit=3) == block_keys(ns, list(range(12)), BS)


def test_put_then_read_into_buffers(tmp_path: Path) -> None:
    store = make(tmp_path)
    key = block_keys(namespace(m=1), [1, 2, 3, 4], BS)[0]
    assert store.put(key, slabs(1), PAYLOAD) == PAYLOAD
    files = list((tmp_path / "ram" / "blocks").rglob("*"))
    assert [f.name for f in files if f.is_file()] == [key]  # one file for all layers
    assert store.path("ram", key).stat().st_size == HEADER_SIZE + PAYLOAD
    out = [np.zeros(SLAB, dtype=np.uint8) for _ in range(LAYERS)]
    assert store.read_into(key, out, PAYLOAD) == "ram"
    assert all((o == s).all() for o, s in zip(out, slabs(1)))
    assert store.read_into("0" * 32, out, PAYLOAD) is None
    assert store.counters["hits_ram"] == 1 and store.counters["misses"] == 1


def test_shared_prefix_is_stored_once(tmp_path: Path) -> None:
    store = make(tmp_path)
    ns = namespace(m=1)
    shared = [9] * (2 * BS)
    for tail in ([1] * BS, [2] * BS):
        for i, key in enumerate(block_keys(ns, shared + tail, BS)):
            store.put(key, slabs(i), PAYLOAD)
    assert store.usage()["ram"]["blocks"] == 4  # 2 shared + 2 distinct tails
    assert store.counters["put_blocks"] == 4
    assert store.count_present(block_keys(ns, shared + [3] * BS, BS)) == 2


def test_over_budget_spills_lru_to_nvme_and_reads_back(tmp_path: Path) -> None:
    block = HEADER_SIZE + PAYLOAD
    store = make(tmp_path, ram_bytes=2 * block)
    keys = block_keys(namespace(m=1), list(range(4 * BS)), BS)
    for i, key in enumerate(keys[:2]):
        store.put(key, slabs(i), PAYLOAD)
        time.sleep(0.01)
    out = [np.zeros(SLAB, dtype=np.uint8) for _ in range(LAYERS)]
    store.read_into(keys[0], out, PAYLOAD)  # keys[0] is now more recent than keys[1]
    time.sleep(0.01)
    store.put(keys[2], slabs(2), PAYLOAD)
    # Over budget: the least recently used block (keys[1], not the re-read keys[0]) spills.
    assert [store.locate(k) for k in keys[:3]] == ["ram", "nvme", "ram"]
    time.sleep(0.01)
    store.put(keys[3], slabs(3), PAYLOAD)
    assert [store.locate(k) for k in keys] == ["nvme", "nvme", "ram", "ram"]
    usage = store.usage()
    assert usage["ram"]["bytes"] <= 2 * block and usage["nvme"]["blocks"] == 2
    assert store.counters["spilled_blocks"] == 2
    assert store.read_into(keys[1], out, PAYLOAD) == "nvme"
    assert all((o == s).all() for o, s in zip(out, slabs(1)))
    assert store.counters["hits_nvme"] == 1


def test_nvme_over_budget_evicts(tmp_path: Path) -> None:
    block = HEADER_SIZE + PAYLOAD
    store = make(tmp_path, ram_bytes=block, nvme_bytes=block)
    keys = block_keys(namespace(m=2), list(range(3 * BS)), BS)
    for i, key in enumerate(keys):
        store.put(key, slabs(i), PAYLOAD)
        time.sleep(0.01)
    assert [store.locate(k) for k in keys] == [None, "nvme", "ram"]
    assert store.counters["evicted_blocks"] == 1 and store.counters["spilled_blocks"] == 2


def test_no_nvme_tier_evicts_from_ram(tmp_path: Path) -> None:
    block = HEADER_SIZE + PAYLOAD
    store = KVStore(KVStoreConfig(root=tmp_path / "ram", ram_bytes=block))
    keys = block_keys(namespace(m=3), list(range(2 * BS)), BS)
    for i, key in enumerate(keys):
        store.put(key, slabs(i), PAYLOAD)
        time.sleep(0.01)
    assert [store.locate(k) for k in keys] == [None, "ram"]
    assert store.counters["evicted_blocks"] == 1


def test_torn_or_foreign_block_is_not_read(tmp_path: Path) -> None:
    store = make(tmp_path)
    key, other = block_keys(namespace(m=4), list(range(2 * BS)), BS)
    store.put(key, slabs(1), PAYLOAD)
    out = [np.zeros(SLAB, dtype=np.uint8) for _ in range(LAYERS)]
    with pytest.raises(OSError, match="read"):  # an engine with another layout asks for more bytes
        store.read_into(key, out + [np.zeros(8, dtype=np.uint8)], PAYLOAD + 8)
    store.path("ram", other).parent.mkdir(exist_ok=True)
    os.link(store.path("ram", key), store.path("ram", other))  # a file under the wrong key
    with pytest.raises(OSError, match="bad header"):
        store.read_into(other, out, PAYLOAD)
    assert list((tmp_path / "ram" / "tmp").iterdir()) == []  # writes leave no temporaries


def _writer(root: str, seed: int, name: str) -> None:
    store = KVStore(KVStoreConfig(root=Path(root), ram_bytes=1 << 30), stats_name=name)
    for key in block_keys(namespace(m=5), list(range(8 * BS)), BS):
        store.put(key, slabs(seed), PAYLOAD)
    store.flush_stats()


def test_processes_share_a_root(tmp_path: Path) -> None:
    """Two processes writing the same blocks at once: each block ends up whole, once."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "ram"), 1, f"w{i}")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = KVStore(KVStoreConfig(root=tmp_path / "ram"))
    assert store.usage()["ram"]["blocks"] == 8
    for key in block_keys(namespace(m=5), list(range(8 * BS)), BS):
        out = [np.zeros(SLAB, dtype=np.uint8) for _ in range(LAYERS)]
        assert store.read_into(key, out, PAYLOAD) == "ram"
    stats = read_stats(tmp_path / "ram", prefix="w")
    assert 8 <= stats["put_blocks"] <= 16  # each block written by one or both, never torn
    assert list((tmp_path / "ram" / "tmp").iterdir()) == []


def test_put_raw_round_trip_checks_the_header(tmp_path: Path) -> None:
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    key, other = block_keys(namespace(m=6), list(range(2 * BS)), BS)
    a.put(key, slabs(3), PAYLOAD)
    raw = a.read_raw(key)
    assert raw is not None and b.put_raw(key, raw) == PAYLOAD
    assert b.path("ram", key).read_bytes() == raw
    with pytest.raises(OSError, match="bad header"):
        b.put_raw(other, raw)


def test_stats_files_sum_by_prefix(tmp_path: Path) -> None:
    s1 = KVStore(KVStoreConfig(root=tmp_path), stats_name="eng1.scheduler")
    s2 = KVStore(KVStoreConfig(root=tmp_path), stats_name="eng1.worker7")
    s3 = KVStore(KVStoreConfig(root=tmp_path), stats_name="eng2.scheduler")
    s1.count(recompute_fallbacks=1)
    s2.count(load_blocks=3)
    s3.count(recompute_fallbacks=5)
    for s in (s1, s2, s3):
        s.flush_stats()
    assert read_stats(tmp_path, "eng1.") == {"recompute_fallbacks": 1, "load_blocks": 3}
    assert read_stats(tmp_path)["recompute_fallbacks"] == 6


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from helios.engine.kv_connector import HeliosConnectorConfig, kv_transfer_config  # imports vLLM

    with pytest.raises(ValueError, match=r"kv store\.ram_byts"):
        KVStoreConfig.parse({"root": str(tmp_path), "ram_byts": 1})
    with pytest.raises(ValueError, match=r"kv_connector_extra_config\.store\.nvme_bytes"):
        HeliosConnectorConfig.parse({"store": {"nvme_bytes": "lots"}})
    assert KVStoreConfig.parse({"ram_bytes": "2GiB"}).ram_bytes == 2 << 30
    cfg = kv_transfer_config("kv_both", KVStoreConfig(root=tmp_path), instance="x")
    assert cfg["kv_connector_module_path"] == "helios.engine.kv_connector" and cfg["kv_load_failure_policy"] == "recompute"
    assert HeliosConnectorConfig.parse(cfg["kv_connector_extra_config"]).store.root == tmp_path
    with pytest.raises(ValueError, match="kv_role"):
        kv_transfer_config("kv_decoder")  # type: ignore[arg-type]


@pytest.mark.parametrize("promote", [True, False])
def test_a_block_read_from_nvme_is_promoted_to_ram(tmp_path: Path, promote: bool) -> None:
    """A prefix that became hot again is read from RAM the next time; its NVMe copy stays, so
    evicting it from RAM again costs a delete. Off, the block stays where it was."""
    block = HEADER_SIZE + PAYLOAD
    store = make(tmp_path, ram_bytes=2 * block, promote_on_hit=promote)
    keys = block_keys(namespace(m=4), list(range(3 * BS)), BS)
    for i, key in enumerate(keys):
        store.put(key, slabs(i), PAYLOAD)
        time.sleep(0.01)
    assert [store.locate(k) for k in keys] == ["nvme", "ram", "ram"]
    out = [np.zeros(SLAB, dtype=np.uint8) for _ in range(LAYERS)]
    assert store.read_into(keys[0], out, PAYLOAD) == "nvme"
    assert all((o == s).all() for o, s in zip(out, slabs(0)))
    if not promote:
        assert store.locate(keys[0]) == "nvme" and "promoted_blocks" not in store.counters
        return
    assert store.path("ram", keys[0]).read_bytes() == store.path("nvme", keys[0]).read_bytes()
    assert store.counters["promoted_blocks"] == 1 and store.counters["promoted_bytes"] == PAYLOAD
    assert store.usage()["ram"]["bytes"] <= 2 * block  # the promotion made room: keys[1] spilled
    assert [store.locate(k) for k in keys] == ["ram", "nvme", "ram"]
    out = [np.zeros(SLAB, dtype=np.uint8) for _ in range(LAYERS)]
    assert store.read_into(keys[0], out, PAYLOAD) == "ram"
    assert all((o == s).all() for o, s in zip(out, slabs(0)))
