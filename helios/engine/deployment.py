"""The Serve deployment of one model's engine: a thin shell around `LLMEngine`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from helios.api.protocol import EngineChunk, EngineRequest
from helios.config import ModelConfig
from helios.engine.demo_model import resolve_source
from helios.ray_env import lower_priority


class EngineDeployment:
    """Serves one model; Serve restarts a replica whose engine fails its health check."""

    def __init__(self, model: dict[str, Any], cache_root: str) -> None:
        from pathlib import Path

        from helios.engine.llm_engine import LLMEngine

        config = ModelConfig.model_validate(model)
        model_dir = resolve_source(config.source, Path(cache_root))
        self.engine = LLMEngine(config, model_dir)
        # After the engine core and workers are spawned, so they keep the normal priority.
        lower_priority(config.deployment.nice)

    async def generate_stream(self, req: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream coalesced chunks (called with `stream=True`); cancelling it aborts in vLLM."""
        async for chunk in self.engine.generate(req):
            yield chunk

    async def generate(self, req: EngineRequest) -> EngineChunk:
        return await self.engine.generate_full(req)

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def num_unfinished_requests(self) -> int:
        return self.engine.num_unfinished_requests()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def deployment_name(model_id: str) -> str:
    """Serve deployment names allow no '/' or ':'; model ids often have them."""
    return "engine-" + re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


def engine_deployment(model: ModelConfig, cache_root: str) -> serve.Application:
    """Bind the engine deployment of one model with its Serve options."""
    d = model.deployment
    actor_options: dict[str, Any] = {"num_cpus": d.num_cpus}
    if d.accelerator == "gpu":
        actor_options["num_gpus"] = model.engine.tensor_parallel_size
    return serve.deployment(EngineDeployment).options(
        name=deployment_name(model.id),
        num_replicas=d.num_replicas,
        max_ongoing_requests=d.max_ongoing_requests,
        ray_actor_options=actor_options,
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
        # The router logs each request; a second access line per engine call only costs CPU.
        logging_config={"enable_access_log": False},
    ).bind(model.model_dump(mode="json"), cache_root)
