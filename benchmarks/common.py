"""What every benchmark shares: the machine's facts and waiting for a server to answer."""

from __future__ import annotations

import asyncio
import os
import platform
import time
from pathlib import Path

import aiohttp
import servers


def cpu_flags() -> list[str]:
    """The CPU features that decide vLLM's CPU speed (native bf16 or emulated): recorded with results."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    return sorted(wanted & set(line.split()))


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_flags": cpu_flags()}


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
