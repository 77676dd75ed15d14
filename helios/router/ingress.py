"""The router: Helios's only HTTP ingress (OpenAI API, health, readiness, OpenAPI schema).

The Serve ingress adapts HTTP to `RouterCore`, which holds the routing logic: it checks
the key, reads `model` and `stream` from the body, and forwards the raw body to the
model's engine replica, where vLLM's own OpenAI serving layer answers. SSE bytes are
relayed as they come; the first chunk is awaited before the 200 so that early errors
keep their status codes.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ReplicaState

from helios.api import admin, error_handlers
from helios.config import ModelConfig, RouterConfig, RouterContext
from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.errors import EngineUnavailable, ModelNotFound, ServiceUnavailable
from helios.observability.export import PROMETHEUS_TEXT, HeadMetrics
from helios.observability.logs import get_logger, log_event
from helios.ray_env import lower_priority
from helios.router.admission import AdmissionGate, KeyLimits
from helios.router.core import (
    ENGINE_ROUTES,
    EngineClient,
    EngineStream,
    ModelRoute,
    RetryPolicy,
    RouterCore,
    RouterResponse,
    new_request_id,
)
from helios.router.local_engine import LocalEngine
from helios.router.on_demand import OnDemandClient
from helios.router.request_metrics import queue_depth_gauge

logger = get_logger("router")

app = FastAPI(title="Helios", docs_url=None, redoc_url=None, openapi_url=None)
error_handlers.install(app)
app.include_router(admin.router)
USAGE_FLUSH_S = 1.0
REPLICA_POLL_S = 5.0


async def _unwrapped(awaitable: Any) -> Any:
    try:
        return await awaitable
    except StopAsyncIteration:
        raise
    except RayActorError as exc:  # the replica died or is unreachable: RouterCore retries before any output
        raise EngineUnavailable(f"engine replica unavailable: {type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - Ray wraps errors: the HeliosError inside keeps its status
        raise error_handlers.unwrap(exc) from None


class ServeEngineStream(EngineStream):
    """A streaming Serve call of `EngineDeployment.stream`."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen

    async def first(self) -> EngineHTTPResponse:
        try:
            return await _unwrapped(self.gen.__anext__())
        except StopAsyncIteration:
            raise ServiceUnavailable("The engine ended the stream before any output; retry") from None

    async def rest(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await _unwrapped(self.gen.__anext__())
            except StopAsyncIteration:
                return

    def cancel(self) -> None:
        self.gen.cancel()


class ServeEngine(EngineClient):
    """An engine deployment reached through its Serve handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self.streaming = handle.options(stream=True)
        self.key = f"{handle.app_name}/{handle.deployment_name}"  # shared with its request router's breakers

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        return await _unwrapped(self.handle.call.remote(req))

    def stream(self, req: EngineHTTPRequest) -> EngineStream:
        return ServeEngineStream(self.streaming.stream.remote(req))


def _key_limits(config: RouterConfig) -> KeyLimits | None:
    limits = config.rate_limits
    if limits is None or not (limits.requests_per_minute or limits.tokens_per_minute):
        return None
    return KeyLimits(limits.requests_per_minute, limits.tokens_per_minute)


def _response(resp: RouterResponse) -> Response:
    if resp.stream is not None:
        return StreamingResponse(resp.stream, status_code=resp.status, headers=resp.headers, media_type=resp.media_type)
    return Response(resp.body, status_code=resp.status, headers=resp.headers, media_type=resp.media_type)


def _registry_view(model: dict[str, Any] | None) -> dict[str, Any]:
    """The registry's part of a /v1/models entry: versions, profile (weights GiB, KV bytes/token), warm status."""
    if model is None:
        return {}
    default = model.get("default_version")
    versions = model.get("versions", [])
    profile = next((v.get("profile") for v in versions if v["version"] == default), None) or {}
    warm = model.get("warm", {})
    tiers = sorted({kind for node in warm.get("tiers", {}).values() for kind, held in node.items() if held})
    return {
        "default_version": default,
        "versions": [v["version"] for v in versions],
        "profile": {"weights_gib": profile.get("weights_gib"), "kv_bytes_per_token": profile.get("kv_bytes_per_token"),
                    "dtype": profile.get("dtype")},
        "warm": {"replicas_loaded": len(warm.get("replicas", [])), "tiers_cached": tiers},
    }


def merge_openapi(vllm_schemas: list[dict[str, Any]], helios_schema: dict[str, Any]) -> dict[str, Any]:
    """vLLM's paths that Helios forwards (with the components they use), from each model's engine,
    plus Helios's own public routes."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for vllm_schema in vllm_schemas:
        paths.update({p: ops for p, ops in vllm_schema.get("paths", {}).items() if p in ENGINE_ROUTES})
        schemas.update(vllm_schema.get("components", {}).get("schemas", {}))
    paths.update({p: ops for p, ops in helios_schema.get("paths", {}).items() if not p.startswith("/admin")})
    schemas.update(helios_schema.get("components", {}).get("schemas", {}))
    return {"openapi": vllm_schemas[0].get("openapi", "3.1.0") if vllm_schemas else "3.1.0",
            "info": {"title": "Helios", "version": helios_schema.get("info", {}).get("version", "0.1.0")},
            "paths": paths, "components": {"schemas": schemas}}


@serve.ingress(app)
class Router:
    """Adapts HTTP to `RouterCore`; owns the Serve handles, on-demand models and usage batching."""

    async def __init__(  # type: ignore[misc] - Serve awaits an async constructor
        self,
        config: dict[str, Any],
        engines: dict[str, DeploymentHandle],
        context: RouterContext | None = None,
        prefill: dict[str, DeploymentHandle] | None = None,
        local: dict[str, Any] | None = None,
    ) -> None:
        """`local`: the model whose engine runs in this replica (`router.colocate_engine`), if any."""
        started = time.monotonic()
        context = context or RouterContext(cache_root="")
        self.config = RouterConfig.model_validate(config)
        self.engines = engines  # a disaggregated model's entry is its decode side
        self.prefill = prefill or {}
        self.infos: dict[str, dict[str, Any]] = {}
        self.cache_root = context.cache_root
        self.storage = context.storage
        self.registry_config = context.registry
        self.models = {m.id: m for m in context.models}
        self.on_demand = OnDemandClient(serve.get_replica_context().app_name, self.cache_root, self.storage,
                                        self.registry_config)
        self._warming: asyncio.Task | None = None
        if self.registry_config.max_dynamic_models > 0:  # the first on-demand start then finds its manager up
            self._warming = asyncio.get_running_loop().create_task(self.on_demand.warm())
        if context.engine_pool.enabled:  # owned by this replica: the pool goes with the app
            from helios.engine.pool import get_or_create_pool

            pool = context.engine_pool
            self.engine_pool = get_or_create_pool(pool.size_per_node, pool.nice, pool.max_per_node,
                                                  pool.predict_horizon_s, pool.idle_class, pool.reserve_gib)
        routes = {m: ModelRoute(ServeEngine(h), ServeEngine(self.prefill[m]) if m in self.prefill else None)
                  for m, h in engines.items()}
        self.core = RouterCore(routes, [k.encode() for k in self.config.keys()],  # noqa: SIM118 - the API keys
                               resolver=self._on_demand_route, on_use=self._record_use,
                               retry=RetryPolicy(deadline_s=self.config.retry_deadline_s,
                                                 max_backoff_s=self.config.retry_max_backoff_s),
                               admission=self._admission_gate, limits=_key_limits(self.config),
                               session_affinity=self.config.session_affinity,
                               breaker={"failures": self.config.breaker_failures,
                                        "cooldown_s": self.config.breaker_cooldown_s},
                               name=serve.get_replica_context().replica_id.unique_id)
        self.replicas: dict[str, int] = {}  # model -> its RUNNING engine replicas, from serve.status()
        self._replicas_task: asyncio.Task | None = None
        self._on_demand_routes: dict[str, ModelRoute] = {}
        self._openapi: dict[str, Any] | None = None
        self._usage: dict[str, list[float]] = {}
        self._usage_task: asyncio.Task | None = None
        self.head_metrics = HeadMetrics()
        self.local_model: str | None = None
        self.local: LocalEngine | None = None
        if local is not None:  # after the pool exists: the engine may take a pooled host
            from helios.engine.deployment import start_server
            from helios.engine.pool import PooledServer

            storage = self.storage.model_dump(mode="json") if self.storage else None
            replica = serve.get_replica_context().replica_id.unique_id
            server = await start_server(local, self.cache_root, storage, True, "unified", replica, started)
            self.local = LocalEngine(server, remote=isinstance(server, PooledServer))
            self.local_model = local["id"]
            self.core.routes[self.local_model] = ModelRoute(self.local)
        app.state.helios = self  # the admin routes reach the router's state through the app
        # A colocated engine's front end runs here: it keeps the engine replica's priority
        # (`deployment.nice`, set once the engine started), not the router's lower one on top.
        lower_priority(self.config.nice if self.local is None or self.local.remote else 0)

    def config_models(self) -> list[str]:
        """The config's models, in its order: the colocated one, then those reached by handle."""
        return [*([self.local_model] if self.local_model else []), *self.engines]

    async def check_health(self) -> None:
        """A colocated engine that failed fails this replica's health check: Serve restarts it."""
        if self.local is not None:
            await self.local.check_health()

    async def info(self) -> dict[str, Any] | None:
        """The colocated engine's facts and start timings (an engine replica's `info`); None without one."""
        return await self.local.info() if self.local is not None else None

    async def num_unfinished_requests(self) -> int:
        """Requests in the colocated engine now (0 without one)."""
        return await self.local.num_unfinished_requests() if self.local is not None else 0

    async def __del__(self) -> None:
        """Serve awaits this on shutdown: the colocated engine stops, then Serve's ASGI wrapper
        (next in this class's MRO) shuts its app down as it would without this method."""
        local = getattr(self, "local", None)
        if local is not None:
            local.shutdown()
        parent = getattr(super(), "__del__", None)
        if parent is not None and inspect.isawaitable(result := parent()):
            await result

    # -- models -----------------------------------------------------------------------

    async def _on_demand_route(self, model: str) -> ModelRoute:
        """A registered model's engine, started on demand (503 with Retry-After while it starts)."""
        if not self.on_demand.ready(model):
            record = await self.resolve(model)
            if model not in self.on_demand.handles:
                self._record_use(model)  # demand counts even while the model cold-starts (it drives prefetch)
            await self.on_demand.handle(model, record)
        handle = self.on_demand.handles[model]
        route = self._on_demand_routes.get(model)
        if route is None or route.engine.handle is not handle:  # type: ignore[attr-defined]
            route = self._on_demand_routes[model] = ModelRoute(ServeEngine(handle))
        return route

    async def resolve(self, model: str, version: str | None = None) -> dict[str, Any]:
        """The registry's record of a model version; 404 for a model nobody registered."""
        from helios.registry.actor import get_registry

        registry = get_registry()
        if registry is None:
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        try:
            return await registry.resolve.remote(model, version)
        except Exception as exc:  # noqa: BLE001 - a registry error of its own is a 404, anything else a 503
            inner = error_handlers.unwrap(exc)
            if isinstance(inner, ModelNotFound):
                raise ModelNotFound(f"The model `{model}` does not exist.", param="model") from None
            raise ServiceUnavailable("The model registry is not answering; retry shortly.", retry_after_s=5) from None

    # -- admission ---------------------------------------------------------------------

    def _admission_gate(self, model: str) -> AdmissionGate:
        """A model's queue bound: its replicas' capacity, shared out among the router replicas
        (a colocated engine is this replica's own: its capacity is one replica's)."""
        config = self.models.get(model)
        deployment = config.deployment if config else self.registry_config.defaults.deployment
        local = model == self.local_model
        routers = 1 if local else self.config.num_replicas
        self._watch_replica_counts()

        def capacity() -> int:
            replicas = 1 if local else self.replicas.get(model, deployment.num_replicas)
            return max(math.ceil(deployment.max_ongoing_requests * replicas / routers), 1)

        return AdmissionGate(model, capacity, math.ceil(deployment.max_queued_requests / routers),
                             self.config.queue_timeout_s, on_depth=queue_depth_gauge(model, self.core.name))

    def _watch_replica_counts(self) -> None:
        if self._replicas_task is None:
            self._replicas_task = asyncio.get_running_loop().create_task(self._watch_replicas())

    async def _count_replicas(self) -> None:
        """Each model's RUNNING replicas, from Serve's status (not asked when every model is this replica's
        own: one `serve.status()` holds the GIL for ~30 ms here, a stall for the requests in flight)."""
        handles = {**self.engines, **self.on_demand.handles}
        if not handles:
            return
        status = await asyncio.to_thread(serve.status)
        for model, handle in handles.items():
            app = status.applications.get(handle.app_name)
            dep = app.deployments.get(handle.deployment_name) if app else None
            if dep is not None:
                self.replicas[model] = dep.replica_states.get(ReplicaState.RUNNING, 0)

    async def _watch_replicas(self) -> None:
        """Keep each model's running replica count fresh (autoscaling changes it), waking queues that gained room."""
        while True:
            try:
                await self._count_replicas()
                for gate in self.core.gates.values():
                    gate.wake()
            except Exception as exc:  # noqa: BLE001 - keep the last counts; admission must not fail over this
                log_event(logger, "replica_count_failed", error=repr(exc))
            await asyncio.sleep(REPLICA_POLL_S)

    def routing_status(self) -> dict[str, Any]:
        """Per model: its admission gate, its replicas' breakers and its affinity counts (this router replica)."""
        from helios.router.breaker import breakers_for
        from helios.router.replica_router import POLICIES

        out: dict[str, Any] = {}
        routes = {**self.core.routes, **self._on_demand_routes}
        for model, route in routes.items():
            key = route.engine.key
            gate = self.core.gates.get(model)
            policy = POLICIES.get(key)
            out[model] = {
                "admission": gate and {"capacity": gate.capacity(), "running": gate.running, "queued": gate.queued,
                                       "max_queued": gate.max_queued, "shed": gate.shed, "timed_out": gate.timed_out,
                                       "drain_per_s": gate.drain.per_second()},
                "breakers": {rid: {"state": b.state, "consecutive_failures": b.consecutive}
                             for rid, b in breakers_for(key).replicas.items()},
                "affinity": policy and {"matched": policy.matched, "balanced": policy.balanced,
                                        "prefixes": len(policy.owners), "sessions": len(policy.sessions)},
            }
        return out

    # -- usage -----------------------------------------------------------------------

    def _record_use(self, model: str) -> None:
        """Count a request for the registry's usage statistics, sent in batches (one message a second)."""
        self._usage.setdefault(model, []).append(time.time())
        if self._usage_task is None or self._usage_task.done():
            self._usage_task = asyncio.get_running_loop().create_task(self._flush_usage())

    async def _flush_usage(self) -> None:
        from helios.registry.actor import get_registry

        while self._usage:
            await asyncio.sleep(USAGE_FLUSH_S)
            batch, self._usage = self._usage, {}
            registry = get_registry()
            if registry is not None:
                try:
                    await registry.record_requests.remote(batch)
                except Exception as exc:  # noqa: BLE001 - usage is statistics: never fail serving over it
                    log_event(logger, "usage_flush_failed", error=repr(exc))

    async def _probe(self, model: str) -> dict[str, Any] | None:
        """The model's engine facts if a replica (of each side, if disaggregated) answers in time, else None.
        A model scaled to zero is ready without asking: a probe would wake it (its next request will)."""
        self._watch_replica_counts()
        config = self.models.get(model)
        if config is not None and config.deployment.min_replicas == 0:
            await self._count_replicas()  # fresh: a probe of a model at zero would queue and wake it
            if self.replicas.get(model) == 0:
                return {**self.infos.get(model, {}), "replicas": 0}
        if self.local is not None and model == self.local_model:
            calls = [self.local.info()]
        else:
            sides = [self.engines[model], *([self.prefill[model]] if model in self.prefill else [])]
            calls = [h.info.remote() for h in sides]
        try:
            info, *_ = await asyncio.wait_for(asyncio.gather(*calls), self.config.ready_timeout_s)
        except Exception:  # noqa: BLE001 - a side that does not answer is not ready
            return None
        self.infos[model] = info
        return info

    async def _probe_all(self) -> dict[str, dict[str, Any] | None]:
        """`_probe` of every model, concurrently."""
        models = self.config_models()
        infos = await asyncio.gather(*(self._probe(m) for m in models))
        return dict(zip(models, infos, strict=True))

    # -- OpenAI API: forwarded to vLLM's serving layer in the engine replica ----------------

    async def _forward(self, request: Request, path: str) -> Response:
        request.state.request_id = request_id = new_request_id(request.headers)
        self.core.authorize(request.headers)
        return _response(await self.core.forward(path, request.headers, await request.body(), request_id))

    @app.post("/v1/completions", include_in_schema=False)
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/completions")

    @app.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/chat/completions")

    @app.post("/v1/embeddings", include_in_schema=False)
    async def embeddings(self, request: Request) -> Response:
        return await self._forward(request, "/v1/embeddings")

    @app.post("/tokenize", include_in_schema=False)
    async def tokenize(self, request: Request) -> Response:
        return await self._forward(request, "/tokenize")

    @app.post("/detokenize", include_in_schema=False)
    async def detokenize(self, request: Request) -> Response:
        return await self._forward(request, "/detokenize")

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """Every model: the config's (with readiness) and every registered one, with versions, profile, warm view."""
        request.state.request_id = new_request_id(request.headers)
        self.core.authorize(request.headers)
        probes = await self._probe_all()
        registered = {m["id"]: m for m in await self._registered()}
        on_demand: set[str] = set()
        configured = self.config_models()
        if set(registered) - set(configured):
            try:
                on_demand = set((await self.on_demand.status())["ready"])
            except ServiceUnavailable:  # the manager does not answer: list them as not ready
                pass
        data = []
        for model in [*configured, *(m for m in registered if m not in configured)]:
            info = probes.get(model)
            known = info or self.infos.get(model) or {}
            entry = {"id": model, "object": "model", "created": known.get("created", 0), "owned_by": "helios",
                     "max_model_len": known.get("max_model_len"),
                     "ready": info is not None if model in configured else model in on_demand}
            entry.update(_registry_view(registered.get(model)))
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def _registered(self) -> list[dict[str, Any]]:
        """The registry's models, or none when it does not answer in time (listing must not hang on it)."""
        from helios.registry.actor import get_registry

        registry = get_registry()
        if registry is None:
            return []
        try:
            return await asyncio.wait_for(registry.list_models.remote(), self.config.ready_timeout_s * 5)
        except Exception as exc:  # noqa: BLE001 - list the config's models without the registry's view
            log_event(logger, "registry_unavailable", error=repr(exc))
            return []

    # -- schema --------------------------------------------------------------------

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        """vLLM's own schema of the forwarded routes, with Helios's routes beside them."""
        if self._openapi is None:
            # One schema per model: a pooling model's engine describes /v1/embeddings, a generator's the rest.
            try:
                local = [self.local.openapi()] if self.local is not None else []
                schemas = await asyncio.wait_for(
                    asyncio.gather(*local, *(h.openapi.remote() for h in self.engines.values())), 30)
            except Exception:  # noqa: BLE001 - no engine answers yet: the schema comes with the first one
                raise ServiceUnavailable("No engine replica is ready to describe the API yet", retry_after_s=5) from None
            self._openapi = merge_openapi(schemas, app.openapi())
        return JSONResponse(self._openapi)

    @app.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Helios API")

    # -- health --------------------------------------------------------------------

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        """Prometheus text: the head node's Ray metrics export (Helios's, vLLM's, Ray's own)."""
        try:
            text = await self.head_metrics.text()
        except OSError as exc:
            raise ServiceUnavailable(f"metrics are not available: {exc}", retry_after_s=5) from None
        return Response(text, media_type=PROMETHEUS_TEXT)

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        states = {model: info is not None for model, info in (await self._probe_all()).items()}
        ok = all(states.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "models": states}, status_code=200 if ok else 503)


def router_deployment(
    config: RouterConfig, engines: dict[str, Any], context: RouterContext, prefill: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> serve.Application:
    """Bind the router with its Serve options over the bound engine deployments.

    `context`: what on-demand models and the admin API need (cache root, storage and
    registry settings, the config's models)."""
    return serve.deployment(Router).options(
        name="router",
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})},
    ).bind(config.model_dump(), engines, context, prefill or {})


def colocated_router_deployment(
    config: RouterConfig, model: ModelConfig, context: RouterContext, env: dict[str, str] | None = None,
    hints: dict[str, Any] | None = None,
) -> serve.Application:
    """The router with `model`'s engine in each replica (`router.colocate_engine`): the replica takes
    the engine's resources and health checks and runs the model's `num_replicas`."""
    from helios.engine.placement import placement_for, warm_first

    hints = hints or {}
    # Each replica is a router too: models reached by handle share their capacity among all of them.
    router = config.model_copy(update={"num_replicas": model.deployment.num_replicas})
    options = warm_first(placement_for(model, hints.get("memory_need")), hints.get("warm_nodes") or []).deployment_options()
    if env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return serve.deployment(Router).options(
        name="router",
        num_replicas=router.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
        **options,
    ).bind(router.model_dump(), {}, context, {}, model.model_dump(mode="json"))

