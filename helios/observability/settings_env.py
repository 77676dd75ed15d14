"""The environment that carries `observability` settings to every process serving a model.

Replicas are separate Ray workers (and a pooled engine host adopts what its replica has), so
tracing and metrics settings travel as environment variables; this is the one list of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from helios.observability import metrics, tracing

if TYPE_CHECKING:
    from helios.config import ObservabilityConfig

NAMES = (tracing.ENDPOINT_ENV, tracing.RATIO_ENV, metrics.TOKEN_LATENCY_ENV)


def settings_env(config: ObservabilityConfig) -> dict[str, str]:
    """The variables a config's observability settings give the router and engine replicas."""
    return {**tracing.tracing_env(config.tracing.endpoint, config.tracing.sample_ratio),
            **metrics.metrics_env(config.engine_token_latency)}


def inherited_env() -> dict[str, str]:
    """This process's settings, for the processes it deploys or hands an engine (a model started on
    demand traces and exports as the router that started it does)."""
    return {name: os.environ[name] for name in NAMES if name in os.environ}
