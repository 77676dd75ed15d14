"""Helios's request router on two real engine replicas: a shared prefix goes back to the replica that
holds it (vLLM reports the prefix as cached there); requests without one spread over both."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import MODEL_ID, run_app, tiny_args

pytestmark = pytest.mark.integration

APP = "helios-routing"
ADMIN = "routing-admin-token"
SYSTEM = "You are Helios, a careful assistant who answers in short sentences. " * 12  # ~800 bytes: 3 blocks


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path) -> str:
    from ray import serve

    args = tiny_args(cache_root, admin_token=ADMIN, breaker_failures=2, breaker_cooldown_s=600)
    model = args["models"][0]
    model["engine"] = {**model["engine"], "enable_prompt_tokens_details": True}
    model["deployment"] = {"num_replicas": 2, "num_cpus": 0.5}
    url = run_app(args, APP, serve_port)
    from ray.serve.schema import ReplicaState

    from helios.engine.deployment import deployment_name

    deadline = time.monotonic() + 300  # /readyz needs one replica: wait for both
    while True:
        deployment = serve.status().applications[APP].deployments[deployment_name(MODEL_ID)]
        if deployment.replica_states.get(ReplicaState.RUNNING, 0) == 2:
            break
        assert time.monotonic() < deadline, deployment.replica_states
        time.sleep(1)
    yield url
    serve.delete(APP)


def _chat(base_url: str, user: str) -> requests.Response:
    body = {"model": MODEL_ID, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    r = requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_cache(base_url: str) -> None:
    answers = [_chat(base_url, f"Question number {i}: what is {i} + {i}?") for i in range(6)]
    replicas = {r.headers["x-helios-replica"] for r in answers}
    assert len(replicas) == 1, replicas
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in answers]
    assert cached[0] == 0 or cached[0] is None or cached[0] < len(SYSTEM.encode()) // 2
    assert all(c >= len(SYSTEM.encode()) // 2 for c in cached[1:]), cached  # the system prompt came from cache


def test_requests_without_a_shared_prefix_use_both_replicas(base_url: str) -> None:
    seen = set()
    for i in range(24):
        r = requests.post(f"{base_url}/v1/completions", timeout=120,
                          json={"model": MODEL_ID, "prompt": f"short prompt {i}", "max_tokens": 2})
        assert r.status_code == 200
        seen.add(r.headers["x-helios-replica"])
    assert len(seen) == 2


def _infos(min_calls: int = 0, for_s: float = 0.0) -> Iterator[dict]:
    """info() of engine replicas, one call at a time through a handle, which picks the replica: at
    least `min_calls` calls back to back, or calls 20 ms apart for `for_s`. The handle routes by load
    from stats each replica reports every 2 s, so a replica whose generation just ended gets calls
    again only once its next report arrives."""
    from ray import serve

    from helios.engine.deployment import deployment_name

    handle = serve.get_deployment_handle(deployment_name(MODEL_ID), app_name=APP)
    deadline = time.monotonic() + for_s
    calls = 0
    while calls < min_calls or time.monotonic() < deadline:
        yield handle.info.remote().result(timeout_s=60)
        calls += 1
        if for_s:
            time.sleep(0.02)


def _info_of(replica: str, for_s: float = 0.0) -> dict:
    """info() of one engine replica (ask until it is the one): 200 calls at once, or for `for_s`."""
    for info in _infos(200, for_s):
        if info["replica"] == replica:
            return info
    raise AssertionError(f"never reached replica {replica}")


def test_replicas_report_the_schedulers_load_to_the_router(base_url: str) -> None:
    """What the request router weighs a replica by comes from vLLM's scheduler: while a long
    generation runs, its replica reports it running and KV-cache blocks in use; after, none."""
    body = {"model": MODEL_ID, "prompt": "a long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with requests.post(f"{base_url}/v1/completions", json=body, stream=True, timeout=120) as resp:
        assert resp.status_code == 200
        replica = resp.headers["x-helios-replica"]
        lines = resp.iter_lines()
        next(lines)
        busy = _info_of(replica)["scheduler"]
        assert busy["running"] == 1 and busy["kv_cache_usage"] > 0, busy
    deadline = time.monotonic() + 60
    while (idle := _info_of(replica, for_s=30)["scheduler"])["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert idle["running"] == 0 and idle["waiting"] == 0, idle


def _replica_pids(base_url: str) -> dict[str, int]:
    """Both engine replicas' ids and pids (each call lands on one; no prefix, so both get calls)."""
    out: dict[str, int] = {}
    for info in _infos(for_s=30):  # a replica that looked busy gets calls again after its next stats report
        out[info["replica"]] = info["pid"]
        if len(out) == 2:
            return out
    raise AssertionError(f"only saw {out}")


def test_a_failing_replica_is_skipped_once_its_breaker_opens(base_url: str) -> None:
    """Kill one replica's engine core: that replica can answer nothing until Serve replaces it. Clients
    see only 200s (the dead engine's refusal is retried on the other replica), the first request the
    router sends there opens its breaker, and the replacement is used.

    Requests go on until the router has tried the dead replica once: by load it may prefer the
    other for a while (its routing stats can still show the previous test's long generation)."""
    import psutil

    replicas = _replica_pids(base_url)
    bad = min(replicas)
    known = requests.get(f"{base_url}/admin/routing", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=30).json()["models"][MODEL_ID]["breakers"]
    assert set(known) == set(replicas), known  # the router's breakers name the replicas we kill one of
    (core,) = [p for p in psutil.Process(replicas[bad]).children(recursive=True)
               if "VLLM::EngineCore" in " ".join(p.cmdline())]
    core.kill()
    served = []
    deadline = time.monotonic() + 120
    while True:
        r = requests.post(f"{base_url}/v1/completions", timeout=120,
                          json={"model": MODEL_ID, "prompt": f"breaker {len(served)}", "max_tokens": 2})
        assert r.status_code == 200, r.text
        served.append(r.headers["x-helios-replica"])
        status = requests.get(f"{base_url}/admin/routing", headers={"Authorization": f"Bearer {ADMIN}"},
                              timeout=30).json()
        breakers = status["models"][MODEL_ID]["breakers"]
        if bad not in breakers or breakers[bad]["consecutive_failures"]:
            break
        assert time.monotonic() < deadline, (len(served), breakers)
    assert bad not in served  # (the replacement may already answer some)
    # One failure opened it (the configured count is 2), or Serve has already replaced it: then it is gone.
    assert bad not in breakers or breakers[bad] == {"state": "open", "consecutive_failures": 1}, breakers
    for i in range(6):  # an open breaker takes no requests
        r = requests.post(f"{base_url}/v1/completions", timeout=120,
                          json={"model": MODEL_ID, "prompt": f"open {i}", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-helios-replica"] != bad, r.text
    deadline = time.monotonic() + 300  # Serve's health check replaces the replica; the new one takes requests
    while True:
        seen = {requests.post(f"{base_url}/v1/completions", timeout=120,
                              json={"model": MODEL_ID, "prompt": f"after {i}", "max_tokens": 2}).headers.get(
                                  "x-helios-replica") for i in range(8)}
        if len(seen - {bad}) == 2:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(2)
    assert bad not in seen
