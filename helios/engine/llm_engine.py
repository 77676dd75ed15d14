"""One model's vLLM v1 `AsyncLLM` with vLLM's own OpenAI serving layer over it.

The engine's logic as a plain class (the Serve deployment only wraps it): the engine
arguments from Helios's config, the started engine, and vLLM's OpenAI app that answers the
router's requests (see `openai_app`). Every field vLLM's server accepts is handled by vLLM.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from helios.config import ModelConfig
from helios.engine import warm_start
from helios.engine.engine_stats import EngineStats, SchedulerStatsSink
from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.engine.placement import placement_for
from helios.engine.reaper import ensure_reaper
from helios.errors import InvalidRequest
from helios.observability import tracing
from helios.observability.logs import get_logger

logger = get_logger("engine")


def engine_kwargs(
    model: ModelConfig, model_dir: Path, loader: dict[str, Any] | None = None, kv_transfer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for one model; `extra_args` are checked by name.

    `loader` set means the model sits in a Helios cache tier: vLLM loads it with the
    Helios loader (`load_format="helios"`), with these `model_loader_extra_config` keys.
    `kv_transfer` plugs in a KV connector: a dict from `kv_connector.kv_transfer_config()`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    e = model.engine
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": [model.id],
        "dtype": e.dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "enable_prefix_caching": e.enable_prefix_caching,
        "tensor_parallel_size": e.tensor_parallel_size,
        "enforce_eager": e.enforce_eager,
        "seed": e.seed,
        # vLLM's default stat loggers off: its periodic log line is printed by its server's
        # lifespan, which Helios does not run, yet the logger still tallied every step. Stats
        # stay on: AsyncLLM keeps them for the loggers Helios passes (routing, metrics).
        "disable_log_stats": True,
        "runner": e.runner,
    }
    if e.reasoning_parser:
        kwargs["reasoning_parser"] = e.reasoning_parser
    if e.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    if loader is not None:
        kwargs["load_format"] = "helios"
        kwargs["model_loader_extra_config"] = loader
    if kv_transfer is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(**kv_transfer)
    if model.deployment.accelerator != "cpu":
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
        kwargs.update(placement_for(model).engine_kwargs)  # a GPU share, or Ray workers in the placement group
    if traces_to := tracing.endpoint():  # vLLM's request spans join the router's trace
        kwargs["otlp_traces_endpoint"] = traces_to
    known = set(AsyncEngineArgs.__dataclass_fields__)
    unknown = sorted(set(e.extra_args) - known)
    if unknown:
        raise InvalidRequest(f"models.{model.id}.engine.extra_args: unknown vLLM engine argument(s) {unknown}")
    kwargs.update({k: _config_object(k, v) for k, v in e.extra_args.items()})
    return kwargs


def _config_object(key: str, value: Any) -> Any:
    """A dict given for one of vLLM's config dataclasses (e.g. `structured_outputs_config`) as that
    class, as vLLM's command-line parser makes it: its server code reads attributes, not keys."""
    import dataclasses
    import types
    import typing

    from pydantic import TypeAdapter, ValidationError
    from vllm.engine.arg_utils import AsyncEngineArgs

    if not isinstance(value, dict):
        return value
    annotation = {f.name: f.type for f in dataclasses.fields(AsyncEngineArgs)}[key]
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    config_type = next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)
    if config_type is None:
        return value
    try:
        return TypeAdapter(config_type).validate_python(value)
    except ValidationError as exc:
        raise InvalidRequest(f"engine.extra_args.{key}: {exc}") from None


def frontend_kwargs(model: ModelConfig) -> dict[str, Any]:
    """vLLM server (frontend) settings: tools, chat template. Auth and CORS stay with the router."""
    e = model.engine
    return {
        "enable_auto_tool_choice": e.enable_auto_tool_choice,
        "tool_call_parser": e.tool_call_parser,
        "chat_template": e.chat_template,
        "enable_prompt_tokens_details": e.enable_prompt_tokens_details,
    }


def import_vllm() -> None:
    """Import what the replica needs of vLLM (its engine client and OpenAI server), so a start's
    import phase is timed on its own."""
    import vllm.engine.arg_utils
    import vllm.entrypoints.launchers.api_server.app_state
    import vllm.entrypoints.launchers.app
    import vllm.v1.engine.async_llm  # noqa: F401


def uses_zygote(model: ModelConfig, kwargs: dict[str, Any]) -> bool:
    """Whether this engine's processes are forked from the replica's zygote (`warm_start`): not when
    configured off, nor when its workers are Ray actors (vLLM's Ray executor starts those itself)."""
    return model.deployment.engine_processes == "zygote" and kwargs.get("distributed_executor_backend") != "ray"


def _process_report() -> str:
    import tempfile
    import uuid

    return str(Path(tempfile.gettempdir()) / f"helios-process-start-{uuid.uuid4().hex}")


def _stat_loggers(stats: EngineStats) -> list[Any]:
    """The scheduler-stats sink for routing, and vLLM's own metrics through Ray's pipeline
    (`ray_vllm:*`, as Ray Serve LLM exports them) when the engine runs in a Ray worker; with
    metrics off, a stand-in that keeps vLLM from adding its in-process Prometheus logger."""
    import ray

    from helios.observability.metrics import metrics_enabled

    loggers: list[Any] = [SchedulerStatsSink.factory(stats)]
    if not metrics_enabled():
        from helios.engine.vllm_metrics import DisabledPrometheusStatLogger

        loggers.append(DisabledPrometheusStatLogger)
    elif ray.is_initialized():
        from helios.engine.vllm_metrics import HeliosRayStatLogger

        loggers.append(HeliosRayStatLogger)
    return loggers


class LLMEngine:
    """A started vLLM engine for one model and the OpenAI app that serves it."""

    def __init__(
        self, model: ModelConfig, model_dir: Path, loader: dict[str, Any] | None = None, kv_transfer: dict[str, Any] | None = None
    ) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if model.deployment.accelerator == "cpu":
            # vLLM's CPU backend sizes its KV cache from this variable only.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(model.engine.kv_cache_space_gib)
        started = time.monotonic()
        ensure_reaper()  # before vLLM spawns its engine core: a replica killed mid-start leaves nothing behind
        self.model = model
        self.model_id = model.id
        kwargs = engine_kwargs(model, model_dir, loader, kv_transfer)
        self.engine_args = AsyncEngineArgs(**kwargs)
        self.stats = EngineStats()  # the scheduler's latest step, for the request router
        report = _process_report() if uses_zygote(model, kwargs) else None
        if report is not None:
            warm_start.use_for_engine()
            os.environ[warm_start.REPORT_ENV] = report
        constructing = time.time()
        try:
            self.engine = AsyncLLM.from_engine_args(self.engine_args, stat_loggers=_stat_loggers(self.stats))
        finally:
            os.environ.pop(warm_start.REPORT_ENV, None)
        self.max_model_len: int = self.engine.model_config.max_model_len
        self.created = int(time.time())
        self.start_seconds = time.monotonic() - started
        self.timings: dict[str, float] = {"engine_init_s": self.start_seconds}
        if report is not None:
            reported = warm_start.read_report(report)
            Path(report).unlink(missing_ok=True)
            if "start" in reported:  # from asking vLLM for its engine to its engine core running: no imports
                self.timings["engine_process_start_s"] = max(reported["start"] - constructing, 0.0)
            if "kv_init" in reported:  # vLLM's profiling, KV-cache allocation and warm-up
                self.timings["kv_alloc_warmup_s"] = reported["kv_init"]
        self.app: Any = None  # vLLM's OpenAI app, built by start_app
        self.tasks: list[str] = []  # what the engine serves (generate, embed, ...), from start_app

    async def start_app(self) -> None:
        """Build vLLM's OpenAI app over the started engine (async: vLLM's state set-up awaits the engine)."""
        from helios.engine.openai_app import OpenAIApp, build_openai_app, server_args

        args = server_args(self.engine_args, frontend_kwargs(self.model))
        app = await build_openai_app(self.engine, args)
        self.app = OpenAIApp(app, self.model.deployment.stream_interval_ms / 1000.0)
        self.tasks = list(await self.engine.get_supported_tasks())

    def info(self) -> dict[str, Any]:
        return {"id": self.model_id, "max_model_len": self.max_model_len, "created": self.created,
                "timings": self.timings, "tasks": self.tasks}

    def num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        return await self.app.call(req)

    def stream(self, req: EngineHTTPRequest) -> AsyncIterator[EngineHTTPResponse | bytes]:
        return self.app.stream(req)
