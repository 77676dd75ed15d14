"""`build_app(args)`: the Serve application a config's `import_path` names."""

from __future__ import annotations

from typing import Any

from ray import serve

from helios.config import HeliosArgs, parse_args
from helios.engine.deployment import engine_deployment
from helios.router.ingress import router_deployment


def build_app(args: dict[str, Any] | HeliosArgs) -> serve.Application:
    """Validate `args` (raising ConfigError naming any bad key), start the registry, bind router and engines."""
    from helios.registry.actor import get_or_create_registry

    config = parse_args(args)
    cache_root = str(config.resolved_cache_root())
    storage = config.storage.model_dump(mode="json") if config.storage else None
    get_or_create_registry(str(config.registry_state_dir()), storage)
    engines, prefill = {}, {}
    for m in config.models:
        if m.serving == "disaggregated":  # the router prefills on one side, then decodes on the other
            prefill[m.id] = engine_deployment(m, cache_root, config.storage, role="prefill")
            engines[m.id] = engine_deployment(m, cache_root, config.storage, role="decode")
        else:
            engines[m.id] = engine_deployment(m, cache_root, config.storage)
    context = {
        "cache_root": cache_root,
        "storage": storage,
        "registry": config.registry.model_dump(mode="json"),
        "models": [m.model_dump(mode="json") for m in config.models],
    }
    return router_deployment(config.router, engines, context, prefill)
