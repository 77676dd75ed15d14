"""The engine deployments' autoscaling policy: queue depth, KV use and predicted bursts, inside the
replica bounds the registry holds for the model.

Serve calls the policy in its controller every control-loop tick, so it must never
block: the bounds and the model's request history are fetched from the registry actor in
the background (one call in flight at a time; bounds every `REFRESH_S`, usage every
`USAGE_REFRESH_S`) and the last answers are used meanwhile. An admin's
`POST /admin/scale` sets the bounds in the registry; within one refresh the policy steers
the deployment into them. The decision itself is `ScalePolicy` (`helios/scaling/decide.py`):
the replicas' own reports (`EngineDeployment.record_autoscaling_stats`, read from
`ctx.raw_metrics`), Serve's ongoing-request count, and the predictions of
`helios/scaling/predict.py`. Serve applies its upscale/downscale delays and factors after
the policy, and the deployment's own `autoscaling_config` min/max are the outer limits.
Each change of decision is logged (`autoscale_decision`) with its inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from helios.observability.logs import get_logger, log_event
from helios.scaling.decide import LoadSnapshot, ReplicaLoad, ScaleDecision, ScalePolicy
from helios.scaling.predict import usage_from_registry
from helios.storage.prefetch import ModelUsage

logger = get_logger("scaling.policy")

REFRESH_S = 2.0
USAGE_REFRESH_S = 30.0
STATS = ("unfinished", "running", "waiting", "kv_cache_usage")  # what record_autoscaling_stats reports


def _registry() -> Any:
    from helios.registry.actor import get_registry

    return get_registry()


def replica_loads(ctx: AutoscalingContext) -> tuple[ReplicaLoad, ...]:
    """Each running replica's latest `record_autoscaling_stats` numbers (the newest point of its raw
    series: the look-back mean Serve aggregates would hide the start of a burst)."""
    raw: Mapping[str, Mapping[Any, Any]] = ctx.raw_metrics or {}
    out = []
    for replica in ctx.running_replicas:
        values: dict[str, float] = {}
        for name in STATS:
            series = raw.get(name, {}).get(replica)
            if series:
                values[name] = float(series[-1].value)
        if values:
            out.append(ReplicaLoad(**values))
    return tuple(out)


def snapshot(ctx: AutoscalingContext) -> LoadSnapshot:
    queued = ctx.total_queued_requests
    return LoadSnapshot(current=ctx.current_num_replicas, ongoing=float(ctx.total_num_requests or 0.0),
                        queued=float(queued or 0.0), replicas=replica_loads(ctx))


class RegistryBoundedPolicy:
    """Class-callable Serve policy: one instance per deployment, kept by the controller.

    `registry`: how to reach the registry actor (None when there is none; tests and the
    benchmark pass a stub). `predictive`, `lead_s` (how long before a predicted burst or
    request to start replicas: a cold start and then some) and `kv_target` go to `ScalePolicy`."""

    def __init__(
        self, model_id: str, min_replicas: int, max_replicas: int, predictive: bool = True, lead_s: float = 60.0,
        kv_target: float = 0.8, registry: Callable[[], Any] = _registry,
    ) -> None:
        self.model_id = model_id
        self.bounds = (min_replicas, max_replicas)  # the config's, until the registry answers
        self.usage: ModelUsage | None = None
        self.options = {"predictive": predictive, "lead_s": lead_s, "kv_target": kv_target}
        self.core: ScalePolicy | None = None
        self.last: ScaleDecision | None = None
        self._registry = registry
        self._pending: dict[str, Any] = {}  # "scale" / "usage" -> ObjectRef in flight
        self._fetched = {"scale": 0.0, "usage": 0.0}
        self._failed = False

    def _collect(self) -> None:
        import ray

        for kind, ref in list(self._pending.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            del self._pending[kind]
            try:
                answer = ray.get(ref)
            except Exception:  # noqa: BLE001, S112 - registry restarting or model unknown: keep the last answer
                continue
            if kind == "usage":
                self.usage = usage_from_registry(answer)
            elif answer.get("explicit", True):  # a registry default must not override the config's counts
                self.bounds = (int(answer["min_replicas"]), int(answer["max_replicas"]))

    def _refresh(self) -> None:
        if self._pending:
            self._collect()
        now = time.monotonic()
        due = [k for k, every in (("scale", REFRESH_S), ("usage", USAGE_REFRESH_S))
               if k not in self._pending and now - self._fetched[k] >= every]
        if not due:
            return
        registry = self._registry()
        if registry is None:
            return
        for kind in due:
            self._pending[kind] = getattr(registry, kind).remote(self.model_id)
            self._fetched[kind] = now

    def decide(self, ctx: AutoscalingContext) -> ScaleDecision:
        """The decision for one tick, logged when it differs from the last one."""
        if self.core is None:
            self.core = ScalePolicy(ctx.config.get_target_ongoing_requests(), **self.options)
        now = ctx.current_time if ctx.current_time is not None else time.time()
        decision = self.core.decide(now, snapshot(ctx), self.bounds, self.usage)
        if self.last is None or (decision.replicas, decision.reason) != (self.last.replicas, self.last.reason):
            log_event(logger, "autoscale_decision", model=self.model_id, deployment=ctx.deployment_name,
                      replicas=decision.replicas, target=ctx.target_num_replicas, reason=decision.reason,
                      **decision.inputs)
        self.last = decision
        return decision

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        try:
            self._refresh()
        except Exception:  # noqa: BLE001, S110 - never break Serve's control loop
            pass
        try:
            return self.decide(ctx).replicas, {}
        except Exception as exc:  # noqa: BLE001 - fall back to Serve's rule inside the bounds
            if not self._failed:  # once: the controller calls this ten times a second
                log_event(logger, "autoscale_policy_failed", level=logging.WARNING, model=self.model_id,
                          error=f"{type(exc).__name__}: {exc}"[:200])
            self._failed = True
            desired, state = replica_queue_length_autoscaling_policy(ctx)
            low, high = self.bounds
            return min(max(desired, low), high), state
