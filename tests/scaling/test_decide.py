"""The replica count the policy wants from load, queue depth, KV use and predictions, within bounds (no Ray)."""

from __future__ import annotations

from helios.scaling.decide import LoadSnapshot, ReplicaLoad, ScalePolicy
from helios.storage.prefetch import ModelUsage


def busy(n: int, running: float, waiting: float = 0.0, kv: float = 0.3) -> LoadSnapshot:
    reps = tuple(ReplicaLoad(running + waiting, running, waiting, kv) for _ in range(n))
    return LoadSnapshot(current=n, ongoing=n * (running + waiting), replicas=reps)


def test_queue_depth_scales_up_where_serves_count_does_not() -> None:
    # 16 requests per replica against a target of 32: Serve's rule sees half load. But the engines run
    # only 8 and queue 8 (KV-limited), so the replicas are saturated and the queue asks for twice as many.
    policy = ScalePolicy(target_ongoing_requests=32, predictive=False)
    d = policy.decide(0.0, busy(2, running=8, waiting=8), (1, 8))
    assert d.replicas == 4
    assert d.reason == "queue"
    assert d.inputs["waiting"] == 16


def test_a_little_waiting_is_tolerated() -> None:
    policy = ScalePolicy(target_ongoing_requests=32, predictive=False)
    assert policy.decide(0.0, busy(2, running=30, waiting=1), (1, 8)).replicas == 2


def test_kv_cache_use_scales_up() -> None:
    policy = ScalePolicy(target_ongoing_requests=32, kv_target=0.8, predictive=False)
    d = policy.decide(0.0, busy(2, running=4, kv=0.96), (1, 8))
    assert d.replicas == 3  # 2 * 0.96 / 0.8 = 2.4
    assert d.reason == "kv"


def test_serves_ongoing_count_is_the_floor() -> None:
    policy = ScalePolicy(target_ongoing_requests=4, predictive=False)
    load = LoadSnapshot(current=1, ongoing=10.0, queued=6.0, replicas=(ReplicaLoad(4, 4, 0, 0.2),))
    d = policy.decide(0.0, load, (1, 8))
    assert d.replicas == 3  # queued at the handle counts: (4 + 6) / 4 -> 3 by load, 2.5 by queue
    assert d.reason == "load"


def test_idle_model_scales_to_zero_when_bounds_allow() -> None:
    policy = ScalePolicy(target_ongoing_requests=32)
    idle = LoadSnapshot(current=1, ongoing=0.0, replicas=(ReplicaLoad(),))
    d = policy.decide(0.0, idle, (0, 4))
    assert (d.replicas, d.reason) == (0, "idle")


def test_warm_pool_keeps_min_replicas() -> None:
    policy = ScalePolicy(target_ongoing_requests=32)
    d = policy.decide(0.0, LoadSnapshot(current=2, ongoing=0.0), (2, 4))
    assert (d.replicas, d.reason) == (2, "idle:min_replicas")
    assert d.inputs["unbounded"] == 0


def test_bounds_cap_every_signal() -> None:
    policy = ScalePolicy(target_ongoing_requests=1, predictive=False)
    d = policy.decide(0.0, busy(2, running=8, waiting=40, kv=1.0), (1, 3))
    assert d.replicas == 3
    assert d.reason.endswith(":max_replicas")
    assert d.inputs["bounds"] == "1-3"


def test_idle_model_comes_back_before_its_next_request() -> None:
    usage = ModelUsage()  # the registry's request-gap history: a request every 600 s
    for t in range(0, 6001, 600):
        usage.record(float(t))
    policy = ScalePolicy(target_ongoing_requests=32, lead_s=60.0)
    idle = LoadSnapshot(current=0, ongoing=0.0)
    assert policy.decide(6000.0 + 300, idle, (0, 4), usage).replicas == 0
    d = policy.decide(6000.0 + 580, idle, (0, 4), usage)
    assert (d.replicas, d.reason) == (1, "predicted_request")
    assert d.inputs["p_request"] >= 0.3


def test_without_prediction_an_idle_model_stays_at_zero() -> None:
    usage = ModelUsage()
    for t in range(0, 6001, 600):
        usage.record(float(t))
    policy = ScalePolicy(target_ongoing_requests=32, lead_s=60.0, predictive=False)
    assert policy.decide(6580.0, LoadSnapshot(current=0, ongoing=0.0), (0, 4), usage).replicas == 0


def periodic(policy: ScalePolicy, bursts: int, period: float = 300.0, length: float = 40.0,
             burst_load: float = 4 * 32, background: float = 8.0) -> list[tuple[float, int, str]]:
    """Drive the policy through `bursts` periodic bursts, one tick a second: (t, replicas, reason)."""
    out = []
    for t in range(int(bursts * period)):
        load = burst_load if t % period < length else background
        d = policy.decide(float(t), LoadSnapshot(current=1, ongoing=load), (0, 8))
        out.append((float(t), d.replicas, d.reason))
    return out


def test_predictive_scale_up_before_a_periodic_burst() -> None:
    period, lead = 300.0, 60.0
    trace = periodic(ScalePolicy(target_ongoing_requests=32, lead_s=lead), bursts=6, period=period)
    last = [(t, n, why) for t, n, why in trace if t >= 5 * period - period / 2]  # the run-up to the 6th burst
    early = [(t, n) for t, n, why in last if why == "predicted_burst"]
    assert early, "no replica was asked for before the burst"
    first = early[0][0]
    assert 5 * period - lead - 10 <= first < 5 * period  # within the lead time, not long before
    assert all(n == 4 for _, n in early)  # as many as the bursts needed


def test_reactive_policy_waits_for_the_burst() -> None:
    trace = periodic(ScalePolicy(target_ongoing_requests=32, predictive=False), bursts=6)
    before = [n for t, n, _ in trace if 1260 <= t < 1500]  # after the 5th burst, before the 6th
    assert max(before) == 1
