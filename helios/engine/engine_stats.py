"""The vLLM scheduler's latest numbers for one engine, kept by a stat logger.

vLLM hands every scheduler step's `SchedulerStats` (running and waiting requests, KV-cache
use) to its stat loggers in the engine's front process; `SchedulerStatsSink` keeps the
latest of them in an `EngineStats` the replica reads without asking the engine core. The
request router weighs replicas by them (`EngineDeployment.record_routing_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass
class EngineStats:
    """Each engine's last step: (running, waiting, KV-cache use 0..1) by engine index."""

    per_engine: dict[int, tuple[int, int, float]] = field(default_factory=dict)

    def update(self, engine_idx: int, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.per_engine[engine_idx] = (running, waiting, kv_cache_usage)

    def routing(self, unfinished: int) -> dict[str, Any]:
        """The last steps' numbers (data-parallel engines add up; KV use: the fullest), given how many
        requests the engine's front end holds now. With none, the engine is idle whatever its last
        step said: an abort takes no step, so the last stats of an engine whose client went away
        would otherwise say busy for good."""
        steps = self.per_engine.values()
        if unfinished == 0 or not steps:
            return {"unfinished": unfinished, "running": 0, "waiting": 0, "kv_cache_usage": 0.0}
        return {"unfinished": unfinished, "running": sum(r for r, _, _ in steps),
                "waiting": sum(w for _, w, _ in steps), "kv_cache_usage": round(max(k for _, _, k in steps), 4)}


class SchedulerStatsSink(StatLoggerBase):
    """A vLLM stat logger that only remembers: `factory(stats)` is what `stat_loggers=` takes."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, stats: EngineStats) -> None:
        self.engine_index = engine_index
        self.stats = stats

    @staticmethod
    def factory(stats: EngineStats) -> Any:
        return lambda vllm_config, engine_index=0: SchedulerStatsSink(vllm_config, engine_index, stats=stats)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        self.stats.update(engine_idx, scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                          scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        pass
