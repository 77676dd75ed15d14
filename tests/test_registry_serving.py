"""The registry behind the router: on-demand models, /v1/models, and the admin API.

One Serve app for the module, through the storage tiers (RAM, NVMe, file:// remote):
the config serves the tiny demo model; a second copy of it is pushed to the store as
another model, which becomes servable without touching the config.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests.conftest import MODEL_ID, TINY_ENGINE, local_storage, run_app, tiny_args

pytestmark = pytest.mark.integration

ADMIN = "helios-admin-test-token"
PUSHED, OTHER = "helios-pushed", "helios-pushed-two"
APP = "helios-registry-test"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-serving")


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path, root: Path, tiny_model_dir: Path) -> str:
    from ray import serve

    from helios.config import StorageConfig
    from helios.storage.store import ModelStore

    storage = local_storage(root / "tiers")
    store = ModelStore.from_config(StorageConfig.model_validate(storage), cache_root)
    store.push(tiny_model_dir, PUSHED, "v1")  # what `helios models push` does
    store.push(_variant(tiny_model_dir, root / "other"), OTHER, "v1")
    args = {
        # Two router replicas: on-demand state lives in one manager that both ask.
        **tiny_args(cache_root, admin_token=ADMIN, num_replicas=2),
        "storage": storage,
        "registry": {"state_dir": str(root / "registry"), "max_dynamic_models": 1, "start_timeout_s": 1,
                     "retry_after_s": 7, "prefetch_interval_s": 0, "defaults": {"engine": TINY_ENGINE}},
    }
    url = run_app(args, APP, serve_port)
    yield url
    for name in list(serve.status().applications):
        if name.startswith("helios-model-"):
            serve.delete(name)
    serve.delete(APP)


def _variant(src: Path, dst: Path) -> Path:
    """A copy of a model whose weights file differs in one byte (same shapes): blobs of its own."""
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return dst


def admin(base_url: str, method: str, path: str, token: str | None = ADMIN, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{base_url}/admin{path}", headers=headers, timeout=300, **kw)


def complete(base_url: str, model: str, prompt: str = "Hello, my name is") -> requests.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": True}
    return requests.post(f"{base_url}/v1/completions", json=body, timeout=300)


# -- admin auth ------------------------------------------------------------------------


def test_the_router_starts_its_on_demand_manager_before_any_on_demand_request(base_url: str) -> None:
    """The first on-demand start must not also pay for starting its manager (a Ray actor process, its
    Serve client, its imports): the router starts it with the app. Runs before any on-demand request."""
    import ray

    from helios.router.on_demand import MANAGER_NAMESPACE, MANAGER_PREFIX

    deadline = time.monotonic() + 60
    while True:
        try:
            manager = ray.get_actor(MANAGER_PREFIX + APP, namespace=MANAGER_NAMESPACE)
            break
        except ValueError:
            assert time.monotonic() < deadline, "no on-demand manager after the app started"
            time.sleep(0.5)
    assert ray.get(manager.status.remote(), timeout=30) == {"ready": [], "starting": [], "stopping": []}


def test_slower_tiers_are_filled_only_after_the_first_answer(base_url: str, root: Path, cache_root: Path) -> None:
    """The config model came from the remote into the RAM tier; its copy into NVMe (hashing and writing
    every byte) waits for the engine's first answer instead of competing with the end of its start.
    Runs before any request to the config model."""
    from helios.config import StorageConfig
    from helios.storage.store import ModelStore

    store = ModelStore.from_config(StorageConfig.model_validate(local_storage(root / "tiers")), cache_root)
    weights = next(f for f in store.resolve(MODEL_ID, "demo-tiny").files if f.name == "model.safetensors")
    nvme = root / "tiers" / "nvme"
    time.sleep(3)  # what the fill took when it began with the engine's start: it would be done by now
    assert weights.sha256 in _blobs(root / "tiers" / "ram")
    assert weights.sha256 not in _blobs(nvme)
    assert complete(base_url, MODEL_ID).status_code == 200
    deadline = time.monotonic() + 30
    while weights.sha256 not in _blobs(nvme):
        assert time.monotonic() < deadline, "the NVMe tier was not filled after the first answer"
        time.sleep(0.2)


@pytest.mark.parametrize("path", ["/registry", "/usage", "/cache"])
def test_admin_needs_its_token(base_url: str, path: str) -> None:
    assert admin(base_url, "get", path, token=None).status_code == 401
    wrong = admin(base_url, "get", path, token="sk-not-the-admin-token")
    assert wrong.status_code == 403 and wrong.json()["error"]["type"] == "permission_error"
    assert admin(base_url, "get", path).status_code == 200


def test_admin_actions_need_the_token_too(base_url: str) -> None:
    body = {"model": MODEL_ID, "min_replicas": 1, "max_replicas": 1}
    assert admin(base_url, "post", "/scale", token=None, json=body).status_code == 401
    assert admin(base_url, "post", "/scale", token="wrong", json=body).status_code == 403


# -- /v1/models ------------------------------------------------------------------------


def test_models_lists_every_registered_model_with_profile_and_warm_status(base_url: str) -> None:
    deadline = time.monotonic() + 60
    while True:  # the replica registers the config model right after its engine starts
        data = {m["id"]: m for m in requests.get(f"{base_url}/v1/models", timeout=60).json()["data"]}
        if data.get(MODEL_ID, {}).get("warm", {}).get("replicas_loaded") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {MODEL_ID, PUSHED, OTHER} <= data.keys()
    config_model = data[MODEL_ID]
    assert config_model["ready"] is True
    assert config_model["default_version"] == "demo-tiny" and config_model["versions"] == ["demo-tiny"]
    assert config_model["warm"]["replicas_loaded"] == 1
    profile = config_model["profile"]
    assert profile["dtype"] == "float32" and profile["weights_gib"] > 0 and profile["kv_bytes_per_token"] > 0
    pushed = data[PUSHED]
    assert pushed["ready"] is False and pushed["versions"] == ["v1"] and pushed["warm"]["replicas_loaded"] == 0
    assert pushed["profile"] == profile  # the same files, profiled from the store without loading them
    assert data[OTHER]["profile"] == profile  # same shapes


# -- serving a pushed model ------------------------------------------------------------


def test_pushed_model_is_served_on_demand_after_a_503(base_url: str) -> None:
    first = complete(base_url, PUSHED)
    assert first.status_code == 503, first.text  # its cold start takes longer than start_timeout_s
    assert first.headers["Retry-After"] == "7"
    assert first.json()["error"]["type"] == "service_unavailable"
    deadline = time.monotonic() + 300
    while (resp := complete(base_url, PUSHED)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(3)
    assert resp.status_code == 200, resp.text
    reference = complete(base_url, MODEL_ID)
    assert resp.json()["choices"][0]["token_ids"] == reference.json()["choices"][0]["token_ids"]
    models = {m["id"]: m for m in requests.get(f"{base_url}/v1/models", timeout=60).json()["data"]}
    assert models[PUSHED]["ready"] is True
    # Whichever router replica answers (HAProxy spreads them), it sees the one start.
    for _ in range(6):
        assert admin(base_url, "get", "/registry").json()["on_demand"]["ready"] == [PUSHED]


def test_beyond_the_on_demand_limit_is_503_with_retry_after(base_url: str) -> None:
    resp = complete(base_url, OTHER)  # max_dynamic_models=1 and PUSHED holds the slot
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "7"
    assert "max_dynamic_models" in resp.json()["error"]["message"]


def test_unknown_model_is_404(base_url: str) -> None:
    resp = complete(base_url, "no-such-model")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_usage_counts_requests(base_url: str) -> None:
    for _ in range(3):
        assert complete(base_url, MODEL_ID).status_code == 200
    time.sleep(2.5)  # the router sends usage in one batch a second
    usage = admin(base_url, "get", "/usage", params={"model": MODEL_ID}).json()
    assert usage["requests_total"] >= 3 and usage["last_used"] > time.time() - 60


# -- caches ----------------------------------------------------------------------------


def _blobs(tier_dir: Path) -> set[str]:
    return {p.name for p in (tier_dir / "blobs").iterdir()} if (tier_dir / "blobs").exists() else set()


def test_evict_then_preload_moves_blobs_between_tiers(base_url: str, root: Path) -> None:
    from helios.config import StorageConfig
    from helios.storage.store import ModelStore

    store = ModelStore.from_config(StorageConfig.model_validate(local_storage(root / "tiers")), root)
    files = store.resolve(OTHER, "v1").files
    digests = {f.sha256 for f in files}
    weights = next(f for f in files if f.name == "model.safetensors")  # its own; config and tokenizer are shared
    ram, nvme = root / "tiers" / "ram", root / "tiers" / "nvme"

    r = admin(base_url, "post", "/preload", json={"model": OTHER, "tier": "nvme"})
    assert r.status_code == 200, r.text
    assert digests <= _blobs(nvme)
    r = admin(base_url, "post", "/preload", json={"model": OTHER, "tier": "ram"})
    assert r.status_code == 200, r.text
    assert digests <= _blobs(ram)
    (node,) = r.json()["nodes"].values()
    assert node["tier"] == "ram" and node["sources"]["nvme"] >= weights.size
    assert sum(node["sources"].values()) == node["bytes"]

    cache = admin(base_url, "get", "/cache").json()["nodes"]
    (tiers,) = (n["tiers"] for n in cache.values())
    assert tiers["ram"]["models"][OTHER] == ["v1"] and tiers["ram"]["bytes"] >= node["bytes"]
    assert {"hits", "misses"} <= tiers["ram"].keys()

    r = admin(base_url, "post", "/evict", json={"model": OTHER, "tier": "ram"})
    assert r.status_code == 200, r.text
    assert weights.sha256 not in _blobs(ram)  # files PUSHED (in RAM) shares stay for it
    assert digests <= _blobs(nvme)  # only the named tier


def test_preload_of_unknown_model_is_404(base_url: str) -> None:
    r = admin(base_url, "post", "/preload", json={"model": "no-such-model", "tier": "ram"})
    assert r.status_code == 404


# -- registry edits ----------------------------------------------------------------------


def test_register_set_default_and_delete_a_version(base_url: str, root: Path, tiny_model_dir: Path) -> None:
    r = admin(base_url, "post", "/models", json={"model": OTHER, "version": "v2", "source": str(tiny_model_dir)})
    assert r.status_code == 201, r.text
    assert admin(base_url, "post", "/models/default", json={"model": OTHER, "version": "v2"}).status_code == 200
    models = {m["id"]: m for m in admin(base_url, "get", "/registry").json()["models"]}
    assert models[OTHER]["default_version"] == "v2"
    assert {v["version"] for v in models[OTHER]["versions"]} == {"v1", "v2"}
    assert admin(base_url, "delete", "/models", params={"model": OTHER, "version": "v2"}).status_code == 200
    models = {m["id"]: m for m in admin(base_url, "get", "/registry").json()["models"]}
    assert models[OTHER]["default_version"] == "v1"
    bad = admin(base_url, "post", "/models/default", json={"model": OTHER, "version": "v9"})
    assert bad.status_code == 404
    assert admin(base_url, "delete", "/models", params={"model": MODEL_ID}).status_code == 409


# -- scaling -----------------------------------------------------------------------------


def _running(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_scale_sets_the_replica_count_within_bounds(base_url: str) -> None:
    from helios.engine.deployment import deployment_name

    name = deployment_name(MODEL_ID)
    assert admin(base_url, "post", "/scale", json={"model": MODEL_ID, "min_replicas": 5, "max_replicas": 5}).status_code == 400
    r = admin(base_url, "post", "/scale", json={"model": MODEL_ID, "min_replicas": 2, "max_replicas": 2})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 300
    while _running(name) < 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert _running(name) == 2
    r = admin(base_url, "post", "/scale", json={"model": MODEL_ID, "min_replicas": 1, "max_replicas": 1})
    assert r.status_code == 200
    deadline = time.monotonic() + 120
    while _running(name) > 1 and time.monotonic() < deadline:
        time.sleep(2)
    assert _running(name) == 1


# -- deleting an on-demand model -----------------------------------------------------------


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(1)


def test_deleting_a_model_while_it_starts_undoes_the_start(base_url: str) -> None:
    from ray import serve

    from helios.router.on_demand import app_name

    def deployed(model: str) -> bool:
        return app_name(model) in serve.status().applications

    r = admin(base_url, "delete", "/models", params={"model": PUSHED})  # frees the one on-demand slot
    assert r.status_code == 200 and r.json()["stopped"] is True
    _wait(lambda: not deployed(PUSHED), 120, f"{PUSHED} still deployed after its delete")
    assert complete(base_url, PUSHED).status_code == 404  # deleted for good: the store sync does not re-add it

    first = complete(base_url, OTHER)
    assert first.status_code == 503 and "starting" in first.json()["error"]["message"], first.text
    assert OTHER in admin(base_url, "get", "/registry").json()["on_demand"]["starting"]
    r = admin(base_url, "delete", "/models", params={"model": OTHER})
    assert r.status_code == 200 and r.json()["stopped"] is True

    def start_over() -> bool:
        on_demand = admin(base_url, "get", "/registry").json()["on_demand"]
        return OTHER not in on_demand["starting"]

    _wait(start_over, 300, f"the start of {OTHER} never ended")
    on_demand = admin(base_url, "get", "/registry").json()["on_demand"]
    assert OTHER not in on_demand["ready"] and OTHER not in on_demand["stopping"]
    _wait(lambda: not deployed(OTHER), 60, f"the start of {OTHER} left its app deployed")
    assert complete(base_url, OTHER).status_code == 404
    listed = {m["id"] for m in requests.get(f"{base_url}/v1/models", timeout=60).json()["data"]}
    assert OTHER not in listed and PUSHED not in listed


def test_a_router_whose_on_demand_manager_is_gone_reaches_a_new_one(serve_port: int, root: Path) -> None:
    """A router holding a handle to a manager that exited (its app deleted, this one redeployed under
    the same name) gets one 503, then a new manager: it no longer answers 503 forever."""
    import asyncio
    import uuid

    import ray

    from helios.config import RegistryConfig
    from helios.errors import ServiceUnavailable
    from helios.router.on_demand import OnDemandClient

    client = OnDemandClient(f"gone-{uuid.uuid4().hex[:8]}", str(root), None, RegistryConfig())

    async def status() -> dict:
        return await client._call(client._manager().status.remote())

    assert asyncio.run(status()) is not None
    dead = client._manager()
    ray.kill(dead, no_restart=True)
    deadline = time.monotonic() + 30
    while True:  # ray.kill returns before the actor is gone: a call just after it may still be answered
        try:
            ray.get(dead.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed manager kept answering"
        time.sleep(0.1)
    with pytest.raises(ServiceUnavailable, match="not answering"):
        asyncio.run(status())
    deadline = time.monotonic() + 60
    while True:  # the dead manager's name is freed within moments; the next lookup creates a new one
        try:
            assert asyncio.run(status()) is not None
            break
        except ServiceUnavailable:
            assert time.monotonic() < deadline, "the router never reached a new manager"
            time.sleep(0.5)
    ray.kill(client._manager(), no_restart=True)
