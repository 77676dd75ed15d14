"""Pydantic models for every `args:` key of a Helios Serve config.

Every model forbids unknown keys, so a typo fails at start with an error naming the
key's full path (`models.0.engine.max_model_lenn`), never later in a replica.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class ConfigError(ValueError):
    """A Serve config that cannot start; the message names every bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Strict):
    """vLLM engine settings for one model (a subset of vLLM's `AsyncEngineArgs`)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; float32 makes greedy output batch-invariant on CPU."
    )
    max_model_len: int | None = Field(None, ge=16, description="Context length; defaults to the model's own.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences the engine batches at once.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Token budget of one engine step.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prompt prefixes inside the engine.")
    kv_cache_space_gib: int = Field(
        1, ge=1, description="CPU only: whole GiB of RAM for the KV cache (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: share of GPU memory vLLM may use.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile (faster start).")
    seed: int = Field(0, description="Engine seed, for reproducible sampling.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Further AsyncEngineArgs keys, passed through verbatim (checked at start)."
    )


class ModelDeploymentConfig(_Strict):
    """Ray Serve settings of one model's engine deployment."""

    num_replicas: int = Field(1, ge=1, description="Engine replicas of this model.")
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Where the engine runs.")
    num_cpus: float = Field(1.0, ge=0, description="Logical Ray CPUs one replica reserves.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one replica takes at once before Serve queues.")
    nice: int = Field(
        5,
        ge=0,
        le=19,
        description="CPU nice value added to the replica process once its engine has started (the engine "
        "core and workers keep theirs), so the engine's step loop wins contended cores.",
    )
    stream_interval_ms: float = Field(
        50.0,
        ge=0,
        description="Least time between two streamed chunks of one request; tokens made meanwhile are coalesced "
        "into one message (the first token is never delayed).",
    )


class ModelConfig(_Strict):
    """One model to serve: where its files come from and how to run it."""

    id: str = Field(..., pattern=MODEL_ID_PATTERN, description="The model name clients send in `model`.")
    source: str = Field(
        ...,
        description="A directory with config.json, tokenizer and safetensors, or `demo://<preset>` for the "
        "built-in demo model (built into the cache root on first use).",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deployment: ModelDeploymentConfig = Field(default_factory=ModelDeploymentConfig)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value.startswith("demo://"):
            from helios.engine.demo_model import PRESETS

            preset = value.removeprefix("demo://")
            if preset not in PRESETS:
                raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
        elif "://" in value and not value.startswith("file://"):
            raise ValueError("source must be a local directory, file://, or demo://<preset>")
        return value


class RouterConfig(_Strict):
    """The ingress deployment: auth and HTTP behaviour."""

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer keys accepted on /v1/*; empty means open. HELIOS_API_KEYS (comma-separated) adds more.",
    )
    num_replicas: int = Field(1, ge=1, description="Router replicas.")
    num_cpus: float = Field(0.5, ge=0, description="Logical Ray CPUs one router replica reserves.")
    max_ongoing_requests: int = Field(2048, ge=1, description="Requests one router replica takes at once.")
    ready_timeout_s: float = Field(2.0, gt=0, description="How long /readyz waits for each model's replica.")
    nice: int = Field(
        10, ge=0, le=19, description="CPU nice value added to router processes, so engines win contended cores."
    )

    def keys(self) -> list[str]:
        """The configured keys plus those from HELIOS_API_KEYS (secrets may come from the environment)."""
        env = [k.strip() for k in os.environ.get("HELIOS_API_KEYS", "").split(",") if k.strip()]
        return [k.get_secret_value() for k in self.api_keys] + env


class HeliosArgs(_Strict):
    """The whole `args:` block of `helios.app:build_app`."""

    models: list[ModelConfig] = Field(..., min_length=1, description="Models to serve.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    cache_root: str | None = Field(
        None, description="Where Helios keeps built and fetched models; default HELIOS_CACHE_ROOT or ~/.cache/helios."
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> HeliosArgs:
        ids = [m.id for m in self.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"models: duplicate id(s) {dupes}")
        return self

    def resolved_cache_root(self) -> Path:
        root = self.cache_root or os.environ.get("HELIOS_CACHE_ROOT") or "~/.cache/helios"
        return Path(root).expanduser()


def parse_args(args: dict[str, Any] | HeliosArgs) -> HeliosArgs:
    """Validate a raw `args:` dict, turning pydantic's report into one readable ConfigError."""
    if isinstance(args, HeliosArgs):
        return args
    try:
        return HeliosArgs.model_validate(args or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<args>"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("invalid Helios config:\n" + "\n".join(lines)) from None
