"""Models started on demand: a registered model that the Serve config does not deploy.

The first request for such a model deploys it as its own Serve application
(`helios-model-<id>`, no HTTP route: the router reaches it through a handle), which
cold-starts through the storage tiers like any replica. The request waits up to
`registry.start_timeout_s`; past that, or when `registry.max_dynamic_models` models are
already running on demand, it gets 503 with Retry-After while the start goes on. A
separate application per model means deploying or deleting one never touches the
config's application (and so never restarts the router).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from helios.config import ModelConfig, RegistryConfig, StorageConfig
from helios.errors import HeliosError, ModelNotFound, ServiceUnavailable
from helios.observability.logs import get_logger, log_event

logger = get_logger("router.on_demand")
APP_PREFIX = "helios-model-"


def app_name(model_id: str) -> str:
    return APP_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


def _serve_apps() -> dict[str, str]:
    """Serve application name -> status (RUNNING, DEPLOYING, DEPLOY_FAILED, ...)."""
    return {name: str(app.status) for name, app in serve.status().applications.items()}


def model_config(model_id: str, record: dict[str, Any], defaults: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a registered version: its own deploy settings over the registry defaults."""
    deploy = record.get("deploy") or {}
    return ModelConfig.model_validate({
        "id": model_id,
        "source": record["source"],
        "engine": {**defaults.get("engine", {}), **deploy.get("engine", {})},
        "deployment": {**defaults.get("deployment", {}), **deploy.get("deployment", {})},
    })


class OnDemandModels:
    """Deploys, finds and removes the per-model applications of on-demand models."""

    def __init__(self, cache_root: str, storage: StorageConfig | None, registry: RegistryConfig) -> None:
        self.cache_root = cache_root
        self.storage = storage
        self.config = registry
        self.handles: dict[str, DeploymentHandle] = {}
        self.streams: dict[str, DeploymentHandle] = {}
        self._starting: dict[str, asyncio.Task] = {}
        self._stopped: set[str] = set()  # stopped while starting: the start undoes itself

    def ready(self, model_id: str) -> bool:
        return model_id in self.handles

    def status(self) -> dict[str, list[str]]:
        """What this router replica runs on demand: ready, still starting, stopped while starting."""
        return {"ready": sorted(self.handles), "starting": sorted(self._starting), "stopping": sorted(self._stopped)}

    async def handle(self, model_id: str, record: dict[str, Any]) -> DeploymentHandle:
        """The model's handle, starting it if needed; 503 + Retry-After while it is not ready in time."""
        if model_id in self.handles:
            return self.handles[model_id]
        if self.storage is None or self.config.max_dynamic_models == 0:
            raise ServiceUnavailable(
                f"The model `{model_id}` is registered but not deployed, and this server starts no models on demand "
                "(needs a `storage:` section and registry.max_dynamic_models > 0)."
            )
        task = self._starting.get(model_id)
        if task is None:
            task = asyncio.create_task(self._start(model_id, record))
            self._starting[model_id] = task
            task.add_done_callback(lambda t, m=model_id: self._started(m, t))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.config.start_timeout_s)
        except TimeoutError:
            raise ServiceUnavailable(
                f"The model `{model_id}` is starting (cold start); retry shortly.",
                retry_after_s=self.config.retry_after_s,
            ) from None

    def _started(self, model_id: str, task: asyncio.Task) -> None:
        self._starting.pop(model_id, None)
        self._stopped.discard(model_id)  # a start that failed early never undid itself
        if not task.cancelled() and task.exception() is None:
            handle = task.result()
            self.handles[model_id] = handle
            self.streams[model_id] = handle.options(stream=True)

    async def _start(self, model_id: str, record: dict[str, Any]) -> DeploymentHandle:
        name = app_name(model_id)
        apps = await asyncio.to_thread(_serve_apps)
        if name not in apps:
            running = [a for a in apps if a.startswith(APP_PREFIX)]
            if len(running) >= self.config.max_dynamic_models:
                raise ServiceUnavailable(
                    f"{len(running)} model(s) already run on demand, the most registry.max_dynamic_models allows; "
                    f"retry later or ask an admin to free one.",
                    retry_after_s=self.config.retry_after_s,
                )
            config = model_config(model_id, record, self.config.defaults.model_dump(mode="json"))
            log_event(logger, "model_starting", flush=True, model=model_id, app=name, source=config.source)
            from helios.engine.deployment import engine_deployment

            app = engine_deployment(config, self.cache_root, self.storage, pinned=False)
            try:
                await asyncio.to_thread(serve.run, app, name=name, route_prefix=None)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the half-deployed app is removed
                log_event(logger, "model_start_failed", flush=True, model=model_id, error=repr(exc))
                await asyncio.to_thread(serve.delete, name)
                raise HeliosError(f"model {model_id} failed to start: {exc}") from None
        await self._unless_stopped(model_id, name)
        handle = serve.get_app_handle(name)
        await handle.info.remote()  # waits for a replica that has its engine started
        await self._unless_stopped(model_id, name)
        log_event(logger, "model_started", flush=True, model=model_id, app=name)
        return handle

    async def _unless_stopped(self, model_id: str, name: str) -> None:
        """A model stopped (deleted) while it was starting: remove what the start deployed, and
        tell its waiting requests the model is gone, instead of serving a deleted model."""
        if model_id not in self._stopped:
            return  # (`_started` clears the mark when the start task ends, either way)
        await asyncio.to_thread(serve.delete, name)
        log_event(logger, "model_start_undone", flush=True, model=model_id, app=name)
        raise ModelNotFound(f"The model `{model_id}` was deleted while it was starting.", param="model")

    async def stop(self, model_id: str) -> bool:
        """Delete the model's on-demand application; False if it had none."""
        name = app_name(model_id)
        self.handles.pop(model_id, None)
        self.streams.pop(model_id, None)
        if model_id in self._starting:
            # The start removes its app once its deploy is over: deleting an app while serve.run
            # waits on it can leave that call waiting for good.
            self._stopped.add(model_id)
            log_event(logger, "model_stop_deferred", flush=True, model=model_id, app=name)
            return True
        if name not in await asyncio.to_thread(_serve_apps):
            return False
        await asyncio.to_thread(serve.delete, name)
        log_event(logger, "model_stopped", flush=True, model=model_id, app=name)
        return True
