"""The scheduler-stats sink Helios's request router reads (pure: vLLM's own stats objects, no engine)."""

from __future__ import annotations

from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats

from helios.engine.engine_stats import EngineStats, SchedulerStatsSink


def _step(running: int, waiting: int, kv: float, hits: int = 0) -> SchedulerStats:
    prefix = PrefixCacheStats()
    prefix.record(num_tokens=100, num_hits=hits, preempted=False)
    return SchedulerStats(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=kv,
                          prefix_cache_stats=prefix)


def test_the_sink_keeps_the_last_step() -> None:
    stats = EngineStats()
    sink = SchedulerStatsSink.factory(stats)(None, 0)
    sink.record(_step(3, 2, 0.5, hits=40), None)
    sink.record(None, None)  # a step without scheduler stats changes nothing
    sink.record(_step(1, 0, 0.25, hits=10), None)
    assert stats.routing(unfinished=1) == {"unfinished": 1, "running": 1, "waiting": 0, "kv_cache_usage": 0.25}


def test_data_parallel_engines_add_up_and_the_fullest_cache_counts() -> None:
    stats = EngineStats()
    SchedulerStatsSink.factory(stats)(None, 0).record(_step(2, 1, 0.2), None, engine_idx=0)
    SchedulerStatsSink.factory(stats)(None, 1).record(_step(1, 4, 0.7), None, engine_idx=1)
    assert stats.routing(unfinished=8) == {"unfinished": 8, "running": 3, "waiting": 5, "kv_cache_usage": 0.7}


def test_an_engine_with_no_requests_is_idle_whatever_its_last_step_said() -> None:
    """An aborted request (client gone) takes no engine step: the last stats still say busy."""
    stats = EngineStats()
    SchedulerStatsSink.factory(stats)(None, 0).record(_step(1, 0, 0.3), None)
    assert stats.routing(unfinished=0) == {"unfinished": 0, "running": 0, "waiting": 0, "kv_cache_usage": 0.0}


def test_metrics_off_keeps_routing_stats_and_records_no_vllm_metric(monkeypatch, tmp_path, caplog) -> None:
    """`HELIOS_METRICS=0`: vLLM's stat loggers, built as its AsyncLLM builds them from Helios's
    engine arguments and loggers, still feed the router's numbers but leave out vLLM's own
    loggers (its in-process Prometheus one is added unless one is passed in)."""
    import logging

    import prometheus_client
    from vllm.config import VllmConfig
    from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerManager

    from helios.config import parse_args
    from helios.engine.llm_engine import _stat_loggers, engine_kwargs
    from helios.engine.vllm_metrics import DisabledPrometheusStatLogger

    monkeypatch.setenv("HELIOS_METRICS", "0")
    # vLLM adds its periodic log line's logger only when its module logs at INFO, as in a server.
    caplog.set_level(logging.INFO, logger="vllm.v1.metrics.loggers")
    model = parse_args({"models": [{"id": "m", "source": "demo://tiny"}]}).models[0]
    log_stats = not engine_kwargs(model, tmp_path)["disable_log_stats"]  # AsyncLLM's enable_default_loggers
    stats = EngineStats()
    manager = StatLoggerManager(VllmConfig(), custom_stat_loggers=_stat_loggers(stats),
                                enable_default_loggers=log_stats)
    manager.record(_step(2, 1, 0.4, hits=5), None)
    manager.log()
    assert stats.routing(unfinished=3) == {"unfinished": 3, "running": 2, "waiting": 1, "kv_cache_usage": 0.4}
    prometheus = [type(lg) for lg in manager.stat_loggers if isinstance(lg, PrometheusStatLogger)]
    assert prometheus == [DisabledPrometheusStatLogger]
    per_engine = [lg for lg in manager.stat_loggers if not isinstance(lg, PrometheusStatLogger)]
    assert [type(lg.per_engine_stat_loggers[0]) for lg in per_engine] == [SchedulerStatsSink]  # no LoggingStatLogger
    assert not [name for name in prometheus_client.REGISTRY._names_to_collectors if name.startswith("vllm:")]
