"""Pydantic models for every `args:` key of a Helios Serve config.

Every model forbids unknown keys, so a typo fails at start with an error naming the
key's full path (`models.0.engine.max_model_lenn`), never later in a replica.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
DEMO_PRESETS = ("tiny", "bench")  # the shapes `helios.storage.demo_model.PRESETS` builds (a test keeps them equal)


class ConfigError(ValueError):
    """A Serve config that cannot start; the message names every bad key."""


def default_cache_root() -> Path:
    """HELIOS_CACHE_ROOT, else ~/.cache/helios: where a config without `cache_root` keeps models."""
    return Path(os.environ.get("HELIOS_CACHE_ROOT") or "~/.cache/helios").expanduser()


def _repeated(values: Iterable[str]) -> list[str]:
    """Values that occur more than once, sorted."""
    seen = list(values)
    return sorted({v for v in seen if seen.count(v) > 1})


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
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over (inside a node).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages, each on tensor_parallel_size GPUs "
                                        "(may span nodes).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile (faster start).")
    cache_in_tiers: bool = Field(
        True, description="Keep vLLM's cache root (torch.compile artifacts, startup plans) in the model cache's tiers, "
        "keyed by vLLM and torch versions, model digest, parallel layout and device, so a model compiled once "
        "anywhere in the cluster starts without compiling (models that come through the store).")
    seed: int = Field(0, description="Engine seed, for reproducible sampling.")
    share_weights: bool = Field(
        False,
        description="CPU: keep weights on the cache's mapped pages instead of vLLM's per-replica oneDNN repack, "
        "so every replica of this model on a node shares one copy (costs some tokens/s). Needs a `storage:` "
        "section (the model is loaded from a local tier).",
    )
    layout_cache: bool = Field(
        False,
        description="CPU: after a start, keep the weights in vLLM's parameter layout (fused, in the engine's "
        "dtype) as a derived blob beside the tier the model loaded from; later starts on the node map it "
        "instead of loading the checkpoint (vLLM's own repack still runs, serving is unchanged). Costs the "
        "weights' size in that tier once per model, dtype and vLLM version. Needs a `storage:` section.",
    )
    runner: Literal["auto", "generate", "pooling"] = Field(
        "auto", description="vLLM's runner: `pooling` serves /v1/embeddings (a decoder converted to an embedder)."
    )
    tool_call_parser: str | None = Field(
        None, description="vLLM tool-call parser for `tool_choice: auto` (e.g. `hermes`); see vLLM's docs."
    )
    enable_auto_tool_choice: bool = Field(
        False, description="Let the model decide to call tools (`tool_choice: auto`); needs `tool_call_parser`."
    )
    reasoning_parser: str | None = Field(None, description="vLLM reasoning parser (splits `reasoning_content`).")
    chat_template: str | None = Field(
        None, description="Chat template (a file path or the template itself) instead of the tokenizer's."
    )
    enable_prompt_tokens_details: bool = Field(
        False, description="Report `usage.prompt_tokens_details.cached_tokens` (prompt tokens vLLM's prefix cache "
        "already held), as vLLM's server flag of that name does.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Further AsyncEngineArgs keys, passed through verbatim (checked at start)."
    )

    @model_validator(mode="after")
    def _auto_tools(self) -> EngineConfig:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (e.g. `hermes`)")
        return self


class ModelDeploymentConfig(_Strict):
    """Ray Serve settings of one model's engine deployment."""

    num_replicas: int = Field(1, ge=1, description="Engine replicas of this model at start (and its default min and max).")
    max_replicas: int | None = Field(
        None, ge=1, description="Most replicas `POST /admin/scale` may ask for; default max(num_replicas, 4)."
    )
    min_replicas: int | None = Field(
        None, ge=0, description="Set: the model autoscales on load (queue depth, KV use, predicted bursts) between "
        "this and max_replicas from the start; 0 lets an idle model scale to zero (its weights stay in the warm "
        "tiers; the next request waits for a warm start). Unset: num_replicas runs until an admin scales it.")
    predictive_scaling: bool = Field(
        True, description="Start replicas ahead of bursts the registry's request history predicts, and keep one "
        "warm when the next request is due within a cold start (see helios/scaling/predict.py).")
    idle_to_zero_s: float = Field(
        300.0, ge=0, description="With min_replicas 0: how long a model stays idle before its last replica stops.")
    target_ongoing_requests: float = Field(
        32, gt=0, description="Requests per replica the autoscaler aims at, between the model's min and max replicas."
    )
    accelerator: str = Field(
        "cpu", pattern=r"^(cpu|gpu|mig-\d+g\.\d+gb)$",
        description="Where the engine runs: cpu, gpu (whole GPUs, or gpu_fraction of one), or a MIG slice such as "
        "mig-1g.10gb (the custom resource a node with that slice advertises; the model must fit its memory).")
    gpu_fraction: float | None = Field(
        None, gt=0, le=1, description="accelerator gpu, one GPU per replica: the share of a GPU a replica takes "
        "(several small models fit on one GPU); vLLM's gpu_memory_utilization is scaled to it.")
    num_cpus: float = Field(1.0, ge=0, description="Logical Ray CPUs one replica reserves.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one replica runs at once; the model's capacity is this times its replicas.")
    max_queued_requests: int = Field(
        256, ge=0, description="Requests that may wait for the model beyond its capacity; past that the router "
        "answers 429 with Retry-After at once.")
    nice: int = Field(
        5,
        ge=0,
        le=19,
        description="CPU nice value added to the replica process once its engine has started (the engine "
        "core and workers keep theirs), so the engine's step loop wins contended cores.",
    )
    engine_processes: Literal["zygote", "spawn"] = Field(
        "zygote",
        description="How vLLM's engine core and worker start: forked from a zygote that imported vLLM while the "
        "replica did (`zygote`, seconds), or spawned afresh, each importing torch and vLLM (`spawn`, vLLM's own "
        "way). Replicas whose workers are Ray actors (tensor or pipeline parallel) always spawn.",
    )
    request_router: Literal["helios", "serve_default", "ray_prefix"] = Field(
        "helios",
        description="How a request picks its replica: `helios` (prefix and session affinity bounded by load, then "
        "power of two choices; see README), Serve's default power of two choices, or Ray Serve LLM's "
        "PrefixCacheAffinityRouter (`ray_prefix`, for comparison).",
    )
    affinity_imbalance: float = Field(
        8.0, ge=0, description="Most requests an affine replica may carry beyond the least-loaded one before a "
        "request goes by load instead.")
    stream_interval_ms: float = Field(
        50.0,
        ge=0,
        description="Least time between two streamed chunks of one request; tokens made meanwhile are coalesced "
        "into one message (the first token is never delayed).",
    )

    @model_validator(mode="after")
    def _ceiling(self) -> ModelDeploymentConfig:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below num_replicas ({self.num_replicas})")
        if self.min_replicas is not None and self.min_replicas > self.num_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above num_replicas ({self.num_replicas})")
        return self

    def replica_ceiling(self) -> int:
        return self.max_replicas or max(self.num_replicas, 4)


def default_kv_root() -> Path:
    """Shared memory, per user: engines of one user on a node share it, users do not."""
    return Path("/dev/shm") / f"helios-kv-{getpass.getuser()}"


class NodeKVTiers(BaseModel):
    """Where KV blocks go when they share the node cache's tiers (filled in by the engine replica)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: str = Field(..., description="The node cache's local socket (abstract name) that takes reports.")
    tiers: dict[str, Path] = Field(..., min_length=1, description="Tier kind -> tier root, fastest first.")
    capacity: dict[str, int] = Field(default_factory=dict, description="Tier kind -> bytes, used only while the "
                                     "node cache cannot be reached.")


class KVStoreConfig(BaseModel):
    """Where the node's KV blocks live and how many bytes each tier may hold (`helios.engine.kv_store`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path = Field(default_factory=default_kv_root, description="RAM tier directory (tmpfs, e.g. under /dev/shm).")
    ram_bytes: ByteSize = Field(ByteSize(4 << 30), ge=0, description="Most bytes of blocks in the RAM tier, e.g. `4GiB`.")
    nvme_path: Path | None = Field(None, description="NVMe tier directory; unset: blocks evicted from RAM are dropped.")
    nvme_bytes: ByteSize = Field(ByteSize(64 << 30), ge=0, description="Most bytes of blocks in the NVMe tier.")
    promote_on_hit: bool = Field(
        True, description="A block read from NVMe is written back into RAM (the NVMe copy stays), so a prefix "
        "that became hot again is read from RAM next time.")
    placement: Literal["auto", "node_cache", "own"] = Field(
        "auto",
        description="`node_cache`: blocks live in the model cache's local tiers, under the node cache actor's one "
        "budget and policy per tier (root, ram_bytes, nvme_path and nvme_bytes are then not used). `own`: this "
        "store's own directories and budgets. `auto`: node_cache when the storage has its node cache on under Ray "
        "and neither `root` nor `nvme_path` is set.",
    )
    node_tiers: NodeKVTiers | None = Field(
        None, description="Set by the replica, not by hand: the node cache tiers and socket this store reports to."
    )

    def wants_node_cache(self) -> bool:
        """Whether this store should join the node cache (when there is one)."""
        if self.placement == "auto":
            return not ({"root", "nvme_path"} & self.model_fields_set)
        return self.placement == "node_cache"

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "kv store") -> KVStoreConfig:
        """Validate, with errors that name the offending key (`where.key: message`)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(config_errors(exc, where)) from None


def config_errors(exc: ValidationError, where: str) -> str:
    return "; ".join(f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


class DisaggregatedConfig(_Strict):
    """Prefill and decode in separate replicas, KV moving between them through Helios's KV store."""

    prefill_replicas: int = Field(1, ge=1, description="Replicas that run prompts (vLLM kv_producer).")
    decode_replicas: int = Field(1, ge=1, description="Replicas that continue from the stored KV (kv_consumer).")
    prefill_kv_cache: dict[str, Any] | None = Field(
        None, description="KV store of the prefill replicas, if not the model's `kv_cache` (e.g. another root, as "
        "on another node)."
    )
    decode_kv_cache: dict[str, Any] | None = Field(
        None, description="KV store of the decode replicas, if not the model's `kv_cache`."
    )


class ModelConfig(_Strict):
    """One model to serve: where its files come from and how to run it."""

    id: str = Field(..., pattern=MODEL_ID_PATTERN, description="The model name clients send in `model`.")
    source: str = Field(
        ...,
        description="Where the model's files come from: a directory (or file://) loaded as is; `demo://<preset>` "
        "for the built-in demo model (built on first use, and pushed to the remote tier when a `storage:` "
        "section exists); or `store://ID[:VERSION]` for a model pushed with `helios models push`.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deployment: ModelDeploymentConfig = Field(default_factory=ModelDeploymentConfig)
    serving: Literal["unified", "disaggregated"] = Field(
        "unified",
        description="`unified`: each replica prefills and decodes. `disaggregated`: prompts run on prefill replicas, "
        "whose KV blocks decode replicas load through the Helios KV store (see `disaggregated`).",
    )
    disaggregated: DisaggregatedConfig = Field(default_factory=DisaggregatedConfig)
    kv_cache: dict[str, Any] | None = Field(
        None,
        description="Helios KV connector store (root, ram_bytes, nvme_path, nvme_bytes). Set on a unified model, its "
        "replicas also save and reuse KV across requests beyond the engine's own cache; a disaggregated model "
        "always uses it (defaults when unset).",
    )

    @field_validator("kv_cache", mode="after")
    @classmethod
    def _kv_store(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            KVStoreConfig.model_validate(value)  # errors name the bad key inside kv_cache
        return value

    @model_validator(mode="after")
    def _one_kv_connector(self) -> ModelConfig:
        if (self.serving == "disaggregated" or self.kv_cache is not None) and "kv_transfer_config" in self.engine.extra_args:
            raise ValueError("engine.extra_args.kv_transfer_config: Helios sets it for kv_cache / disaggregated serving")
        for key in ("prefill_kv_cache", "decode_kv_cache"):
            value = getattr(self.disaggregated, key)
            if value is not None:
                try:
                    KVStoreConfig.model_validate(value)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    raise ValueError(f"disaggregated.{key}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return self

    def kv_store(self, role: str | None = None) -> dict[str, Any]:
        """The KV store settings of this model's replicas of `role` (prefill, decode or None: unified)."""
        override = {"prefill": self.disaggregated.prefill_kv_cache, "decode": self.disaggregated.decode_kv_cache}
        return (override.get(role or "") or self.kv_cache or {})

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value.startswith("demo://"):
            preset = value.removeprefix("demo://")
            if preset not in DEMO_PRESETS:
                raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(DEMO_PRESETS)}")
        elif value.startswith("store://"):
            if not value.removeprefix("store://").strip(":"):
                raise ValueError("store:// source needs a model id: store://ID[:VERSION]")
        elif "://" in value and not value.startswith("file://"):
            raise ValueError("source must be a local directory, file://, demo://<preset> or store://ID[:VERSION]")
        return value

    def uses_store(self) -> bool:
        """Whether this model is loaded through the storage tiers (not straight from a directory)."""
        return self.source.startswith(("store://", "demo://"))


DEFAULT_BANDWIDTH: dict[str, int] = {"ram": 10 * 10**9, "nvme": 2 * 10**9, "ssd": 5 * 10**8, "remote": 2 * 10**8}
"""Read bytes/s of each tier kind when its config gives no `bandwidth` (typical node figures)."""


class _TierBandwidth(_Strict):
    """A tier's read bandwidth: what a blob costs to fetch again from it, which cost-aware eviction weighs."""

    bandwidth: ByteSize | None = Field(
        None,
        gt=0,
        description="Read bandwidth in bytes per second, e.g. `2GB` or `2GB/s`; defaults by kind (ram 10GB/s, "
        "nvme 2GB/s, ssd 0.5GB/s, remote 0.2GB/s). The `cost` eviction policy corrects it from measured fetches.",
    )

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _per_second(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower().endswith("/s"):
            value = value.strip()[:-2]
        return value

    def bytes_per_s(self) -> int:
        return int(self.bandwidth) if self.bandwidth else DEFAULT_BANDWIDTH[self.kind]  # type: ignore[attr-defined]


class _LocalTierConfig(_TierBandwidth):
    path: str | None = Field(
        None, description="Directory of this tier; defaults under the cache root (RAM: /dev/shm/helios-<user>)."
    )
    capacity: ByteSize = Field(..., description="Most bytes of blobs this tier holds, e.g. `8GiB`; it evicts beyond.")
    eviction: Literal["lru", "cost"] = Field(
        "lru",
        description="Which blobs go first when the tier is full: `lru` (least recently used) or `cost` (fewest "
        "cold-start seconds lost per byte freed, weighing use counts and the bandwidth a refetch comes from; "
        "honours keep-alive hints from the registry).",
    )


class RamTierConfig(_LocalTierConfig):
    """Shared memory on the node: every process maps the same pages."""

    kind: Literal["ram"]


class NvmeTierConfig(_LocalTierConfig):
    """A fast local disk."""

    kind: Literal["nvme"]


class SsdTierConfig(_LocalTierConfig):
    """A slower, larger local disk."""

    kind: Literal["ssd"]


class RemoteTierConfig(_TierBandwidth):
    """The durable tier, any fsspec URL (`s3://bucket/prefix`, `gs://...`, `file:///dir`)."""

    kind: Literal["remote"]
    url: str = Field(..., description="fsspec URL of the store's root; `file://~/x` expands `~`.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the fsspec filesystem (for s3: endpoint_url, key, secret, ...). Credentials may "
        "also come from the usual AWS_* environment variables.",
    )

    reader: Literal["auto", "obstore", "fsspec"] = Field(
        "auto", description="How blob ranges are read from an s3:// remote: obstore (Rust, releases the GIL, "
        "so the transfer window runs in parallel), fsspec (s3fs), or auto (obstore when installed).")

    @field_validator("url")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("remote url needs a scheme, e.g. s3://bucket/prefix or file:///path")
        return value


TierConfig = Annotated[
    RamTierConfig | NvmeTierConfig | SsdTierConfig | RemoteTierConfig, Field(discriminator="kind")
]


class TransferConfig(_Strict):
    """How blobs move between tiers."""

    chunk_mib: int = Field(16, ge=1, le=1024, description="Size of one ranged read.")
    concurrency: int = Field(16, ge=1, le=256, description="Ranged reads in flight at once (a sliding window).")
    lock_timeout_s: float = Field(
        3600, gt=0, description="How long a process waits for another one fetching the same blob."
    )
    direct_io: bool = Field(
        True, description="Write blobs fetched into a disk tier (nvme, ssd) with O_DIRECT, around the page cache "
        "(falls back to buffered writes where the filesystem refuses it); the RAM tier is always written buffered.")
    overlap_engine_start: bool = Field(
        False, description="Start a model's engine as soon as its small files (config, tokenizer) are local and fetch "
        "its weight files meanwhile; the loader waits for each weight file it reaches (off: every file first). Off "
        "by default: on a 2-core VM the fetch and the engine's start compete for the cores (see README).")


class KVBlocksConfig(_Strict):
    """How the node cache weighs KV blocks against model blobs in the tiers they share."""

    recompute_bytes_per_s: ByteSize = Field(
        ByteSize(10**9), gt=0, description="KV bytes an engine recomputes per second (prefill speed x KV bytes per "
        "token): what losing a block from the last local tier costs, as cold-start seconds are for blobs.")
    weight: float = Field(1.0, gt=0, description="Multiplies a KV block's cost against a model blob's (above 1: "
                          "keep KV longer).")


class StorageConfig(_Strict):
    """The model cache: tiers from fastest to slowest, and transfer settings."""

    tiers: list[TierConfig] = Field(..., min_length=1, description="Cache tiers; at most one of each kind.")
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    node_cache: bool = Field(
        True, description="Under Ray, every process on a node keeps the local tiers' budgets and eviction in one "
        "node cache actor, so each tier has one policy that sees every access (off: each process keeps its own).")
    kv_blocks: KVBlocksConfig = Field(default_factory=KVBlocksConfig)

    @model_validator(mode="after")
    def _one_of_each(self) -> StorageConfig:
        dupes = _repeated(t.kind for t in self.tiers)
        if dupes:
            raise ValueError(f"tiers: more than one tier of kind {dupes}")
        if all(t.kind == "remote" for t in self.tiers):
            raise ValueError("tiers: at least one local tier (ram, nvme or ssd) is needed to load from")
        return self


class KeyRateLimits(_Strict):
    """Rates each API key may use (token buckets with a minute's burst); an open API shares one."""

    requests_per_minute: float | None = Field(None, gt=0, description="Requests a key may send per minute.")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Tokens a key may use per minute, counted at admission: the body's bytes / 4 plus "
        "the output it reserves (max_tokens, 16 when unset, times n).")


class RouterConfig(_Strict):
    """The ingress deployment: auth and HTTP behaviour."""

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer keys accepted on /v1/*; empty means open. HELIOS_API_KEYS (comma-separated) adds more.",
    )
    num_replicas: int = Field(1, ge=1, description="Router replicas.")
    num_cpus: float = Field(0.5, ge=0, description="Logical Ray CPUs one router replica reserves.")
    max_ongoing_requests: int = Field(2048, ge=1, description="Requests one router replica takes at once.")
    colocate_engine: bool = Field(
        False,
        description="Run the one model's engine inside each router replica: requests reach vLLM's serving layer "
        "without a Ray call in between (fewer hops and less CPU per token where the engine shares the node's "
        "CPUs). Needs exactly one unified model without autoscaling; the router then runs that model's "
        "`deployment.num_replicas` replicas with its resources, and other models (registered ones started on "
        "demand) are still reached by handle. With `engine_pool` on, the engine may start in a pooled host, "
        "one Ray call away again: a faster start for a slower request path.",
    )
    ready_timeout_s: float = Field(2.0, gt=0, description="How long /readyz waits for each model's replica.")
    session_affinity: bool = Field(
        False, description="Keep a client's requests on one replica: by the `x-session-id` header, else the "
        "OpenAI `user` field (within the affinity's load bound).")
    queue_timeout_s: float = Field(
        60.0, gt=0, description="How long a request may wait in its model's queue before it gets 503 with Retry-After.")
    rate_limits: KeyRateLimits | None = Field(
        None, description="Per-API-key request and token rates (429 rate_limit_exceeded past them); none by default.")
    breaker_failures: int = Field(
        3, ge=1, description="5xx answers in a row after which a replica's circuit breaker opens (no requests "
        "go there until a probe after `breaker_cooldown_s` succeeds).")
    breaker_cooldown_s: float = Field(10.0, gt=0, description="How long an open breaker waits before its probe.")
    retry_deadline_s: float = Field(
        120.0, ge=0,
        description="How long a request whose replica died before any output is retried on another (or the "
        "restarted) replica before it gets 503; 0 turns retries off. Long enough for a replica restart.",
    )
    retry_max_backoff_s: float = Field(2.0, gt=0, description="The longest pause between two retries (backoff "
                                       "doubles from 0.1 s).")
    nice: int = Field(
        10, ge=0, le=19, description="CPU nice value added to router processes, so engines win contended cores."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the /admin API (separate from `api_keys`); HELIOS_ADMIN_TOKEN also sets it. "
        "Without one, /admin answers 403 to everyone.",
    )

    def keys(self) -> list[str]:
        """The configured keys plus those from HELIOS_API_KEYS (secrets may come from the environment)."""
        env = [k.strip() for k in os.environ.get("HELIOS_API_KEYS", "").split(",") if k.strip()]
        return [k.get_secret_value() for k in self.api_keys] + env

    def admin_key(self) -> str | None:
        """The admin token: HELIOS_ADMIN_TOKEN wins over the config (secrets may come from the environment)."""
        env = os.environ.get("HELIOS_ADMIN_TOKEN", "").strip()
        return env or (self.admin_token.get_secret_value() if self.admin_token else None)


class DynamicModelDefaults(_Strict):
    """Engine and deployment settings of a model started on demand (a version may carry its own)."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    deployment: ModelDeploymentConfig = Field(default_factory=ModelDeploymentConfig)


class RegistryConfig(_Strict):
    """The registry actor and the models it starts on demand."""

    state_dir: str | None = Field(None, description="Where the registry persists its state; default <cache_root>/registry.")
    max_dynamic_models: int = Field(
        2, ge=0, description="Most registered-but-not-configured models running at once (0: serve only the config's)."
    )
    start_timeout_s: float = Field(
        60.0, gt=0, description="How long a request for a model that is not running waits for its cold start "
        "before it gets 503 with Retry-After (the start goes on)."
    )
    retry_after_s: int = Field(15, ge=1, description="The Retry-After seconds sent with such a 503.")
    prefetch_interval_s: float = Field(
        30.0, ge=0, description="How often the registry plans keep-alive and prefetch into RAM (0: never)."
    )
    defaults: DynamicModelDefaults = Field(default_factory=DynamicModelDefaults)


class TracingConfig(_Strict):
    """OpenTelemetry traces of each request (router, prefill, KV, decode, vLLM) to an OTLP receiver."""

    endpoint: str | None = Field(None, description="OTLP gRPC endpoint, e.g. http://otel-collector:4317; unset: "
                                 "tracing off (and free).")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of requests traced, decided at the router "
                                "(a client's sampled traceparent is followed).")


class ObservabilityConfig(_Strict):
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    engine_token_latency: bool = Field(
        False, description="Also export vLLM's per-token inter-token histogram (`vllm:inter_token_latency_seconds`). "
        "Off by default: it is one histogram value per generated token, and Ray's metrics agent replays every "
        "histogram value one by one at export (10-20 us of agent CPU each on a 2-core host), the largest part of what metrics "
        "cost a streamed token. The router's inter-token histogram (per relayed chunk, as clients see it) and "
        "vLLM's per-request time per output token (`vllm:request_time_per_output_token_seconds`) stay.")


class EnginePoolConfig(_Strict):
    """Engine hosts kept waiting on every node with vLLM imported (helios.engine.pool)."""

    size_per_node: int = Field(
        0, ge=0, le=16, description="Idle engine hosts kept on each node (0: no pool). Each holds about 1 GiB of "
        "host memory while it waits; a new replica on the node takes one and skips every import.")
    nice: int = Field(
        10, ge=0, le=19, description="Nice value a host imports at, so refills never slow serving; a taken host "
        "goes back to 0 where the process may (CAP_SYS_NICE), else keeps it.")
    idle_class: bool = Field(
        True, description="Waiting hosts also run in Linux's SCHED_IDLE class: a core only when nothing else wants "
        "it. Ray starts its workers at nice 15, so a nice value alone would put a refill's imports ahead of the "
        "routers and replicas serving now. A taken host goes back to the normal class.")
    max_per_node: int = Field(
        0, ge=0, le=16, description="Most idle hosts a node keeps when the registry's usage predictions ask for more "
        "than `size_per_node`: one per expected start of a model that is not running within `predict_horizon_s` "
        "(a start with at least a 30 % chance counts), on the warmest node holding it. 0: config size only.")
    predict_horizon_s: float = Field(
        300.0, gt=0, description="How far ahead predicted starts size the pool (longer than a host's ~20 s of "
        "imports, so it is ready when the start comes).")
    reserve_gib: float = Field(
        0.0, ge=0, le=1024, description="Memory each idle host faults in while it waits and gives back, a slice "
        "at a time, just ahead of its engine's allocations once taken (helios.engine.memory_reserve). On VMs that "
        "return free memory to the host (virtio-balloon free page reporting) a page's first touch costs a host "
        "fault, 6-14 s per GiB measured here, so a CPU engine's weights and KV cache dominate its start; set it to "
        "the largest model's weights in its dtype (twice on the CPU when its checkpoint is loaded: the loaded and "
        "the packed copy) plus its KV cache, plus its checkpoint when it may be fetched into the RAM tier. Held by "
        "every idle host. 0: off.")

    @model_validator(mode="after")
    def _max_not_below_size(self) -> EnginePoolConfig:
        if self.max_per_node and self.max_per_node < self.size_per_node:
            raise ValueError(f"max_per_node ({self.max_per_node}) is below size_per_node ({self.size_per_node})")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.size_per_node or self.max_per_node)


class RouterContext(_Strict):
    """What the router needs besides its own settings: on-demand starts and the admin API read it."""

    cache_root: str
    storage: StorageConfig | None = None
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    models: list[ModelConfig] = Field(default_factory=list, description="The config's models.")
    engine_pool: EnginePoolConfig = Field(default_factory=EnginePoolConfig)


class HeliosArgs(_Strict):
    """The whole `args:` block of `helios.app:build_app`."""

    models: list[ModelConfig] = Field(..., min_length=1, description="Models to serve.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    cache_root: str | None = Field(
        None, description="Where Helios keeps built and fetched models; default HELIOS_CACHE_ROOT or ~/.cache/helios."
    )
    storage: StorageConfig | None = Field(
        None, description="The multi-tier model cache; without it models load straight from their source directory."
    )
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    engine_pool: EnginePoolConfig = Field(default_factory=EnginePoolConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> HeliosArgs:
        dupes = _repeated(m.id for m in self.models)
        if dupes:
            raise ValueError(f"models: duplicate id(s) {dupes}")
        for i, m in enumerate(self.models):
            if m.source.startswith("store://") and self.storage is None:
                raise ValueError(f"models.{i}.source: store:// needs a `storage:` section")
            for option in ("share_weights", "layout_cache"):
                if getattr(m.engine, option) and self.storage is None:
                    raise ValueError(f"models.{i}.engine.{option}: needs a `storage:` section")
        if self.router.colocate_engine:
            self._check_colocated()
        return self

    def _check_colocated(self) -> None:
        """`router.colocate_engine` puts one unified, fixed-size model into the router's replicas."""
        if len(self.models) != 1:
            raise ValueError(f"router.colocate_engine: needs exactly one model in `models` (got {len(self.models)})")
        model = self.models[0]
        if model.serving != "unified":
            raise ValueError("router.colocate_engine: models.0.serving must be unified (a disaggregated model's "
                             "sides are separate deployments)")
        if model.deployment.min_replicas is not None:
            raise ValueError("router.colocate_engine: models.0.deployment.min_replicas: a colocated engine runs "
                             "num_replicas replicas; autoscaling needs its own engine deployment")
        if "num_replicas" in self.router.model_fields_set and self.router.num_replicas != model.deployment.num_replicas:
            raise ValueError(f"router.num_replicas: with colocate_engine the router runs models.0.deployment."
                             f"num_replicas ({model.deployment.num_replicas}) replicas; leave it unset")

    def resolved_cache_root(self) -> Path:
        return Path(self.cache_root).expanduser() if self.cache_root else default_cache_root()

    def registry_state_dir(self) -> Path:
        state = self.registry.state_dir
        return Path(state).expanduser() if state else self.resolved_cache_root() / "registry"


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
