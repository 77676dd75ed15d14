"""Helios's KV connector in real vLLM engines (the tiny demo model, float32, on the CPU).

Four engines live for the whole module, each in its own process (kv_probe.py): a plain
engine (no connector: the unified reference), a prefill engine (`kv_producer`) and a
decode engine (`kv_consumer`) sharing store A, and a unified `kv_both` engine on a
separate store B, standing in for another node. Prompts are token ids, so block counts
are exact (the CPU backend's blocks hold 128 tokens).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helios.config import NodeKVTiers
from helios.engine.kv_connector import SECRET_ENV, connector_stats, fetch_blocks, kv_transfer_config
from helios.engine.kv_store import HEADER_SIZE, KVStore, KVStoreConfig
from helios.storage.node_cache import NodeCache
from tests.process_tree import kill_tree

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("kv_probe.py")
BLOCK = 128
TINY = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "kv_cache_space_gib": 1}
DECODE_TOKENS = 12
KV_SECRET = "test-cluster-secret"


def prompt(seed: int, n: int) -> list[int]:
    """`n` byte tokens, a fixed function of `seed` (no RNG: stable across versions)."""
    return [(seed * 131 + i * 37 + (i * i) % 17) % 256 for i in range(n)]


class Engine:
    """One probe process: an engine answering generate commands."""

    def __init__(self, name: str, model_dir: Path, engine: dict[str, Any], log_dir: Path) -> None:
        env = {**os.environ, SECRET_ENV: KV_SECRET}  # as Helios's replicas get the cluster's secret
        env.pop("VLLM_PLUGINS", None)
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(PROBE), str(model_dir), json.dumps(engine)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, start_new_session=True,
        )

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "READY":
                return
        raise AssertionError(f"engine {self.name} died (rc={self.proc.poll()}):\n{self.log_path.read_text()[-6000:]}")

    def generate(self, prompts: list[list[int]], max_tokens: int, params: list[dict | None] | None = None) -> list[dict]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens, "kv_transfer_params": params}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line.removeprefix("RESULT "))
        raise AssertionError(f"engine {self.name} died (rc={self.proc.poll()}):\n{self.log_path.read_text()[-6000:]}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        kill_tree(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def dirs() -> Iterator[tuple[Path, Path]]:
    ram = Path(tempfile.mkdtemp(prefix="helios-kv-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    disk = Path(tempfile.mkdtemp(prefix="helios-kv-test-"))
    yield ram, disk
    shutil.rmtree(ram, ignore_errors=True)
    shutil.rmtree(disk, ignore_errors=True)


@pytest.fixture(scope="module")
def keeper(dirs: tuple[Path, Path]) -> Iterator[NodeCache]:
    """Store B's node cache: the model cache's RAM and NVMe tiers, which B's blocks live in."""
    ram, disk = dirs
    storage = {"tiers": [{"kind": "ram", "path": str(ram / "b"), "capacity": "256MiB"},
                         {"kind": "nvme", "path": str(disk / "b"), "capacity": "1GiB"}]}
    cache = NodeCache(storage, str(disk / "cache"))
    yield cache
    cache.close()


@pytest.fixture(scope="module")
def stores(dirs: tuple[Path, Path], keeper: NodeCache) -> dict[str, KVStoreConfig]:
    """Store A (its own RAM tier in /dev/shm, NVMe tier on disk) and store B, standing in for
    another node, in that node's cache tiers (reported to its keeper from vLLM's processes)."""
    ram, disk = dirs
    return {
        "A": KVStoreConfig(root=ram / "a", ram_bytes=256 << 20, nvme_path=disk / "a", nvme_bytes=1 << 30),
        "B": KVStoreConfig(node_tiers=NodeKVTiers.model_validate(keeper.kv_endpoint())),
    }


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path, stores: dict[str, KVStoreConfig], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    logs = tmp_path_factory.mktemp("kv-engine-logs")
    local = {"server_host": "127.0.0.1"}
    specs = {
        "ref": dict(TINY),
        "prod": {**TINY, "kv_transfer_config": kv_transfer_config("kv_producer", stores["A"], instance="prod", **local)},
        "cons": {**TINY, "enable_prefix_caching": False,
                 "kv_transfer_config": kv_transfer_config("kv_consumer", stores["A"], instance="cons", **local)},
        "both": {**TINY, "enable_prefix_caching": False,
                 "kv_transfer_config": kv_transfer_config("kv_both", stores["B"], instance="both", **local)},
    }
    started: dict[str, Engine] = {}
    try:
        for name, spec in specs.items():  # one at a time: two cores do not start four engines faster
            started[name] = Engine(name, tiny_model_dir, spec, logs)
            started[name].wait_ready()
        yield started
    finally:
        for e in started.values():
            e.close()


def settled_stats(store: KVStoreConfig, instance: str, until: Any = None, timeout_s: float = 20) -> dict[str, float]:
    """An engine's counters once the node cache has taken in its last reports: they travel on the
    engine's own socket and a query comes on another, so an answer can trail the engine by a
    moment. Waits until two reads agree (and `until(stats)` holds), then returns the last."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        stats = connector_stats(store, instance)
        if (stats == last and (until is None or until(stats))) or time.monotonic() > deadline:
            return stats
        last = stats
        time.sleep(0.25)


def reference(engines: dict[str, Engine], prompts: list[list[int]], n: int = DECODE_TOKENS) -> list[list[int]]:
    return [r["tokens"] for r in engines["ref"].generate(prompts, n)]


def prefill(engines: dict[str, Engine], prompts: list[list[int]]) -> list[dict]:
    """The PD router's first leg: max_tokens=1 on the producer, asking for remote decode."""
    return engines["prod"].generate(prompts, 1, [{"do_remote_decode": True}] * len(prompts))


def test_disaggregated_output_is_token_identical_to_unified(engines: dict[str, Engine], stores: dict[str, KVStoreConfig]) -> None:
    prompts = [prompt(1, 300), prompt(2, 421), prompt(3, 640)]
    expected = reference(engines, prompts)
    first = prefill(engines, prompts)
    for p, out, want in zip(prompts, first, expected):
        assert out["tokens"] == want[:1]
        helios = out["kv_transfer_params"]["helios"]
        assert helios["num_tokens"] == len(p) // BLOCK * BLOCK
        assert helios["store"] == str(stores["A"].root) and helios["addr"].startswith("127.0.0.1:")
    before = connector_stats(stores["A"], "cons")
    decoded = engines["cons"].generate(prompts, DECODE_TOKENS, [o["kv_transfer_params"] for o in first])
    assert [d["tokens"] for d in decoded] == expected
    # Prefix caching is off on the decode engine: every cached token came through the connector.
    assert [d["num_cached_tokens"] for d in decoded] == [(len(p) - 1) // BLOCK * BLOCK for p in prompts]
    after = connector_stats(stores["A"], "cons")
    loaded = sum((len(p) - 1) // BLOCK for p in prompts)
    assert after["load_blocks"] - before.get("load_blocks", 0) == loaded
    assert after.get("recompute_fallbacks", 0) == before.get("recompute_fallbacks", 0)
    assert after.get("remote_fetches", 0) == 0  # same node, same store: nothing goes over the network


def test_separate_store_roots_fetch_from_the_producer(engines: dict[str, Engine], stores: dict[str, KVStoreConfig]) -> None:
    prompts = [prompt(4, 390), prompt(5, 515)]
    expected = reference(engines, prompts)
    first = prefill(engines, prompts)
    b = KVStore(stores["B"])
    blocks_before = b.usage()["ram"]["blocks"]
    decoded = engines["both"].generate(prompts, DECODE_TOKENS, [o["kv_transfer_params"] for o in first])
    assert [d["tokens"] for d in decoded] == expected
    assert [d["num_cached_tokens"] for d in decoded] == [(len(p) - 1) // BLOCK * BLOCK for p in prompts]
    want = sum((len(p) - 1) // BLOCK for p in prompts)
    stats = settled_stats(stores["B"], "both", lambda st: st.get("remote_fetched_blocks", 0) >= want)
    assert stats["remote_fetched_blocks"] == want
    assert stats.get("recompute_fallbacks", 0) == 0
    assert connector_stats(stores["A"], "prod")["served_bytes"] == stats["remote_fetched_bytes"]
    assert b.usage()["ram"]["blocks"] - blocks_before == stats["remote_fetched_blocks"]  # now B holds its own copy


def test_shared_prefix_is_prefilled_once_then_loaded(engines: dict[str, Engine], stores: dict[str, KVStoreConfig]) -> None:
    shared = prompt(6, 4 * BLOCK)
    prompts = [shared + prompt(7, 90), shared + prompt(8, 150), shared + prompt(9, 40)]
    expected = reference(engines, prompts)
    before = settled_stats(stores["B"], "both")
    outs = engines["both"].generate(prompts, DECODE_TOKENS)
    assert [o["tokens"] for o in outs] == expected
    # The first prompt computes the prefix; the others load all four of its blocks.
    assert [o["num_cached_tokens"] for o in outs] == [0, 4 * BLOCK, 4 * BLOCK]
    after = settled_stats(stores["B"], "both", lambda st: st.get("load_blocks", 0) - before.get("load_blocks", 0) >= 8)
    # Saved: the prefix's 4 blocks once, plus the second prompt's own 5th block.
    assert after["save_blocks"] - before.get("save_blocks", 0) == 5
    assert after["load_blocks"] - before.get("load_blocks", 0) == 8


def test_spilled_block_is_read_back_from_nvme(engines: dict[str, Engine], stores: dict[str, KVStoreConfig]) -> None:
    prompts = [prompt(10, 333)]
    expected = reference(engines, prompts)
    first = prefill(engines, prompts)
    # Another process squeezes the RAM tier to nothing: every block spills to NVMe.
    squeezer = KVStore(stores["A"].model_copy(update={"ram_bytes": 0}))
    squeezer.make_room()
    usage = squeezer.usage()
    assert usage["ram"]["blocks"] == 0 and usage["nvme"]["blocks"] >= 2
    assert squeezer.counters["spilled_blocks"] >= 2
    before = connector_stats(stores["A"], "cons")
    decoded = engines["cons"].generate(prompts, DECODE_TOKENS, [first[0]["kv_transfer_params"]])
    assert decoded[0]["tokens"] == expected[0]
    assert decoded[0]["num_cached_tokens"] == 2 * BLOCK
    after = connector_stats(stores["A"], "cons")
    assert after["hits_nvme"] - before.get("hits_nvme", 0) == 2


def test_missing_blocks_fall_back_to_recompute(engines: dict[str, Engine], stores: dict[str, KVStoreConfig]) -> None:
    prompts = [prompt(11, 470)]
    expected = reference(engines, prompts)
    first = prefill(engines, prompts)
    a = KVStore(stores["A"])
    assert a.drop(_all_keys(a)) > 0  # evicted everywhere before the decode arrives
    before = connector_stats(stores["A"], "cons")
    decoded = engines["cons"].generate(prompts, DECODE_TOKENS, [first[0]["kv_transfer_params"]])
    assert decoded[0]["tokens"] == expected[0]
    assert decoded[0]["num_cached_tokens"] == 0
    after = connector_stats(stores["A"], "cons")
    assert after["recompute_fallbacks"] - before.get("recompute_fallbacks", 0) == 1
    assert after["recompute_fallback_tokens"] - before.get("recompute_fallback_tokens", 0) == 3 * BLOCK


def _all_keys(store: KVStore) -> list[str]:
    return sorted({p.name for d in store.dirs.values() for p in (d / "blocks").glob("*/*")})


def test_a_block_fetch_without_the_secret_is_refused(engines: dict[str, Engine], stores: dict[str, KVStoreConfig]) -> None:
    """The producer's block server answers only holders of the cluster's secret (401 otherwise)."""
    prompts = [prompt(21, 300)]
    first = prefill(engines, prompts)
    remote = first[0]["kv_transfer_params"]["helios"]
    keys = sorted(p.name for p in (KVStore(stores["A"]).dirs["ram"] / "blocks").glob("*/*") if len(p.name) == 32)[:2]
    assert keys, "the producer stored no blocks"
    for wrong in ("", "not-the-secret"):
        with pytest.raises(OSError, match="HTTP 401"):
            fetch_blocks(remote["addr"], keys, timeout=10, secret=wrong)
    assert [k for k, _ in fetch_blocks(remote["addr"], keys, timeout=10, secret=KV_SECRET)]  # the right one is served


def test_a_producer_that_never_answers_costs_one_bounded_wait(engines: dict[str, Engine], stores: dict[str, KVStoreConfig]) -> None:
    """A decode whose producer accepts the connection but never answers is not held past
    `fetch_wait_s`: it recomputes, gives the reference tokens, and waits once, not per step."""
    prompts = [prompt(31, 400)]
    expected = reference(engines, prompts)
    params = prefill(engines, prompts)[0]["kv_transfer_params"]
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # listens, never accepts
        host, port = silent.getsockname()
        params = {**params, "helios": {**params["helios"], "addr": f"{host}:{port}", "node": "elsewhere"}}
        before = settled_stats(stores["B"], "both")
        decoded = engines["both"].generate(prompts, DECODE_TOKENS, [params])
    assert decoded[0]["tokens"] == expected[0]
    after = settled_stats(stores["B"], "both",
                          lambda st: st.get("remote_fetch_waits_exceeded", 0) > before.get("remote_fetch_waits_exceeded", 0))
    assert after.get("remote_fetch_waits_exceeded", 0) - before.get("remote_fetch_waits_exceeded", 0) == 1


def test_the_node_cache_keeps_an_engines_kv_in_its_ram_budget(
    engines: dict[str, Engine], stores: dict[str, KVStoreConfig], keeper: NodeCache
) -> None:
    """Store B lives in the node cache's tiers: the engine's processes report the blocks they save
    and read, and the keeper, not the engine, spills what RAM cannot hold; the engine then reads
    those blocks back from NVMe with the same tokens."""
    ram, block = keeper.tiers["ram"], 2 * 4 * 2 * 64 * 4 * BLOCK + HEADER_SIZE  # tiny: K+V, 4 layers, 2 heads
    capacity, ram.capacity = ram.capacity, 3 * block
    try:
        _spill_and_read_back(engines, stores, keeper, ram)
    finally:
        ram.capacity = capacity


def _spill_and_read_back(engines: dict[str, Engine], stores: dict[str, KVStoreConfig], keeper: NodeCache,
                         ram: Any) -> None:
    prompts = [prompt(12, 6 * BLOCK + 20)]
    expected = reference(engines, prompts)
    inserts = keeper.stats()["tiers"]["ram"]["counters"].get("inserts", 0)
    first = engines["both"].generate(prompts, DECODE_TOKENS)
    assert first[0]["tokens"] == expected[0]
    deadline = time.monotonic() + 30
    while ram.used() > ram.capacity or keeper.stats()["tiers"]["ram"]["counters"].get("inserts", 0) < inserts + 6:
        assert time.monotonic() < deadline, keeper.stats()
        time.sleep(0.1)
    stats = keeper.stats()["tiers"]
    assert stats["ram"]["kv_blocks"] <= 3 and stats["ram"]["used"] <= ram.capacity
    assert stats["nvme"]["kv_blocks"] >= 3  # spilled by the keeper, on the engine's reports
    before = settled_stats(stores["B"], "both")
    again = engines["both"].generate(prompts, DECODE_TOKENS)
    assert again[0]["tokens"] == expected[0]
    assert again[0]["num_cached_tokens"] == 6 * BLOCK
    after = settled_stats(stores["B"], "both", lambda st: st.get("hits_nvme", 0) - before.get("hits_nvme", 0) >= 3)
    assert after["hits_nvme"] - before.get("hits_nvme", 0) >= 3
    assert after["hits_nvme"] + after.get("hits_ram", 0) - before.get("hits_nvme", 0) - before.get("hits_ram", 0) == 6
