"""Keep-alive and prefetch planning from inter-arrival histograms (pure logic), and the cache benchmark's core."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helios.storage.prefetch import InterArrivalHistogram, ModelState, ModelUsage, PrefetchPlanner

GB = 10**9
BW = {"ram": 10e9, "nvme": 2e9, "remote": 0.2e9}
HOUR = 3600.0


def _periodic(planner: PrefetchPlanner, model: str, period: float, bursts: int, start: float = 0.0) -> float:
    """`bursts` bursts of five requests ten seconds apart, one every `period`; returns the last request's time."""
    t = start
    for k in range(bursts):
        for i in range(5):
            t = start + k * period + 10 * i
            planner.record(model, t)
    return t


# -- the histogram ----------------------------------------------------------------------


def test_histogram_cdf_is_monotone_and_counts_every_gap() -> None:
    h = InterArrivalHistogram()
    for gap in (0.5, 5, 50, 500, 5000):
        h.add(gap)
    values = [h.cdf(x) for x in (0.1, 1, 10, 100, 1000, 10_000, 10**7)]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(1.0)
    assert h.cdf(20) == pytest.approx(0.4, abs=0.05)


def test_histogram_answers_conditionally_on_how_long_the_gap_has_lasted() -> None:
    h = InterArrivalHistogram()
    for _ in range(10):
        for gap in (10, 10, 10, HOUR):  # bursts of short gaps, an hour between bursts
            h.add(gap)
    assert h.p_within(age=5, horizon=30) > 0.6  # inside a burst: soon
    assert h.p_within(age=600, horizon=600) < 0.1  # the burst is over, the next is far
    assert h.p_within(age=HOUR - 300, horizon=600) > 0.8  # ...and then it is near
    assert h.median_remaining(age=600) == pytest.approx(HOUR - 600, rel=0.1)


def test_histogram_forgets_an_old_pattern() -> None:
    h = InterArrivalHistogram(half_life_s=HOUR)
    for _ in range(50):
        h.add(10)
    for _ in range(50):
        h.add(HOUR)
    assert h.cdf(100) < 0.05


def test_a_busy_burst_does_not_wash_out_the_gaps_between_bursts() -> None:
    """Thousands of short gaps in a burst weigh by time, not count: the hour between bursts stays."""
    usage = ModelUsage()
    for burst in range(12):
        for i in range(2000):
            usage.record(burst * HOUR + 0.01 * i)
    last = usage.last
    next_burst = 12 * HOUR
    assert usage.p_within(now=last + 600, horizon=600) < 0.1  # between bursts: not soon
    assert usage.p_within(now=next_burst - 120, horizon=300) > 0.5  # the next burst is near
    assert usage.next_use(now=last + 600) == pytest.approx(next_burst, rel=0.05)


def test_usage_round_trips_through_its_saved_form() -> None:
    usage = ModelUsage()
    for t in (0.0, 10.0, 20.0, HOUR, HOUR + 10):
        usage.record(t)
    back = ModelUsage.from_dict(json.loads(json.dumps(usage.to_dict())))
    assert back is not None and back.last == usage.last and back.histogram.gaps == 4
    assert back.p_within(HOUR + 15, 600) == usage.p_within(HOUR + 15, 600)
    assert ModelUsage.from_dict({"last": 1.0, "histogram": {"counts": [1.0]}}) is None  # other bins: rebuilt
    assert ModelUsage.from_dict({"last": "soon"}) is None


def test_a_gap_past_everything_seen_means_no_prediction() -> None:
    usage = ModelUsage()
    for t in range(0, 60, 10):
        usage.record(float(t))
    assert usage.p_within(now=50 + 14 * 86400, horizon=HOUR) == 0.0
    assert usage.next_use(now=50 + 14 * 86400) is None


def test_too_few_gaps_mean_no_prediction() -> None:
    usage = ModelUsage()
    usage.record(0.0)
    usage.record(10.0)
    assert usage.p_within(now=12.0, horizon=60) == 0.0


# -- the planner ------------------------------------------------------------------------


def test_a_periodic_model_is_prewarmed_shortly_before_its_next_use_and_not_earlier() -> None:
    planner = PrefetchPlanner(capacity=200 * GB, bandwidths=BW, interval_s=30, margin_s=10)
    last = _periodic(planner, "job", period=HOUR, bursts=12)
    next_burst = last - 40 + HOUR
    nvme = {"job": ModelState(size=40 * GB, tier="nvme")}  # 20 s to fetch from NVMe
    lead = 20 + 10 + 30
    early = planner.plan(next_burst - 1800, nvme)
    assert early.prewarm == []
    due = planner.plan(next_burst - lead + 5, nvme)
    assert [p.model_id for p in due.prewarm] == ["job"]
    p = due.prewarm[0]
    assert p.source == "nvme" and p.fetch_s == pytest.approx(20)
    assert p.expected_use == pytest.approx(next_burst, abs=300)
    assert "job" in {k.model_id for k in due.keep_alive}  # and RAM keeps it until the burst has come


def test_a_model_is_not_prewarmed_from_the_remote_by_default() -> None:
    planner = PrefetchPlanner(capacity=200 * GB, bandwidths=BW)
    last = _periodic(planner, "job", period=HOUR, bursts=12)
    remote = {"job": ModelState(size=4 * GB, tier="remote")}
    assert planner.plan(last - 40 + HOUR - 40, remote).prewarm == []
    eager = PrefetchPlanner(capacity=200 * GB, bandwidths=BW, prewarm_from=("nvme", "remote"))
    _periodic(eager, "job", period=HOUR, bursts=12)
    assert [p.model_id for p in eager.plan(last - 40 + HOUR - 40, remote).prewarm] == ["job"]


def test_a_model_in_a_burst_is_kept_alive_and_an_idle_one_is_not() -> None:
    planner = PrefetchPlanner(capacity=200 * GB, bandwidths=BW, keep_horizon_s=600)
    last = _periodic(planner, "busy", period=HOUR, bursts=12)
    in_ram = {"busy": ModelState(size=10 * GB, tier="ram")}
    during = planner.plan(last + 5, in_ram)
    assert [k.model_id for k in during.keep_alive] == ["busy"]
    assert during.keep_alive[0].until == pytest.approx(last + 5 + 600)
    after = planner.plan(last + 900, in_ram)  # the burst is over; the next is most of an hour away
    assert after.keep_alive == []
    assert [i.model_id for i in after.idle] == []  # due within the idle horizon (an hour): not idle
    days_later = planner.plan(last + 3 * 86400, in_ram)
    assert days_later.keep_alive == []


def test_a_periodic_model_between_bursts_is_marked_idle() -> None:
    planner = PrefetchPlanner(capacity=200 * GB, bandwidths=BW, idle_horizon_s=HOUR)
    last = _periodic(planner, "nightly", period=24 * HOUR, bursts=8)
    plan = planner.plan(last + 600, {"nightly": ModelState(size=10 * GB, tier="ram")})
    assert [i.model_id for i in plan.idle] == ["nightly"]


def test_keep_alive_stays_within_its_share_of_ram_most_valuable_first() -> None:
    planner = PrefetchPlanner(capacity=100 * GB, bandwidths=BW, keep_share=0.5)
    lasts = {m: _periodic(planner, m, period=HOUR, bursts=12) for m in ("a", "b", "c")}
    models = {"a": ModelState(30 * GB, "ram"), "b": ModelState(30 * GB, "ram"), "c": ModelState(15 * GB, "ram")}
    plan = planner.plan(max(lasts.values()) + 5, models)
    kept = {k.model_id for k in plan.keep_alive}
    assert sum(models[m].size for m in kept) <= 50 * GB
    assert len(kept) == 2


def test_models_never_seen_are_ignored() -> None:
    planner = PrefetchPlanner(capacity=100 * GB, bandwidths=BW)
    plan = planner.plan(1000.0, {"new": ModelState(GB, "nvme")})
    assert plan.keep_alive == plan.prewarm == plan.idle == []


# -- the benchmark's core, on a tiny catalog ----------------------------------------------


@pytest.fixture
def cache_policy():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import cache_policy

        yield cache_policy
    finally:
        sys.path.pop(0)


def test_cache_benchmark_simulates_every_policy_and_writes_its_report(cache_policy, tmp_path: Path) -> None:
    w = cache_policy.Workload(n_models=8, min_gb=1, max_gb=12, duration_s=6 * HOUR, rate=0.05, ram_share=0.5,
                              nvme_share=0.8)
    report = cache_policy.run(w, alphas=(0.8, 1.2), progress=False)
    out = tmp_path / "cache_policy.json"
    cache_policy.write(report, out)
    data = json.loads(out.read_text())
    assert set(data["alphas"]) == {"0.8", "1.2"}
    for alpha, per_policy in data["alphas"].items():
        assert set(per_policy) == set(cache_policy.POLICY_NAMES)
        for m in per_policy.values():
            assert {"cold_start_s", "hit_ratio", "byte_hit_ratio", "prefetch_bytes"} <= set(m)
            assert 0 <= m["hit_ratio"] <= 1 and 0 <= m["byte_hit_ratio"] <= 1
            assert m["requests"] == data["config"]["requests"][alpha] > 0  # every policy serves the same trace
        assert per_policy["lru"]["prefetch_bytes"] == per_policy["belady"]["prefetch_bytes"] == 0
    assert "0.8_helios_over_lru_cold_start" in data["ratios"]
    assert data["config"]["tiers"]["nvme"]["bandwidth"] == 2 * 10**9  # from the config models' defaults
    assert out.with_suffix(".png").stat().st_size > 0
