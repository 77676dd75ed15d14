"""The vLLM scheduler's latest numbers for one engine, kept by a stat logger.

vLLM hands every scheduler step's `SchedulerStats` (running and waiting requests, KV-cache
use) to its stat loggers in the engine's front process; `SchedulerStatsSink` keeps the
latest of them in an `EngineStats` the replica reads without asking the engine core. The
request router weighs replicas by them (`EngineDeployment.record_routing_stats`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass
class EngineStats:
    """What the scheduler last reported, and when (monotonic seconds; 0 before the first step)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of the KV cache's blocks in use, 0..1
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    updated: float = 0.0
    per_engine: dict[int, tuple[int, int, float]] = field(default_factory=dict)

    def update(self, engine_idx: int, running: int, waiting: int, kv_cache_usage: float,
               queries: int, hits: int) -> None:
        """One engine's step; with data-parallel engines the numbers add up (KV use: the fullest)."""
        self.per_engine[engine_idx] = (running, waiting, kv_cache_usage)
        self.running = sum(r for r, _, _ in self.per_engine.values())
        self.waiting = sum(w for _, w, _ in self.per_engine.values())
        self.kv_cache_usage = max(k for _, _, k in self.per_engine.values())
        self.prefix_cache_queries += queries
        self.prefix_cache_hits += hits
        self.updated = time.monotonic()

    def routing(self, unfinished: int) -> dict[str, Any]:
        """The last step's numbers, given how many requests the engine's front end holds now.
        With none, the engine is idle whatever its last step said: an abort takes no step, so
        the last stats of an engine whose client went away would otherwise say busy for good."""
        if unfinished == 0:
            return {"unfinished": 0, "running": 0, "waiting": 0, "kv_cache_usage": 0.0}
        return {"unfinished": unfinished, "running": self.running, "waiting": self.waiting,
                "kv_cache_usage": round(self.kv_cache_usage, 4)}


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
        prefix = scheduler_stats.prefix_cache_stats
        self.stats.update(engine_idx, scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                          scheduler_stats.kv_cache_usage, prefix.queries if prefix else 0, prefix.hits if prefix else 0)

    def log_engine_initialized(self) -> None:
        pass
