"""How many replicas an engine deployment wants now: load the replicas report, predicted bursts, bounds.

Serve's default rule divides the ongoing requests by `target_ongoing_requests`. That is
a guess at an engine's capacity, and the wrong one whenever requests differ in length: an
engine whose KV cache is full runs fewer requests than the target and queues the rest,
while Serve's count looks healthy. So the replicas report what vLLM's scheduler sees
(`EngineDeployment.record_autoscaling_stats`: running, waiting, KV-cache use) and the
policy wants the most of:

- `load`: Serve's rule, ongoing requests (including those queued at handles) / target;
- `queue`: requests are waiting inside the engines, so each replica runs only what it
  runs now: (running + waiting + queued) / running per replica;
- `kv`: the KV caches are fuller than `kv_target`, so add replicas in proportion;
- `predicted_burst`: a burst is due within `lead_s` (`BurstForecaster`): its replicas now;
- `predicted_request`: an idle model's next request is due within `lead_s` (the
  registry's request-gap histogram): keep, or bring back, one replica.

A model with no load and no request due wants zero (`idle`), which the bounds turn into
its warm pool (`min_replicas`, 0 allows scale-to-zero). Serve applies its delays and
factors after the policy; the registry's bounds clamp before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from helios.scaling.predict import BurstForecaster, wake_probability
from helios.storage.prefetch import ModelUsage


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's latest report (`record_autoscaling_stats`)."""

    unfinished: float = 0.0  # requests in the engine, scheduled or not
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1


@dataclass(frozen=True)
class LoadSnapshot:
    """What the policy knows of a deployment's load at one control-loop tick."""

    current: int  # running replicas
    ongoing: float  # Serve's count: requests on replicas plus those queued at handles
    queued: float = 0.0  # queued at handles, not yet on a replica
    replicas: tuple[ReplicaLoad, ...] = ()


@dataclass(frozen=True)
class ScaleDecision:
    """The replicas wanted, the signal that set it, and every input it was made from (for the log)."""

    replicas: int
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)


class ScalePolicy:
    """Reactive (load, queue, KV) and predictive (bursts, next request) replica counts within bounds.

    Stateful only through its `BurstForecaster`; one instance per deployment, called once
    per control-loop tick with monotonic-enough `now` seconds."""

    def __init__(
        self, target_ongoing_requests: float, kv_target: float = 0.8, queue_tolerance: float = 0.1,
        lead_s: float = 60.0, predictive: bool = True, burst_threshold: float = 0.3, wake_threshold: float = 0.3,
        forecaster: BurstForecaster | None = None,
    ) -> None:
        if target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be positive")
        self.target = target_ongoing_requests
        self.kv_target = kv_target
        self.queue_tolerance = queue_tolerance
        self.lead_s = lead_s
        self.predictive = predictive
        self.burst_threshold = burst_threshold
        self.wake_threshold = wake_threshold
        self.forecaster = forecaster or BurstForecaster()

    def reactive(self, load: LoadSnapshot) -> tuple[float, str, dict[str, Any]]:
        """The replicas the load needs now (a float, Serve-style), the signal that set it, and its inputs."""
        reps = load.replicas
        running = sum(r.running for r in reps)
        waiting = sum(r.waiting for r in reps) + load.queued
        kv = max((r.kv_cache_usage for r in reps), default=0.0)
        kv_mean = sum(r.kv_cache_usage for r in reps) / len(reps) if reps else 0.0
        ongoing = max(load.ongoing, sum(r.unfinished for r in reps) + load.queued)
        wants = {"load": ongoing / self.target, "queue": 0.0, "kv": 0.0}
        n = len(reps) or load.current
        if n and running > 0 and waiting > self.queue_tolerance * running:
            wants["queue"] = n * (running + waiting) / running
        if n and kv_mean > self.kv_target:
            wants["kv"] = n * kv_mean / self.kv_target
        reason = max(wants, key=lambda k: wants[k])
        inputs = {"ongoing": round(ongoing, 2), "running": running, "waiting": waiting,
                  "kv_cache_usage_mean": round(kv_mean, 3), "kv_cache_usage_max": round(kv, 3)}
        return wants[reason], reason, inputs

    def decide(
        self, now: float, load: LoadSnapshot, bounds: tuple[int, int], usage: ModelUsage | None = None,
    ) -> ScaleDecision:
        """Replicas wanted at `now` within `bounds` (min, max); `usage` is the model's request-gap
        history from the registry (None: no idle-model prediction)."""
        need, reason, inputs = self.reactive(load)
        self.forecaster.observe(now, need)
        wanted = math.ceil(need - 1e-9)
        if wanted == 0:
            reason = "idle"
        inputs = {"current": load.current, **inputs, "need": round(need, 3)}
        if self.predictive:
            burst = self.forecaster.forecast(now, self.lead_s)
            inputs["p_burst"] = round(burst.probability, 3)
            if burst.probability >= self.burst_threshold and burst.replicas > wanted:
                wanted, reason = burst.replicas, "predicted_burst"
                inputs["since_burst_s"] = round(burst.since_onset_s or 0.0, 1)
            if wanted == 0:
                p = wake_probability(usage, now, self.lead_s)
                inputs["p_request"] = round(p, 3)
                if p >= self.wake_threshold:
                    wanted, reason = 1, "predicted_request"
        low, high = bounds
        bounded = min(max(wanted, low), high)
        if bounded != wanted:
            inputs["unbounded"] = wanted
            reason = f"{reason}:{'min' if bounded > wanted else 'max'}_replicas"
        inputs["bounds"] = f"{low}-{high}"
        return ScaleDecision(bounded, reason, inputs)
