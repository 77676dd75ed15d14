"""`router.colocate_engine`: the model's engine inside the router's replica, end to end.

Real Ray Serve (HAProxy ingress), a real vLLM CPU engine, real HTTP: the same answers as
with a separate engine deployment, with no Ray call between the router and vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import openai
import psutil
import pytest
import requests

from tests.conftest import (
    MAX_TOKENS,
    MODEL_ID,
    PROMPTS,
    check_disconnect_aborts,
    greedy_token_ids,
    local_storage,
    run_app,
    tiny_args,
)

pytestmark = pytest.mark.integration

APP = "helios-colocated"
ADMIN = "colocated-admin-token"


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path) -> str:
    from ray import serve

    args = {**tiny_args(cache_root, colocate_engine=True, admin_token=ADMIN),
            "storage": local_storage(cache_root / "tiers-colocated")}
    url = run_app(args, APP, serve_port)
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _router() -> object:
    from ray import serve

    return serve.get_deployment_handle("router", app_name=APP)


def test_the_app_is_one_deployment_whose_replica_runs_the_engine(base_url: str) -> None:
    from ray import serve

    assert set(serve.status().applications[APP].deployments) == {"router"}
    info = _router().info.remote().result(timeout_s=60)
    assert info["pid"] != os.getpid() and info["replica"]
    assert info["timings"]["load_s"] > 0 and info["timings"]["fetch_s"] > 0  # through the tiers
    names = [p.name() for p in psutil.Process(info["pid"]).children(recursive=True)]
    assert "VLLM::EngineCore" in names and "VLLM::Worker" in names


def test_greedy_output_equals_vllm(client: openai.OpenAI, vllm_reference: list[list[int]]) -> None:
    assert greedy_token_ids(client) == vllm_reference


def test_streamed_greedy_tokens_equal_vllm(base_url: str, vllm_reference: list[list[int]]) -> None:
    for i, prompt in enumerate(PROMPTS[:2]):
        body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        ids: list[int] = []
        with requests.post(f"{base_url}/v1/completions", json=body, stream=True, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
        for line in lines[:-1]:
            event = json.loads(line[6:])
            if event["choices"]:
                ids += event["choices"][0]["token_ids"]
        assert lines[-1] == b"data: [DONE]"
        assert ids == vllm_reference[i]


def test_models_readiness_and_schema(client: openai.OpenAI, base_url: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert models[0].model_extra["ready"] is True and models[0].model_extra["max_model_len"] == 2048
    ready = requests.get(f"{base_url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"] == {MODEL_ID: True}
    paths = requests.get(f"{base_url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


def test_errors_keep_their_status_and_the_replica_serving(client: openai.OpenAI, base_url: str) -> None:
    r = requests.post(f"{base_url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = requests.post(f"{base_url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": "many"},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = requests.post(f"{base_url}/v1/completions", json={"model": MODEL_ID, "prompt": "x " * 3000, "stream": True},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = requests.post(f"{base_url}/v1/completions", data=b"{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert client.completions.create(model=MODEL_ID, prompt="still here", max_tokens=3).usage.completion_tokens == 3


def test_admin_scale_names_where_the_replica_count_lives(base_url: str) -> None:
    r = requests.post(f"{base_url}/admin/scale", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                      json={"model": MODEL_ID, "min_replicas": 1, "max_replicas": 2})
    assert r.status_code == 409, r.text
    assert "colocate_engine" in r.json()["error"]["message"]


def _unfinished() -> int:
    return _router().num_unfinished_requests.remote().result(timeout_s=30)


def test_client_disconnect_aborts_the_engine_request(base_url: str) -> None:
    check_disconnect_aborts(base_url, _unfinished)


def test_a_killed_replica_comes_back_and_leaves_no_engine_process(base_url: str, client: openai.OpenAI) -> None:
    """Keep last: the replica restarts. A request the killed replica held is lost with it (HAProxy sees
    the connection drop): that is what colocating trades for the hop; see README."""
    pid = _router().info.remote().result(timeout_s=60)["pid"]
    engine = [p for p in psutil.Process(pid).children(recursive=True)
              if "VLLM::" in p.name() or "multiprocessing.forkserver" in " ".join(p.cmdline())]
    assert engine
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60  # the killed replica's watchdog SIGKILLs its engine core and worker
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine):
        assert time.monotonic() < deadline, [p.pid for p in engine if p.is_running()]
        time.sleep(0.2)
    deadline = time.monotonic() + 300
    while True:  # Serve starts a new replica, with its own engine
        try:
            new, error = _router().info.remote().result(timeout_s=30), None
        except Exception as exc:  # noqa: BLE001 - the replica is restarting
            new, error = None, exc
        if new and new["pid"] != pid:
            break
        assert time.monotonic() < deadline, f"the router replica never came back: {error!r}"
        time.sleep(1)
    resp = client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert resp.usage.completion_tokens == 5
