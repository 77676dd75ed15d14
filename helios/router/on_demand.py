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
import contextlib
import inspect
import re
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from helios.config import ModelConfig, RegistryConfig, StorageConfig
from helios.errors import HeliosError, ModelNotFound, ServiceUnavailable
from helios.observability.logs import get_logger, log_event
from helios.observability.metrics import ON_DEMAND_START_SECONDS, ON_DEMAND_STARTS
from helios.observability.settings_env import inherited_env

logger = get_logger("router.on_demand")
APP_PREFIX = "helios-model-"


def app_name(model_id: str) -> str:
    return APP_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


def _serve_apps() -> dict[str, str]:
    """Serve application name -> status (RUNNING, DEPLOYING, DEPLOY_FAILED, ...)."""
    return {name: str(app.status) for name, app in serve.status().applications.items()}


APP_POLL_S = 0.1  # how often a start asks whether its application is running


async def _deploy_and_wait(app: Any, name: str) -> None:
    """Deploy an application and return once it is RUNNING (raise if its deploy fails).

    `serve.run` checks for RUNNING once a second (Ray's CLIENT_POLLING_INTERVAL_S), up to a
    second added to every on-demand start, most of what a pooled start spends outside the
    replica; this asks every `APP_POLL_S` instead. Where Ray lacks the non-blocking deploy,
    `serve.run` waits as before."""
    deploy = getattr(serve, "_run", None)
    if deploy is None or "_blocking" not in inspect.signature(deploy).parameters:  # another Ray
        await asyncio.to_thread(serve.run, app, name=name, route_prefix=None)
        return
    await asyncio.to_thread(deploy, app, name=name, route_prefix=None, _blocking=False)
    while True:
        app_status = await asyncio.to_thread(lambda: serve.status().applications.get(name))
        if app_status is None:  # deleted meanwhile (or the controller lost it): as serve.run says it
            raise RuntimeError(f"Waiting for application {name} to be RUNNING, but application doesn't exist.")
        if app_status.status == ApplicationStatus.RUNNING:
            return
        if app_status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Deploying application {name} failed: {app_status.message}")
        await asyncio.sleep(APP_POLL_S)


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
        started = time.monotonic()
        try:
            handle = await self._deploy(model_id, record)
        except BaseException:
            ON_DEMAND_STARTS.inc(model=model_id, outcome="failed")
            raise
        ON_DEMAND_STARTS.inc(model=model_id, outcome="started")
        ON_DEMAND_START_SECONDS.observe(time.monotonic() - started, model=model_id)
        return handle

    async def _deploy(self, model_id: str, record: dict[str, Any]) -> DeploymentHandle:
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
            from helios.engine.deployment import engine_deployment, registry_hints

            hints = await asyncio.to_thread(registry_hints, config)  # warm nodes first
            app = engine_deployment(config, self.cache_root, self.storage, pinned=False, hints=hints,
                                    env=inherited_env())
            try:
                await _deploy_and_wait(app, name)
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


# -- one manager per Helios application -----------------------------------------------------------

MANAGER_PREFIX = "helios-on-demand-"
MANAGER_NAMESPACE = "helios"
READY_TTL_S = 5.0  # how long a router replica trusts its cached handle before asking the manager again
APP_WATCH_S = 30.0


class OnDemandManager:
    """The one place an application's on-demand models are started and stopped (a Ray actor).

    Every router replica asks it, so with several router replicas a model starts once and an
    admin delete stops it for all. It lives as long as its Helios application: once that is
    gone it deletes the models it started and exits."""

    def __init__(self, app: str, cache_root: str, storage: dict[str, Any] | None, registry: dict[str, Any]) -> None:
        self.app = app
        self.models = OnDemandModels(cache_root, StorageConfig.model_validate(storage) if storage else None,
                                     RegistryConfig.model_validate(registry))
        self._watch: asyncio.Task | None = None

    async def ensure(self, model_id: str, record: dict[str, Any]) -> str:
        """The model's application name once it serves (starting it if needed); 503 while it starts."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_app())
        await self.models.handle(model_id, record)
        return app_name(model_id)

    async def warm(self) -> None:
        """Made ready before any model is asked for (router start): the first on-demand start then
        pays no actor start, Serve client connection or import (seconds of a pooled start's first token)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_app())
        await asyncio.to_thread(_serve_apps)
        import helios.engine.deployment  # noqa: F401 - what a start imports, ahead of it

    def ready(self, model_id: str) -> bool:
        return self.models.ready(model_id)

    async def stop(self, model_id: str) -> bool:
        return await self.models.stop(model_id)

    def status(self) -> dict[str, list[str]]:
        return self.models.status()

    async def _watch_app(self) -> None:
        """Exit with the application: its on-demand models go with it."""
        import ray

        while True:
            await asyncio.sleep(APP_WATCH_S)
            try:
                apps = await asyncio.to_thread(_serve_apps)
            except Exception:  # noqa: BLE001, S112 - the controller may be restarting: look again later
                continue
            if self.app not in apps:
                for model_id in list(self.models.handles):
                    await self.models.stop(model_id)
                log_event(logger, "on_demand_manager_exit", flush=True, app=self.app)
                ray.actor.exit_actor()


class OnDemandClient:
    """A router replica's view of its application's on-demand models, through the one manager."""

    def __init__(self, app: str, cache_root: str, storage: StorageConfig | None, registry: RegistryConfig) -> None:
        self.app = app
        self.args = (app, cache_root, storage.model_dump(mode="json") if storage else None,
                     registry.model_dump(mode="json"))
        self.handles: dict[str, DeploymentHandle] = {}
        self._checked: dict[str, float] = {}
        self._actor: Any = None

    def _manager(self, create: bool = True) -> Any:
        import ray

        if self._actor is None:
            name = MANAGER_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", self.app)
            if create:
                self._actor = ray.remote(OnDemandManager).options(
                    name=name, namespace=MANAGER_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                    max_restarts=-1, max_concurrency=64).remote(*self.args)
            else:
                try:
                    self._actor = ray.get_actor(name, namespace=MANAGER_NAMESPACE)
                except ValueError:
                    return None
        return self._actor

    async def _call(self, ref: Any) -> Any:
        from helios.errors import unwrap

        try:
            return await ref
        except Exception as exc:  # noqa: BLE001 - the manager's HeliosErrors (503, 404) keep their status
            inner = unwrap(exc)
            if isinstance(inner, HeliosError):
                raise inner from None
            # A handle to a manager that has exited (its application was deleted and this one redeployed
            # under the same name before the name was freed) never answers again: look it up afresh next
            # time, which creates a new manager once the old one is gone.
            self._actor = None
            raise ServiceUnavailable("The on-demand model manager is not answering; retry shortly.",
                                     retry_after_s=5) from None

    async def warm(self) -> None:
        """Start the application's manager now, not at the first on-demand request. A manager that does
        not answer (one of a deleted application, still exiting) is dropped, as a request would drop it."""
        with contextlib.suppress(HeliosError):
            await self._call(self._manager().warm.remote())

    def ready(self, model_id: str) -> bool:
        """Served here without asking the manager (a cached handle, rechecked every READY_TTL_S)."""
        import time

        return model_id in self.handles and time.monotonic() - self._checked.get(model_id, 0.0) < READY_TTL_S

    async def handle(self, model_id: str, record: dict[str, Any]) -> DeploymentHandle:
        import time

        name = await self._call(self._manager().ensure.remote(model_id, record))
        if model_id not in self.handles:
            self.handles[model_id] = serve.get_app_handle(name)
        self._checked[model_id] = time.monotonic()
        return self.handles[model_id]

    async def stop(self, model_id: str) -> bool:
        self.handles.pop(model_id, None)
        self._checked.pop(model_id, None)
        manager = self._manager(create=False)
        return bool(manager and await self._call(manager.stop.remote(model_id)))

    async def status(self) -> dict[str, list[str]]:
        manager = self._manager(create=False)
        if manager is None:
            return {"ready": [], "starting": [], "stopping": []}
        return await self._call(manager.status.remote())
