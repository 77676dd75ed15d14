"""`build_app(args)`: the Serve application a config's `import_path` names."""

from __future__ import annotations

from typing import Any

from ray import serve

from helios.config import HeliosArgs, ModelConfig, RouterContext, parse_args
from helios.engine.deployment import engine_deployment, registry_hints
from helios.observability.settings_env import settings_env
from helios.router.ingress import colocated_router_deployment, router_deployment


def build_app(args: dict[str, Any] | HeliosArgs) -> serve.Application:
    """Validate `args` (raising ConfigError naming any bad key), start the registry, bind router and engines."""
    from helios.registry.actor import get_or_create_registry

    config = parse_args(args)
    cache_root = str(config.resolved_cache_root())
    storage = config.storage.model_dump(mode="json") if config.storage else None
    settings = {"prefetch_interval_s": config.registry.prefetch_interval_s}
    registry = get_or_create_registry(str(config.registry_state_dir()), storage, cache_root, settings)
    for m in config.models:  # listed at once; each replica registers its version again once loaded
        ref = _config_version(m, config.storage is not None)
        if ref is not None:
            registry.register.remote(m.id, ref[0], ref[1], make_default=True, pinned=True)
    env = settings_env(config.observability)  # each replica makes its tracer and metrics from it
    context = RouterContext(cache_root=cache_root, storage=config.storage, registry=config.registry,
                            models=config.models, engine_pool=config.engine_pool)
    if config.router.colocate_engine:  # one model, its engine in each router replica
        model = config.models[0]
        return colocated_router_deployment(config.router, model, context, env=env, hints=registry_hints(model))
    engines, prefill = {}, {}
    for m in config.models:
        hints = registry_hints(m)  # warm nodes first; a MIG slice must hold the model
        if m.serving == "disaggregated":  # the router prefills on one side, then decodes on the other
            prefill[m.id] = engine_deployment(m, cache_root, config.storage, role="prefill", env=env, hints=hints)
            engines[m.id] = engine_deployment(m, cache_root, config.storage, role="decode", env=env, hints=hints)
        else:
            engines[m.id] = engine_deployment(m, cache_root, config.storage, env=env, hints=hints)
    return router_deployment(config.router, engines, context, prefill, env=env)


def _config_version(model: ModelConfig, has_storage: bool) -> tuple[str, str] | None:
    """(version, source) a config model is registered under before its replicas load it.

    Replicas register what they actually loaded (`store://ID:VERSION` or a directory);
    this gives the same answer up front, or None for `store://ID` without a version,
    which only the store resolves."""
    from helios.storage.manifest import parse_ref
    from helios.storage.sources import demo_version

    if model.source.startswith("demo://"):
        preset = model.source.removeprefix("demo://")
        if has_storage:
            return demo_version(preset), f"store://{model.id}:{demo_version(preset)}"
        return "local", model.source
    if model.source.startswith("store://"):
        _model_id, version = parse_ref(model.source.removeprefix("store://"))
        return (version, model.source) if version else None
    return "local", model.source.removeprefix("file://")
