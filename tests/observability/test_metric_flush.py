"""Deferred metric records (helios.observability.metrics.recorder): what reaches Ray's record
call, and when. The export through Ray itself is tests/test_bound_metrics.py's."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest

from helios.observability import metrics


class RecordingRayMetric:
    """Stands in for a `ray.util.metrics` metric: the shape `recorder` binds to, with the records kept."""

    def __init__(self) -> None:
        self._default_tags: dict[str, str] = {}
        self.records: list[tuple[float, dict[str, str]]] = []
        self._metric = self

    def _validate_tags(self, tags: dict[str, str]) -> None:
        if "model" not in tags:
            raise ValueError("Missing value for tag key(s): model")

    def record(self, value: float, tags: dict[str, str]) -> None:
        self.records.append((value, tags))


def ray_metric(kind: str) -> Any:
    """One of Ray's kinds by name (`recorder` picks how to defer by Ray's class name)."""
    return type(kind, (RecordingRayMetric,), {})()


@pytest.fixture(autouse=True)
def _nothing_pending() -> None:
    metrics.FLUSHER.flush()


def test_counter_steps_are_summed_into_one_record() -> None:
    counter = ray_metric("Counter")
    inc = metrics.recorder(counter, {"model": "m"})
    for step in (2.0, 3.0, 1.5):
        inc(step)
    assert counter.records == []  # nothing reaches Ray on the caller's path
    metrics.FLUSHER.flush()
    assert counter.records == [(6.5, {"model": "m"})]
    metrics.FLUSHER.flush()
    assert len(counter.records) == 1  # nothing new: nothing recorded again


def test_gauge_records_its_last_value_and_histogram_every_value() -> None:
    gauge, hist = ray_metric("Gauge"), ray_metric("Histogram")
    set_ = metrics.recorder(gauge, {"model": "m"})
    observe = metrics.recorder(hist, {"model": "m"})
    for value in (4.0, 4.0, 7.0):
        set_(value)
    for value in (0.05, 0.5, 0.005):
        observe(value)
    metrics.FLUSHER.flush()
    assert [v for v, _ in gauge.records] == [7.0]
    assert [v for v, _ in hist.records] == [0.05, 0.5, 0.005]


def test_tags_are_still_checked_when_bound() -> None:
    with pytest.raises(ValueError, match="model"):
        metrics.recorder(ray_metric("Counter"), {"other": "x"})


def test_the_flusher_thread_records_within_its_interval() -> None:
    counter = ray_metric("Counter")
    metrics.recorder(counter, {"model": "m"})(1.0)
    deadline = time.monotonic() + metrics.FLUSH_S * 5
    while not counter.records and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter.records == [(1.0, {"model": "m"})]


def test_a_failing_record_does_not_stop_the_others() -> None:
    broken, counter = ray_metric("Counter"), ray_metric("Counter")

    def fail(value: float, tags: dict[str, str]) -> None:
        raise RuntimeError("Ray is shutting down")

    broken.record = fail  # type: ignore[method-assign]
    metrics.recorder(broken, {"model": "a"})(1.0)
    metrics.recorder(counter, {"model": "b"})(2.0)
    metrics.FLUSHER.flush()
    assert counter.records == [(2.0, {"model": "b"})]


def _child(counter: Any, out: Any) -> None:
    """In a forked child: the parent's pending step is not the child's to record; its own is."""
    inc = metrics.recorder(counter, {"model": "child"})
    inc(5.0)
    metrics.FLUSHER.flush()
    out.put(counter.records)


def test_a_forked_child_records_only_its_own_values() -> None:
    counter = ray_metric("Counter")
    metrics.recorder(counter, {"model": "parent"})(1.0)  # pending in the parent when it forks
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child, args=(counter, out))
    child.start()
    records = out.get(timeout=30)
    child.join(30)
    assert records == [(5.0, {"model": "child"})]
    metrics.FLUSHER.flush()
    assert counter.records == [(1.0, {"model": "parent"})]
