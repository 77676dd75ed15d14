"""`build_app(args)`: the Serve application a config's `import_path` names."""

from __future__ import annotations

from typing import Any

from ray import serve

from helios.config import HeliosArgs, parse_args
from helios.engine.deployment import engine_deployment
from helios.router.ingress import router_deployment


def build_app(args: dict[str, Any] | HeliosArgs) -> serve.Application:
    """Validate `args` (raising ConfigError naming any bad key) and bind router and engines."""
    config = parse_args(args)
    cache_root = str(config.resolved_cache_root())
    engines = {m.id: engine_deployment(m, cache_root, config.storage) for m in config.models}
    return router_deployment(config.router, engines)
