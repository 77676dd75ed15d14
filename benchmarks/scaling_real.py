"""The short real run of `benchmarks/scaling.py`: a real Serve app on this machine, scaled from zero and up
by a bursty client, Helios's policy against Serve's default autoscaling (Ray Serve LLM).

Each system serves the tiny demo model with `min_replicas: 0`, at most two replicas and one
ongoing request per replica as the target, and starts idle at zero. The client then sends
one request (a start from zero), and once it is answered a burst of long streamed requests
(more than one replica holds at `max_ongoing_requests: 2`, so the rest wait for a second
replica or a free slot). A request's *wait for capacity* is its time to first token less
the warm engine's (measured afterwards on a running replica). Replica-seconds are the
time engines exist: vLLM's engine-core processes in the system's process tree, sampled
every 0.5 s, from the first request until the system is back at zero (or the run ends).

Helios's prediction needs a history of bursts that a run of minutes cannot give; it is
on, as configured by default, and what it adds over reactive scaling is measured by the
simulation. Ray Serve LLM's replicas start slower than Helios's (its cold start is in
`benchmarks/cold_start.py`), which counts here too: it is what a user of each waits for.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import servers
from common import TINY_ENGINE, stream_one, wait_ready

IDLE_TO_ZERO_S = 10.0
SCALING = {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1, "max_ongoing_requests": 2}


def log(msg: str) -> None:
    print(f"[scaling real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def engines(root_pid: int) -> int:
    """vLLM engine cores alive under the server's process tree: one per replica with an engine."""
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    count = 0
    for proc in procs:
        try:
            count += proc.name().startswith("VLLM::EngineCor")
        except psutil.Error:
            continue
    return count


class EngineMeter(threading.Thread):
    """Samples the engine count every 0.5 s; `replica_s` integrates it from `start()`."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.replica_s, self.peak, self.now = pid, 0.0, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self._halt.wait(0.5):
            self.now = engines(self.pid)
            t = time.monotonic()
            self.replica_s += self.now * (t - last)
            self.peak = max(self.peak, self.now)
            last = t

    def stop(self) -> None:
        self._halt.set()
        self.join()


async def until(what: str, check, timeout_s: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f}s")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def run_system(system: str, model_dir: Path, port: int, work: Path, burst: int, burst_tokens: int,
                     wait_for_zero: bool) -> dict[str, Any]:
    env_key = "HELIOS_BENCH_DEPLOYMENT" if system == "helios" else "HELIOS_BENCH_RSLLM_AUTOSCALING"
    settings = ({**SCALING, "num_replicas": 1, "idle_to_zero_s": IDLE_TO_ZERO_S, "num_cpus": 0.5}
                if system == "helios" else  # Serve's autoscaling config, with the delays Helios's engines get
                {**SCALING, "initial_replicas": 1, "upscale_delay_s": 2.0, "downscale_delay_s": 10.0,
                 "downscale_to_zero_delay_s": IDLE_TO_ZERO_S})
    os.environ[env_key] = json.dumps(settings)
    log(f"{system}: starting (log {work / f'scaling-{system}.log'})")
    proc = servers.launch(system, str(model_dir), port, TINY_ENGINE, str(work / f"scaling-{system}.log"))
    base = f"http://127.0.0.1:{port}"
    meter = None
    try:
        ready_s = await wait_ready(base, proc, 600)
        zero_s = await until("idle at zero", lambda: engines(proc.pid) == 0, 300)
        log(f"{system}: ready after {ready_s:.0f}s, idle at zero {zero_s:.0f}s later; the trace starts")
        meter = EngineMeter(proc.pid)
        meter.start()
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as http:
            from_zero = (await stream_one(http, base, "A start from zero:", 16))[0]
            log(f"{system}: first request after zero: first token after {from_zero:.1f}s")
            burst_ttft = [ttft for ttft, _ in await asyncio.gather(
                *(stream_one(http, base, f"Burst {i}: a long story.", burst_tokens) for i in range(burst)))]
            log(f"{system}: burst of {burst}: first tokens after " + ", ".join(f"{t:.1f}" for t in burst_ttft) + " s")
            warm = [(await stream_one(http, base, f"Warm probe {i}", 1))[0] for i in range(10)]
        warm_ttft = statistics.median(warm)
        back_to_zero_s = None
        if wait_for_zero:
            back_to_zero_s = await until("back to zero", lambda: meter.now == 0, 300)
        seconds = time.monotonic() - started
        meter.stop()
        waits = [max(0.0, t - warm_ttft) for t in [from_zero, *burst_ttft]]
        return {
            "ready_s": ready_s, "warm_ttft_s": warm_ttft, "from_zero_wait_s": waits[0],
            "burst_waits_s": waits[1:], "max_wait_s": max(waits), "p50_wait_s": statistics.median(waits),
            "replica_s": meter.replica_s, "peak_replicas": meter.peak, "back_to_zero_s": back_to_zero_s,
            "seconds": seconds, "settings": settings,
        }
    finally:
        servers.stop(proc)  # first: nothing of the server outlives a failed run
        if meter is not None:
            meter.stop()
        os.environ.pop(env_key, None)


def real_run(quick: bool, port: int = 8361) -> dict[str, Any]:
    """Helios alone with --quick (under 4 minutes); Helios and Ray Serve LLM otherwise."""
    from helios.storage.demo_model import resolve_source

    root = Path(__file__).resolve().parents[1]
    work = root / "benchmarks" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_source("demo://tiny", work / "cache")
    systems = ["helios"] if quick else ["helios", "rayserve_llm"]
    burst, tokens = (6, 300) if quick else (8, 600)
    out: dict[str, Any] = {"systems": {}, "burst": burst, "burst_tokens": tokens, "engine": TINY_ENGINE,
                           "idle_to_zero_s": IDLE_TO_ZERO_S}
    for i, system in enumerate(systems):
        out["systems"][system] = asyncio.run(run_system(system, model_dir, port + i, work, burst, tokens,
                                                        wait_for_zero=not quick))
    if "rayserve_llm" in out["systems"]:
        h, r = out["systems"]["helios"], out["systems"]["rayserve_llm"]
        out["ratios"] = {"helios_over_rayserve_llm_max_wait": h["max_wait_s"] / r["max_wait_s"],
                         "helios_over_rayserve_llm_replica_s": h["replica_s"] / r["replica_s"]}
    return out
