"""vLLM's engine-core and worker processes forked from a parent that has already imported them.

vLLM starts its engine core with `spawn` on the CPU (its CPU platform forces it) and inside
Ray actors, so every engine start runs a fresh Python that imports torch and vLLM (10-20 s
on this kind of machine), and the engine core spawns its worker the same way: two full
imports before the engine can load a single weight. Forking the replica itself is not safe
(a Ray worker process has gRPC threads and Ray state that a child must not touch).

So each replica starts a clean *zygote* as its first step: Python's `forkserver`, with the
engine-core, executor, worker and loader modules preloaded. It imports in parallel with the
replica's own imports, and has never initialised Ray, OpenMP or a GPU. vLLM's engine core is
then forked from it (no imports), and forks its own worker in turn (`fork`, safe there: the
engine core is not a Ray actor and has run no tensor op yet). Measured here: the engine's
construction falls from ~32 s to ~4 s once the zygote is ready.

A forkserver child inherits the zygote's environment, not the replica's, so each process
is started with the replica's environment of that moment (vLLM sets variables around
`Process.start`). The zygote is a child of the replica, so the reaper's descendant watch
covers it and everything it forks.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from helios.observability.logs import get_logger, log_event

logger = get_logger("engine.warm_start")

# What an engine core and its worker import before they can start; the zygote imports them once.
PRELOAD = (
    "helios.engine.process_titles",  # first, while the environment is as the zygote's exec left it
    "torch",
    "vllm.v1.engine.core",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.model_executor.models.llama",
    "helios.storage.loader",
    "helios.engine.kv_connector",
)
REPORT_ENV = "HELIOS_PROCESS_START"  # the engine core reports its start here (`read_report`)

_started = False
_lock = threading.Lock()
_installed = False


class _WithEnvironment:
    """The process target, run with the environment the replica had when it started the process."""

    def __init__(self, target: Callable[..., Any], environment: dict[str, str]) -> None:
        self.target = target
        self.environment = environment

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        os.environ.clear()
        os.environ.update(self.environment)
        # The engine core is not a Ray actor and has run no tensor op: its worker can be forked.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
        if report := os.environ.get(REPORT_ENV):
            _append(report, f"start {time.time():.6f}\n")
            _time_kv_init(report)
        return self.target(*args, **kwargs)


def _time_kv_init(report: str) -> None:
    """Time the engine core's KV-cache set-up (profiling, allocation and warm-up: vLLM's
    `_initialize_kv_caches`) into the report. Patched in this forked engine core only."""
    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:
        return
    original = getattr(EngineCore, "_initialize_kv_caches", None)
    if original is None:
        return

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        began = time.monotonic()
        try:
            return original(self, *args, **kwargs)
        finally:
            _append(report, f"kv_init {time.monotonic() - began:.6f}\n")

    EngineCore._initialize_kv_caches = timed  # type: ignore[method-assign]


def _append(path: str, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        pass


class WarmProcess(multiprocessing.context.ForkServerProcess):
    """A forkserver process that carries the parent's environment at `start()`."""

    def start(self) -> None:
        if self._target is not None and not isinstance(self._target, _WithEnvironment):  # type: ignore[attr-defined]
            self._target = _WithEnvironment(self._target, dict(os.environ))  # type: ignore[attr-defined]
        super().start()


class WarmContext(multiprocessing.context.ForkServerContext):
    Process = WarmProcess  # type: ignore[assignment]


WARM_CONTEXT = WarmContext()


def start_zygote() -> None:
    """Start this process's zygote in the background (idempotent): it imports while the caller does."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
        multiprocessing.set_forkserver_preload(list(PRELOAD))
    threading.Thread(target=_ensure_running, name="helios-zygote", daemon=True).start()


def _ensure_running() -> None:
    try:
        multiprocessing.forkserver.ensure_running()
    except Exception as exc:  # noqa: BLE001 - vLLM then starts its processes its own way
        log_event(logger, "zygote_failed", error=repr(exc)[:300])


def use_for_engine() -> None:
    """Make vLLM start this process's engine cores from the zygote (see the module docstring).

    vLLM picks the start method in `vllm.v1.engine.utils.get_mp_context`; Helios replaces
    that name in that module only, so the engine core's own choice for its workers is left to
    vLLM (and to `VLLM_WORKER_MULTIPROC_METHOD=fork`, set in the child). If vLLM moves the
    function, engines start the way vLLM starts them and the log says so."""
    global _installed
    start_zygote()
    if _installed:
        return
    import vllm.v1.engine.utils as engine_utils

    original = getattr(engine_utils, "get_mp_context", None)
    if original is None:
        log_event(logger, "warm_start_unavailable", reason="vllm.v1.engine.utils.get_mp_context is gone")
        return

    def get_mp_context() -> multiprocessing.context.BaseContext:
        original()  # vLLM's side effects (RAY_ADDRESS for a Ray executor in the child)
        return WARM_CONTEXT

    engine_utils.get_mp_context = get_mp_context
    _installed = True


def read_report(path: str) -> dict[str, float]:
    """What the engine core reported: `start` (epoch seconds its code began) and `kv_init`
    (seconds of KV-cache profiling, allocation and warm-up); the first of each."""
    out: dict[str, float] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key and value.strip():
                    out.setdefault(key, float(value))
    except (OSError, ValueError):
        pass
    return out
