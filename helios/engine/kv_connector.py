"""Helios's vLLM KV connector: KV blocks to and from the node's KV store, and across nodes.

vLLM loads it by name (`kv_connector_module_path`); `kv_transfer_config()` below builds
the engine argument. The roles are vLLM's:

- `kv_producer` (prefill replica) saves every full prompt block it computes,
- `kv_consumer` (decode replica) loads the longest stored prefix of its prompt,
- `kv_both` (unified replica) does both, so a prompt sharing a prefix with an earlier
  one reuses its KV even after the engine's own prefix cache dropped it.

Blocks are keyed by a chained hash of block-aligned token ids (see kv_store), so a prefix
shared by many prompts is saved once. Saving and loading are synchronous and whole-block:
after a step's forward, each newly filled block goes to the store with one `writev`
gathering its slabs from every layer of vLLM's paged cache; before a forward, a block
comes back with one `preadv` scattering the file straight into those slabs. No staging
copy, no per-layer files, no serialization format.

A consumer that cannot find the blocks (evicted, or stored on another node and the fetch
failed) reports fewer matched tokens, so vLLM recomputes them: it never fails a request.
Such a request counts as a *recompute fallback* (`recompute_fallbacks`,
`recompute_fallback_tokens` in the store's stats, see `connector_stats`). A block that
vanishes between the match and the load is reported to vLLM as a load error, and the
engine is configured (`kv_load_failure_policy="recompute"`) to recompute it.

Cross-node: a producer serves its store over HTTP (a small threaded block server in its
engine-core process, `POST /v1/kv/blocks`); a consumer whose local store misses fetches
the missing blocks from the producer named in the request's `kv_transfer_params` into its
own store, then loads them as usual. A block server rather than a Ray actor because the
connector runs inside vLLM's engine-core process, which is not a Ray worker: an actor call
would need a Ray client there, while a socket needs nothing and also works between two
engines with separate store roots on one machine, without a shared filesystem.

kv_transfer_params contract (what the PD router does):

1. Prefill request, to a `kv_producer` engine: `max_tokens=1` and
   `SamplingParams(extra_args={"kv_transfer_params": {"do_remote_decode": True}})`
   (the key is informational: a producer saves every prompt's full blocks).
2. The prefill's final `RequestOutput.kv_transfer_params` is
   `{"helios": {"v": 1, "node": HOSTNAME, "store": ROOT, "addr": "HOST:PORT" | None,
   "num_tokens": N}}`: where the blocks are and how many prompt tokens they cover
   (whole blocks only, so the prompt's last partial block is always recomputed).
3. Decode request, to a `kv_consumer` engine: the same prompt, with
   `SamplingParams(extra_args={"kv_transfer_params": <that dict, unchanged>})`.
   The decode engine loads the blocks from its node's store, or fetches them from
   `addr` when its store misses, and otherwise recomputes (counted as a fallback).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hmac
import http.client
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helios.config import KVStoreConfig, config_errors
from helios.engine.kv_store import KVStore, block_keys, namespace, store_stats
from helios.observability import tracing
from helios.ray_env import node_address

if TYPE_CHECKING:
    import torch

try:  # vLLM is only needed where an engine runs; the config helpers work without it.
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
except ImportError:  # pragma: no cover - vLLM not installed
    KVConnectorBase_V1 = object  # type: ignore[misc,assignment]
    KVConnectorMetadata = object  # type: ignore[misc,assignment]
    KVConnectorRole = None  # type: ignore[assignment]

logger = logging.getLogger("helios.kv_connector")

Role = Literal["kv_producer", "kv_consumer", "kv_both"]
PARAMS_KEY = "helios"
BLOCKS_PATH = "/v1/kv/blocks"
MAX_KEYS_PER_FETCH = 4096
# The cluster's block-server secret: Helios's engine replica puts it in the environment the engine
# core inherits (never in the engine arguments, which vLLM logs). A server without one serves nobody.
SECRET_ENV = "HELIOS_KV_SECRET"


class HeliosConnectorConfig(BaseModel):
    """`kv_connector_extra_config` of a Helios engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: KVStoreConfig = Field(default_factory=KVStoreConfig)
    namespace: str = Field("", description="Extra salt for block keys (e.g. a model version): engines share blocks only if equal.")
    serve: bool = Field(True, description="Producers serve their store to other nodes' consumers over HTTP.")
    server_host: str | None = Field(None, description="Address the block server binds and advertises; unset: this node's address.")
    server_port: int = Field(0, ge=0, le=65535, description="Block server port; 0 picks a free one.")
    fetch_timeout_s: float = Field(30.0, gt=0, description="Socket timeout of a fetch from a remote store (it goes on "
                                   "in the background past `fetch_wait_s`, filling this node's store for later).")
    fetch_wait_s: float = Field(1.0, ge=0, description="Longest a scheduler step waits for a remote fetch before it "
                                "recomputes the prompt instead (the step blocks every running request meanwhile).")
    instance: str | None = Field(None, description="Name of this engine's stats files; unset: vLLM's engine_id.")
    prefault: bool = Field(True, description="Touch every page of the KV cache at start, so a load never waits on page faults.")

    @classmethod
    def parse(cls, data: dict[str, Any]) -> HeliosConnectorConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(config_errors(exc, "kv_connector_extra_config")) from None


def kv_transfer_config(role: Role, store: KVStoreConfig | None = None, **options: Any) -> dict[str, Any]:
    """The `kv_transfer_config` engine argument that plugs Helios's connector into vLLM.

    `options` are the other HeliosConnectorConfig fields (instance, server_host, ...)."""
    if role not in ("kv_producer", "kv_consumer", "kv_both"):
        raise ValueError(f"kv_role: expected kv_producer, kv_consumer or kv_both, got {role!r}")
    cfg = HeliosConnectorConfig.parse({"store": store or KVStoreConfig(), **options})
    return {
        "kv_connector": "HeliosConnector",
        "kv_connector_module_path": __name__,
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": cfg.model_dump(mode="json"),
    }


def connector_stats(store: KVStoreConfig | None = None, instance: str = "") -> dict[str, float]:
    """Counters of the engines using `store` (one engine's if `instance` is its name).

    Scheduler-side: lookups, matched_tokens, recompute_fallbacks, recompute_fallback_tokens,
    remote_fetched_blocks, remote_fetch_errors; worker-side: load_blocks, load_bytes,
    load_seconds, load_errors, save_blocks, save_bytes, save_seconds; store: hits_ram,
    hits_nvme, misses, spilled_blocks, evicted_blocks, ... (all cumulative)."""
    return store_stats(store or KVStoreConfig(), instance)


# --------------------------------------------------------------------------- metadata


@dataclass
class HeliosConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One step's work for the worker: blocks to load before the forward, to save after."""

    loads: list[tuple[str, int]] = field(default_factory=list)  # (key, vLLM block id)
    saves: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _Request:
    """Scheduler-side state of one request."""

    prompt: list[int]
    keys: list[str]  # keys of the prompt's full blocks
    remote: dict[str, Any] | None  # the producer's kv_transfer_params["helios"], if any
    saved_blocks: int = 0  # prompt blocks already saved or found stored
    local_tokens: int = 0  # block-aligned local hit at the last match
    counted: bool = False
    fetch_given_up: bool = False  # a remote fetch outlasted fetch_wait_s once: never wait for it again
    save_started_ns: int = 0  # when its first blocks were planned for saving (the save span's start)


# --------------------------------------------------------------------------- block server


class _BlockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _BlockServer

    def do_POST(self) -> None:
        if self.path != BLOCKS_PATH:
            self.send_error(404)
            return
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.server.secret):
            self.send_error(401, "a block fetch needs the cluster's secret")
            return
        try:
            keys = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))["keys"]
            if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_FETCH or not all(_is_key(k) for k in keys):
                raise ValueError("keys: expected a list of 32-hex-digit block keys")
        except (ValueError, KeyError, TypeError) as exc:
            self.send_error(400, str(exc))
            return
        blobs: list[bytes] = []
        for key in keys:  # a prefix only: a gap makes the rest useless to the consumer
            data = self.server.store.read_raw(key)
            if data is None:
                break
            blobs.append(data)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("X-Helios-Sizes", ",".join(str(len(b)) for b in blobs))
        self.send_header("Content-Length", str(sum(len(b) for b in blobs)))
        self.end_headers()
        for b in blobs:
            self.wfile.write(b)
        self.server.store.flush_stats()

    def log_message(self, format: str, *args: Any) -> None:
        return


def _is_key(k: Any) -> bool:
    return isinstance(k, str) and len(k) == 32 and all(c in "0123456789abcdef" for c in k)


class _BlockServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: KVStore, host: str, port: int, secret: bytes) -> None:
        self.store = store
        self.secret = secret
        super().__init__((host, port), _BlockHandler)


def fetch_blocks(addr: str, keys: list[str], timeout: float, secret: str | None = None) -> list[tuple[str, bytes]]:
    """The longest stored prefix of `keys` from the block server at `addr` ("host:port")."""
    host, _, port = addr.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    secret = secret if secret is not None else os.environ.get(SECRET_ENV, "")
    try:
        body = json.dumps({"keys": keys}).encode()
        conn.request("POST", BLOCKS_PATH, body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise OSError(f"block server {addr}: HTTP {resp.status}")
        sizes = [int(s) for s in (resp.getheader("X-Helios-Sizes") or "").split(",") if s]
    finally:
        conn.close()
    out, pos = [], 0
    for key, size in zip(keys, sizes):
        out.append((key, data[pos : pos + size]))
        pos += size
    return out


# --------------------------------------------------------------------------- the connector


class HeliosConnector(KVConnectorBase_V1):  # type: ignore[misc,valid-type]
    """vLLM `KVConnectorBase_V1` over the Helios KV store (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        tc = self._kv_transfer_config
        self.cfg = HeliosConnectorConfig.parse(dict(tc.kv_connector_extra_config or {}))
        self.saves = bool(tc.is_kv_producer)
        self.loads = bool(tc.is_kv_consumer)
        self.block_size: int = vllm_config.cache_config.block_size
        instance = self.cfg.instance or str(tc.engine_id)
        side = "scheduler" if role == KVConnectorRole.SCHEDULER else f"worker{os.getpid()}"
        self.store = KVStore(self.cfg.store, stats_name=f"{instance}.{side}")
        self.node = socket.gethostname()
        # scheduler side
        self._requests: dict[str, _Request] = {}
        self._pending_loads: list[tuple[str, int]] = []
        self._server: _BlockServer | None = None
        self.addr: str | None = None
        self._fetcher = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="helios-kv-fetch")
        self._fetches: dict[str, concurrent.futures.Future[int]] = {}  # by the first key fetched
        self._ns = b""
        if role == KVConnectorRole.SCHEDULER:
            self._ns = namespace(**self._identity(vllm_config, kv_cache_config))
            if self.saves and self.cfg.serve:
                self._start_server()
            self.store.flush_stats()
        # worker side
        self._slabs: list[tuple[Any, int]] = []  # (uint8 numpy view of a layer, block dim)
        self._payload = 0
        self._load_errors: set[int] = set()

    # ---------------------------------------------------------------- identity
    def _identity(self, vllm_config: Any, kv_cache_config: Any) -> dict[str, Any]:
        """What two engines must agree on for their KV blocks to be interchangeable."""
        mc = vllm_config.model_config
        ident: dict[str, Any] = {
            "salt": self.cfg.namespace,
            "model": mc.served_model_name if isinstance(mc.served_model_name, str) else str(mc.model),
            "dtype": str(mc.dtype),
            "cache_dtype": str(vllm_config.cache_config.cache_dtype),
            "block_size": self.block_size,
            "tp": vllm_config.parallel_config.tensor_parallel_size,
        }
        if kv_cache_config is not None:
            for i, group in enumerate(kv_cache_config.kv_cache_groups):
                spec = group.kv_cache_spec
                ident[f"group{i}"] = [type(spec).__name__, len(group.layer_names), getattr(spec, "num_kv_heads", None),
                                      getattr(spec, "head_size", None), str(getattr(spec, "dtype", ""))]
        from vllm.platforms import current_platform

        ident["platform"] = current_platform.device_type
        if current_platform.device_type == "cpu":  # the CPU kernels' block interior depends on the ISA
            with contextlib.suppress(Exception):
                from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

                ident["isa"] = str(_get_attn_isa(mc.dtype, self.block_size, mc.get_head_size()))
        return ident

    def _start_server(self) -> None:
        host = self.cfg.server_host or node_address()
        secret = os.environ.get(SECRET_ENV, "")
        if not secret:
            logger.warning("Helios KV: no %s in the environment: the block server refuses every fetch", SECRET_ENV)
            secret = secrets.token_hex(32)  # known to nobody
        self._server = _BlockServer(self.store, host, self.cfg.server_port, secret.encode())
        self.addr = f"{host}:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="helios-kv-blocks", daemon=True).start()
        logger.info("Helios KV block server on %s serving %s", self.addr, self.store.dirs)

    # ---------------------------------------------------------------- scheduler side
    def _state(self, request: Any) -> _Request:
        st = self._requests.get(request.request_id)
        if st is None:
            prompt = list(request.prompt_token_ids or [])
            params = request.kv_transfer_params or {}
            remote = params.get(PARAMS_KEY) if isinstance(params.get(PARAMS_KEY), dict) else None
            st = _Request(prompt, block_keys(self._ns, prompt, self.block_size), remote)
            self._requests[request.request_id] = st
        return st

    def on_new_request(self, request: Any) -> None:
        self._state(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond the local hit whose blocks the store has (fetched from the producer's
        store first when this node's misses them). Always leaves the last prompt token to compute."""
        if not self.loads or getattr(request, "mm_features", None):
            return 0, False
        st = self._state(request)
        limit = (len(st.prompt) - 1) // self.block_size
        start = num_computed_tokens // self.block_size
        st.local_tokens = num_computed_tokens
        if start >= limit:
            return 0, False
        wanted = st.keys[start:limit]
        with tracing.span("helios.kv.lookup", getattr(request, "trace_headers", None),
                          **{"helios.request_id": request.request_id, "helios.kv.wanted_blocks": len(wanted)}) as span:
            n = self.store.count_present(wanted)
            local = n
            if n < len(wanted) and st.remote and not st.fetch_given_up and not self._is_own_store(st.remote):
                fetched = self._fetch(st.remote, wanted[n:])
                if fetched is None:  # the step waited fetch_wait_s once; this request recomputes
                    st.fetch_given_up = True
                n += fetched or 0
            if span is not None:
                span.set_attribute("helios.kv.local_blocks", local)
                span.set_attribute("helios.kv.fetched_blocks", n - local)
                span.set_attribute("helios.cached_tokens", n * self.block_size)
        self.store.touch(wanted[:n])  # just matched: make them the last to be evicted
        self.store.count(lookups=1, lookup_tokens=len(wanted) * self.block_size)
        return n * self.block_size, False

    def _is_own_store(self, remote: dict[str, Any]) -> bool:
        return remote.get("node") == self.node and Path(str(remote.get("store"))) == self.store.dirs["ram"]

    def _fetch(self, remote: dict[str, Any], keys: list[str]) -> int | None:
        """Copy the longest prefix of `keys` the producer's store has into this node's store:
        how many blocks are here now, or None when the fetch outlasted `fetch_wait_s`."""
        addr = remote.get("addr")
        if not addr:
            return 0
        keys = keys[:MAX_KEYS_PER_FETCH]
        fetch = self._fetches.get(keys[0])
        if fetch is None or fetch.done():
            fetch = self._fetches[keys[0]] = self._fetcher.submit(self._fetch_into_store, str(addr), keys)
        try:
            got = fetch.result(timeout=self.cfg.fetch_wait_s)
        except concurrent.futures.TimeoutError:
            # Recompute now rather than hold up every running request; the fetch goes on and later
            # requests with this prefix find the blocks here.
            self.store.count(remote_fetch_waits_exceeded=1)
            return None
        finally:
            if fetch.done():
                self._fetches.pop(keys[0], None)
        return self.store.count_present(keys) if got else 0

    def _fetch_into_store(self, addr: str, keys: list[str]) -> int:
        """On the fetch thread: copy the producer's blocks into this node's store; how many arrived."""
        started = time.perf_counter()
        try:
            got = fetch_blocks(addr, keys, self.cfg.fetch_timeout_s)
            nbytes = sum(self.store.put_raw(key, data) for key, data in got)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            logger.warning("Helios KV: fetching %d blocks from %s failed (%r); recomputing", len(keys), addr, exc)
            self.store.count(remote_fetch_errors=1)
            return 0
        self.store.count(remote_fetches=1, remote_fetched_blocks=len(got), remote_fetched_bytes=nbytes,
                         remote_fetch_seconds=time.perf_counter() - started)
        return len(got)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens > 0:
            block_ids = blocks.get_block_ids()[0]
            start = st.local_tokens // self.block_size
            n = num_external_tokens // self.block_size
            self._pending_loads.extend(zip(st.keys[start : start + n], block_ids[start : start + n]))
            self.store.count(matched_requests=1, matched_tokens=num_external_tokens)
        if st.remote and not st.counted:  # a PD decode: did it get what the prefill stored?
            st.counted = True
            limit = (len(st.prompt) - 1) // self.block_size * self.block_size
            expected = min(int(st.remote.get("num_tokens", 0)), limit)
            have = st.local_tokens + num_external_tokens
            if have < expected:
                self.store.count(recompute_fallbacks=1, recompute_fallback_tokens=expected - have)
                logger.info("Helios KV: request %s recomputes %d tokens its prefill stored", request.request_id, expected - have)

    def build_connector_meta(self, scheduler_output: Any) -> HeliosConnectorMetadata:
        meta = HeliosConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if self.saves:
            meta.saves = self._plan_saves(scheduler_output)
        return meta

    def _plan_saves(self, so: Any) -> list[tuple[str, int]]:
        """Prompt blocks this step fills that no tier holds yet."""
        computed: dict[str, tuple[int, list[int] | None]] = {}
        for new in so.scheduled_new_reqs:
            computed[new.req_id] = (new.num_computed_tokens, new.block_ids[0] if new.block_ids else None)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            computed[req_id] = (cached.num_computed_tokens[i], None)
        saves: list[tuple[str, int]] = []
        seen: set[str] = set()
        state = getattr(so, "kv_connector_block_state", None)
        for req_id, (before, block_ids) in computed.items():
            st = self._requests.get(req_id)
            if st is None:
                continue
            full = min(before + so.num_scheduled_tokens.get(req_id, 0), len(st.prompt)) // self.block_size
            if full <= st.saved_blocks:
                continue
            if state is not None:
                groups = state.get_block_ids(req_id)
                block_ids = list(groups[0]) if groups else block_ids
            if block_ids is None:
                continue
            st.save_started_ns = st.save_started_ns or time.time_ns()
            for i in range(st.saved_blocks, min(full, len(block_ids))):
                key = st.keys[i]
                if key not in seen and self.store.locate(key) is None:
                    saves.append((key, block_ids[i]))
                    seen.add(key)
            st.saved_blocks = full
        return saves

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Saves are done by now (synchronous), so blocks free at once; a producer says where they are."""
        st = self._requests.pop(request.request_id, None)
        self.store.flush_stats()
        if not self.saves or st is None:
            return False, None
        # From the first planned save to now: the saves ran in the request's forward steps.
        span = tracing.start("helios.kv.save", getattr(request, "trace_headers", None),
                             start_ns=st.save_started_ns or None, **{
                                 "helios.request_id": request.request_id, "helios.kv.saved_blocks": st.saved_blocks})
        tracing.finish(span)
        return False, {PARAMS_KEY: {"v": 1, "node": self.node, "store": str(self.store.dirs["ram"]), "addr": self.addr,
                                    "num_tokens": st.saved_blocks * self.block_size}}

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._fetcher.shutdown(wait=False, cancel_futures=True)
        self.store.flush_stats()

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Remember each layer's cache as a byte view and which dimension indexes blocks.

        A block is then a few contiguous slabs per layer (one for the CPU backend's
        [blocks, heads, block_size, 2*head] layout, two for [2, blocks, ...])."""
        import torch

        num_blocks = self._kv_cache_config.num_blocks
        seen: set[int] = set()
        for name in sorted(kv_caches):
            t = kv_caches[name]
            if not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if t.device.type != "cpu":
                raise NotImplementedError(f"HeliosConnector: layer {name} is on {t.device}; only host-memory KV caches are supported")
            if not t.is_contiguous() or num_blocks not in t.shape[:2]:
                raise NotImplementedError(f"HeliosConnector: layer {name}: unsupported KV cache layout {tuple(t.shape)}/{t.stride()}")
            dim = 0 if t.shape[0] == num_blocks else 1
            arr = t.view(torch.uint8).numpy()
            if self.cfg.prefault:
                flat = arr.reshape(-1)
                flat[::4096] = flat[::4096]  # fault every page in now, not on a load's critical path
            self._slabs.append((arr, dim))
            self._payload += t.select(dim, 0).nbytes
        logger.info("HeliosConnector: %d KV layers, %d bytes per block", len(self._slabs), self._payload)

    def _buffers(self, block_id: int) -> list[Any]:
        bufs = []
        for arr, dim in self._slabs:
            if dim == 0:
                bufs.append(arr[block_id])
            else:
                bufs.extend(arr[j, block_id] for j in range(arr.shape[0]))
        return bufs

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not meta.loads:
            return
        started, nbytes, done = time.perf_counter(), 0, 0
        for key, block_id in meta.loads:
            try:
                tier = self.store.read_into(key, self._buffers(block_id), self._payload)
            except OSError as exc:
                logger.warning("Helios KV: block %s unreadable (%r); recomputing it", key[:12], exc)
                tier = None
            if tier is None:
                self._load_errors.add(block_id)
                continue
            nbytes += self._payload
            done += 1
        self.store.count(load_blocks=done, load_bytes=nbytes, load_seconds=time.perf_counter() - started,
                         load_errors=len(meta.loads) - done)
        self.store.flush_stats()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved, all layers at once, in wait_for_save

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not meta.saves:
            return
        started, nbytes = time.perf_counter(), 0
        for key, block_id in meta.saves:
            nbytes += self.store.put(key, self._buffers(block_id), self._payload)
        self.store.count(save_blocks=len(meta.saves), save_bytes=nbytes, save_seconds=time.perf_counter() - started)
        self.store.flush_stats()

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
