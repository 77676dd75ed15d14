"""The warm pool of engine hosts: on-demand models and scale-ups take a host that imported vLLM ahead.

One Serve app for the module, through the storage tiers, with `engine_pool.size_per_node: 1`:
the config serves the tiny demo model; a copy of it pushed to the store is started on demand.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import MODEL_ID, TINY_ENGINE, local_storage, run_app, tiny_args
from tests.otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.integration

ADMIN = "helios-pool-test-token"
PUSHED = "helios-pooled"
LAYOUT = "helios-layout-node"  # the tiny model's tensors in files of its own (no blob shared with the others)
APP = "helios-pool-test"
PROMPTS = ["Hello, my name is", "The capital of France is"]
RESERVE_GIB = 0.25


@pytest.fixture(scope="module")
def otlp() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return local_storage(tmp_path_factory.mktemp("engine-pool-tiers"))


def _store(storage: dict[str, Any], cache_root: Path) -> Any:
    from helios.config import StorageConfig
    from helios.storage.store import ModelStore

    return ModelStore.from_config(StorageConfig.model_validate(storage), cache_root, shared=False)


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
             otlp: OTLPReceiver, storage: dict[str, Any]) -> Iterator[str]:
    import shutil

    from ray import serve
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("engine-pool")
    store = _store(storage, cache_root)
    store.push(tiny_model_dir, PUSHED, "v1")
    own = root / "layout-model"  # same tensors, other file bytes: its weight blobs are its own in the tiers
    shutil.copytree(tiny_model_dir, own, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in tiny_model_dir.glob("*.safetensors"):
        save_file(load_file(f), own / f.name, metadata={"format": "pt", "helios_test": LAYOUT})
    store.push(own, LAYOUT, "v1")
    args = {
        **tiny_args(cache_root, admin_token=ADMIN),
        "storage": storage,
        "registry": {"state_dir": str(root / "registry"), "max_dynamic_models": 1, "start_timeout_s": 240,
                     "prefetch_interval_s": 0, "defaults": {"engine": {**TINY_ENGINE, "layout_cache": True}}},
        # A small memory reserve: each idle host faults it in and hands it to its engine's start.
        "engine_pool": {"size_per_node": 1, "reserve_gib": RESERVE_GIB},
        # Traced: a pooled host must adopt the replica's tracing settings (see the first test).
        "observability": {"tracing": {"endpoint": otlp.endpoint, "sample_ratio": 1.0}},
    }
    args["models"][0]["deployment"] = {"max_replicas": 2}
    # The first replica writes the weights in vLLM's layout beside the RAM tier; the scale-up maps them.
    args["models"][0]["engine"] = {**TINY_ENGINE, "layout_cache": True}
    url = run_app(args, APP, serve_port)
    yield url
    for name in list(serve.status().applications):
        if name.startswith("helios-model-"):
            serve.delete(name)
    serve.delete(APP)


def _pool() -> Any:
    import ray

    from helios.engine.pool import POOL_NAME, POOL_NAMESPACE

    return ray.get_actor(POOL_NAME, namespace=POOL_NAMESPACE)


def _wait_ready_host(timeout_s: float = 240, reserve: bool = False) -> dict[str, Any]:
    """The pool's status once this node has an idle host that has finished importing (and, with
    `reserve`, faulting in its memory reserve)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        status = ray.get(_pool().status.remote())
        node = status["nodes"].get(ray.get_runtime_context().get_node_id(), {})
        populated = max(node.get("reserve_populated_bytes") or [0])
        if node.get("ready") and (not reserve or populated >= status["reserve_bytes"]):
            return status
        assert time.monotonic() < deadline, f"no ready engine host: {status}"
        time.sleep(1)


def _tokens(base_url: str, model: str) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
        r = requests.post(f"{base_url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["token_ids"])
    return out


def _pooled(info: dict[str, Any]) -> bool:
    """A replica started in a pooled host: the host imported ahead, the start itself imported nothing."""
    return "host_pid" in info and "host_imports_ahead_s" in info["timings"] and "imports_s" not in info["timings"]


def test_an_on_demand_model_takes_a_pooled_host_and_answers_as_a_fresh_engine(base_url: str) -> None:
    from ray import serve

    from helios.router.on_demand import app_name

    before = _wait_ready_host(reserve=True)
    assert _tokens(base_url, PUSHED) == _tokens(base_url, MODEL_ID)  # same weights, same greedy tokens
    info = serve.get_app_handle(app_name(PUSHED)).info.remote().result(timeout_s=60)
    assert _pooled(info), info
    assert info["timings"]["engine_process_start_s"] >= 0 and info["timings"]["load_s"] > 0
    assert info["timings"]["host_reserve_handed_over_bytes"] > 0  # the start consumed the host's reserve
    host = psutil.Process(info["host_pid"])
    assert host.pid in [p for n in before["nodes"].values() for p in n["pids"]]
    assert any(p.name() == "VLLM::EngineCore" for p in host.children(recursive=True))


def test_a_pooled_host_traces_as_the_replica_that_took_it(base_url: str, otlp: OTLPReceiver) -> None:
    """The on-demand model's engine runs in a pooled host, which adopted the replica's tracing
    settings: the host's engine span and vLLM's own join the router's trace."""
    trace_id = "5cf92f3577b34da6a3ce929d0e0e4737"
    r = requests.post(f"{base_url}/v1/completions", timeout=300, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
                      json={"model": PUSHED, "prompt": "Traced through a pooled host", "max_tokens": 3})
    assert r.status_code == 200, r.text
    spans = {s.name: s for s in otlp.wait_for(trace_id, {"helios.request", "helios.engine.unified", "llm_request"})}
    assert spans["helios.engine.unified"].trace_id == spans["helios.request"].trace_id == trace_id


def test_the_pool_refills_after_a_host_is_taken() -> None:
    status = _wait_ready_host()
    assert status["taken"] >= 1 and status["started"] >= status["taken"] + 1


def test_a_scale_up_takes_a_pooled_host(base_url: str) -> None:
    from ray import serve

    from helios.engine.deployment import deployment_name

    _wait_ready_host()
    r = requests.post(f"{base_url}/admin/scale", json={"model": MODEL_ID, "min_replicas": 2, "max_replicas": 2},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 200, r.text
    handle = serve.get_deployment_handle(deployment_name(MODEL_ID), app_name=APP)
    deadline = time.monotonic() + 300
    infos: dict[str, dict[str, Any]] = {}
    while not any(_pooled(i) for i in infos.values()):
        assert time.monotonic() < deadline, f"no pooled replica after the scale-up: {infos}"
        for _ in range(8):
            try:
                info = handle.info.remote().result(timeout_s=30)
            except Exception:  # noqa: BLE001, S112 - a replica still starting
                continue
            infos[info["replica"]] = info
        time.sleep(1)
    pooled = next(i for i in infos.values() if _pooled(i))
    assert pooled["scheduler"]["unfinished"] == 0
    assert pooled["timings"]["layout_cache_hit"] == 1.0  # the first replica's layout blob, mapped
    assert all(i["timings"]["layout_cache_hit"] == 0.0 for i in infos.values() if not _pooled(i))
    assert _tokens(base_url, MODEL_ID) == _tokens(base_url, PUSHED)


def test_a_killed_idle_host_is_replaced_and_leaves_no_process() -> None:
    import ray

    status = _wait_ready_host()
    node = status["nodes"][ray.get_runtime_context().get_node_id()]
    host = psutil.Process(next(p for p in node["pids"] if p))
    family = [host, *host.children(recursive=True)]
    assert any("multiprocessing.forkserver" in " ".join(p.cmdline()) for p in family[1:])  # its zygote
    os.kill(host.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    deadline = time.monotonic() + 240
    while (status := ray.get(_pool().status.remote()))["replaced"] < 1:
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert host.pid not in _wait_ready_host()["nodes"][ray.get_runtime_context().get_node_id()]["pids"]


def test_a_killed_replica_takes_its_pooled_host_and_engine_with_it(base_url: str) -> None:
    from ray import serve

    from helios.router.on_demand import app_name

    info = serve.get_app_handle(app_name(PUSHED)).info.remote().result(timeout_s=60)
    assert _pooled(info)
    host = psutil.Process(info["host_pid"])
    family = [host, *host.children(recursive=True)]
    assert any(p.name() == "VLLM::EngineCore" for p in family)
    os.kill(info["pid"], signal.SIGKILL)  # the replica
    _, alive = psutil.wait_procs(family, timeout=30)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def _admin(method: str, base_url: str, path: str, **kw: Any) -> Any:
    r = requests.request(method, f"{base_url}/admin/{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300,
                         **kw)
    assert r.status_code in (200, 201), r.text
    return r.json()


def _info(model: str) -> dict[str, Any]:
    from ray import serve

    from helios.router.on_demand import app_name

    return serve.get_app_handle(app_name(model)).info.remote().result(timeout_s=60)


def test_a_node_that_never_held_a_model_maps_its_layout_blob_from_the_remote_tier(
    base_url: str, storage: dict[str, Any], cache_root: Path
) -> None:
    """The first start anywhere loads the checkpoint, writes the weights in vLLM's layout and pushes that
    blob to the remote tier; a start on a node holding neither (the model evicted, the blob removed)
    fetches the blob instead of the checkpoint's weights, maps it, and answers the same."""
    from helios.storage.loader import MappedSafetensors
    from helios.storage.manifest import snapshot_digest
    from helios.storage.store import LAYOUT_CACHE_PREFIX

    _admin("DELETE", base_url, "models", params={"model": PUSHED})  # frees the one on-demand slot
    _wait_ready_host()
    expected = _tokens(base_url, MODEL_ID)
    assert _tokens(base_url, LAYOUT) == expected
    first = _info(LAYOUT)
    assert first["timings"]["layout_cache_hit"] == 0.0 and "layout_fetch_s" not in first["timings"]
    deadline = time.monotonic() + 300
    while (state := _info(LAYOUT).get("layout_share")) == "pending":
        assert time.monotonic() < deadline, "the layout blob was never pushed"
        time.sleep(1)
    assert state == "pushed"
    store = _store(storage, cache_root)
    manifest = store.resolve(LAYOUT, "v1")
    [derived] = [p for p in (store.local[0].root / "derived").glob("*.safetensors")
                 if MappedSafetensors(p).metadata.get("model_digest") == snapshot_digest(manifest.to_json())]
    [shared] = [m for m in store.tiers[-1].manifests() if m.model_id.startswith(f"{LAYOUT_CACHE_PREFIX}/")
                and [f.name for f in m.files] == [derived.name]]
    assert shared.files[0].sha256 == hashlib.sha256(derived.read_bytes()).hexdigest()  # pushed whole
    assert shared.model_id not in {m.model_id for m in store.models()}  # an artefact, not a model to serve

    # Another node: neither the model's blobs nor its layout blob are local.
    _admin("DELETE", base_url, "models", params={"model": LAYOUT})
    _admin("POST", base_url, "models", json={"model": LAYOUT, "version": "v1"})
    _admin("POST", base_url, "evict", json={"model": LAYOUT})
    assert not derived.exists()  # an evicted model's derived blobs go with it
    weights = [f for f in manifest.files if f.name.endswith(".safetensors")]
    assert all(store.local[0].stat(f.sha256) is None and store.local[1].stat(f.sha256) is None for f in weights)
    _wait_ready_host()
    assert _tokens(base_url, LAYOUT) == expected
    info = _info(LAYOUT)
    assert _pooled(info), info
    assert info["timings"]["layout_cache_hit"] == 1.0 and info["timings"]["layout_fetch_s"] > 0, info["timings"]
    assert info["timings"]["fetch_s"] >= info["timings"]["layout_fetch_s"]
    assert derived.stat().st_size == shared.total_bytes  # back, from the remote tier
    # The checkpoint's weights were never fetched: no local tier holds them.
    assert all(store.local[0].stat(f.sha256) is None and store.local[1].stat(f.sha256) is None for f in weights)
    assert info.get("layout_share") in ("pending", "present")
