"""The router: Helios's only HTTP ingress (OpenAI API, health, readiness).

It validates and authorizes at the edge, routes by model id to that model's engine
deployment, and streams engine chunks back as server-sent events without buffering.
Errors before the first token become proper status codes; the first chunk is awaited
before the 200 is sent for exactly that reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from helios.api import admin, error_handlers
from helios.api.protocol import ChatCompletionRequest, CompletionRequest, EngineChunk, EngineRequest
from helios.api.responses import ResponseShape, error_event
from helios.config import ModelConfig, RegistryConfig, RouterConfig, StorageConfig
from helios.errors import AuthenticationFailed, HeliosError, InvalidRequest, ModelNotFound, ServiceUnavailable
from helios.observability.logs import get_logger, log_event
from helios.ray_env import lower_priority
from helios.router.on_demand import OnDemandModels

logger = get_logger("router")

app = FastAPI(title="Helios", docs_url=None, redoc_url=None, openapi_url=None)
error_handlers.install(app)
app.include_router(admin.router)
USAGE_FLUSH_S = 1.0


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def _engine_request_id(request: Request) -> str:
    """Unique per engine request even when clients reuse an x-request-id (aborts go by id)."""
    return f"{request.state.request_id}.{uuid.uuid4().hex[:8]}"


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


@serve.ingress(app)
class Router:
    """Routes OpenAI requests by `model` to engine deployments."""

    def __init__(
        self,
        config: dict[str, Any],
        engines: dict[str, DeploymentHandle],
        context: dict[str, Any] | None = None,
        prefill: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        context = context or {}
        self.config = RouterConfig.model_validate(config)
        self.keys = [k.encode() for k in self.config.keys()]  # noqa: SIM118 - RouterConfig.keys(): the API keys
        self.engines = engines  # a disaggregated model's entry is its decode side
        self.prefill = prefill or {}
        self.streams = {m: h.options(stream=True) for m, h in engines.items()}
        self.infos: dict[str, dict[str, Any]] = {}
        self.cache_root: str = context.get("cache_root", "")
        self.storage = StorageConfig.model_validate(context["storage"]) if context.get("storage") else None
        self.registry_config = RegistryConfig.model_validate(context.get("registry") or {})
        self.models = {m["id"]: ModelConfig.model_validate(m) for m in context.get("models", [])}
        self.on_demand = OnDemandModels(self.cache_root, self.storage, self.registry_config)
        self._usage: dict[str, list[float]] = {}
        self._usage_task: asyncio.Task | None = None
        app.state.helios = self  # the admin routes reach the router's state through the app
        lower_priority(self.config.nice)

    # -- edge checks -------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        """Name the request (the client's x-request-id, or a new one), then check its key.

        Done per handler rather than in an HTTP middleware: Starlette's middleware wraps
        every streamed body in extra tasks and queues, a real cost per chunk.
        """
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self.keys):
            raise AuthenticationFailed("Missing or invalid API key: send 'Authorization: Bearer <key>'")

    async def _handles(self, model: str) -> tuple[DeploymentHandle, DeploymentHandle]:
        """(handle, streaming handle) of the model's engine: a config model's, or one started on demand."""
        if model in self.engines:
            self._record_use(model)
            return self.engines[model], self.streams[model]
        if not self.on_demand.ready(model):
            record = await self.resolve(model)
            self._record_use(model)  # demand counts even while the model cold-starts (it drives prefetch)
            await self.on_demand.handle(model, record)
        else:
            self._record_use(model)
        return self.on_demand.handles[model], self.on_demand.streams[model]

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
        """The model's engine facts if a replica (of each side, if disaggregated) answers in time, else None."""
        sides = [self.engines[model], *([self.prefill[model]] if model in self.prefill else [])]
        try:
            info, *_ = await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in sides)),
                                              self.config.ready_timeout_s)
        except Exception:  # noqa: BLE001 - a side that does not answer is not ready
            return None
        self.infos[model] = info
        return info

    async def _probe_all(self) -> dict[str, dict[str, Any] | None]:
        """`_probe` of every model, concurrently."""
        infos = await asyncio.gather(*(self._probe(m) for m in self.engines))
        return dict(zip(self.engines, infos))

    # -- OpenAI API ----------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._parse(request, CompletionRequest)
        ereq = EngineRequest(
            request_id=_engine_request_id(request),
            prompt=body.prompt,
            sampling=body.sampling(body.max_tokens),
            return_token_ids=body.return_token_ids,
        )
        return await self._serve(body, ereq, chat=False, request_id=request.state.request_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._parse(request, ChatCompletionRequest)
        ereq = EngineRequest(
            request_id=_engine_request_id(request),
            messages=[{"role": m.role, "content": m.text()} for m in body.messages],
            sampling=body.sampling(body.token_limit()),
            return_token_ids=body.return_token_ids,
        )
        return await self._serve(body, ereq, chat=True, request_id=request.state.request_id)

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """Every model: the config's (with readiness) and every registered one, with versions, profile, warm view."""
        self._authorize(request)
        probes = await self._probe_all()
        registered = {m["id"]: m for m in await self._registered()}
        data = []
        for model in [*self.engines, *(m for m in registered if m not in self.engines)]:
            info = probes.get(model)
            known = info or self.infos.get(model) or {}
            entry = {"id": model, "object": "model", "created": known.get("created", 0), "owned_by": "helios",
                     "max_model_len": known.get("max_model_len"),
                     "ready": info is not None if model in self.engines else self.on_demand.ready(model)}
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

    # -- health --------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        states = {model: info is not None for model, info in (await self._probe_all()).items()}
        ok = all(states.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "models": states}, status_code=200 if ok else 503)

    # -- the request path ------------------------------------------------------------

    async def _parse(self, request: Request, model_cls: type) -> Any:
        try:
            return model_cls.model_validate(await _json_body(request))
        except ValidationError as exc:
            raise error_handlers.invalid_from_validation(exc) from None

    async def _serve(self, body: Any, ereq: EngineRequest, chat: bool, request_id: str) -> Response:
        engine, streams = await self._handles(body.model)
        if body.model in self.prefill:
            ereq = await self._prefill(body.model, ereq)
        shape = ResponseShape(chat, ("chatcmpl-" if chat else "cmpl-") + request_id, int(time.time()), body.model)
        headers = {"x-request-id": request_id}
        if not body.stream:
            chunk = await self._call(engine.generate.remote(ereq))
            return JSONResponse(shape.full(chunk), headers=headers)
        gen = streams.generate_stream.remote(ereq)
        try:
            first = await self._call(gen.__anext__())
        except StopAsyncIteration:
            raise ServiceUnavailable("The engine ended the stream before any output; retry") from None
        except BaseException:
            gen.cancel()
            raise
        return StreamingResponse(self._events(shape, first, gen, body.include_usage, request_id),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})

    async def _prefill(self, model: str, ereq: EngineRequest) -> EngineRequest:
        """Run the prompt on a prefill replica (one token, its KV saved to the store); return the
        decode request that continues from that KV. A decode side that cannot find the blocks
        recomputes them (and counts it), so this never changes the tokens, only who computes them."""
        sampling = {k: v for k, v in ereq.sampling.items() if k != "min_tokens"}
        pre = dataclasses.replace(ereq, request_id=ereq.request_id + "-prefill", sampling={**sampling, "max_tokens": 1},
                                  return_token_ids=False, kv_transfer_params={"do_remote_decode": True})
        chunk = await self._call(self.prefill[model].generate.remote(pre))
        return dataclasses.replace(ereq, kv_transfer_params=chunk.kv_transfer_params)

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except StopAsyncIteration:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray wraps errors: the HeliosError inside keeps its status
            raise error_handlers.unwrap(exc) from None

    async def _events(self, shape: ResponseShape, first: EngineChunk, gen: Any, include_usage: bool, request_id: str) -> AsyncIterator[bytes]:
        """SSE bytes for one stream; a client that goes away cancels the engine request."""
        last, finished = first, first.finish_reason is not None
        try:
            yield shape.event(first, first=True)
            async for chunk in gen:
                last, finished = chunk, chunk.finish_reason is not None
                yield shape.event(chunk, first=False)
            yield shape.closing(last, include_usage)
        except Exception as exc:  # noqa: BLE001 - the 200 is already sent: report in-band
            inner = error_handlers.unwrap(exc)
            err = inner if isinstance(inner, HeliosError) else HeliosError("stream failed")
            log_event(logger, "stream_failed", request_id=request_id, error=repr(exc))
            yield error_event(err.to_body(request_id))
        finally:
            if not finished:
                gen.cancel()
                log_event(logger, "stream_cancelled", request_id=request_id, completion_tokens=last.completion_tokens)


def router_deployment(
    config: RouterConfig, engines: dict[str, Any], context: dict[str, Any], prefill: dict[str, Any] | None = None
) -> serve.Application:
    """Bind the router with its Serve options over the bound engine deployments.

    `context`: what on-demand models and the admin API need (cache root, storage and
    registry settings, the config's models), as plain JSON."""
    return serve.deployment(Router).options(
        name="router",
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus},
    ).bind(config.model_dump(), engines, context, prefill or {})
