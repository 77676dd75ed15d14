"""The Serve adapter: per-replica reports from the autoscaling context, registry bounds, decisions logged."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from ray.serve._private.common import TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from helios.scaling.policy import RegistryBoundedPolicy

STATS = ("unfinished", "running", "waiting", "kv_cache_usage")


def context(reports: dict[str, tuple[float, float, float, float]], ongoing: float, now: float = 100.0,
            target: int = 1) -> AutoscalingContext:
    """A context as Serve's controller builds it, replicas named by strings."""
    raw = {name: {r: [TimeStampedValue(now - 5, 0.0), TimeStampedValue(now - 1, v[i])] for r, v in reports.items()}
           for i, name in enumerate(STATS)}
    config = AutoscalingConfig(min_replicas=0, max_replicas=8, target_ongoing_requests=32)
    return AutoscalingContext(
        deployment_id=None, deployment_name="engine-m", app_name="helios", current_num_replicas=len(reports),
        target_num_replicas=target, running_replicas=list(reports), total_num_requests=ongoing,
        total_queued_requests=0.0, aggregated_metrics={}, raw_metrics=raw, capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=config,
    )


@pytest.fixture
def decisions() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("ray.serve.helios.scaling.policy")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(level)


def test_scales_on_the_replicas_latest_reports(decisions: list[str]) -> None:
    policy = RegistryBoundedPolicy("m", 0, 8, registry=lambda: None)
    # Serve counts 32 ongoing (one replica's worth); the engine runs 8 of them and queues 24.
    desired, state = policy(context({"r1": (32, 8, 24, 0.5)}, ongoing=32))
    assert desired == 4
    assert state == {}
    assert policy.last is not None and policy.last.reason == "queue"


def test_decisions_are_logged_with_their_inputs_once_per_change(decisions: list[str]) -> None:
    policy = RegistryBoundedPolicy("m", 0, 8, registry=lambda: None)
    policy(context({"r1": (32, 8, 24, 0.5)}, ongoing=32))
    policy(context({"r1": (32, 8, 24, 0.5)}, ongoing=32, now=101.0))
    policy(context({"r1": (0, 0, 0, 0.0)}, ongoing=0, now=102.0))
    assert len(decisions) == 2
    first, second = decisions
    assert first.startswith("autoscale_decision model=m deployment=engine-m replicas=4 target=1 reason=queue")
    for field in ("running=8", "waiting=24", "kv_cache_usage_mean=0.5", "ongoing=32", "bounds=0-8"):
        assert field in first
    assert "replicas=0" in second and "reason=idle" in second


def test_registry_bounds_clamp_the_decision() -> None:
    policy = RegistryBoundedPolicy("m", 1, 2, registry=lambda: None)
    assert policy(context({"r1": (200, 8, 192, 1.0)}, ongoing=200))[0] == 2
    assert policy(context({"r1": (0, 0, 0, 0.0)}, ongoing=0, now=101.0))[0] == 1


def test_without_replica_reports_serves_count_decides() -> None:
    policy = RegistryBoundedPolicy("m", 0, 8, registry=lambda: None)
    ctx = context({}, ongoing=100)
    ctx.current_num_replicas = 2
    assert policy(ctx)[0] == 4  # ceil(100 / 32)


def test_a_failing_decision_falls_back_to_serves_rule(decisions: list[str]) -> None:
    policy = RegistryBoundedPolicy("m", 0, 8, registry=lambda: None)
    ctx = context({"r1": (64, 64, 0, 0.5)}, ongoing=64)
    ctx.raw_metrics["running"]["r1"][-1].value = "garbled"  # a report the decision cannot read
    assert policy(ctx)[0] == 2  # Serve's rule: 64 ongoing / 32
    policy(ctx)
    assert len(decisions) == 1 and decisions[0].startswith("autoscale_policy_failed model=m error=\"ValueError")
