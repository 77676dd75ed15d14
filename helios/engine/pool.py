"""A warm pool of engine hosts per node: processes that have imported vLLM before any model needs them.

Most of a cold start on this kind of machine is Python importing torch and vLLM, once per
process (the weights take seconds). `warm_start` removes the engine core's and worker's
imports; the pool removes the replica's own. A host is a Ray actor that, on creation, imports
vLLM and Helios's engine and starts its zygote, then waits. A new engine replica (a scale-up,
an on-demand model, a scale from zero) takes an idle host on its node and has it start the
model: the host maps the weights, allocates the KV cache, warms up and serves; the replica
passes requests to it. A host serves one engine for its life: when the replica goes, so does
the host, and the keeper starts a fresh one.

- The keeper (`EnginePool`, one named actor, owned by the router that creates it) keeps
  `size_per_node` idle hosts on every live node, refilling in the background, and up to
  `max_per_node` where the registry expects that many starts soon (`pool_targets`); hosts
  beyond a node's target (a prediction that passed) are stopped, newest first. Hosts import
  in Linux's SCHED_IDLE class (and at a raised nice value), so refills never slow serving:
  Ray starts its workers at nice 15, so a nice value alone would put a refill's imports
  ahead of the routers and replicas serving now. A host that is taken goes back to the
  normal class at nice 0 where the OS allows (it needs CAP_SYS_NICE; otherwise it says so).
  A node's refill waits until the start its host was taken for has ended: a new host's imports
  and memory reserve (`memory_reserve`) would compete with that start for cores and fresh pages.
- Hosts are detached, so that a keeper's restart does not kill the engines they serve; each
  watches what it belongs to instead: an idle host exits when the keeper is gone, a taken host
  when its replica's process is. Its reaper kills its zygote and engine processes with it.
- A replica that finds no host (no pool, none on its node, the keeper unreachable) starts its
  engine itself: the pool is a fast path, never a wait.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psutil
import ray
from ray.exceptions import ActorDiedError, RayActorError

from helios.engine.http import EngineHTTPRequest, EngineHTTPResponse
from helios.engine.memory_reserve import MemoryReserve
from helios.errors import EngineUnavailable, HeliosError
from helios.observability import settings_env
from helios.observability.logs import get_logger, log_event

logger = get_logger("engine.pool")
POOL_NAME = "helios-engine-pool"
POOL_NAMESPACE = "helios"
REFILL_S = 2.0
PREDICT_S = 30.0  # how often the keeper asks the registry for expected starts
START_WAIT_S = 600.0  # longest a node's refill waits for a taken host's start to end
START_CHANCE = 0.3  # an expected start counts for a host from this chance on
WATCH_S = 0.5
PAGE = os.sysconf("SC_PAGE_SIZE")
# What a taken host adopts from the replica: the devices Ray gave the replica, tracing and metrics settings.
INHERITED_ENV = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ONEAPI_DEVICE_SELECTOR",
                 *settings_env.NAMES)


class EngineHost:
    """A process with vLLM imported and a zygote ready, waiting to serve one model (a Ray actor)."""

    def __init__(self, keeper: str, nice: int, idle_class: bool = True, reserve_bytes: int = 0) -> None:
        from helios.engine import warm_start
        from helios.engine.reaper import ensure_reaper

        created = time.monotonic()
        self.keeper, self.nice = keeper, nice
        _renice(nice, idle_class=idle_class)  # before the zygote starts, so it imports at low priority too
        ensure_reaper()  # the zygote and, later, the engine die with this process
        warm_start.start_zygote()
        from helios.engine.llm_engine import import_vllm
        from helios.engine.model_server import ModelServer

        import_vllm()
        # Faulted in at the idle priority set above (the thread inherits it), handed to the engine on start.
        self.reserve = MemoryReserve(reserve_bytes) if reserve_bytes > 0 else None
        self._server_class = ModelServer
        self.server: Any = None
        self.taken = asyncio.Event()
        self.started = asyncio.Event()  # set when a start has ended, well or not
        self.imports_s = time.monotonic() - created
        threading.Thread(target=self._watch_keeper, name="helios-host-keeper-watch", daemon=True).start()
        log_event(logger, "engine_host_ready", imports_s=round(self.imports_s, 3), pid=os.getpid())

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "imports_s": self.imports_s, "node": ray.get_runtime_context().get_node_id()}

    def reserve_stats(self) -> dict[str, float]:
        """The pre-faulted memory: its size, how much is faulted in, how much was handed to the engine."""
        return self.reserve.stats() if self.reserve is not None else {}

    async def until_taken(self) -> bool:
        """Returns when the host is taken (the keeper waits on it to see a dead idle host)."""
        await self.taken.wait()
        return True

    async def until_started(self) -> bool:
        """Returns when the start of the model it was taken for has ended (the keeper refills after it)."""
        await self.started.wait()
        return True

    async def start(self, model: dict[str, Any], cache_root: str, storage: dict[str, Any] | None, pinned: bool,
                    role: str, replica: str, owner_pid: int, started_ago_s: float, env: dict[str, str]) -> None:
        """Serve `model` for the replica whose process is `owner_pid` (same node)."""
        if self.taken.is_set():
            raise RuntimeError("this engine host is already serving a model")
        self.taken.set()
        self._watch(owner_pid)
        _renice(0, children=True)  # the zygote the engine is forked from too
        os.environ.update(env)
        started = time.monotonic() - started_ago_s
        if self.reserve is not None:
            self.reserve.hand_over()
        try:
            self.server = await self._server_class.start(model, cache_root, storage, pinned, role, replica,  # type: ignore[arg-type]
                                                         started)
        finally:
            if self.reserve is not None:
                self.reserve.finish()
            self.started.set()
        self.server.engine.timings["host_imports_ahead_s"] = round(self.imports_s, 3)
        if self.reserve is not None:  # what the engine got of the pre-faulted memory
            self.server.engine.timings["host_reserve_handed_over_bytes"] = self.reserve.handed_over

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        return await self.server.call(req)

    async def stream(self, req: EngineHTTPRequest) -> AsyncIterator[EngineHTTPResponse | bytes]:
        parts = self.server.stream(req)
        try:
            async for part in parts:
                yield part
        finally:
            await parts.aclose()  # a cancelled stream aborts its request in vLLM

    def openapi(self) -> dict[str, Any]:
        return self.server.openapi()

    def info(self) -> dict[str, Any]:
        return self.server.info()

    def record_routing_stats(self) -> dict[str, Any]:
        return self.server.record_routing_stats()

    def num_unfinished_requests(self) -> int:
        return self.server.num_unfinished_requests()

    async def check_health(self) -> None:
        await self.server.check_health()

    def stop(self) -> None:
        """The replica is going: stop the engine (telling the registry), then end this process."""
        try:
            if self.server is not None:
                self.server.shutdown()
        finally:
            threading.Timer(0.2, os._exit, args=(0,)).start()

    def _watch(self, owner_pid: int) -> None:
        owner = psutil.Process(owner_pid)
        born = owner.create_time()

        def watch() -> None:
            while True:
                time.sleep(WATCH_S)
                try:
                    if owner.create_time() == born and owner.status() != psutil.STATUS_ZOMBIE:
                        continue
                except psutil.Error:
                    pass
                log_event(logger, "engine_host_owner_gone", flush=True, owner_pid=owner_pid)
                os._exit(0)  # the reaper stops the engine's processes

        threading.Thread(target=watch, name="helios-host-owner-watch", daemon=True).start()

    def _watch_keeper(self) -> None:
        while not self.taken.is_set():
            time.sleep(5.0)
            if self.taken.is_set():
                return
            try:
                ray.get_actor(self.keeper, namespace=POOL_NAMESPACE)
            except ValueError:
                log_event(logger, "engine_host_keeper_gone", flush=True)
                os._exit(0)
            except Exception:  # noqa: BLE001, S112 - the GCS is busy: ask again later
                continue


def _renice(value: int, children: bool = False, idle_class: bool = False) -> None:
    """Set the nice value (and with `idle_class` the SCHED_IDLE class, else the normal one) of
    every thread of this process (a thread started later inherits its creator's), and of its
    children's: raising it needs no privilege, lowering it needs CAP_SYS_NICE. On Linux both are
    per thread; setting them for the pid alone leaves Ray's and the fetch's threads where they
    were (a taken host then fetched at its idle priority, beside a refill)."""
    policy = getattr(os, "SCHED_IDLE" if idle_class else "SCHED_OTHER", None) if hasattr(os, "sched_setscheduler") else None
    me = psutil.Process()
    for proc in [me, *(me.children(recursive=True) if children else [])]:
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.Error:
            tids = [proc.pid]
        for tid in tids:
            try:
                if policy is not None:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, value)
            except ProcessLookupError:  # the thread ended meanwhile
                continue
            except OSError as exc:
                log_event(logger, "engine_host_priority_kept", pid=proc.pid, tid=tid, wanted=value,
                          idle_class=idle_class, error=str(exc)[:200])
                break


@dataclass
class _Idle:
    host: Any
    until_taken: Any  # errors when the host dies
    ready: Any  # the host's `ready()`: done once it has imported
    pid: int | None = None


def pool_targets(size_per_node: int, max_per_node: int, expected: dict[str, float], nodes: set[str]) -> dict[str, int]:
    """Idle hosts to keep per node: the config's size, raised to the starts the registry expects on
    the node (those expected nowhere in particular shared out over all nodes) up to `max_per_node`.
    An expected start counts for a host once its chance reaches START_CHANCE."""
    if not max_per_node:
        return dict.fromkeys(nodes, size_per_node)
    anywhere = expected.get("", 0.0) / max(len(nodes), 1)
    targets = {}
    for node in nodes:
        predicted = int(expected.get(node, 0.0) + anywhere + (1 - START_CHANCE))
        targets[node] = min(max_per_node, max(size_per_node, predicted))
    return targets


class EnginePool:
    """The keeper: idle hosts on every live node, as many as `pool_targets` says (a Ray actor)."""

    def __init__(self, size_per_node: int, nice: int = 10, max_per_node: int = 0, horizon_s: float = 300.0,
                 idle_class: bool = True, reserve_gib: float = 0.0) -> None:
        self.size, self.nice, self.idle_class = size_per_node, nice, idle_class
        self.reserve_bytes = int(reserve_gib * (1 << 30)) // PAGE * PAGE  # what each host faults in
        self.max_per_node, self.horizon_s = max_per_node, horizon_s
        self.idle: dict[str, list[_Idle]] = {}  # node -> idle hosts, oldest first
        self.starting: dict[str, list[tuple[float, Any]]] = {}  # node -> (taken at, `until_started` ref)
        self.counts = {"started": 0, "taken": 0, "replaced": 0, "trimmed": 0}
        self.expected: dict[str, float] = {}  # the registry's last answer
        self.targets: dict[str, int] = {}
        self._asked: tuple[float, Any] | None = None  # (when, the pending answer)
        self._predicted_at = float("-inf")
        self._task: asyncio.Task | None = None

    def _ensure_refilling(self) -> None:
        """Start the refill loop on the actor's event loop (there is none yet in `__init__`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refill_forever())

    async def _refill_forever(self) -> None:
        while True:
            try:
                self._drop_dead()
                self._refill()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log_event(logger, "engine_pool_refill_failed", error=repr(exc)[:300])
            await asyncio.sleep(REFILL_S)

    def _drop_dead(self) -> None:
        for node, hosts in self.idle.items():
            alive = []
            for idle in hosts:
                try:
                    if idle.pid is None and ray.wait([idle.ready], timeout=0)[0]:
                        idle.pid = ray.get(idle.ready)["pid"]
                    if not ray.wait([idle.until_taken], timeout=0)[0]:
                        alive.append(idle)
                        continue
                    ray.get(idle.until_taken)
                except RayActorError:
                    self.counts["replaced"] += 1
                    log_event(logger, "engine_host_died", node=node, pid=idle.pid)
            hosts[:] = alive

    def _predict(self) -> None:
        """Take the registry's expected starts when they have come, and ask again every PREDICT_S
        (never waited on: no registry, or a busy one, leaves the last answer standing)."""
        if not self.max_per_node:
            return
        now = time.monotonic()
        if self._asked is not None:
            asked_at, ref = self._asked
            if ray.wait([ref], timeout=0)[0]:
                try:
                    self.expected = {str(k): float(v) for k, v in ray.get(ref).items()}
                except Exception as exc:  # noqa: BLE001 - the registry restarted or is gone: keep the last
                    log_event(logger, "engine_pool_predict_failed", error=repr(exc)[:200])
                self._asked = None
            elif now - asked_at < 5 * PREDICT_S:
                return
        if self._asked is None and now - self._predicted_at >= PREDICT_S:
            from helios.registry.actor import get_registry

            registry = get_registry()
            if registry is not None:
                self._asked = (now, registry.expected_starts.remote(self.horizon_s))
                self._predicted_at = now

    def _refill(self) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        live = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0}
        for node in list(self.idle):
            if node not in live:
                del self.idle[node]
        self._predict()
        self.targets = pool_targets(self.size, self.max_per_node, self.expected, live)
        for node in live:
            hosts = self.idle.setdefault(node, [])
            while len(hosts) > self.targets[node]:  # the starts it was kept for are no longer expected
                extra = hosts.pop()
                extra.host.stop.remote()
                self.counts["trimmed"] += 1
            if self._start_in_progress(node):
                continue  # a refill's imports and reserve would compete with the start for cores and pages
            while len(hosts) < self.targets[node]:
                host = ray.remote(EngineHost).options(
                    num_cpus=0, lifetime="detached", max_restarts=0, max_concurrency=1000,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(POOL_NAME, self.nice, self.idle_class, self.reserve_bytes)
                hosts.append(_Idle(host, host.until_taken.remote(), host.ready.remote()))
                self.counts["started"] += 1

    def _start_in_progress(self, node: str) -> bool:
        """Whether a host taken on `node` is still starting its model (for at most START_WAIT_S)."""
        now = time.monotonic()
        pending = []
        for taken_at, ref in self.starting.get(node, []):
            if now - taken_at < START_WAIT_S and not ray.wait([ref], timeout=0)[0]:
                pending.append((taken_at, ref))
        self.starting[node] = pending
        return bool(pending)

    async def take(self, node_id: str) -> Any:
        """An idle host on `node_id` (the oldest: furthest through its imports), or None. The node's
        refill waits until that host's start has ended."""
        self._ensure_refilling()
        self._drop_dead()
        hosts = self.idle.get(node_id) or []
        if not hosts:
            return None
        self.counts["taken"] += 1
        host = hosts.pop(0).host
        self.starting.setdefault(node_id, []).append((time.monotonic(), host.until_started.remote()))
        return host

    async def status(self) -> dict[str, Any]:
        """Per node: idle hosts, those of them done importing, and their pids; counts since start."""
        self._ensure_refilling()
        self._drop_dead()
        nodes = {n: {"idle": len(h), "ready": sum(i.pid is not None for i in h), "pids": [i.pid for i in h],
                     "reserve_populated_bytes": await self._reserve_populated(h)}
                 for n, h in self.idle.items()}
        return {"size_per_node": self.size, "max_per_node": self.max_per_node, "targets": dict(self.targets),
                "expected_starts": dict(self.expected), "reserve_bytes": self.reserve_bytes, "nodes": nodes,
                **self.counts}

    @staticmethod
    async def _reserve_populated(hosts: list[_Idle]) -> list[int]:
        """Per ready idle host, the bytes of its memory reserve faulted in so far (0 while importing)."""
        out = []
        for idle in hosts:
            try:
                stats = await asyncio.wait_for(idle.host.reserve_stats.remote(), 2.0) if idle.pid else {}
            except Exception:  # noqa: BLE001 - busy or gone: the next status asks again
                stats = {}
            out.append(int(stats.get("reserve_populated_bytes", 0)))
        return out


def get_or_create_pool(size_per_node: int, nice: int, max_per_node: int = 0, horizon_s: float = 300.0,
                       idle_class: bool = True, reserve_gib: float = 0.0) -> Any:
    """The pool's keeper, created by (and owned by) the calling process when none runs; it starts
    filling at once."""
    keeper = ray.remote(EnginePool).options(name=POOL_NAME, namespace=POOL_NAMESPACE, get_if_exists=True,
                                            num_cpus=0, max_concurrency=8).remote(size_per_node, nice, max_per_node,
                                                                                  horizon_s, idle_class, reserve_gib)
    keeper.status.remote()
    return keeper


class PooledServer:
    """A replica's engine in a pooled host: the `ModelServer` calls, one Ray call away."""

    def __init__(self, host: Any, replica: str) -> None:
        self.host, self.replica = host, replica

    @classmethod
    async def take(cls, model: dict[str, Any], cache_root: str, storage: dict[str, Any] | None, pinned: bool,
                   role: str, replica: str, started: float) -> PooledServer | None:
        """Start the model in an idle host on this node; None when there is none (start in-process)."""
        try:
            keeper = ray.get_actor(POOL_NAME, namespace=POOL_NAMESPACE)
            host = await keeper.take.remote(ray.get_runtime_context().get_node_id())
        except ValueError:  # the app keeps no pool
            return None
        except Exception as exc:  # noqa: BLE001 - the keeper is not answering: a plain start
            log_event(logger, "engine_pool_unavailable", error=repr(exc)[:300])
            return None
        if host is None:
            log_event(logger, "engine_pool_empty", replica=replica)
            return None
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        try:
            await host.start.remote(model, cache_root, storage, pinned, role, replica, os.getpid(),
                                    time.monotonic() - started, env)
        except BaseException:
            ray.kill(host)
            raise
        log_event(logger, "engine_host_taken", replica=replica)
        return cls(host, replica)

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        return await self._unwrapped(self.host.call.remote(req))

    async def stream(self, req: EngineHTTPRequest) -> AsyncIterator[EngineHTTPResponse | bytes]:
        parts = self.host.stream.options(num_returns="streaming").remote(req)
        finished = False
        try:
            async for ref in parts:
                yield await self._unwrapped(ref)
            finished = True
        finally:
            if not finished:
                ray.cancel(parts)  # the host's stream is cancelled, which aborts the request in vLLM

    async def _unwrapped(self, ref: Any) -> Any:
        from helios.errors import unwrap

        try:
            return await ref
        except RayActorError as exc:  # died for good, or (ActorUnavailableError) unreachable for now
            raise EngineUnavailable("the replica's engine host has died", replica=self.replica,
                                    dead=isinstance(exc, ActorDiedError)) from None
        except Exception as exc:  # Ray wraps errors: the HeliosError inside keeps its status
            inner = unwrap(exc)
            if isinstance(inner, HeliosError):
                raise inner from None
            raise

    def openapi(self) -> Any:
        return self.host.openapi.remote()

    async def info(self) -> dict[str, Any]:
        info = await self._unwrapped(self.host.info.remote())
        info["host_pid"], info["pid"] = info["pid"], os.getpid()  # the engine's processes are the host's
        return info

    def record_routing_stats(self) -> Any:
        return self.host.record_routing_stats.remote()

    def num_unfinished_requests(self) -> Any:
        return self.host.num_unfinished_requests.remote()

    async def check_health(self) -> None:
        await self._unwrapped(self.host.check_health.remote())

    def shutdown(self) -> None:
        try:
            self.host.stop.remote()
        except Exception:  # noqa: BLE001, S110 - the cluster may be going away; the host watches its owner
            pass
