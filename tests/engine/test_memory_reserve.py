"""A pooled host's memory reserve: faulted in while it waits, given back as the engine consumes."""

from __future__ import annotations

import time

from helios.engine import memory_reserve
from helios.engine.memory_reserve import MemoryReserve

MIB = 1 << 20


def _rss_anon() -> int:
    """This process's resident anonymous memory in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon")


def _until(check, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_the_reserve_is_resident_before_it_is_handed_over() -> None:
    before = _rss_anon()
    reserve = MemoryReserve(128 * MIB)
    try:
        _until(lambda: reserve.populated == reserve.size)
        assert _rss_anon() - before >= 120 * MIB  # faulted in, not just mapped
        assert reserve.stats()["reserve_released_bytes"] == 0
    finally:
        reserve.close()
    assert _rss_anon() - before < 32 * MIB


def test_the_reserve_is_given_back_as_memory_is_consumed_and_all_of_it_at_finish() -> None:
    size = memory_reserve.AHEAD + 512 * MIB
    reserve = MemoryReserve(size)
    _until(lambda: reserve.populated == reserve.size)
    reserve.hand_over()
    time.sleep(0.5)
    # Nothing consumed yet: only the slice ahead has been given back.
    assert reserve.released <= memory_reserve.AHEAD + 128 * MIB, reserve.stats()
    consumer = b"\x01" * (384 * MIB)  # an engine's first allocations: written, so faulted in
    _until(lambda: reserve.released >= 384 * MIB, timeout_s=10)
    assert reserve.released < reserve.size or len(consumer) >= size - memory_reserve.AHEAD
    reserve.finish()
    _until(lambda: reserve.released == reserve.size, timeout_s=10)
    assert reserve.stats()["reserve_handed_over_bytes"] >= 384 * MIB
    del consumer
