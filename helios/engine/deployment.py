"""The Serve deployment of one model's engine: a thin shell around `LLMEngine`."""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from helios.config import ModelConfig, StorageConfig
from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.engine.model_server import Role
from helios.engine.placement import placement_for, warm_first
from helios.observability.logs import get_logger, log_event

logger = get_logger("engine.deployment")
# Named, not imported: the request router lives in the router layer and runs in the router's process.
HELIOS_REQUEST_ROUTER = "helios.router.replica_router:HeliosRequestRouter"
RAY_PREFIX_ROUTER = "ray.serve.llm.request_router:PrefixCacheAffinityRouter"


class EngineDeployment:
    """Serves one model; Serve restarts a replica whose engine fails its health check.

    The engine runs in this replica (its vLLM processes forked from the replica's zygote), or,
    when the app keeps an engine pool (`engine_pool`), in a pooled host this replica takes: a
    process that has imported vLLM already, so the start skips every import (`helios.engine.pool`)."""

    async def __init__(  # type: ignore[misc] - Serve awaits an async constructor
        self,
        model: dict[str, Any],
        cache_root: str,
        storage: dict[str, Any] | None = None,
        pinned: bool = True,
        role: Role = "unified",
    ) -> None:
        started = time.monotonic()
        replica = serve.get_replica_context().replica_id.unique_id
        self.server: Any = await start_server(model, cache_root, storage, pinned, role, replica, started)

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        """One OpenAI request answered whole by vLLM's serving layer (status, headers, body bytes)."""
        return await self.server.call(req)

    async def stream(self, req: EngineHTTPRequest) -> AsyncIterator[EngineHTTPResponse | bytes]:
        """The head with the first body bytes, then coalesced SSE bytes (called with `stream=True`);
        cancelling it aborts the request in vLLM."""
        parts = self.server.stream(req)
        try:
            async for part in parts:
                yield part
        finally:
            await parts.aclose()

    async def openapi(self) -> dict[str, Any]:
        """vLLM's OpenAPI schema of the routes this replica answers."""
        return await maybe_await(self.server.openapi())

    async def info(self) -> dict[str, Any]:
        return await maybe_await(self.server.info())

    async def record_routing_stats(self) -> dict[str, Any]:
        """What Helios's request router weighs replicas by: requests in the engine (scheduled or
        not yet) and the scheduler's last running / waiting counts and KV-cache use; a busy report
        carries the wall time it was read at (the router takes off what finished after it). An idle
        one does not: Serve broadcasts the replica set to every handle whenever a report changes."""
        stats = await maybe_await(self.server.record_routing_stats())
        return {**stats, "at": round(time.time(), 3)} if stats.get("unfinished") else stats

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What Helios's autoscaling policy scales on (helios.scaling.policy): the same numbers."""
        return await maybe_await(self.server.record_routing_stats())

    async def num_unfinished_requests(self) -> int:
        return await maybe_await(self.server.num_unfinished_requests())

    async def check_health(self) -> None:
        await self.server.check_health()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()


def pool_fits(model: ModelConfig) -> bool:
    """Whether a pooled host may run this model's engine: one process's engine (no Ray workers in a
    placement group, which belongs to the replica), started the fast way (not `engine_processes: spawn`)."""
    e = model.engine
    return (model.deployment.engine_processes == "zygote"
            and e.tensor_parallel_size * e.pipeline_parallel_size == 1)


async def start_server(model: dict[str, Any], cache_root: str, storage: dict[str, Any] | None, pinned: bool,
                       role: Role, replica: str, started: float) -> Any:
    """Start `model`'s engine for this replica: in a pooled host when the app keeps a pool and
    one is free, else in this process (`ModelServer`). `started`: when the replica began (monotonic)."""
    config = ModelConfig.model_validate(model)
    if pool_fits(config):
        from helios.engine.pool import PooledServer

        server = await PooledServer.take(model, cache_root, storage, pinned, role, replica, started)
        if server is not None:
            return server
    if config.deployment.engine_processes == "zygote":
        from helios.engine import warm_start

        warm_start.start_zygote()  # imports vLLM in parallel with this replica's own imports
    # vLLM is imported before the fetch begins, not beside it: in one process the fetch's threads
    # and the import share the GIL, and the import (pure Python) then took 12.6 s instead of 5.7
    # (bench model from S3). The fetch overlaps the engine's start instead, which runs in the
    # engine core's own processes (transfer.overlap_engine_start).
    imports = time.monotonic()
    from helios.engine.llm_engine import import_vllm
    from helios.engine.model_server import ModelServer

    import_vllm()
    return await ModelServer.start(model, cache_root, storage, pinned, role, replica, started,
                                   imports_s=time.monotonic() - imports)


async def maybe_await(value: Any) -> Any:
    """A server in this process answers at once, one in a pooled host (one Ray call away) with an awaitable."""
    return await value if inspect.isawaitable(value) else value


def deployment_name(model_id: str, role: Role = "unified") -> str:
    """Serve deployment names allow no '/' or ':'; model ids often have them."""
    return "engine-" + re.sub(r"[^A-Za-z0-9._-]", "_", model_id) + ("" if role == "unified" else f"-{role}")


def autoscaling_config(model: ModelConfig) -> dict[str, Any]:
    """Serve autoscaling inside the registry's replica bounds (see helios.scaling.policy).

    Until an admin scales the model, its bounds are `num_replicas` both ways, so a
    config's replica count is exactly what runs; `max_replicas` is the ceiling. A model
    with `min_replicas` set autoscales between it and `max_replicas` from the start, down
    to zero when it is 0 (after `idle_to_zero_s` without requests).
    """
    d = model.deployment
    low, high = (d.num_replicas, d.num_replicas) if d.min_replicas is None else (d.min_replicas, d.replica_ceiling())
    config: dict[str, Any] = {
        "min_replicas": min(low, 1),
        "initial_replicas": d.num_replicas,
        "max_replicas": d.replica_ceiling(),
        "target_ongoing_requests": d.target_ongoing_requests,
        "upscale_delay_s": 2.0,
        "downscale_delay_s": 10.0,
        "policy": {
            "policy_function": "helios.scaling.policy:RegistryBoundedPolicy",
            "policy_kwargs": {"model_id": model.id, "min_replicas": low, "max_replicas": high,
                              "predictive": d.predictive_scaling},
        },
    }
    if low == 0:
        config["downscale_to_zero_delay_s"] = d.idle_to_zero_s
    return config


def registry_hints(model: ModelConfig) -> dict[str, Any]:
    """The registry's placement hints for `model` (`RegistryActor.placement_hints`); none when there
    is no registry or it does not answer in time: placement then goes by resources alone."""
    import ray

    from helios.registry.actor import get_registry

    registry = get_registry()
    if registry is None:
        return {}
    try:
        return ray.get(registry.placement_hints.remote(model.id, model.engine.max_model_len), timeout=10)
    except Exception as exc:  # noqa: BLE001 - a hint, not a requirement
        log_event(logger, "placement_hints_unavailable", model=model.id, error=repr(exc)[:300])
        return {}


def engine_deployment(
    model: ModelConfig, cache_root: str, storage: StorageConfig | None = None, pinned: bool = True,
    role: Role = "unified", env: dict[str, str] | None = None, hints: dict[str, Any] | None = None,
) -> serve.Application:
    """Bind the engine deployment of one model (or one side of a disaggregated model) with its Serve options.

    `pinned`: the model comes from the Serve config (registered by its replicas), not
    started on demand from the registry. Unified deployments autoscale within the
    registry's bounds; prefill and decode sides run their configured replica counts. `hints`
    (`registry_hints`): the model's memory need, which a MIG slice must hold, and the nodes
    that hold it, which its replicas prefer."""
    d = model.deployment
    hints = hints or {}
    placement = warm_first(placement_for(model, hints.get("memory_need")), hints.get("warm_nodes") or [])
    placement = placement.deployment_options()
    if env:  # tracing and metrics settings (helios.observability)
        placement["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    if role == "unified":
        scaling: dict[str, Any] = {"autoscaling_config": autoscaling_config(model)}
    else:
        pd = model.disaggregated
        scaling = {"num_replicas": pd.prefill_replicas if role == "prefill" else pd.decode_replicas}
    # A decode side goes by load (Serve's default). So does a model started on demand: it is its own
    # application's ingress, and Serve refuses a custom request router there under HAProxy.
    if d.request_router != "serve_default" and role != "decode" and pinned:
        helios = d.request_router == "helios"
        scaling["request_router_config"] = RequestRouterConfig(
            request_router_class=HELIOS_REQUEST_ROUTER if helios else RAY_PREFIX_ROUTER,
            request_router_kwargs={"imbalance": d.affinity_imbalance} if helios else {},
            request_routing_stats_period_s=2.0, request_routing_stats_timeout_s=10.0)
    return serve.deployment(EngineDeployment).options(
        name=deployment_name(model.id, role),
        max_ongoing_requests=d.max_ongoing_requests,
        **placement,
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
        # The router logs each request; a second access line per engine call only costs CPU.
        logging_config={"enable_access_log": False},
        **scaling,
    ).bind(model.model_dump(mode="json"), cache_root, storage.model_dump(mode="json") if storage else None, pinned,
           role)
