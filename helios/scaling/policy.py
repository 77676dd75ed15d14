"""The engine deployments' autoscaling policy: Serve's queue-length rule, inside the
replica bounds the registry holds for the model.

Serve calls the policy in its controller every control-loop tick, so it must never
block: the bounds are fetched from the registry actor in the background (one call in
flight at a time, refreshed every few seconds) and the last answer is used meanwhile.
An admin's `POST /admin/scale` sets the bounds in the registry; within one refresh the
policy steers the deployment into them, and Serve's own queue-length rule moves it
within them under load. The deployment's own `autoscaling_config` min/max are the outer
limits Serve enforces after the policy.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

REFRESH_S = 2.0


class RegistryBoundedPolicy:
    """Class-callable Serve policy: one instance per deployment, kept by the controller."""

    def __init__(self, model_id: str, min_replicas: int, max_replicas: int) -> None:
        self.model_id = model_id
        self.bounds = (min_replicas, max_replicas)  # the config's, until the registry answers
        self._pending: Any = None
        self._fetched = 0.0

    def _refresh(self) -> None:
        import ray

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if not ready:
                return
            try:
                scale = ray.get(self._pending)
                if scale.get("explicit", True):  # a registry default must not override the config's counts
                    self.bounds = (int(scale["min_replicas"]), int(scale["max_replicas"]))
            except Exception:  # noqa: BLE001, S110 - registry restarting or model unknown: keep the last bounds
                pass
            self._pending = None
        if time.monotonic() - self._fetched < REFRESH_S:
            return
        from helios.registry.actor import get_registry

        registry = get_registry()
        if registry is not None:
            self._pending = registry.scale.remote(self.model_id)
            self._fetched = time.monotonic()

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        try:
            self._refresh()
        except Exception:  # noqa: BLE001, S110 - never break Serve's control loop
            pass
        desired, state = replica_queue_length_autoscaling_policy(ctx)
        low, high = self.bounds
        return min(max(desired, low), high), state
