"""What this machine's CPU does natively, where it decides how fast vLLM's CPU backend runs."""

from __future__ import annotations

from pathlib import Path

# The flags recorded with benchmark results: AVX2 / AVX-512, and native bf16 (AVX-512 bf16, AMX).
RECORDED = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def cpu_flags() -> list[str]:
    """The CPU features that decide vLLM's CPU speed (native bf16 or emulated)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return sorted(RECORDED & set(line.split()))


def native_bf16(flags: list[str] | None = None) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags() if flags is None else flags))


def cpu_dtype(flags: list[str] | None = None) -> str:
    """bfloat16 where the CPU has native bf16 (AVX-512 bf16 or AMX); float32 otherwise: vLLM then
    emulates bf16 matmuls about 30x slower, and its oneDNN path and torch's plain one round them
    differently, so greedy output would depend on which path a load took."""
    return "bfloat16" if native_bf16(flags) else "float32"
