"""Autoscaling a real Serve app on load: an idle model scales to zero, the next request wakes it and is
answered correctly, queue depth scales it to two replicas, and idleness takes it back to zero.

The policy is Helios's (`helios.scaling.policy`, fed by the replicas' own load reports); the
prediction of bursts is off here, so only load moves it (its decisions are unit-tested in
tests/scaling/)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import MODEL_ID, run_app, tiny_args

pytestmark = pytest.mark.integration

APP = "helios-autoscaling"
PROMPT = "Autoscaling keeps the answer the same:"


def _replicas() -> dict[str, int]:
    from ray import serve

    from helios.engine.deployment import deployment_name

    states = serve.status().applications[APP].deployments[deployment_name(MODEL_ID)].replica_states
    return {str(getattr(state, "value", state)).lower(): n for state, n in states.items()}


def _wait(what: str, check, timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while not check(states := _replicas()):
        assert time.monotonic() < deadline, f"{what}: replicas {states}"
        time.sleep(1)
    return states


def _answer(base_url: str) -> str:
    r = requests.post(f"{base_url}/v1/completions", timeout=600,
                      json={"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def base_url(serve_port: int, cache_root: Path) -> str:
    from ray import serve

    args = tiny_args(cache_root, queue_timeout_s=600)
    args["models"][0]["deployment"] = {
        "num_replicas": 1, "min_replicas": 0, "max_replicas": 2, "idle_to_zero_s": 5, "predictive_scaling": False,
        "max_ongoing_requests": 2, "target_ongoing_requests": 1, "num_cpus": 0.5}
    url = run_app(args, APP, serve_port)
    yield url
    serve.delete(APP)


def test_zero_to_one_to_two_and_back_to_zero(base_url: str) -> None:
    expected = _answer(base_url)
    _wait("an idle model scales to zero", lambda s: s.get("running", 0) == 0 and s.get("starting", 0) == 0, 240)
    assert requests.get(f"{base_url}/readyz", timeout=30).status_code == 200  # scaled to zero is not unready
    assert _answer(base_url) == expected  # the first request after zero waits for a start, and is right

    long = {"model": MODEL_ID, "prompt": "A long story:", "max_tokens": 1500, "ignore_eos": True}
    statuses: list[int] = []
    load = [threading.Thread(target=lambda: statuses.append(
        requests.post(f"{base_url}/v1/completions", json=long, timeout=900).status_code)) for _ in range(8)]
    for t in load:
        t.start()
    _wait("queue depth scales it to two", lambda s: s.get("running", 0) + s.get("starting", 0) >= 2, 300)
    for t in load:
        t.join()
    assert statuses == [200] * 8
    _wait("idle again, back to zero", lambda s: not s.get("running", 0) and not s.get("starting", 0), 400)
