"""What serving through Helios costs over vLLM's own server, and over Ray Serve LLM.

Ray Serve LLM runs twice: on Ray Serve's HAProxy ingress (Ray's own fast path, what its
users run, and the main baseline) and on the default Python proxy. All of them serve the tiny demo model with the same engine settings on this machine, one
after the other in one run. For each: output tokens/s at 16 concurrent streamed requests
(64 requests of 64 tokens, `ignore_eos`), and time to first token for 1-token requests
sent one at a time. Writes JSON (and a PNG bar chart beside it); the last line printed
gives Helios's tokens/s as ratios of the two baselines.

    python benchmarks/overhead.py [--quick] [--out PATH] [--systems A,B,...]
    python benchmarks/overhead.py --observability [--cycles N] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers
from common import TINY_ENGINE, machine, stream_one, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_NAMES = {"raw_vllm": "vLLM OpenAI server", "rayserve_llm": "Ray Serve LLM",
                "rayserve_llm_haproxy": "Ray Serve LLM + HAProxy", "helios": "Helios",
                "helios_metrics_off": "Helios, metrics off", "helios_tracing": "Helios, tracing every request",
                "helios_token_latency": "Helios, vLLM's per-token histogram on",
                "helios_colocated": "Helios, engine in the router's replica"}


def log(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def throughput(base: str, requests: int, concurrency: int, max_tokens: int) -> float:
    """Output tokens/s with `concurrency` streams in flight until `requests` are done."""
    queue = list(range(requests))
    total = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def worker() -> None:
            nonlocal total
            while queue:
                i = queue.pop()
                _, tokens = await stream_one(http, base, f"Request {i}: tell me about the sea.", max_tokens)
                total += tokens
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    if total != requests * max_tokens:
        raise RuntimeError(f"expected {requests * max_tokens} tokens, got {total}")
    return total / wall


async def ttfts(base: str, n: int, first: int = 0) -> list[float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        return [(await stream_one(http, base, f"Latency probe {i}", 1))[0] for i in range(first, first + n)]


def cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds used so far by a server's process tree, split into the vLLM engine's own
    processes (engine core and workers) and everything else (the serving front end: HTTP,
    Ray, routers, output processing). Robust where wall-clock rates swing with the host."""
    import psutil

    totals = {"engine": 0.0, "frontend": 0.0}
    try:
        procs = [psutil.Process(root_pid)] + psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return totals
    for proc in procs:
        try:
            name = proc.name()
            times = proc.cpu_times()
        except psutil.Error:
            continue
        kind = "engine" if name.startswith(("VLLM::EngineCore", "VLLM::Worker")) else "frontend"
        totals[kind] += times.user + times.system
    return totals


@contextlib.contextmanager
def frozen(root_pids: list[int]) -> Iterator[None]:
    """SIGSTOP every process of these trees for the block, SIGCONT after (children first on
    the way in, so no parent sees a child stop; all of a cluster stops together, so none of
    its own health checks spans the pause)."""
    import psutil

    stopped: list[psutil.Process] = []
    try:
        for pid in root_pids:
            try:
                tree = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for proc in reversed(tree):
                try:
                    proc.suspend()
                    stopped.append(proc)
                except psutil.Error:
                    pass
        yield
    finally:
        for proc in reversed(stopped):
            try:
                proc.resume()
            except psutil.Error:
                pass


def bracketed_ratios(sequence: list[tuple[str, float]], reference: str) -> dict[str, list[float]]:
    """Each round's tokens/s over the reference system's tokens/s interpolated to its place in
    the run, in log space, from the reference rounds just before and just after it (weighted by
    how many rounds away each is; the nearest one alone at either end): the host's speed drifts
    over minutes (successive rounds correlate), and the interpolation cancels a drift that is
    linear between the two, which a baseline from one side does not."""
    import math

    at = [i for i, (s, _) in enumerate(sequence) if s == reference]
    out: dict[str, list[float]] = {}
    for i, (system, rate) in enumerate(sequence):
        if system == reference or not at:
            continue
        k = bisect.bisect(at, i)  # at[k - 1] < i < at[k]
        before, after = at[max(k - 1, 0):k], at[k:k + 1]
        if before and after:
            b, a = before[0], after[0]
            w = (i - b) / (a - b)  # the later round's weight grows as the round sits closer to it
            baseline = math.exp((1 - w) * math.log(sequence[b][1]) + w * math.log(sequence[a][1]))
        else:
            baseline = sequence[(before or after)[0]][1]
        out.setdefault(system, []).append(rate / baseline)
    return out


def rotated(order: list[str], k: int) -> list[str]:
    """`order` starting at its `k`-th entry (modulo its length): cycle k's order of systems."""
    k %= len(order)
    return order[k:] + order[:k]


@contextlib.asynccontextmanager
async def alone(procs: dict, system: str, settle_s: float) -> AsyncIterator[None]:
    """Every other system's whole process tree stopped for the block: an idle Ray cluster
    (GCS, raylet, agents, Serve's controller loop) still wakes up, and on two cores its
    wake-ups land on whichever system is measured. The measured tree was stopped through the
    rounds before: its timers, health reports and metric pushes catch up during `settle_s`,
    before the block's clock starts."""
    with frozen([p.pid for s, (p, _) in procs.items() if s != system]):
        await asyncio.sleep(settle_s)
        yield


def ratio_interval(ratios: list[float], resamples: int = 10000, seed: int = 0, block: int = 1) -> dict[str, float]:
    """Geometric mean of paired per-cycle ratios with a 95 % bootstrap interval over cycles:
    how precisely the runs pin the cost down, not only where its middle is. With `block` > 1,
    a moving-block bootstrap (runs of `block` successive cycles), for ratios whose neighbours
    share a baseline round (`bracketed_ratios`)."""
    import math
    import random

    logs = [math.log(r) for r in ratios]
    n, rng = len(logs), random.Random(seed)
    block = max(1, min(block, n))
    starts = range(n - block + 1)

    def resample() -> float:
        picked: list[float] = []
        while len(picked) < n:
            k = rng.choice(starts)
            picked += logs[k:k + block]
        return statistics.fmean(picked[:n])

    means = sorted(resample() for _ in range(resamples))
    return {"geomean": math.exp(statistics.fmean(logs)), "ci95_low": math.exp(means[int(0.025 * resamples)]),
            "ci95_high": math.exp(means[int(0.975 * resamples) - 1]), "cycles": n, "bootstrap_block": block}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(rates: list[float], lat: list[float], cpu_before: dict[str, float], cpu_after: dict[str, float],
              args: argparse.Namespace) -> dict:
    """One system's result: median tokens/s of its rounds, TTFT percentiles, CPU per token over its rounds."""
    tokens = args.rounds * args.requests * args.max_tokens
    return {
        "tok_s": statistics.median(rates),
        "tok_s_rounds": rates,
        "ttft_p50_ms": percentile(lat, 0.5) * 1000,
        "ttft_p99_ms": percentile(lat, 0.99) * 1000,
        "cpu_us_per_token": {k: (cpu_after[k] - cpu_before[k]) / tokens * 1e6 for k in cpu_after},
    }


async def measure(system: str, model_dir: Path, port: int, args: argparse.Namespace, work: Path) -> dict:
    log(f"{SYSTEM_NAMES[system]}: starting (log {work / (system + '.log')})")
    proc = servers.launch(system, str(model_dir), port, TINY_ENGINE, str(work / f"{system}.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        ready_s = await wait_ready(base, proc, 420)
        log(f"{SYSTEM_NAMES[system]}: ready after {ready_s:.0f}s; warming up")
        await throughput(base, 16, 16, 16)
        rates = []
        cpu_before = cpu_seconds(proc.pid)
        for r in range(args.rounds):
            rates.append(await throughput(base, args.requests, args.concurrency, args.max_tokens))
            log(f"{SYSTEM_NAMES[system]}: round {r + 1}/{args.rounds}: {rates[-1]:.0f} tok/s")
        cpu_after = cpu_seconds(proc.pid)
        result = summarize(rates, await ttfts(base, args.ttft_requests), cpu_before, cpu_after, args)
        result["ready_s"] = ready_s
        cpu_us = result["cpu_us_per_token"]
        log(f"{SYSTEM_NAMES[system]}: {result['tok_s']:.0f} tok/s, TTFT p50 {result['ttft_p50_ms']:.1f} ms, "
            f"p99 {result['ttft_p99_ms']:.1f} ms; CPU per token: engine {cpu_us['engine']:.0f} us, "
            f"front end {cpu_us['frontend']:.0f} us")
        return result
    finally:
        servers.stop(proc)


async def measure_interleaved(systems: list[str], model_dir: Path, port: int, args: argparse.Namespace,
                              work: Path) -> tuple[dict, dict, dict, dict]:
    """Every system up at once, then rounds in turn (A, B, C, B, C, A, ...): each round of one
    system runs while the others are stopped (SIGSTOP), so a drift of the host's speed (this machine's swings
    exceed the costs measured) falls on all of them alike. Returns (results per system,
    each system's tokens/s over the first's in the same cycle, the same from CPU per token,
    each round over the first system's rounds on both sides: `bracketed_ratios`)."""
    procs = {}
    try:
        for i, system in enumerate(systems):
            log(f"{SYSTEM_NAMES[system]}: starting (log {work / (system + '.log')})")
            procs[system] = (servers.launch(system, str(model_dir), port + i, TINY_ENGINE, str(work / f"{system}.log")),
                             f"http://127.0.0.1:{port + i}")
        for system, (proc, base) in procs.items():
            ready_s = await wait_ready(base, proc, 600)
            log(f"{SYSTEM_NAMES[system]}: ready after {ready_s:.0f}s; warming up")
            await throughput(base, 16, 16, 16)
        rates: dict[str, list[float]] = {s: [] for s in systems}
        cpu_rounds: dict[str, list[float]] = {s: [] for s in systems}  # CPU seconds per token, each round
        tokens = args.requests * args.max_tokens
        # CPU of the rounds alone, by kind: the settle pauses between them (a Ray cluster catching
        # up on its timers after a stop) are not the serving's cost.
        cpu_used = {s: {"engine": 0.0, "frontend": 0.0} for s in systems}
        order = list(procs)
        sequence: list[tuple[str, float]] = []  # (system, tokens/s) of every round, in the order run
        for r in range(args.rounds):
            # Each cycle starts with the next system (A B C, B C A, ...): no system always runs
            # first after a pause, nor always right after another's load.
            for system in rotated(order, r):
                proc, base = procs[system]
                async with alone(procs, system, args.settle_s):
                    before = cpu_seconds(proc.pid)
                    rates[system].append(await throughput(base, args.requests, args.concurrency, args.max_tokens))
                    after = cpu_seconds(proc.pid)
                    cpu_rounds[system].append(sum(after[k] - before[k] for k in after) / tokens)
                    for k in after:
                        cpu_used[system][k] += after[k] - before[k]
                sequence.append((system, rates[system][-1]))
            log(f"cycle {r + 1}/{args.rounds}: " + ", ".join(f"{SYSTEM_NAMES[s]} {rates[s][-1]:.0f}" for s in systems)
                + " tok/s")
        latencies: dict[str, list[float]] = {s: [] for s in systems}
        batches = 4  # the probes too alternate between systems, each batch with the others stopped
        for b in range(batches):
            for system in rotated(order, b):
                async with alone(procs, system, args.settle_s):
                    first, end = b * args.ttft_requests // batches, (b + 1) * args.ttft_requests // batches
                    latencies[system] += await ttfts(procs[system][1], end - first, first)
        zero = {"engine": 0.0, "frontend": 0.0}
        results = {s: summarize(rates[s], latencies[s], zero, cpu_used[s], args) for s in systems}
        first = systems[0]
        paired = {s: [a / b for a, b in zip(rates[s], rates[first], strict=True)] for s in systems[1:]}
        # The same cost read from CPU time: the first system's CPU per token over this one's, per
        # cycle. On a machine this busy tokens/s is CPU-bound, so this is the tokens/s ratio the
        # work alone would give, without the host's swings in how much CPU a round gets.
        paired_cpu = {s: [b / a for a, b in zip(cpu_rounds[s], cpu_rounds[first], strict=True)] for s in systems[1:]}
        for s in systems:
            results[s]["cpu_us_per_token_rounds"] = [c * 1e6 for c in cpu_rounds[s]]
        return results, paired, paired_cpu, bracketed_ratios(sequence, first)
    finally:
        for proc, _ in procs.values():
            servers.stop(proc)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    names = [textwrap.fill(SYSTEM_NAMES[s], 16) for s in results]
    palette = {"raw_vllm": "#888888", "rayserve_llm_haproxy": "#4c72b0", "rayserve_llm": "#8fb0d8", "helios": "#dd8452",
               "helios_metrics_off": "#f0b27a", "helios_tracing": "#a0522d", "helios_token_latency": "#c97b4a",
               "helios_colocated": "#c44e52"}
    colors = [palette[s] for s in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(names, [r["tok_s"] for r in results.values()], color=colors)
    a.set_title("Output tokens/s (16 concurrent streams)")
    b.bar(names, [r["ttft_p50_ms"] for r in results.values()], color=colors, label="p50")
    b.scatter(names, [r["ttft_p99_ms"] for r in results.values()], color="black", zorder=3, label="p99")
    b.set_title("Time to first token (ms)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Serving overhead on the tiny demo model (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="Fewer rounds (3; 4 cycles with --interleaved, 6 with --observability) and 30 latency "
                        "probes.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Default benchmarks/results/overhead.json (observability_overhead.json with "
                        "--observability).")
    parser.add_argument("--systems", default=None,
                        help="Comma-separated subset to run (default: raw_vllm,rayserve_llm_haproxy,rayserve_llm,helios,"
                        "helios_colocated; "
                        "also helios_metrics_off, helios_tracing and helios_token_latency, for what observability "
                        "costs).")
    parser.add_argument("--observability", action="store_true",
                        help="What metrics and tracing cost: Helios with metrics off, on, and tracing every request "
                        "(with --systems, another set that starts with helios_metrics_off, e.g. adding "
                        "helios_token_latency: vLLM's per-token histogram on too), all up at once and measured in "
                        "alternating rounds.")
    parser.add_argument("--interleaved", action="store_true",
                        help="All systems up at once and measured in alternating rounds, each with the others "
                        "stopped (as --observability does), paired against the first system in each cycle: ratios "
                        "that the host's drift between systems does not skew.")
    parser.add_argument("--cycles", type=int, default=None,
                        help="With --observability or --interleaved: cycles of alternating rounds (default with "
                        "--quick 6 and 4, else 48 and 12).")
    parser.add_argument("--port", type=int, default=8321)
    args = parser.parse_args()
    if args.out is None:
        name = "observability_overhead.json" if args.observability else "overhead.json"
        args.out = ROOT / "benchmarks" / "results" / name
    args.requests, args.concurrency, args.max_tokens = 64, 16, 64
    # Tokens/s on a small shared machine swings between rounds; the median of several is reported.
    args.rounds = 3 if args.quick else 7
    args.settle_s = 0.0
    if args.interleaved:
        args.rounds = args.cycles or (4 if args.quick else 12)
        args.settle_s = 1.0
    if args.observability:
        # Small costs under this host's swings: many short cycles, paired within each cycle and
        # against the metrics-off rounds on both sides. Short rounds sit closer in time, where
        # the host's speed has drifted less, so pairs cancel more of it.
        args.rounds = args.cycles or (6 if args.quick else 48)
        args.settle_s = 1.0
    args.ttft_requests = 30 if args.quick else 100

    from helios.storage.demo_model import resolve_source

    work = ROOT / "benchmarks" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_source("demo://tiny", work / "cache")
    default = "raw_vllm,rayserve_llm_haproxy,rayserve_llm,helios,helios_colocated"
    if args.observability and not args.systems:
        args.systems = "helios_metrics_off,helios,helios_tracing"
    systems = [s.strip() for s in (args.systems or default).split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEM_NAMES]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(SYSTEM_NAMES)})")
    if args.observability and (systems[0] != "helios_metrics_off" or len(systems) < 2):
        parser.error("--observability compares with metrics off: --systems must start with helios_metrics_off "
                     "and name at least one more")
    if args.cycles is not None and args.cycles < 1:
        parser.error("--cycles must be at least 1")
    started = time.monotonic()
    receiver = None
    if "helios_tracing" in systems:  # a real OTLP receiver takes the spans, as a collector would
        sys.path.insert(0, str(ROOT))
        from tests.otlp_receiver import OTLPReceiver

        receiver = OTLPReceiver().start()
        os.environ["HELIOS_BENCH_OTLP"] = receiver.endpoint
    paired: dict[str, list[float]] = {}
    paired_cpu: dict[str, list[float]] = {}
    bracketed: dict[str, list[float]] = {}
    if args.observability or args.interleaved:
        results, paired, paired_cpu, bracketed = asyncio.run(
            measure_interleaved(systems, model_dir, args.port, args, work))
    else:
        results = {s: asyncio.run(measure(s, model_dir, args.port + i, args, work)) for i, s in enumerate(systems)}
    if receiver is not None:
        results["helios_tracing"]["spans_received"] = len(receiver.spans)
        receiver.stop()

    ratios: dict[str, float] = {}
    intervals: dict[str, dict[str, float]] = {}
    if "helios" in results and "raw_vllm" in results:
        ratios["helios_over_raw_tok_s"] = results["helios"]["tok_s"] / results["raw_vllm"]["tok_s"]
    if "helios" in results and "rayserve_llm" in results:
        ratios["helios_over_rayserve_llm_tok_s"] = results["helios"]["tok_s"] / results["rayserve_llm"]["tok_s"]
    if "helios" in results and "rayserve_llm_haproxy" in results:
        ratios["helios_over_rayserve_llm_haproxy_tok_s"] = (
            results["helios"]["tok_s"] / results["rayserve_llm_haproxy"]["tok_s"])
    if "helios_colocated" in results and "raw_vllm" in results:
        ratios["helios_colocated_over_raw_tok_s"] = results["helios_colocated"]["tok_s"] / results["raw_vllm"]["tok_s"]
        ratios["helios_colocated_minus_raw_ttft_p50_ms"] = (results["helios_colocated"]["ttft_p50_ms"]
                                                            - results["raw_vllm"]["ttft_p50_ms"])
    if "helios_colocated" in results and "rayserve_llm_haproxy" in results:
        ratios["helios_colocated_over_rayserve_llm_haproxy_tok_s"] = (
            results["helios_colocated"]["tok_s"] / results["rayserve_llm_haproxy"]["tok_s"])
    if "helios" in results and "raw_vllm" in results:
        ratios["helios_minus_raw_ttft_p50_ms"] = results["helios"]["ttft_p50_ms"] - results["raw_vllm"]["ttft_p50_ms"]
    if "helios" in results and "raw_vllm" in results:
        # Front-end CPU per token, each normalised by its own engine's CPU per token (which
        # is the same work in every system, so it cancels the host's speed at the time).
        def share(r: dict) -> float:
            return r["cpu_us_per_token"]["frontend"] / r["cpu_us_per_token"]["engine"]

        ratios["helios_over_raw_frontend_cpu"] = share(results["helios"]) / share(results["raw_vllm"])
    for system, key in (("helios", "metrics_on_over_off_tok_s"), ("helios_tracing", "tracing_over_metrics_off_tok_s"),
                        ("helios_token_latency", "token_latency_over_metrics_off_tok_s")):
        if system in paired and args.observability:  # the median of each cycle's own ratio: drift cancels
            ratios[key] = statistics.median(paired[system])
            intervals[key] = ratio_interval(paired[system])
            cpu_key = key + "_from_cpu"  # off CPU per token over on: a tokens/s ratio
            intervals[cpu_key] = ratio_interval(paired_cpu[system])
            ratios[cpu_key] = intervals[cpu_key]["geomean"]
            bracketed_key = key + "_bracketed"  # against the metrics-off rounds on both sides
            intervals[bracketed_key] = ratio_interval(bracketed[system], block=2)
            ratios[bracketed_key] = statistics.median(bracketed[system])
        elif system in results and "helios_metrics_off" in results:
            ratios[key] = results[system]["tok_s"] / results["helios_metrics_off"]["tok_s"]
    if args.interleaved:  # each system against the first, cycle by cycle
        for system, cycles in paired.items():
            key = f"{system}_over_{systems[0]}_tok_s_paired"
            intervals[key] = ratio_interval(cycles)
            ratios[key] = statistics.median(cycles)
            intervals[key + "_from_cpu"] = ratio_interval(paired_cpu[system])
            ratios[key + "_from_cpu"] = intervals[key + "_from_cpu"]["geomean"]
            ratios[f"{system}_minus_{systems[0]}_ttft_p50_ms"] = (results[system]["ttft_p50_ms"]
                                                                   - results[systems[0]]["ttft_p50_ms"])
    report = {
        "benchmark": "overhead",
        "quick": args.quick,
        "machine": machine(),
        "workload": {"model": "demo://tiny", "engine": TINY_ENGINE, "requests": args.requests,
                     "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "ttft_requests": args.ttft_requests, "streaming": True},
        "systems": results,
        "ratios": ratios,
        **({"paired_ratios_per_cycle": paired, "paired_cpu_ratios_per_cycle": paired_cpu,
            "bracketed_ratios": bracketed, "paired_intervals": intervals, "interleaved": True,
            "others_frozen_during_a_round": True, "settle_s": args.settle_s} if paired else {}),
        "seconds": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()) or "no ratios (run all three systems)", flush=True)
    for key, interval in intervals.items():
        print(f"{key}: geometric mean {interval['geomean']:.3f}, 95% interval "
              f"{interval['ci95_low']:.3f}-{interval['ci95_high']:.3f} over {interval['cycles']} cycles", flush=True)


if __name__ == "__main__":
    main()
