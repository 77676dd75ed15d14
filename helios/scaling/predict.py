"""Predictive scale-up: when the next burst (or the next request) is due, from inter-arrival histograms.

A replica takes tens of seconds to start, so a policy that only reacts makes the first
requests of every burst wait that long. Two questions, both asked of the same
`InterArrivalHistogram` the registry keeps per model (`helios/storage/prefetch.py`):

- **the next request** of a model that is idle: the registry's histogram of the gaps
  between its requests, conditioned on how long it has been idle (`wake_probability`).
  A model at zero replicas gets one back `lead_s` before its next request is due;
- **the next burst** of a model that is busy: the gaps between its requests are short all
  the time, so they say nothing about bursts. `BurstForecaster` watches the load the
  replicas report (in replicas' worth of work), marks where each burst starts, keeps the
  gaps between burst onsets in a histogram of the same kind, and remembers how many
  replicas recent bursts needed. When a burst is likely within `lead_s`, the policy asks
  for that many replicas now.

Pure logic, no Ray: the policy (`helios/scaling/policy.py`) feeds it, the tests and the
benchmark drive it with simulated time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from helios.storage.prefetch import InterArrivalHistogram, ModelUsage


@dataclass(frozen=True)
class Forecast:
    """How likely a burst starts within the lead time, and how many replicas it will need."""

    probability: float
    replicas: int
    since_onset_s: float | None  # seconds since the last burst started (None: none seen yet)


NO_FORECAST = Forecast(0.0, 0, None)


class BurstForecaster:
    """Burst onsets from a model's load, their inter-arrival histogram and recent burst sizes.

    `observe(now, demand)` is called every control-loop tick with the load in replicas'
    worth of work. Outside a burst a slow baseline follows the load (time constant
    `baseline_s`); a burst starts when the load reaches `rise` times the baseline and at
    least `min_rise` replicas above it, and ends when it falls back below half way
    between the baseline and that threshold. Each onset adds the gap since the previous
    onset to the histogram; each end remembers the burst's peak (the last `memory` of them).
    """

    def __init__(
        self, rise: float = 1.5, min_rise: float = 1.0, baseline_s: float = 120.0, memory: int = 3,
        min_gaps: int = 2, histogram: InterArrivalHistogram | None = None,
    ) -> None:
        self.rise = rise
        self.min_rise = min_rise
        self.baseline_s = baseline_s
        self.min_gaps = min_gaps
        self.histogram = histogram or InterArrivalHistogram()
        self.peaks: deque[float] = deque(maxlen=memory)
        self.baseline: float | None = None
        self.in_burst = False
        self.last_onset: float | None = None
        self._peak = 0.0
        self._last_t: float | None = None

    def threshold(self) -> float:
        base = self.baseline or 0.0
        return max(base * self.rise, base + self.min_rise)

    def observe(self, now: float, demand: float) -> None:
        """The load at `now`, in replicas (e.g. ongoing requests / target per replica)."""
        if self.baseline is None:
            self.baseline = demand
        dt = 0.0 if self._last_t is None else max(now - self._last_t, 0.0)
        self._last_t = now
        threshold = self.threshold()
        if self.in_burst:
            self._peak = max(self._peak, demand)
            if demand < (self.baseline + threshold) / 2:
                self.in_burst = False
                self.peaks.append(self._peak)
            return
        if demand >= threshold:
            self.in_burst = True
            self._peak = demand
            if self.last_onset is not None:
                self.histogram.add(now - self.last_onset)
            self.last_onset = now
            return
        self.baseline += (1.0 - math.exp(-dt / self.baseline_s)) * (demand - self.baseline)

    def forecast(self, now: float, lead_s: float) -> Forecast:
        """P(a burst starts within `lead_s`) and the replicas it needs; nothing during a burst
        (the load itself says what it needs) or before `min_gaps` gaps have been seen."""
        if self.last_onset is None:
            return NO_FORECAST
        since = max(now - self.last_onset, 0.0)
        if self.in_burst or self.histogram.gaps < self.min_gaps or not self.peaks:
            return Forecast(0.0, 0, since)
        p = self.histogram.p_within(since, lead_s)
        return Forecast(p, math.ceil(max(self.peaks) - 1e-9), since)


def wake_probability(usage: ModelUsage | None, now: float, lead_s: float, min_gaps: int = 3) -> float:
    """P(the model gets a request within `lead_s`), from its request-gap histogram (0 without one)."""
    if usage is None:
        return 0.0
    return usage.p_within(now, lead_s, min_gaps)


def usage_from_registry(data: Mapping[str, Any]) -> ModelUsage | None:
    """The model's request-gap histogram from the registry's `usage(model_id)` answer.

    The registry returns the last request time and its most recent inter-arrival times;
    replaying them through `ModelUsage` rebuilds the histogram the registry's prefetch
    planner keeps (over that recent history), with the same bins and the same decay."""
    last = data.get("last_used")
    gaps: Sequence[float] = data.get("inter_arrival_s") or ()
    if not isinstance(last, (int, float)) or isinstance(last, bool) or not math.isfinite(last):
        return None
    usage = ModelUsage()
    t = float(last) - sum(float(g) for g in gaps)
    usage.record(t)
    for g in gaps:
        t += float(g)
        usage.record(t)
    return usage
