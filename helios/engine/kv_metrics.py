"""The KV connector's counters as Prometheus metrics of the replica that runs the engine.

The connector lives in vLLM's engine-core and worker processes and sends its counters to
the node cache (or writes small stats files in its own store; see kv_store.store_stats); the
Serve replica reads its own engine's counters every few seconds and adds the increase to Ray metrics counters,
which Ray's metrics agent exports for Prometheus (`helios_kv_*_total`, tagged by model
and role). `snapshot()` gives the same numbers to `info()` for tests and the admin view.
"""

from __future__ import annotations

import threading
from typing import Any

from helios.config import KVStoreConfig
from helios.engine.kv_connector import connector_stats

EXPORTED = {
    "recompute_fallbacks": "Requests whose stored KV was missing (evicted, other node unreachable) and were recomputed.",
    "recompute_fallback_tokens": "Prompt tokens recomputed because their stored KV was missing.",
    "matched_tokens": "Prompt tokens served from the Helios KV store instead of computed.",
    "load_bytes": "Bytes of KV loaded from the store into the engine.",
    "save_bytes": "Bytes of KV saved from the engine into the store.",
    "remote_fetched_blocks": "KV blocks fetched from another node's store.",
}


class KVMetrics:
    """Follows one engine's connector counters and exports their increase."""

    def __init__(self, store: KVStoreConfig, instance: str, model_id: str, role: str, interval_s: float = 5.0) -> None:
        from ray.util.metrics import Counter

        self.store, self.instance, self.interval_s = store, instance, interval_s
        tags = {"model": model_id, "role": role}
        self._counters = {}
        for name, doc in EXPORTED.items():
            counter = Counter(f"helios_kv_{name}_total", description=doc, tag_keys=("model", "role"))
            counter.set_default_tags(tags)
            self._counters[name] = counter
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="helios-kv-metrics", daemon=True)
        self._thread.start()

    def snapshot(self) -> dict[str, float]:
        return connector_stats(self.store, self.instance)

    def export(self) -> None:
        stats = self.snapshot()
        for name, counter in self._counters.items():
            value = float(stats.get(name, 0.0))
            delta = value - self._seen.get(name, 0.0)
            if delta > 0:  # a read that missed some handles (keeper restarting) must not count them twice later
                counter.inc(delta)
                self._seen[name] = value

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.export()
            except Exception:  # noqa: BLE001, S110 - metrics must never take the replica down
                pass

    def close(self) -> None:
        self._stop.set()


def stats_view(metrics: KVMetrics | None) -> dict[str, Any] | None:
    return metrics.snapshot() if metrics else None
