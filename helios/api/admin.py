"""The admin HTTP surface under /admin: the registry, the caches, replica bounds.

Separate credentials from the OpenAI API: `router.admin_token` (or HELIOS_ADMIN_TOKEN).
No token sent: 401; a wrong one, or an admin API with no token configured: 403. Every
action that changes something is logged with who asked and what changed.

The routes are plain functions on the router's FastAPI app; they reach the router's
state (registry settings, storage, on-demand models) through `request.app.state.helios`.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helios.api import error_handlers
from helios.api.bodies import parse_json_object
from helios.config import MODEL_ID_PATTERN
from helios.errors import (
    AuthenticationFailed,
    Conflict,
    HeliosError,
    InvalidRequest,
    PermissionDenied,
    ServiceUnavailable,
)
from helios.observability.logs import get_logger, log_event

logger = get_logger("admin")
router = APIRouter(prefix="/admin")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterBody(_Body):
    model: str = Field(..., pattern=MODEL_ID_PATTERN, description="Model id clients will send.")
    version: str = Field(..., min_length=1, max_length=128)
    source: str | None = Field(
        None, description="store://ID:VERSION (default: store://<model>:<version>), or a directory on the router's "
        "node that is pushed to the store first."
    )
    make_default: bool = False
    deploy: dict[str, Any] | None = Field(None, description="{engine: {...}, deployment: {...}} for on-demand starts.")


class DefaultBody(_Body):
    model: str
    version: str


class CacheBody(_Body):
    model: str
    version: str | None = None
    tier: Literal["ram", "nvme", "ssd"] | None = None
    node_id: str | None = Field(None, description="One node; default every alive node.")


class EvictBody(_Body):
    model: str | None = Field(None, description="Default: everything in the tier(s).")
    version: str | None = None
    tier: Literal["ram", "nvme", "ssd"] | None = None
    node_id: str | None = None


class ScaleBody(_Body):
    model: str
    min_replicas: int = Field(..., ge=1)
    max_replicas: int = Field(..., ge=1)


def _state(request: Request) -> Any:
    """The router deployment that mounted these routes (it sets `app.state.helios`; the api layer sits
    below the router, so it is not imported here)."""
    return request.app.state.helios


def _authorize(request: Request) -> str:
    """Check the admin bearer token; returns the request id the action is logged under."""
    request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("The admin API needs 'Authorization: Bearer <admin token>'")
    expected = _state(request).config.admin_key()
    if expected is None:
        raise PermissionDenied("The admin API is disabled: no router.admin_token or HELIOS_ADMIN_TOKEN is set")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise PermissionDenied("Wrong admin token")
    return request.state.request_id


async def _body(request: Request, cls: type[_Body]) -> Any:
    try:
        return cls.model_validate(parse_json_object(await request.body()))
    except ValidationError as exc:
        raise error_handlers.invalid_from_validation(exc) from None


def _registry() -> Any:
    from helios.registry.actor import get_registry

    registry = get_registry()
    if registry is None:
        raise ServiceUnavailable("The model registry is not running; retry shortly.", retry_after_s=5)
    return registry


async def _call(ref: Any) -> Any:
    """Await a registry call: its own errors keep their status; a registry that is dead or
    restarting is a 503 to retry, not a server error."""
    from ray.exceptions import RayActorError  # ActorUnavailableError (restarting) is one too

    try:
        return await ref
    except RayActorError:
        raise ServiceUnavailable("The model registry is restarting; retry shortly.", retry_after_s=5) from None
    except Exception as exc:
        inner = error_handlers.unwrap(exc)
        if isinstance(inner, HeliosError):
            raise inner from None
        raise


def _audit(request: Request, action: str, **fields: Any) -> None:
    client = request.client.host if request.client else None
    log_event(logger, "admin_action", flush=True, action=action, request_id=request.state.request_id, client=client,
              **fields)


def _storage(request: Request) -> dict[str, Any]:
    state = _state(request)
    if state.storage is None:
        raise Conflict("This server has no `storage:` section, so it has no caches to act on")
    return state.storage.model_dump(mode="json")


# -- registry ------------------------------------------------------------------------


@router.get("/registry")
async def registry_status(request: Request) -> JSONResponse:
    _authorize(request)
    registry = _registry()
    models, status = await asyncio.gather(_call(registry.list_models.remote()), _call(registry.status.remote()))
    on_demand = await _state(request).on_demand.status()
    return JSONResponse({"models": models, "status": status, "on_demand": on_demand})


@router.post("/models")
async def register(request: Request) -> JSONResponse:
    """Register a version (pushing a directory into the store first when given one)."""
    _authorize(request)
    body: RegisterBody = await _body(request, RegisterBody)
    source = body.source or f"store://{body.model}:{body.version}"
    if not source.startswith("store://"):
        source = await _push(request, Path(source), body.model, body.version)
    record = await _call(_registry().register.remote(
        body.model, body.version, source, make_default=body.make_default, deploy=body.deploy))
    _audit(request, "register", model=body.model, version=body.version, source=source, make_default=body.make_default)
    return JSONResponse(record, status_code=201)


async def _push(request: Request, path: Path, model: str, version: str) -> str:
    from helios.config import StorageConfig
    from helios.storage.store import ModelStore

    storage = _storage(request)
    if not path.is_dir():
        raise InvalidRequest(f"source: {path} is neither store://ID:VERSION nor a directory on the server", param="source")
    store = ModelStore.from_config(StorageConfig.model_validate(storage), Path(_state(request).cache_root))
    await asyncio.to_thread(store.push, path, model, version)
    return f"store://{model}:{version}"


@router.delete("/models")
async def delete(request: Request, model: str, version: str | None = None) -> JSONResponse:
    """Delete a version, or a whole model (which also stops its on-demand replicas)."""
    _authorize(request)
    state = _state(request)
    if model in state.config_models() and version is None:
        raise Conflict(f"The model `{model}` is declared in the Serve config; remove it there", param="model")
    await _call(_registry().delete.remote(model, version))
    stopped = await state.on_demand.stop(model) if version is None else False
    _audit(request, "delete", model=model, version=version, stopped_replicas=stopped)
    return JSONResponse({"deleted": {"model": model, "version": version}, "stopped": stopped})


@router.post("/models/default")
async def set_default(request: Request) -> JSONResponse:
    _authorize(request)
    body: DefaultBody = await _body(request, DefaultBody)
    record = await _call(_registry().set_default.remote(body.model, body.version))
    _audit(request, "set_default", model=body.model, version=body.version)
    return JSONResponse(record)


# -- caches --------------------------------------------------------------------------


async def _refresh_tiers(request: Request) -> dict[str, Any]:
    """Every node's tier status, also handed to the registry's warm view."""
    from helios.storage.node_ops import on_nodes

    state = _state(request)
    status = await on_nodes("status", _storage(request), state.cache_root)
    registry = _registry()
    for node, result in status.items():
        if "tiers" in result:
            view: dict[str, dict[str, int]] = {}
            for kind, tier in result["tiers"].items():
                for model, size in tier["model_bytes"].items():
                    view.setdefault(model, {})[kind] = size
            registry.set_tiers.remote(node, view)
    return status


@router.post("/preload")
async def preload(request: Request) -> JSONResponse:
    """Bring a model version into a tier on every node (or one)."""
    from helios.storage.node_ops import on_nodes

    _authorize(request)
    body: CacheBody = await _body(request, CacheBody)
    state = _state(request)
    record = await state.resolve(body.model, body.version)
    model_id, version = _store_ref(record)
    results = await on_nodes("preload", _storage(request), state.cache_root, body.node_id,
                             model_id=model_id, version=version, tier=body.tier)
    await _refresh_tiers(request)
    _audit(request, "preload", model=body.model, version=version, tier=body.tier, node_id=body.node_id)
    return JSONResponse({"nodes": results})


@router.post("/evict")
async def evict(request: Request) -> JSONResponse:
    """Drop a model version (or a whole model, or everything) from a tier on every node (or one)."""
    from helios.storage.node_ops import on_nodes

    _authorize(request)
    body: EvictBody = await _body(request, EvictBody)
    state = _state(request)
    model_id, version = None, None
    if body.model is not None:
        model_id, version = _store_ref(await state.resolve(body.model, body.version))
        version = version if body.version else None  # no version named: every version of the model
    results = await on_nodes("evict", _storage(request), state.cache_root, body.node_id,
                             model_id=model_id, version=version, tier=body.tier)
    await _refresh_tiers(request)
    _audit(request, "evict", model=body.model, version=body.version, tier=body.tier, node_id=body.node_id)
    return JSONResponse({"nodes": results})


def _store_ref(record: dict[str, Any]) -> tuple[str, str]:
    """(model id, version) in the store that a registry record's source names."""
    from helios.storage.manifest import parse_ref

    source = record.get("source", "")
    if not source.startswith("store://"):
        raise Conflict(f"version {record.get('version')} loads from {source}, not through the cache tiers")
    model_id, version = parse_ref(source.removeprefix("store://"))
    return model_id, version or record["version"]


@router.get("/cache")
async def cache_status(request: Request) -> JSONResponse:
    """Per node and tier: bytes, capacity, models held, and hits/misses of replica loads."""
    _authorize(request)
    status = await _refresh_tiers(request)
    stats = await _call(_registry().cache_stats.remote())
    for node, result in status.items():
        for kind, tier in result.get("tiers", {}).items():
            tier.update(stats.get(node, {}).get(kind, {"hits": 0, "misses": 0}))
    return JSONResponse({"nodes": status})


# -- replicas and usage --------------------------------------------------------------


@router.get("/routing")
async def routing_status(request: Request) -> JSONResponse:
    """This router replica's view per model: admission queue, replicas' circuit breakers, affinity counts."""
    _authorize(request)
    return JSONResponse({"models": _state(request).routing_status()})


@router.post("/scale")
async def scale(request: Request) -> JSONResponse:
    """Set a model's replica bounds; the engines' autoscaling policy moves into them within seconds."""
    _authorize(request)
    body: ScaleBody = await _body(request, ScaleBody)
    state = _state(request)
    if body.min_replicas > body.max_replicas:
        raise InvalidRequest("min_replicas: must not exceed max_replicas", param="min_replicas")
    if body.model == state.local_model:
        raise Conflict(f"The model `{body.model}` runs in the router's replicas (router.colocate_engine): it has "
                       "models.0.deployment.num_replicas replicas; change that in the Serve config", param="model")
    config = state.models.get(body.model)
    ceiling = (config.deployment if config else state.registry_config.defaults.deployment).replica_ceiling()
    if body.max_replicas > ceiling:
        raise InvalidRequest(f"max_replicas: at most {ceiling} for `{body.model}` (its deployment.max_replicas)",
                             param="max_replicas")
    if config is None:
        await state.resolve(body.model)  # 404 for a model nobody registered
    result = await _call(_registry().set_scale.remote(body.model, body.min_replicas, body.max_replicas))
    _audit(request, "scale", model=body.model, min_replicas=body.min_replicas, max_replicas=body.max_replicas)
    return JSONResponse(result)


@router.get("/usage")
async def usage(request: Request, model: str | None = None) -> JSONResponse:
    _authorize(request)
    return JSONResponse(await _call(_registry().usage.remote(model)))
