"""Helios's metrics as a real Prometheus sees them, scraping the ingress's `GET /metrics`.

A known set of requests goes through the app; then Prometheus's HTTP API must report the
same numbers: requests by status, streamed requests in the TTFT histogram, the model
cache's misses and bytes for the tiers the weights came through, and vLLM's own KV-cache
gauge per replica. Prometheus is Debian's `prometheus` (`make test` installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import TINY_ENGINE, free_port, local_storage, run_app, tiny_args

pytestmark = pytest.mark.integration

APP = "helios-metrics"
# Its own model id: the session's Ray cluster keeps exporting other modules' series under theirs.
MODEL_ID = "helios-metrics-tiny"
MISSING = "no-such-model-metrics"
# A copy of the model pushed to the store late in the module: its first request starts it on demand.
ON_DEMAND = "helios-metrics-on-demand"
DASHBOARD = Path(__file__).resolve().parents[1] / "observability" / "helios-dashboard.json"
PLAIN, STREAMED = 5, 3


@pytest.fixture(scope="module")
def app(serve_port: int, cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from ray import serve

    tiers = tmp_path_factory.mktemp("metrics-tiers")
    args = {**tiny_args(cache_root), "storage": local_storage(tiers)}
    args["models"][0]["id"] = MODEL_ID
    # Its own state dir: later modules' registries must not list its models. A request for a model
    # started on demand waits 1 s, then gets 503 (a refusal before any engine) while the start goes on.
    args["registry"] = {"state_dir": str(tiers / "registry"), "start_timeout_s": 1, "retry_after_s": 2,
                        "prefetch_interval_s": 0, "defaults": {"engine": TINY_ENGINE}}
    # With a KV store the unified engine runs Helios's KV connector (kv_both): its counters are exported too.
    # No directories of its own: its blocks live in the node cache's tiers (placement auto).
    args["models"][0]["kv_cache"] = {}
    url = run_app(args, APP, serve_port)
    yield {"url": url, "port": serve_port, "tiers": tiers, "storage": args["storage"]}
    for name in list(serve.status().applications):
        if name.startswith("helios-model-"):
            serve.delete(name)
    serve.delete(APP)


@pytest.fixture(scope="module")
def prometheus(app: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is not installed: run `make test` as root, or `apt-get install prometheus`"
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: helios\n    metrics_path: /metrics\n    static_configs: [{{targets: ['127.0.0.1:{app['port']}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(work / "prometheus.log").open("w"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prom: str, expr: str) -> list[dict]:
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def value(prom: str, expr: str) -> float | None:
    result = query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def eventually(prom: str, expr: str, expected: float, timeout_s: float = 120) -> None:
    """Ray exports every few seconds and Prometheus scrapes every second: wait for the value."""
    deadline = time.monotonic() + timeout_s
    while (got := value(prom, expr)) != expected:
        assert time.monotonic() < deadline, f"{expr} = {got}, expected {expected}"
        time.sleep(1)


@pytest.fixture(scope="module")
def traffic(app: dict, prometheus: str) -> dict:
    """The requests the tests count: plain, streamed, and one for a model nobody serves."""
    base = app["url"]
    for i in range(PLAIN):
        r = requests.post(f"{base}/v1/completions", json={"model": MODEL_ID, "prompt": f"count {i}", "max_tokens": 3},
                          timeout=120)
        assert r.status_code == 200, r.text
    for i in range(STREAMED):
        body = {"model": MODEL_ID, "prompt": f"stream {i}", "max_tokens": 4, "stream": True}
        with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=120) as r:
            assert r.status_code == 200
            assert b"[DONE]" in b"".join(r.iter_content(None))
    long = {"model": MODEL_ID, "prompt": "Blocks of KV for the connector to save. " * 10, "max_tokens": 2}
    assert requests.post(f"{base}/v1/completions", json=long, timeout=120).status_code == 200
    missing = requests.post(f"{base}/v1/completions", json={"model": MISSING, "prompt": "x"}, timeout=60)
    assert missing.status_code == 404
    return {"plain": PLAIN + 1, "streamed": STREAMED}


def test_the_ingress_serves_prometheus_text(app: dict, traffic: dict) -> None:
    r = requests.get(f"{app['url']}/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in r.text


def test_prometheus_counts_every_request_by_status(prometheus: str, traffic: dict) -> None:
    ok = f'sum(ray_helios_router_requests_total{{model="{MODEL_ID}",endpoint="/v1/completions",status="200"}})'
    eventually(prometheus, ok, traffic["plain"] + traffic["streamed"])
    eventually(prometheus, f'sum(ray_helios_router_requests_total{{model="{MISSING}",status="404"}})', 1)


def test_streamed_requests_fill_the_time_to_first_token_histogram(prometheus: str, traffic: dict) -> None:
    eventually(prometheus, f'sum(ray_helios_router_time_to_first_token_seconds_count{{model="{MODEL_ID}"}})',
               traffic["streamed"])
    eventually(prometheus, f'sum(ray_helios_router_request_duration_seconds_count{{model="{MODEL_ID}"}})',
               traffic["plain"] + traffic["streamed"])


def test_cache_counters_match_the_tiers_the_weights_came_through(prometheus: str, app: dict, traffic: dict) -> None:
    """The replica pulled every blob from the remote into RAM (each one a RAM miss), then filled NVMe."""
    ram_blobs = [p for p in (app["tiers"] / "ram" / "blobs").rglob("*") if p.is_file()]
    assert ram_blobs
    size = sum(p.stat().st_size for p in ram_blobs)
    ours = f'model="{MODEL_ID}"'
    eventually(prometheus, f'sum(ray_helios_cache_lookups_total{{{ours},tier="ram",result="miss"}})', len(ram_blobs))
    eventually(prometheus, f'sum(ray_helios_cache_read_bytes_total{{{ours},tier="remote"}})', size)
    eventually(prometheus, f'sum(ray_helios_cache_written_bytes_total{{{ours},tier="ram"}})', size)
    eventually(prometheus, f'sum(ray_helios_cache_written_bytes_total{{{ours},tier="nvme"}})', size)


def test_the_engines_kv_blocks_live_in_the_node_caches_ram_tier(app: dict, cache_root: Path, traffic: dict) -> None:
    """`kv_cache: {}` puts the connector's blocks in the model cache's RAM tier, and vLLM's engine
    processes report them to the node's keeper, which counts them against the tier's budget."""
    import ray

    from helios.config import StorageConfig
    from helios.storage.node_cache import node_cache_handle

    blocks = [p for p in (app["tiers"] / "ram" / "kv" / "blocks").rglob("*") if p.is_file()]
    assert len(blocks) >= 3  # the long prompt's full blocks, at least
    storage = StorageConfig.model_validate(local_storage(app["tiers"])).model_dump(mode="json")
    keeper = node_cache_handle(storage, str(cache_root))
    deadline = time.monotonic() + 60
    while True:
        stats = ray.get(keeper.stats.remote(), timeout=60)
        if any(".worker" in c for c in stats["clients"]):
            break
        assert time.monotonic() < deadline, f"no report from vLLM's worker process: {stats['clients']}"
        time.sleep(0.5)
    ram = stats["tiers"]["ram"]
    # Every blob the replica wrote and every block the engine saved reached the keeper as an insert.
    blobs = [p for p in (app["tiers"] / "ram" / "blobs").iterdir() if p.is_file()]
    assert ram["counters"]["inserts"] >= len(blocks) + len(blobs)
    assert ram["kv_blocks"] == len(blocks)
    assert ram["kv_bytes"] == sum(p.stat().st_size for p in blocks)
    assert ram["used"] >= ram["kv_bytes"] + sum(p.stat().st_size for p in (app["tiers"] / "ram" / "blobs").iterdir())


def test_vllms_kv_cache_gauge_is_exported_per_replica(prometheus: str, app: dict, traffic: dict) -> None:
    """vLLM's own metrics come through its Ray stat logger (Ray writes `vllm:` as `vllm_`). A gauge is
    set on engine steps (an idle engine's goes stale in Ray's export): serve one request first."""
    r = requests.post(f"{app['url']}/v1/completions", json={"model": MODEL_ID, "prompt": "gauge", "max_tokens": 2},
                      timeout=120)
    assert r.status_code == 200
    deadline = time.monotonic() + 120
    while not (series := query(prometheus, f'ray_vllm_kv_cache_usage_perc{{model_name="{MODEL_ID}"}}')):
        names = requests.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"]
        labels = [s["metric"] for s in query(prometheus, "ray_vllm_kv_cache_usage_perc")]
        assert time.monotonic() < deadline, f"no vLLM KV-cache gauge for {MODEL_ID}: {labels} {len(names)}"
        time.sleep(1)
    assert len({s["metric"].get("ReplicaId") for s in series}) == len(series) >= 1  # one series per replica
    assert all(0.0 <= float(s["value"][1]) <= 1.0 for s in series)


def test_vllms_per_request_histograms_are_exported_and_its_per_token_one_is_not(prometheus: str,
                                                                               traffic: dict) -> None:
    """vLLM's time per output token comes once per finished request; its per-token inter-token
    histogram is off by default (`observability.engine_token_latency`): Ray's agent would replay
    one value per generated token. tests/test_pd_serving.py turns it on and sees it."""
    served = traffic["plain"] + traffic["streamed"]
    expr = f'sum(ray_vllm_request_time_per_output_token_seconds_count{{model_name="{MODEL_ID}"}})'
    deadline = time.monotonic() + 120
    while (got := value(prometheus, expr) or 0) < served:
        assert time.monotonic() < deadline, f"{expr} = {got}, expected at least {served}"
        time.sleep(1)
    assert query(prometheus, f'ray_vllm_inter_token_latency_seconds_count{{model_name="{MODEL_ID}"}}') == []
    assert value(prometheus, f'sum(ray_helios_router_inter_token_latency_seconds_count{{model="{MODEL_ID}"}})')


@pytest.fixture(scope="module")
def events(app: dict, traffic: dict, cache_root: Path, tiny_model_dir: Path) -> dict:
    """What the event panels draw, caused last (the counting tests above see none of it): a model
    pushed to the store is started on demand; its first request is refused with 503 while it starts."""
    from helios.config import StorageConfig
    from helios.storage.store import ModelStore

    store = ModelStore.from_config(StorageConfig.model_validate(app["storage"]), cache_root)
    store.push(tiny_model_dir, ON_DEMAND, "v1")  # what `helios models push` does; its blobs are there already
    body = {"model": ON_DEMAND, "prompt": "on demand", "max_tokens": 3}
    statuses: list[int] = []
    deadline = time.monotonic() + 300
    while True:
        r = requests.post(f"{app['url']}/v1/completions", json=body, timeout=120)
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        # 404 until the registry lists the store again (it does so at most every 5 s), then 503 while it starts.
        assert r.status_code in (404, 503) and time.monotonic() < deadline, (statuses, r.text)
        time.sleep(2 if r.status_code == 503 else 1)
    assert 503 in statuses, statuses
    return {"refused": statuses.count(503)}


def test_every_dashboard_panel_queries_a_metric_prometheus_saw(prometheus: str, traffic: dict, events: dict) -> None:
    """The committed dashboard is drawn from series that exist: each panel names at least one that
    this module's Prometheus scraped, the KV connector's and the event panels' (refusals, on-demand
    start seconds) included."""
    from helios.observability.dashboard import _panels, promql_metric_names

    eventually(prometheus, f'sum(ray_helios_router_requests_total{{model="{MISSING}",status="404"}})', 1)
    eventually(prometheus, f'sum(ray_helios_router_rejected_requests_total{{model="{ON_DEMAND}",reason="unavailable"}})',
               events["refused"])
    eventually(prometheus, f'sum(ray_helios_router_on_demand_starts_total{{model="{ON_DEMAND}",outcome="started"}})', 1)
    eventually(prometheus, f'sum(ray_helios_router_on_demand_start_seconds_count{{model="{ON_DEMAND}"}})', 1)
    deadline = time.monotonic() + 60
    seen: set[str] = set()
    while True:
        seen = set(requests.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"])
        dashboard = json.loads(DASHBOARD.read_text())
        blind = [p["title"] for p in _panels(dashboard["panels"]) if p.get("targets")
                 and not set().union(*(promql_metric_names(t["expr"]) for t in p["targets"])) & seen]
        if not blind or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not blind, f"panels whose metrics Prometheus never saw: {blind}"
