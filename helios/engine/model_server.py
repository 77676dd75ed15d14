"""One model's engine as a replica runs it: the start (tiers, engine, vLLM's app, registry) and each request.

A plain class, so the same server runs in the Serve replica itself or in a pooled engine host
that a replica has taken (`helios.engine.pool`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from helios.config import ModelConfig, StorageConfig
from helios.engine.http import REPLICA_HEADER, EngineHTTPRequest, EngineHTTPResponse
from helios.errors import EngineUnavailable
from helios.observability import tracing
from helios.observability.logs import get_logger, log_event, request_context
from helios.ray_env import lower_priority

if TYPE_CHECKING:
    from helios.storage.store import LocalModel

logger = get_logger("engine.server")
Role = Literal["unified", "prefill", "decode"]


class ModelServer:
    """One model's started engine and what a replica does around each request: spans, log context,
    its id on the answer, a dead engine refused; its stats for routing and autoscaling."""

    def __init__(self, replica: str, role: Role) -> None:
        self.replica, self.role = replica, role
        self.node = socket.gethostname()
        self._serving: Path | None = None  # see `serving_marker`
        self._release_fill: Any = lambda: None  # lets the fill of slower tiers begin (see `start`)
        self.layout_share: str | None = None  # the layout blob's push to the remote tier (`_share_layout`)

    @classmethod
    async def start(
        cls, model: dict[str, Any], cache_root: str, storage: dict[str, Any] | None, pinned: bool, role: Role,
        replica: str, started: float, imports_s: float | None = None,
    ) -> ModelServer:
        """Prepare the model in the tiers, start its engine and vLLM's app, tell the registry.

        `started`: when the replica began (monotonic), so `total_s` covers the whole start;
        `imports_s`: how long this process took to import vLLM, when it did so for this start."""
        from helios.engine.llm_engine import LLMEngine
        from helios.storage.sources import prepare

        self = cls(replica, role)
        config = ModelConfig.model_validate(model)
        storage_cfg = StorageConfig.model_validate(storage) if storage else None
        prepared = prepare(config, storage_cfg, Path(cache_root))
        loader, report = _loader_options(config, prepared.local.tier_root) if prepared.local else (None, None)
        engine_cache = _restore_engine_cache(config, prepared, cache_root)
        kv_transfer, self.kv_metrics = _kv_connector(config, role, replica, storage_cfg, cache_root)
        if kv_transfer is not None:  # the engine core inherits it; vLLM logs engine args, so not there
            from helios.engine.kv_connector import SECRET_ENV
            from helios.ray_env import cluster_secret

            os.environ[SECRET_ENV] = cluster_secret("kv-blocks")
        self.engine = LLMEngine(config, prepared.path, loader, kv_transfer)
        try:
            await _start_beside_arrivals(self.engine, prepared.local)
        except BaseException:
            prepared.started()  # nothing will serve: the fill need not wait
            raise
        # The fill of slower tiers (RAM -> NVMe: 1.4 GB hashed and written) waits for the first answer:
        # run between the engine's start and its first token it takes cores from the replica's last
        # steps (start_app, Serve's RUNNING, the first request). At most HOLD_MAX_S without one
        # (the layout blob's write in the worker waits the same way).
        self._release_fill = prepared.started
        from helios.storage.layout_cache import HOLD_MAX_S

        hold = threading.Timer(HOLD_MAX_S, prepared.started)
        hold.daemon = True  # never keeps a stopping replica alive
        hold.start()
        # After the engine core and workers are spawned, so they keep the normal priority.
        lower_priority(config.deployment.nice)
        loaded = _read_report(report)
        timings = {**prepared.timings, **_load_timings(loaded), **self.engine.timings}
        if "layout_fetch_s" in timings:  # the layout blob came instead of the weights: part of the fetch
            timings["fetch_s"] = timings.get("fetch_s", 0.0) + timings["layout_fetch_s"]
        _share_layout(config, prepared, loaded, self._layout_shared, report)
        if engine_cache is not None:
            timings["engine_cache_restore_s"] = engine_cache[3]
            threading.Thread(target=_save_engine_cache, args=(prepared.store, *engine_cache[:3]),
                             name="helios-engine-cache-save", daemon=True).start()
        if imports_s is not None:
            timings["imports_s"] = imports_s
        if "load_s" in timings:
            timings["engine_start_s"] = max(timings["engine_init_s"] - timings["load_s"], 0.0)
        timings["total_s"] = time.monotonic() - started
        self.engine.timings = {k: round(v, 3) for k, v in timings.items()}
        _record_start(config.id, role, replica, self.engine.timings)
        log_event(
            logger, "engine_started", flush=True, model=config.id, path=str(prepared.path),
            sources=prepared.local.sources if prepared.local else None, **self.engine.timings,
        )
        self._warm = _report_started(config, prepared, pinned, replica)
        self._store, self._usage_at = prepared.store, time.monotonic()
        self._began = started
        self._serving = serving_marker(report) if report is not None else None
        return self

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        """One OpenAI request answered whole by vLLM's serving layer (status, headers, body bytes)."""
        self._check_engine()
        span = self._span(req)
        try:
            with request_context(req.request_id, tracing.trace_id(span)):
                resp = await self.engine.call(req)
        except BaseException as exc:
            tracing.finish(span, exc)
            raise
        if span is not None:
            tracing.finish(span, status=resp.status, **_usage(resp.body))
        if resp.status >= 500:
            self._check_engine()
        resp.headers.append((REPLICA_HEADER, self.replica))
        self._first_answer()
        return resp

    async def stream(self, req: EngineHTTPRequest) -> AsyncIterator[EngineHTTPResponse | bytes]:
        """The head with the first body bytes, then coalesced SSE bytes (called with `stream=True`);
        cancelling it aborts the request in vLLM."""
        self._check_engine()
        span = self._span(req)
        error: BaseException | None = None
        parts = self.engine.stream(req)
        trace_id = tracing.trace_id(span)
        try:
            while True:
                with request_context(req.request_id, trace_id):  # each step's log lines name the request
                    try:
                        part = await anext(parts)
                    except StopAsyncIteration:
                        break
                if isinstance(part, EngineHTTPResponse):
                    if part.status >= 500:
                        self._check_engine()
                    part.headers.append((REPLICA_HEADER, self.replica))
                    self._first_answer()
                yield part
        except BaseException as exc:
            error = exc
            raise
        finally:
            await parts.aclose()  # a cancelled stream aborts its request in vLLM now, not at collection
            tracing.finish(span, error)

    def _layout_shared(self, state: str) -> None:
        self.layout_share = state

    def _first_answer(self) -> None:
        """The start's last phase: seconds from the replica's start to its first answer (the first
        token of a stream), which for a start on demand or from zero is what its first client waited."""
        if "first_token_s" not in self.engine.timings:
            self.engine.timings["first_token_s"] = round(time.monotonic() - self._began, 3)
            if self._serving is not None:  # the layout blob's writer may begin (helios.storage.layout_cache)
                with contextlib.suppress(OSError):
                    self._serving.touch()
            self._release_fill()

    def _span(self, req: EngineHTTPRequest) -> Any:
        """This replica's span of a traced request (None untraced); vLLM's and the KV connector's
        spans go under it, as the request's trace headers now name it."""
        span = tracing.start(f"helios.engine.{self.role}", req.headers, server=True, **{
            "helios.model": self.engine.model_id, "helios.role": self.role, "helios.replica": self.replica,
            "helios.node": self.node, "helios.request_id": req.request_id})
        if span is not None:
            req.headers = tracing.headers_for(span, req.headers)
        return span

    def _check_engine(self) -> None:
        """A replica whose engine died answers no request: the router retries elsewhere, counts it against
        this replica's breaker, and Serve's health check replaces the replica."""
        if self.engine.engine.errored:
            raise EngineUnavailable("the replica's engine has died", replica=self.replica, dead=True)

    def openapi(self) -> dict[str, Any]:
        """vLLM's OpenAPI schema of the routes this replica answers."""
        return self.engine.app.openapi()

    def info(self) -> dict[str, Any]:
        info = self.engine.info()
        info["role"] = self.role
        info["pid"] = os.getpid()  # the replica's process (its engine core and workers are its children)
        info["replica"] = self.replica
        if self.layout_share is not None:
            info["layout_share"] = self.layout_share
        info["scheduler"] = self.record_routing_stats()  # vLLM's last step: running, waiting, KV-cache use
        if self.kv_metrics is not None:
            info["kv"] = self.kv_metrics.snapshot()
        return info

    def record_routing_stats(self) -> dict[str, Any]:
        """What Helios's request router weighs replicas by: requests in the engine (scheduled or
        not yet) and the scheduler's last running / waiting counts and KV-cache use."""
        return self.engine.stats.routing(self.engine.num_unfinished_requests())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Helios's autoscaling policy scales on (helios.scaling.policy): the same numbers."""
        return self.record_routing_stats()

    def num_unfinished_requests(self) -> int:
        return self.engine.num_unfinished_requests()

    async def check_health(self) -> None:
        await self.engine.check_health()
        await self._report_cache_usage()

    async def _report_cache_usage(self, every_s: float = 15.0) -> None:
        """Set the node's cache-fill gauges again now and then (from the health check): Ray's export
        drops a gauge nobody has set for a while, and the tiers change under other processes too."""
        if self._store is None or time.monotonic() - self._usage_at < every_s:
            return
        self._usage_at = time.monotonic()
        try:
            await asyncio.to_thread(self._store.report_usage)
        except OSError as exc:  # a tier being cleaned up under us: the next round reports it
            log_event(logger, "cache_usage_unreadable", error=str(exc)[:300])

    def shutdown(self) -> None:
        """Stop the engine and tell the registry (also when the server is collected)."""
        metrics, self.kv_metrics = getattr(self, "kv_metrics", None), None
        if metrics is not None:
            metrics.close()
        warm, self._warm = getattr(self, "_warm", None), None
        if warm is not None:
            _report_stopped(*warm)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        serving, self._serving = getattr(self, "_serving", None), None
        if serving is not None:
            serving.unlink(missing_ok=True)

    def __del__(self) -> None:
        self.shutdown()


async def _start_beside_arrivals(engine: Any, local: LocalModel | None) -> None:
    """Start the engine while its weights may still be arriving; a failed fetch is the error raised.

    The loader fails with the fetch's message when the fetch fails; the fetch's own exception
    (BlobNotFound, CorruptBlob, TierFull...) is what the caller knows how to report, so it wins.
    Weights fetched only if asked for are not fetched once the engine has started without them."""
    arriving = local.arriving if local is not None else None
    try:
        try:
            await engine.start_app()
        finally:
            if local is not None and local.only_if_wanted is not None:
                local.only_if_wanted.set()
    except Exception:
        if arriving is not None:
            await asyncio.wait([asyncio.wrap_future(arriving)], timeout=1.0)  # its thread may be a moment behind
            if arriving.done() and arriving.exception() is not None:
                raise arriving.exception() from None
        raise
    if arriving is not None:
        await asyncio.wrap_future(arriving)  # a start that needed no weights (layout cache hit) waits here


def _restore_engine_cache(config: ModelConfig, prepared: Any, cache_root: str) -> tuple[Any, Path, Any, float] | None:
    """Point vLLM's cache root at this model's engine cache, filled from the tiers (see
    storage/engine_cache.py); (key, root, what was restored, seconds), or None when the model did
    not come through the store, the config turns it off, or there is nothing to cache (an eager
    engine on the CPU). A failure costs a compile, never a start."""
    if not config.engine.cache_in_tiers or prepared.store is None or prepared.manifest is None:
        return None
    from helios.storage.engine_cache import EngineCacheKey, restore

    began = time.monotonic()
    engine = config.engine
    key = EngineCacheKey.current(prepared.manifest.digest(), engine.tensor_parallel_size,
                                 engine.pipeline_parallel_size, dtype=engine.dtype)
    if engine.enforce_eager and key.device == "cpu":
        return None  # nothing is compiled and startup plans are GPU-only: spare the start a store lookup
    root = Path(cache_root).expanduser() / "vllm-cache" / key.digest()
    try:
        restored = restore(prepared.store, key, root)
    except Exception as exc:  # noqa: BLE001 - an unreadable cache is a compile, not a failed start
        log_event(logger, "engine_cache_restore_failed", key=key.digest(), error=f"{type(exc).__name__}: {exc}")
        restored = None
    root.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_CACHE_ROOT"] = str(root)  # the engine core and workers inherit it
    return key, root, restored, time.monotonic() - began


def _save_engine_cache(store: Any, key: Any, root: Path, restored: Any) -> None:
    from helios.storage.engine_cache import save

    try:
        save(store, key, root, restored)
    except Exception as exc:  # noqa: BLE001 - the next start compiles again
        log_event(logger, "engine_cache_save_failed", key=key.digest(), error=f"{type(exc).__name__}: {exc}")


def _kv_connector(
    config: ModelConfig, role: Role, replica: str, storage: StorageConfig | None = None, cache_root: str = ""
) -> tuple[dict[str, Any] | None, Any]:
    """The engine's `kv_transfer_config` for its role, and the exporter of its connector counters.

    A disaggregated model's prefill replicas produce KV, its decode replicas consume it; a
    unified model with `kv_cache` set does both (reuse across requests). Each replica's
    connector writes its counters under its own name (the Serve replica id)."""
    if role == "unified" and config.kv_cache is None:
        return None, None
    from helios.config import KVStoreConfig
    from helios.engine.kv_connector import kv_transfer_config
    from helios.engine.kv_metrics import KVMetrics

    store = KVStoreConfig.model_validate(config.kv_store(None if role == "unified" else role))
    store = _in_node_cache(store, storage, cache_root)
    kv_role = {"unified": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}[role]
    instance = f"{role}-{replica}"
    return kv_transfer_config(kv_role, store, instance=instance), KVMetrics(store, instance, config.id, role)


def _in_node_cache(store: Any, storage: StorageConfig | None, cache_root: str) -> Any:
    """The KV store placed in the node cache's tiers when it asks for that and there is one
    (`KVStoreConfig.placement`); its own directories otherwise, as before the node cache."""
    if not store.wants_node_cache() or storage is None or not storage.node_cache:
        return store
    import ray

    from helios.storage.node_cache import node_cache_handle

    try:
        endpoint = ray.get(node_cache_handle(storage.model_dump(mode="json"), cache_root).kv_endpoint.remote(),
                           timeout=60)
    except Exception as exc:
        if store.placement == "node_cache":
            raise
        logger.warning("KV blocks keep their own store: the node cache is not reachable (%s)", exc)
        return store
    return type(store).model_validate({**store.model_dump(mode="json", exclude_unset=True), "node_tiers": endpoint})


def _report_started(config: ModelConfig, prepared: Any, pinned: bool, replica_id: str) -> tuple[Any, str, str, str] | None:
    """Tell the registry this replica has the model loaded (and, for a config model, that it exists).

    Best effort: serving never waits on, or fails with, the registry. Returns what
    `_report_stopped` needs, or None when there is no registry.
    """
    import ray

    from helios.registry.actor import get_registry

    registry = get_registry()
    if registry is None:
        return None
    manifest = prepared.manifest
    version = manifest.version if manifest else "local"
    source = f"store://{manifest.model_id}:{manifest.version}" if manifest else str(prepared.path)
    node_id = ray.get_runtime_context().get_node_id()
    if pinned:
        registry.register.remote(config.id, version, source, manifest=manifest.model_dump(mode="json") if manifest
                                 else None, make_default=True, pinned=True)
    if manifest is None:  # a directory only this node may have: the registry cannot profile it itself
        from helios.registry.profile import profile_from_dir

        registry.report_profile.remote(config.id, version, profile_from_dir(prepared.path).model_dump(mode="json"))
    registry.set_replica.remote(config.id, replica_id, node_id, True, version)
    if prepared.local is not None:
        registry.record_cache.remote(node_id, prepared.local.tier, prepared.local.sources)
    return registry, config.id, replica_id, node_id


def _report_stopped(registry: Any, model_id: str, replica_id: str, node_id: str) -> None:
    try:
        registry.set_replica.remote(model_id, replica_id, node_id, False)
    except Exception:  # noqa: BLE001, S110 - the cluster may be going away
        pass


def _usage(body: bytes) -> dict[str, int]:
    """Token counts of a whole answer for its span (prompt, completion, cached); never text."""
    try:
        usage = json.loads(body).get("usage") or {}
    except (ValueError, AttributeError):
        return {}
    details = usage.get("prompt_tokens_details") or {}
    return {k: v for k, v in {"gen_ai.usage.prompt_tokens": usage.get("prompt_tokens"),
                              "gen_ai.usage.completion_tokens": usage.get("completion_tokens"),
                              "helios.cached_tokens": details.get("cached_tokens")}.items() if isinstance(v, int)}


def _record_start(model: str, role: str, replica: str, timings: dict[str, float]) -> None:
    """This start's phases as gauges (and a start counted): fetch, engine (vLLM's start and load), total."""
    from helios.observability.metrics import ENGINE_START_SECONDS, ENGINE_STARTS

    ENGINE_STARTS.inc(model=model, role=role)
    phases = {"fetch": timings.get("fetch_s"), "load": timings.get("load_s"),
              "engine": timings.get("engine_init_s"), "total": timings.get("total_s")}
    for phase, seconds in phases.items():
        if seconds is not None:
            ENGINE_START_SECONDS.set(seconds, model=model, role=role, phase=phase, replica=replica)


def _loader_options(config: ModelConfig, tier_root: Path) -> tuple[dict[str, Any], Path]:
    """The Helios loader's settings; its report (load seconds, bytes) lands in a file we read back."""
    import tempfile
    import uuid

    report = Path(tempfile.gettempdir()) / f"helios-load-{uuid.uuid4().hex}.json"
    # Derived (fused-layout) blobs live beside the tier the model loads from: in RAM they are shared pages.
    options = {
        "share_weights": config.engine.share_weights,
        "layout_cache": config.engine.layout_cache,
        "report_path": str(report),
        "serving_path": str(serving_marker(report)),  # made at the first answer: the layout blob's write waits
        "derived_dir": str(tier_root / "derived"),
    }
    return options, report


def serving_marker(report: Path) -> Path:
    """The file that tells the engine's background writes (the layout blob) that it serves now."""
    return report.with_suffix(".serving")


def _share_layout(config: ModelConfig, prepared: Any, loaded: dict[str, Any], on_done: Any,
                  report: Path | None) -> None:
    """Push the layout blob this start mapped or is writing to the remote tier, in the background, once
    the engine has answered, when the store lacks it (`helios.storage.layout_share`); `on_done` hears
    "pending", then how it went."""
    path = loaded.get("derived_path")
    if not (path and loaded.get("derived") in ("hit", "writing") and prepared.manifest is not None):
        return
    from helios.storage.layout_share import LayoutShareKey, push_when_written, shares

    store = prepared.store
    if not shares(config.engine, store):
        return
    from helios.storage.layout_cache import held_until_serving

    key = LayoutShareKey.for_engine(prepared.manifest, config.engine)
    serving = str(serving_marker(report)) if report is not None else None
    thread = threading.Thread(target=push_when_written, args=(store, key, Path(path), on_done),
                              kwargs={"hold": lambda: held_until_serving(serving)},
                              name="helios-layout-share", daemon=True)
    on_done("pending")
    thread.start()


def _read_report(report: Path | None) -> dict[str, Any]:
    """The loader's report of this start (written by the engine's worker), consumed."""
    if report is None or not report.exists():
        return {}
    data = json.loads(report.read_text())
    report.unlink(missing_ok=True)
    return data


def _load_timings(data: dict[str, Any]) -> dict[str, float]:
    if not data:
        return {}
    timings = {"load_s": float(data["load_seconds"]), "load_bytes": float(data["bytes"])}
    if data.get("waited_s"):  # the load reached weights a fetch was still bringing (part of load_s)
        timings["weights_wait_s"] = float(data["waited_s"])
    if data.get("derived") in ("hit", "writing", "unusable") and not data.get("share_weights"):
        timings["layout_cache_hit"] = 1.0 if data["derived"] == "hit" else 0.0  # engine.layout_cache is on
    return timings


