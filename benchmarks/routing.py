"""Which replica a request goes to, and what that does to time to first token.

Two engine replicas of the `bench` demo model (its prefill takes long enough on a CPU to
matter) serve many users who share a few long system prompts. The same Helios app runs
three times, one after the other in one run, with only the request router changed:

- `helios`: Helios's router (prefix affinity bounded by load, then power of two choices);
- `serve_default`: Ray Serve's default power-of-two-choices router;
- `ray_prefix`: Ray Serve LLM's `PrefixCacheAffinityRouter`.

Per system: TTFT p50/p99 of streamed chat requests, output tokens/s, and the prefix-cache
hit ratio (prompt tokens vLLM reports as cached, over all prompt tokens). The dtype comes
from the CPU's flags (bfloat16 with native bf16, float32 otherwise) and is recorded.
Writes JSON and a PNG beside it.

    python benchmarks/routing.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers
from common import bench_dtype, cpu_flags, machine, wait_ready

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = ("helios", "serve_default", "ray_prefix")
MAX_TOKENS = 4


def log(msg: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def system_prompt(i: int, chars: int) -> str:
    words = ["routing", "prefix", "replica", "cache", "token", "engine", "serve", "model", "batch", "queue"]
    rng = random.Random(i)
    text = f"System prompt {i}. You are assistant number {i}. "
    while len(text) < chars:
        text += " ".join(rng.choice(words) for _ in range(12)) + ". "
    return text[:chars]


def workload(prompts: int, requests: int, chars: int, seed: int = 7) -> list[list[dict]]:
    """`requests` chats over `prompts` system prompts, each used equally often, in a shuffled order."""
    order = [i % prompts for i in range(requests)]
    random.Random(seed).shuffle(order)
    return [[{"role": "system", "content": system_prompt(p, chars)},
             {"role": "user", "content": f"User {n} asks question {n * 7 % 13}."}] for n, p in enumerate(order)]


async def chat(http: aiohttp.ClientSession, base: str, messages: list[dict]) -> dict:
    body = {"model": servers.MODEL_ID, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, usage = None, {}
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers.get("x-helios-replica")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - start, "replica": replica,
            "prompt_tokens": usage.get("prompt_tokens", 0), "cached_tokens": details.get("cached_tokens") or 0,
            "completion_tokens": usage.get("completion_tokens", 0)}


async def drive(base: str, chats: list[list[dict]], concurrency: int) -> tuple[list[dict], float]:
    queue = list(reversed(chats))
    out: list[dict] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        async def worker() -> None:
            while queue:
                out.append(await chat(http, base, queue.pop()))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out, time.perf_counter() - started


async def both_replicas_up(base: str, timeout_s: float = 900) -> None:
    """/readyz needs one replica; wait until two distinct replicas have answered short, unshared prompts."""
    seen: set[str] = set()
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        i = 0
        while len(seen) < 2:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"only replicas {seen} answered")
            # Random text: no shared prefix, so every router spreads these over both replicas.
            body = {"model": servers.MODEL_ID, "prompt": os.urandom(12).hex(), "max_tokens": 1}
            async with http.post(f"{base}/v1/completions", json=body) as r:
                if r.status == 200 and r.headers.get("x-helios-replica"):
                    seen.add(r.headers["x-helios-replica"])
            i += 1
            await asyncio.sleep(0.5 if i % 8 else 5)


def measure(router: str, model_dir: Path, port: int, engine: dict, chats: list[list[dict]], args, work: Path) -> dict:
    os.environ["HELIOS_BENCH_DEPLOYMENT"] = json.dumps(
        {"num_replicas": 2, "num_cpus": 0.5, "request_router": router})
    os.environ["HELIOS_BENCH_ENGINE"] = json.dumps({"enable_prompt_tokens_details": True})
    os.environ["HELIOS_BENCH_ROUTER"] = "{}"
    log(f"{router}: starting two replicas")
    proc = servers.launch("helios", str(model_dir), port, engine, str(work / f"routing-{router}.log"))
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base, proc, 900))
        asyncio.run(both_replicas_up(base))
        results, seconds = asyncio.run(drive(base, chats, args.concurrency))
    finally:
        servers.stop(proc)
    ttfts = sorted(r["ttft_s"] for r in results)
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    out = {
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(int(0.99 * len(ttfts)), len(ttfts) - 1)],
        "output_tok_s": sum(r["completion_tokens"] for r in results) / seconds,
        "prefix_hit_ratio": sum(r["cached_tokens"] for r in results) / prompt_tokens if prompt_tokens else 0.0,
        "requests": len(results),
        "seconds": seconds,
        "per_replica": {rep: sum(r["replica"] == rep for r in results) for rep in {r["replica"] for r in results}},
    }
    log(f"{router}: TTFT p50 {out['ttft_p50_s']:.3f} s, p99 {out['ttft_p99_s']:.3f} s, "
        f"hit ratio {out['prefix_hit_ratio']:.2f}, {out['output_tok_s']:.1f} tok/s")
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["systems"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, key, label in zip(axes, ("ttft_p50_s", "ttft_p99_s", "prefix_hit_ratio"),
                              ("TTFT p50 (s)", "TTFT p99 (s)", "prefix-cache hit ratio")):
        ax.bar(names, [report["systems"][n][key] for n in names], color=["#d62728", "#7f7f7f", "#1f77b4"])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Two bench replicas, users sharing a few long system prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer, shorter prompts (under 10 minutes).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing.json")
    parser.add_argument("--port", type=int, default=8521)
    args = parser.parse_args()
    args.prompts, args.requests, args.chars = (8, 24, 1200) if args.quick else (16, 64, 2000)
    args.concurrency = 2

    from helios.storage.demo_model import resolve_source

    work = ROOT / "benchmarks" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags()
    engine = {"dtype": bench_dtype(flags), "max_model_len": 4096, "max_num_seqs": 16, "enforce_eager": True,
              "kv_cache_space_gib": 1}
    model_dir = resolve_source("demo://bench", work / "cache")
    chats = workload(args.prompts, args.requests, args.chars)
    started = time.monotonic()
    systems = {r: measure(r, model_dir, args.port + i, engine, chats, args, work) for i, r in enumerate(ROUTERS)}
    report = {
        "benchmark": "routing",
        "quick": args.quick,
        "machine": machine(),
        "workload": {"model": "demo://bench", "engine": engine, "replicas": 2, "system_prompts": args.prompts,
                     "requests": args.requests, "system_prompt_chars": args.chars, "concurrency": args.concurrency,
                     "max_tokens": MAX_TOKENS, "streaming": True},
        "systems": systems,
        "ttft_p50_s": {r: s["ttft_p50_s"] for r, s in systems.items()},
        "ttft_p99_s": {r: s["ttft_p99_s"] for r, s in systems.items()},
        "prefix_hit_ratio": {r: s["prefix_hit_ratio"] for r, s in systems.items()},
        "ratios": {
            "helios_over_serve_default_ttft_p50": systems["helios"]["ttft_p50_s"] / systems["serve_default"]["ttft_p50_s"],
            "helios_over_ray_prefix_ttft_p50": systems["helios"]["ttft_p50_s"] / systems["ray_prefix"]["ttft_p50_s"],
        },
        "seconds": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    r = report["ratios"]
    log(f"wrote {args.out}: Helios TTFT p50 / Serve default = {r['helios_over_serve_default_ttft_p50']:.2f}, "
        f"/ Ray prefix router = {r['helios_over_ray_prefix_ttft_p50']:.2f}")


if __name__ == "__main__":
    main()
