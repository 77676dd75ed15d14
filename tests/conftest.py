"""Shared fixtures: one Ray cluster per test session, one Serve app per integration module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TINY_ENGINE = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "kv_cache_space_gib": 1}
MODEL_ID = "helios-demo-tiny"
# What the serving modules compare with vLLM's own greedy output (`vllm_reference`).
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "Ray Serve and vLLM"]
CHATS = [[{"role": "user", "content": "Tell me a story."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]]
MAX_TOKENS = 24


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests with their own Ray cluster run first: the shared session cluster starts with the first
    module that needs it and lives to the end, and they stop every Ray process on the machine."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_cluster") else 1)


def free_port() -> int:
    """A port nothing listens on (`helios.ray_env.side_port`: not one the cluster's sockets can take first)."""
    from helios.ray_env import side_port

    return side_port()


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Helios cache for the session, so the demo model is built once."""
    return tmp_path_factory.mktemp("helios-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(cache_root: Path) -> Path:
    from helios.storage.demo_model import resolve_source

    return resolve_source("demo://tiny", cache_root)


def reference_token_ids(model_dir: Path, items: list[dict[str, Any]]) -> list[list[int]]:
    """vLLM's own greedy token ids for `items` (a prompt or messages each, with max_tokens), from its
    offline LLM (one unified engine, no connector) in a subprocess."""
    script = Path(__file__).with_name("reference_vllm.py")
    proc = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(items), json.dumps(TINY_ENGINE)],
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="session")
def vllm_reference(tiny_model_dir: Path) -> list[list[int]]:
    """vLLM's own greedy token ids for PROMPTS then CHATS."""
    items = [{"prompt": p, "max_tokens": MAX_TOKENS} for p in PROMPTS]
    items += [{"messages": m, "max_tokens": MAX_TOKENS} for m in CHATS]
    return reference_token_ids(tiny_model_dir, items)


def greedy_token_ids(client: Any) -> list[list[int]]:
    """A served app's greedy token ids for PROMPTS then CHATS (to compare with `vllm_reference`)."""
    got = []
    for prompt in PROMPTS:
        resp = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True})
        got.append(resp.choices[0].model_extra["token_ids"])
    for messages in CHATS:
        resp = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS,
                                              temperature=0, extra_body={"return_token_ids": True})
        got.append(resp.choices[0].model_extra["token_ids"])
    return got


def check_disconnect_aborts(base_url: str, unfinished: Any) -> None:
    """A client leaving a long stream mid-way leaves no request in the engine (`unfinished()` counts
    them), well before the same request run to its end would have finished."""
    import httpx
    import requests

    body = {"model": MODEL_ID, "prompt": "a long story", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: {")
        assert unfinished() == 1  # generating while we listen
        # leaving the block closes the connection mid-stream
    left = time.monotonic()
    while unfinished() and time.monotonic() < left + 30:
        time.sleep(0.05)
    aborted_s = time.monotonic() - left
    assert unfinished() == 0
    # Gone well before the 1900 tokens could have been made: the same request run to its end takes longer.
    started = time.monotonic()
    full = requests.post(f"{base_url}/v1/completions", json={**body, "stream": False}, timeout=300)
    assert full.json()["usage"]["completion_tokens"] == 1900
    assert aborted_s < (time.monotonic() - started) / 2, aborted_s


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    """A real local Ray cluster with 8 logical CPUs and Serve's HTTP proxy on a free port."""
    import ray
    from ray import serve

    from helios.ray_env import ray_cluster_env, reap_orphaned_haproxy

    reap_orphaned_haproxy()
    os.environ.update(ray_cluster_env())  # as `helios serve` starts Ray: HAProxy ingress
    # HAProxy's own stats and metrics ports, free ones so a running `make serve` cannot clash.
    os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()
    reap_orphaned_haproxy()


def tiny_args(cache_root: Path, **router: Any) -> dict[str, Any]:
    return {
        "models": [{"id": MODEL_ID, "source": "demo://tiny", "engine": TINY_ENGINE}],
        "router": router,
        "cache_root": str(cache_root),
    }


def local_storage(root: Path) -> dict[str, Any]:
    """A `storage:` section like serve_configs/local.yaml's, all under `root`: RAM, NVMe, a file:// remote."""
    return {
        "tiers": [
            {"kind": "ram", "path": str(root / "ram"), "capacity": "1GiB"},
            {"kind": "nvme", "path": str(root / "nvme"), "capacity": "4GiB"},
            {"kind": "remote", "url": f"file://{root / 'remote'}"},
        ]
    }


def wait_registry_gone(timeout_s: float = 60) -> None:
    """Wait until no actor holds the registry's name (it exited or was killed for good)."""
    from helios.registry.actor import REGISTRY_NAME, get_registry

    deadline = time.monotonic() + timeout_s
    while get_registry() is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{REGISTRY_NAME} still registered")
        time.sleep(0.2)


def drop_registry() -> None:
    """Kill the cluster's registry for good, if one runs, and wait until its name is free.

    The registry is detached and one per cluster, so without this the next module's app
    would reuse the one an earlier module started, with that module's catalog and config."""
    import ray

    from helios.registry.actor import get_registry

    handle = get_registry()
    if handle is not None:
        ray.kill(handle, no_restart=True)
        wait_registry_gone()


def run_app(args: dict[str, Any], name: str, port: int) -> str:
    """Deploy Helios as Serve app `name` at `/` with a fresh registry, and wait until /readyz
    says so; returns the base URL."""
    import requests
    from ray import serve

    from helios.app import build_app

    drop_registry()
    serve.run(build_app(args), name=name, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/readyz", timeout=10).status_code == 200:
                return base
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError("Helios did not become ready")
