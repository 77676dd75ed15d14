"""What every benchmark shares: the machine's facts, the tiny model's engine settings, waiting for a
server to answer, and one streamed completion."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time

import aiohttp
import servers

from helios.cpu_features import cpu_dtype, cpu_flags

# The engine settings every system serving the tiny demo model gets alike (overhead, overload, scaling).
TINY_ENGINE = {"dtype": "float32", "max_model_len": 2048, "max_num_seqs": 64, "enforce_eager": True,
               "kv_cache_space_gib": 1}


# The dtype benchmarks run engines in, chosen from the CPU's flags (and recorded with each result).
bench_dtype = cpu_dtype


def machine() -> dict:
    """The machine's facts every result records: CPU count and flags, and the dtype they choose."""
    flags = cpu_flags()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_flags": flags, "bench_dtype": bench_dtype(flags)}


async def wait_ready(base: str, proc, timeout_s: float = 600) -> float:
    """Until a 1-token completion of the demo model answers 200 (every system serves it); seconds waited."""
    started = time.monotonic()
    body = {"model": servers.MODEL_ID, "prompt": "hi", "max_tokens": 1}
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with http.post(f"{base}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(1)
    raise TimeoutError(f"not ready after {timeout_s}s")


async def stream_one(http: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: (seconds to the first token, completion tokens from usage)."""
    body = {"model": servers.MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with http.post(f"{base}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - start), tokens
