"""Burst onsets and their inter-arrival histogram; the registry's usage turned back into a histogram."""

from __future__ import annotations

import pytest

from helios.scaling.predict import BurstForecaster, usage_from_registry, wake_probability
from helios.storage.prefetch import ModelUsage


def feed(f: BurstForecaster, until: int, period: int = 600, length: int = 60, peak: float = 5.0) -> None:
    """A quiet minute, then a burst of `length` s every `period` s: onsets at 60, 660, 1260, 1860, 2460..."""
    for t in range(until):
        f.observe(float(t), peak if t >= 60 and (t - 60) % period < length else 0.5)


def test_onsets_feed_the_histogram_and_peaks_are_remembered() -> None:
    f = BurstForecaster()
    feed(f, 4 * 600)
    assert f.histogram.gaps == 3
    assert list(f.peaks) == [5.0] * 3  # the last `memory` bursts
    assert f.baseline == pytest.approx(0.5)


def test_burst_probability_rises_just_before_the_period() -> None:
    f = BurstForecaster()
    feed(f, 2160)  # half way to the next onset at 2460
    assert f.forecast(2160.0, 60.0).probability < 0.05
    feed_to = BurstForecaster()
    feed(feed_to, 2455)
    late = feed_to.forecast(2455.0, 60.0)
    assert late.probability > 0.9
    assert late.replicas == 5


def test_no_forecast_during_a_burst_or_without_history() -> None:
    f = BurstForecaster()
    assert f.forecast(0.0, 60.0).probability == 0.0
    feed(f, 1870)  # inside the 4th burst
    assert f.in_burst
    assert f.forecast(1870.0, 600.0).probability == 0.0


def test_a_missed_burst_stops_the_prediction() -> None:
    f = BurstForecaster()
    feed(f, 1920)
    for t in range(1920, 6 * 600):
        f.observe(float(t), 0.5)  # the bursts stop
    assert f.forecast(6 * 600.0, 60.0).probability == 0.0


def test_usage_from_registry_replays_the_recent_gaps() -> None:
    usage = ModelUsage()
    for t in (100.0, 160.0, 230.0, 830.0, 900.0):
        usage.record(t)
    rebuilt = usage_from_registry({"last_used": 900.0, "inter_arrival_s": [60.0, 70.0, 600.0, 70.0]})
    assert rebuilt is not None
    assert rebuilt.last == 900.0
    assert rebuilt.histogram.counts == pytest.approx(usage.histogram.counts)
    assert wake_probability(rebuilt, 950.0, 30.0) == pytest.approx(usage.p_within(950.0, 30.0))


def test_usage_without_requests_is_none() -> None:
    assert usage_from_registry({"last_used": None, "inter_arrival_s": []}) is None
    assert wake_probability(None, 0.0, 60.0) == 0.0
