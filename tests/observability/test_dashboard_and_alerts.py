"""The Grafana dashboard and Prometheus alert rules in observability/, checked without a cluster.

The rules go through Debian's real `promtool` (`check rules`, and `test rules` with unit tests
that show alerts firing and not firing); the dashboard through Grafana's own schema models
(`grafana-foundation-sdk`), with a round trip that would drop any key Grafana does not know.
Every series either file names must be one Helios, vLLM's Ray stat logger or Ray Serve
exports; the integration test of the metrics checks the same names against a real Prometheus.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helios.observability import metrics
from helios.observability.dashboard import (
    dashboard_exprs,
    dashboard_metric_names,
    promql_metric_names,
    rules_exprs,
    rules_metric_names,
)

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "observability"
DASHBOARD = OBS / "helios-dashboard.json"
RULES = OBS / "helios-alerts.yml"
RULES_TEST = OBS / "helios-alerts.test.yml"
PROMETHEUS_RULE = OBS / "helios-prometheusrule.yaml"

# vLLM's engine metrics the dashboard and rules may use, by their name in vLLM's
# PrometheusStatLogger (vllm/v1/metrics/loggers.py) and kind. vLLM's Ray stat logger
# (vllm/v1/metrics/ray_wrappers.py) turns `:` into `_`; Ray's export adds `ray_` and a
# counter's `_total`.
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
}
# Ray Serve's own metrics (ray/serve/_private/): healthy replicas per deployment (the
# controller's gauge) and replica starts (one counter series per replica, tagged `replica`).
SERVE_METRICS = {
    "serve_deployment_replica_healthy": "gauge",
    "serve_deployment_replica_starts": "counter",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _exported(name: str, kind: str) -> set[str]:
    """The series Ray's metrics export serves for one metric recorded through `ray.util.metrics`."""
    name = "ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
    if kind == "counter":
        return {name if name.endswith("_total") else name + "_total"}
    if kind == "histogram":
        return {name + suffix for suffix in HISTOGRAM_SUFFIXES}
    return {name}


def _kv_counter_names() -> list[str]:
    """The KV connector's exported counters (helios/engine/kv_metrics.py EXPORTED), read
    without importing the engine package (it loads vLLM and torch)."""
    tree = ast.parse((REPO / "helios" / "engine" / "kv_metrics.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXPORTED" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("helios/engine/kv_metrics.py has no EXPORTED")


def allowed_series() -> set[str]:
    allowed: set[str] = set()
    for metric in vars(metrics).values():
        if isinstance(metric, metrics._Metric):
            allowed |= _exported(metric.name, metric.kind.lower())
    for name in _kv_counter_names():
        allowed |= _exported(f"helios_kv_{name}_total", "counter")
    for name, kind in {**VLLM_METRICS, **SERVE_METRICS}.items():
        allowed |= _exported(name, kind)
    return allowed


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # a top-level package: found, not imported
    assert spec is not None and spec.origin is not None, f"{name} is not installed"
    return Path(spec.origin).parent


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run `make test` as root (it installs Debian's `prometheus` "
                    "package), or `apt-get install prometheus` yourself")
    return path


def _run_promtool(*args: str | Path, cwd: Path = OBS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


# -- the name extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "names"), [
    ("up", {"up"}),
    ('sum by (model) (rate(ray_x_total{model=~"$model", status=~"5.."}[$__rate_interval]))', {"ray_x_total"}),
    ("histogram_quantile(0.99, sum by (le, model) (rate(a_bucket[5m])))", {"a_bucket"}),
    ("a / on (model) group_left (role) b > bool 0.9", {"a", "b"}),
    ("sum without (instance) (a) unless ignoring (x) b or c and d", {"a", "b", "c", "d"}),
    ("max_over_time(a[30m:1m]) - a offset 30m @ start()", {"a"}),
    ('label_replace(a, "dst", "$1", "src", "(by|sum)") + count_values("v", b)', {"a", "b"}),
    ('{__name__="ns:rule:rate5m", job="x"} + vllm:thing', {"ns:rule:rate5m", "vllm:thing"}),
    ('a{label="}{ b [5m] c"} * 1e3 + 0x1F - Inf + NaN + 5m', {"a"}),
    ("topk(5, a) # the busiest\n+ b", {"a", "b"}),
    ("sum (\n  rate (a[5m])\n) by (x)", {"a"}),
    ("vector(1)", set()),
])
def test_promql_names_skip_functions_keywords_labels_and_strings(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_names_are_found_in_every_panel_and_rule(tmp_path: Path) -> None:
    dashboard = {"panels": [
        {"type": "timeseries", "targets": [{"expr": "a_total"}, {"refId": "B"}]},
        {"type": "row", "collapsed": True, "panels": [{"type": "stat", "targets": [{"expr": "rate(b[1m])"}]}]},
    ]}
    (tmp_path / "d.json").write_text(json.dumps(dashboard))
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"groups": [
        {"name": "g", "rules": [{"record": "x:y", "expr": "sum(c)"}, {"alert": "A", "expr": "d > 1"}]}]}))
    assert dashboard_metric_names(tmp_path / "d.json") == {"a_total", "b"}
    assert rules_metric_names(tmp_path / "r.yml") == {"c", "d"}


# -- the names the files use ---------------------------------------------------------------------


def test_vllm_and_serve_names_are_the_ones_their_sources_define() -> None:
    loggers = (_package_dir("vllm") / "v1" / "metrics" / "loggers.py").read_text()
    missing = [name for name in VLLM_METRICS if f'name="{name}"' not in loggers]
    serve = "".join(p.read_text() for p in (_package_dir("ray") / "serve" / "_private").glob("*.py"))
    missing += [name for name in SERVE_METRICS if f'"{name}"' not in serve]
    assert missing == []


def test_dashboard_and_rules_query_only_exported_series() -> None:
    allowed = allowed_series()
    assert dashboard_metric_names(DASHBOARD) - allowed == set()
    assert rules_metric_names(RULES) - allowed == set()


# -- the alert rules -----------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = _run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = _run_promtool("test", "rules", RULES_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    fired, quiet = set(), set()
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fired == alerts
    assert len(quiet) >= 3


def test_every_alert_has_a_severity_and_says_what_to_do() -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert len(rules_exprs(RULES)) == len(rules) >= 7
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_promtool_rejects_bad_promql(tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum by (model) (rate(ray_helios_router_requests_total[5m])"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(rules))
    result = _run_promtool("check", "rules", tmp_path / "bad.yml", cwd=tmp_path)
    assert result.returncode == 1
    assert "parse error" in result.stdout + result.stderr


def test_the_prometheus_rule_carries_the_same_rules() -> None:
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == yaml.safe_load(RULES.read_text()), (
        "observability/helios-prometheusrule.yaml's spec drifted from helios-alerts.yml: copy the rules over")


# -- the dashboard -------------------------------------------------------------------------------


def _dropped(src: Any, out: Any, path: str = "") -> list[str]:
    """Keys of `src` that the schema round trip lost."""
    lost = []
    if isinstance(src, dict):
        for key, value in src.items():
            if not isinstance(out, dict) or key not in out:
                lost.append(f"{path}/{key}")
            else:
                lost += _dropped(value, out[key], f"{path}/{key}")
    elif isinstance(src, list) and isinstance(out, list):
        for i, (a, b) in enumerate(zip(src, out, strict=False)):
            lost += _dropped(a, b, f"{path}[{i}]")
    return lost


def test_dashboard_loads_with_grafanas_schema_and_loses_no_key() -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    src = json.loads(DASHBOARD.read_text())
    out = json.loads(json.dumps(Dashboard.from_json(src), cls=JSONEncoder))
    assert _dropped(src, out) == []


def test_the_schema_check_catches_an_unknown_key() -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    src = json.loads(DASHBOARD.read_text())
    src["panels"][1]["titel"] = "typo"
    out = json.loads(json.dumps(Dashboard.from_json(src), cls=JSONEncoder))
    assert _dropped(src, out) == ["/panels[1]/titel"]


def test_dashboard_has_its_variables_and_every_panel_a_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"] == "label_values(ray_helios_router_requests_total, model)"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert [p["title"] for p in panels if not any(t.get("expr") for t in p.get("targets", []))] == []
    titles = {p["title"] for p in panels}
    for wanted in ("Request rate", "Error ratio", "Time to first token", "Inter-token latency", "Tokens per second",
                   "KV-cache use", "Queue depth", "Cache hit ratio per tier", "Cold-start seconds",
                   "Replicas per model"):
        assert wanted in titles


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query, with Grafana's variables given values."""
    def concrete(expr: str) -> str:
        return expr.replace("$__rate_interval", "5m").replace("$model", ".*")

    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"helios:dashboard_query:{i}", "expr": concrete(expr)}
        for i, expr in enumerate(dashboard_exprs(DASHBOARD))]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    result = _run_promtool("check", "rules", tmp_path / "queries.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_ships_the_dashboard_and_rules() -> None:
    kustomization = yaml.safe_load((OBS / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [PROMETHEUS_RULE.name]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [DASHBOARD.name]
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
