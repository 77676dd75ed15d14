"""vLLM's own metrics through Ray's pipeline, as vLLM's `RayPrometheusStatLogger` exports them
(`ray_vllm_*`, tagged with `ReplicaId`), with each labelled metric recording through a recorder
bound to its tags once.

vLLM's Ray wrappers call Ray's public `observe` / `set` / `inc`, which merge, type-check and
validate the tags on every call; vLLM records several gauges and counters per engine step
and one inter-token histogram value per generated token, and in a profile of the engine
replica under 16 streams that bookkeeping was most of the 9 % of its CPU that vLLM's stat
logging took. Same metrics, same names, same tags, same values; a gauge whose value did not
change since its last record within a second is not recorded again.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.v1.metrics.loggers import PrometheusStatLogger
from vllm.v1.metrics.ray_wrappers import (
    RayCounterWrapper,
    RayGaugeWrapper,
    RayHistogramWrapper,
    RayKVConnectorProm,
    RayPerfMetricsProm,
    RayPrometheusStatLogger,
    RaySpecDecodingProm,
)

from helios.observability.metrics import engine_token_latency, recorder

REFRESH_S = 1.0


class _Bound:
    """Mixin: `_rec(value)` records with this (labelled) metric's tags, bound on first use.

    vLLM labels a metric by copying it (`labels()` is `copy.copy` with new `_tags`), so the
    recorder is kept with the tags it was bound to and made again for a copy's own."""

    metric: Any
    _tags: dict[str, str]

    def _rec(self, value: float) -> None:
        bound = self.__dict__.get("_bound")
        if bound is None or bound[0] is not self._tags:
            bound = self.__dict__["_bound"] = (self._tags, recorder(self.metric, self._tags))
        bound[1](value)


class BoundGauge(_Bound, RayGaugeWrapper):
    """vLLM sets its scheduler gauges on every engine step; an unchanged value is recorded again
    only once `REFRESH_S` has passed (Ray's export drops a gauge that is not set for a while)."""

    def set(self, value: float) -> None:
        if value is None:
            return
        value, now = float(value), time.monotonic()
        last = self.__dict__.get("_last")
        if last is not None and last[0] == value and last[1] is self._tags and now - last[2] < REFRESH_S:
            return
        self.__dict__["_last"] = (value, self._tags, now)
        self._rec(value)


class BoundCounter(_Bound, RayCounterWrapper):
    def inc(self, value: float = 1.0) -> None:
        if value > 0:  # Ray refuses a counter step <= 0; vLLM's wrapper skips 0 itself
            self._rec(float(value))


class BoundHistogram(_Bound, RayHistogramWrapper):
    def observe(self, value: float) -> None:
        self._rec(float(value))


class _BoundClasses:
    """The metric classes vLLM's Prometheus loggers build their metrics from, bound ones."""

    _gauge_cls = BoundGauge
    _counter_cls = BoundCounter
    _histogram_cls = BoundHistogram


class _SpecDecodingProm(_BoundClasses, RaySpecDecodingProm):
    pass


class _KVConnectorProm(_BoundClasses, RayKVConnectorProm):
    pass


class _PerfMetricsProm(_BoundClasses, RayPerfMetricsProm):
    pass


class _Unrecorded:
    """Stands in for a labelled histogram that is not exported: its values go nowhere."""

    def observe(self, value: float) -> None:
        pass


class HeliosRayStatLogger(_BoundClasses, RayPrometheusStatLogger):
    """vLLM's `RayPrometheusStatLogger` with bound recorders (`stat_loggers=[HeliosRayStatLogger]`),
    without the per-token inter-token histogram unless `observability.engine_token_latency` asks
    for it: Ray's metrics agent replays each histogram value one at a time at export, so that one
    histogram cost more agent CPU than all of vLLM's other metrics together."""

    _spec_decoding_cls = _SpecDecodingProm
    _kv_connector_cls = _KVConnectorProm
    _perf_metrics_cls = _PerfMetricsProm

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not engine_token_latency():
            self.histogram_inter_token_latency = {i: _Unrecorded() for i in self.histogram_inter_token_latency}


class DisabledPrometheusStatLogger(PrometheusStatLogger):
    """Stands in for vLLM's in-process Prometheus logger when metrics are off (`HELIOS_METRICS=0`).

    vLLM adds its own `PrometheusStatLogger` whenever stats are on and no Prometheus logger is
    passed in, and Helios keeps stats on for routing (the scheduler-stats sink): without this,
    "metrics off" still recorded every vLLM metric on every engine step into a registry that
    nothing serves. Being a `PrometheusStatLogger`, it takes that default's place; it records nothing."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        self.engine_indexes = engine_indexes if engine_indexes is not None else [0]
        self.vllm_config = vllm_config

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass

    def log_metrics_info(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass
