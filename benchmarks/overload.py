"""What clients see when a model is offered more than it can serve: Helios's admission against no bound.

Both systems are Helios on the tiny demo model, one after the other in one run:

- `helios`: the model runs `CONCURRENCY` requests at once and queues `QUEUED` more; past
  that a request gets 429, and one that waited `router.queue_timeout_s` gets 503, both
  with Retry-After (what `deployment.max_ongoing_requests` / `max_queued_requests` set);
- `helios_unbounded`: the same replica running the same `CONCURRENCY` requests at once,
  with no bound on the queue in front of it (as long as the load makes it), as Helios ran
  before admission control and as Serve's default does.

The model's capacity (requests/s) is measured first with `CONCURRENCY` closed-loop
clients; then Poisson arrivals are offered at 0.5x, 1x, 2x and 4x of it, each step for a
fixed time, with non-streamed requests of 64 tokens. Per step: admitted p50/p99 latency,
the shed fraction (429s and 503s with Retry-After), other 5xx, and client timeouts.
Writes JSON (`steps` is Helios's) and a PNG beside it.

    python benchmarks/overload.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers
from common import TINY_ENGINE, machine, wait_ready

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 8
QUEUED = 2  # the queue bound sets how long an admitted request may wait: about QUEUED / capacity
QUEUE_TIMEOUT_S = 10.0
MAX_TOKENS = 64
CLIENT_TIMEOUT_S = 120.0
LOADS = (0.5, 1.0, 2.0, 4.0)
SYSTEMS = {
    "helios": {"deployment": {"max_ongoing_requests": CONCURRENCY, "max_queued_requests": QUEUED},
               "router": {"queue_timeout_s": QUEUE_TIMEOUT_S}},
    "helios_unbounded": {"deployment": {"max_ongoing_requests": CONCURRENCY, "max_queued_requests": 1_000_000},
                         "router": {"queue_timeout_s": 3600}},
}


def log(msg: str) -> None:
    print(f"[overload {time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def one(http: aiohttp.ClientSession, base: str, i: int) -> dict:
    body = {"model": servers.MODEL_ID, "prompt": f"Request {i}: tell a story", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "temperature": 0}
    start = time.perf_counter()
    try:
        async with http.post(f"{base}/v1/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as r:
            await r.read()
            return {"status": r.status, "s": time.perf_counter() - start, "retry_after": r.headers.get("Retry-After")}
    except TimeoutError:
        return {"status": None, "s": time.perf_counter() - start, "retry_after": None}


async def capacity(base: str, seconds: float) -> float:
    """Requests/s the model finishes with CONCURRENCY clients each sending one after another."""
    done = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def client(c: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < deadline:
                r = await one(http, base, c * 100000 + i)
                i += 1
                done += r["status"] == 200
        started = time.monotonic()
        await asyncio.gather(*(client(c) for c in range(CONCURRENCY)))
        return done / (time.monotonic() - started)


async def step(base: str, rate: float, seconds: float, seed: int) -> list[dict]:
    """Poisson arrivals at `rate` per second for `seconds`; every request's outcome."""
    rng = random.Random(seed)
    tasks = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(one(http, base, seed * 1000000 + i)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def summarize(load: float, rate: float, results: list[dict], seconds: float) -> dict:
    admitted = sorted(r["s"] for r in results if r["status"] == 200)
    shed = [r for r in results if r["status"] in (429, 503) and r["retry_after"]]
    errors = [r for r in results if r["status"] is not None and r["status"] >= 500 and r not in shed]

    def pct(q: float) -> float | None:
        return admitted[min(int(q * len(admitted)), len(admitted) - 1)] if admitted else None

    # sent_rps: what the client managed to send; on a small machine it shares the cores with the
    # server, and at high load it falls behind the offered Poisson rate.
    return {"load": load, "offered_rps": rate, "sent_rps": len(results) / seconds, "requests": len(results),
            "admitted": len(admitted),
            "admitted_p50_s": pct(0.50), "admitted_p99_s": pct(0.99),
            "shed_fraction": len(shed) / len(results) if results else 0.0,
            "shed_429": sum(r["status"] == 429 for r in shed), "shed_503": sum(r["status"] == 503 for r in shed),
            "errors_5xx": len(errors), "timeouts": sum(r["status"] is None for r in results),
            "other_4xx": sum(1 for r in results if r["status"] is not None and 400 <= r["status"] < 500
                             and r not in shed)}


def run_system(name: str, model_dir: Path, port: int, work: Path, args: argparse.Namespace,
               capacity_rps: float | None) -> tuple[dict, float]:
    settings = SYSTEMS[name]
    os.environ["HELIOS_BENCH_DEPLOYMENT"] = json.dumps(settings["deployment"])
    os.environ["HELIOS_BENCH_ROUTER"] = json.dumps(settings["router"])
    log(f"{name}: starting")
    proc = servers.launch("helios", str(model_dir), port, TINY_ENGINE, str(work / f"overload-{name}.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base, proc))
        if capacity_rps is None:
            capacity_rps = asyncio.run(capacity(base, args.capacity_s))
            log(f"capacity: {capacity_rps:.2f} requests/s with {CONCURRENCY} clients")
        steps = []
        for k, load in enumerate(LOADS):
            rate = load * capacity_rps
            results = asyncio.run(step(base, rate, args.step_s, seed=k + 1))
            steps.append(summarize(load, rate, results, args.step_s))
            s = steps[-1]
            log(f"{name} {load}x ({rate:.1f}/s): admitted {s['admitted']}/{s['requests']}, "
                f"p50 {s['admitted_p50_s']}, p99 {s['admitted_p99_s']}, shed {s['shed_fraction']:.2f}, "
                f"5xx {s['errors_5xx']}, timeouts {s['timeouts']}")
        return {"settings": settings, "steps": steps}, capacity_rps
    finally:
        servers.stop(proc)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in report["systems"].items():
        loads = [s["load"] for s in result["steps"]]
        ax1.plot(loads, [s["admitted_p99_s"] or 0 for s in result["steps"]], marker="o", label=name)
        ax2.plot(loads, [s["shed_fraction"] for s in result["steps"]], marker="o", label=name)
    ax1.set(xlabel="offered load (x capacity)", ylabel="admitted p99 latency (s)", title="Latency of admitted requests")
    ax2.set(xlabel="offered load (x capacity)", ylabel="fraction shed (429/503)", title="Shed with Retry-After")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Short steps (about 7 minutes in all).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overload.json")
    parser.add_argument("--port", type=int, default=8421)
    args = parser.parse_args()
    args.step_s = 20.0 if args.quick else 60.0
    args.capacity_s = 15.0 if args.quick else 40.0

    from helios.storage.demo_model import resolve_source

    work = ROOT / "benchmarks" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_source("demo://tiny", work / "cache")
    started = time.monotonic()
    systems, capacity_rps = {}, None
    for i, name in enumerate(SYSTEMS):
        systems[name], capacity_rps = run_system(name, model_dir, args.port + i, work, args, capacity_rps)
    steps = systems["helios"]["steps"]
    by_load = {s["load"]: s for s in steps}
    unbounded = {s["load"]: s for s in systems["helios_unbounded"]["steps"]}

    def p99_ratio(table: dict) -> float | None:
        hi, lo = table[4.0]["admitted_p99_s"], table[1.0]["admitted_p99_s"]
        return hi / lo if hi and lo else None

    report = {
        "benchmark": "overload",
        "quick": args.quick,
        "machine": machine(),
        "workload": {"model": "demo://tiny", "engine": TINY_ENGINE, "max_tokens": MAX_TOKENS, "streaming": False,
                     "capacity_clients": CONCURRENCY, "step_s": args.step_s, "loads": list(LOADS),
                     "client_timeout_s": CLIENT_TIMEOUT_S},
        "capacity_rps": capacity_rps,
        "steps": steps,
        "systems": systems,
        "ratios": {
            "helios_p99_4x_over_1x": p99_ratio(by_load),
            "unbounded_p99_4x_over_1x": p99_ratio(unbounded),
            "helios_errors_5xx_and_timeouts": sum(s["errors_5xx"] + s["timeouts"] for s in steps),
        },
        "seconds": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    r = report["ratios"]
    log(f"wrote {args.out}: Helios admitted p99 at 4x / 1x = {r['helios_p99_4x_over_1x']}, "
        f"unbounded {r['unbounded_p99_4x_over_1x']}; Helios 5xx + timeouts: {r['helios_errors_5xx_and_timeouts']}")


if __name__ == "__main__":
    main()
