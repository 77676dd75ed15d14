"""Metrics recorded through recorders bound to their tags once (helios.observability.metrics and
helios.engine.vllm_metrics) reach Ray's metrics export exactly as the same values recorded
through Ray's public calls (vLLM's own wrappers) do: read back from the node's Prometheus
export, as a scrape sees them."""

from __future__ import annotations

import time

import pytest
import ray
import requests

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
class Recorder:
    def record(self) -> str:
        from ray.util.metrics import Histogram
        from vllm.v1.metrics import ray_wrappers as public

        from helios.engine import vllm_metrics as bound
        from helios.observability.metrics import recorder

        for suffix, hist, gauge, counter in (
            ("bound", bound.BoundHistogram, bound.BoundGauge, bound.BoundCounter),
            ("public", public.RayHistogramWrapper, public.RayGaugeWrapper, public.RayCounterWrapper),
        ):
            h = hist(name=f"helios_t_h_{suffix}", documentation="d", labelnames=["model_name"], buckets=[0.01, 0.1])
            a, b = h.labels(model_name="a"), h.labels(model_name="b")  # vLLM labels by copying
            for value in (0.05, 0.05, 0.005):
                a.observe(value)
            b.observe(0.5)
            g = gauge(name=f"helios_t_g_{suffix}", documentation="d", labelnames=["model_name"])
            for value in (4, 4, 4, 7):
                g.labels("m").set(value)
            g.labels("n").set(1)
            c = counter(name=f"helios_t_c_{suffix}", documentation="d", labelnames=["model_name"]).labels("m")
            for value in (0, 2, 3):
                c.inc(value)
        plain = Histogram("helios_t_plain", boundaries=[1.0], tag_keys=("k",))
        rec = recorder(plain, {"k": "v"})
        rec(0.5)
        rec(2.0)
        discarded = Histogram("helios-t-bad-name", boundaries=[1.0], tag_keys=("k",))  # Ray discards it
        recorder(discarded, {"k": "v"})(0.5)  # records nothing, as Ray's public observe would
        try:
            recorder(plain, {})
        except ValueError as exc:
            return str(exc)
        return "no error"


def exported(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("ray_helios_t_")}


def series(lines: dict[str, float], suffix: str) -> dict[str, float]:
    """One flavour's series, named and tagged alike (the per-process tags dropped)."""
    import re

    out = {}
    for key, value in lines.items():
        if f"_{suffix}" not in key:
            continue
        name, _, tags = key.partition("{")
        kept = sorted(t for t in re.findall(r'(\w+)="([^"]*)"', tags) if t[0] in ("model_name", "le"))
        out[name.replace(f"_{suffix}", "") + str(kept)] = value
    return out


def test_bound_recorders_export_what_ray_public_calls_do(serve_port: int) -> None:
    error = ray.get(Recorder.remote().record.remote())
    assert "Missing value for tag key(s): k" in error  # tags are still checked, once
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, lines = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        lines = exported(port)
        if len(series(lines, "bound")) >= 13 and len(series(lines, "public")) >= 13 and \
                any(k.startswith("ray_helios_t_plain_count") for k in lines):
            break
        time.sleep(1)
    bound, public = series(lines, "bound"), series(lines, "public")
    assert bound == public
    assert bound["ray_helios_t_h_count[('model_name', 'a')]"] == 3
    assert bound["ray_helios_t_g[('model_name', 'm')]"] == 7
    assert bound["ray_helios_t_c_total[('model_name', 'm')]"] == 5
    assert [v for k, v in lines.items() if k.startswith("ray_helios_t_plain_count")] == [2]
