"""Memory a waiting engine host faults in ahead and hands to its engine as the engine grows.

On virtual machines that give free guest memory back to the host (virtio-balloon free page
reporting: Firecracker, many cloud VMs), the first touch of a page the host has taken back costs
a host fault. Measured on this project's VMs: 6-14 s per GiB for such pages, against ~0.3 s for a
page freed a moment ago, which the guest's allocator hands out again before it is reported. An
engine start touches its weights and KV cache for the first time (the bench model in float32:
~4 GiB), so most of a pooled start went to page faults in the kernel (system time, the host's
steal time) rather than to loading.

A pooled host therefore faults `reserve_gib` in while it waits (at its idle priority) and, once
taken, gives the pages back a slice at a time just ahead of what the node consumes: the engine's
allocations then get pages that were freed milliseconds earlier. Releasing everything at once
does not work as well: free page reporting returns what is not reused within a second or two.
"""

from __future__ import annotations

import mmap
import threading
import time

from helios.observability.logs import get_logger, log_event

logger = get_logger("engine.memory_reserve")

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+; the constant is Python 3.12+
CHUNK = 32 << 20  # populate and release granularity
AHEAD = 256 << 20  # released beyond what the node has consumed since the hand-over began
POLL_S = 0.02
HAND_OVER_LIMIT_S = 600.0  # whatever is still held then is released at once


def page_counts() -> tuple[int, int]:
    """Pages the kernel has allocated and freed since boot (/proc/vmstat pgalloc_*, pgfree).

    Their difference moves with what processes take from free memory and give back, and, unlike
    MemFree, not with free page reporting, which takes free pages off the free lists while it reports
    them (MemFree dips as soon as a reserve slice is freed, which would read as consumption)."""
    alloc = freed = 0
    with open("/proc/vmstat", "rb") as f:
        for line in f:
            if line.startswith(b"pgalloc_"):
                alloc += int(line.split()[1])
            elif line.startswith(b"pgfree "):
                freed = int(line.split()[1])
    return alloc, freed


class MemoryReserve:
    """`nbytes` of anonymous memory faulted in by a background thread, released in slices on `hand_over`."""

    def __init__(self, nbytes: int) -> None:
        self.size = max(0, int(nbytes)) // mmap.PAGESIZE * mmap.PAGESIZE
        self.populated = 0  # bytes faulted in, from the start of the mapping
        self.released = 0  # bytes given back, from the end of what was populated
        self.handed_over = 0  # of those, released before `finish()`: what the engine's start consumed
        self._held = 0  # populated bytes at hand-over: what is given back
        self._lock = threading.Lock()
        self._stop_populating = threading.Event()
        self._finished = threading.Event()
        self._mm: mmap.mmap | None = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) \
            if self.size else None
        self.populate_s = 0.0
        self._populating = threading.Thread(target=self._populate, name="helios-reserve-populate", daemon=True)
        self._populating.start()

    def _populate(self) -> None:
        started = time.monotonic()
        try:
            while self._mm is not None and self.populated < self.size and not self._stop_populating.is_set():
                n = min(CHUNK, self.size - self.populated)
                try:
                    self._mm.madvise(_MADV_POPULATE_WRITE, self.populated, n)
                except OSError:  # a kernel before 5.14: write one byte per page
                    for off in range(self.populated, self.populated + n, mmap.PAGESIZE):
                        self._mm[off] = 1
                with self._lock:
                    self.populated += n
        finally:
            self.populate_s = time.monotonic() - started
            log_event(logger, "memory_reserve_populated", bytes=self.populated, seconds=round(self.populate_s, 3))

    def stats(self) -> dict[str, float]:
        return {"reserve_bytes": self.size, "reserve_populated_bytes": self.populated,
                "reserve_released_bytes": self.released, "reserve_handed_over_bytes": self.handed_over}

    def hand_over(self) -> None:
        """Stop populating and give the pages back just ahead of the node's consumption, in a thread,
        until all are back, `finish()` is called, or HAND_OVER_LIMIT_S passes."""
        self._stop_populating.set()
        self._populating.join()
        self._held = self.populated
        threading.Thread(target=self._release_as_consumed, name="helios-reserve-hand-over", daemon=True).start()

    def finish(self) -> None:
        """The engine has started: release what is left at once and unmap."""
        with self._lock:
            self.handed_over = self.released
        self._finished.set()

    def _release(self, upto: int) -> None:
        """Release (MADV_DONTNEED) populated bytes from the end down until `upto` bytes are back."""
        with self._lock:
            while self._mm is not None and self.released < min(upto, self._held):
                n = min(CHUNK, self._held - self.released)
                self._mm.madvise(mmap.MADV_DONTNEED, self._held - self.released - n, n)
                self.released += n

    def _release_as_consumed(self) -> None:
        alloc_at_start, freed_at_start = page_counts()
        deadline = time.monotonic() + HAND_OVER_LIMIT_S
        try:
            while self.released < self._held and not self._finished.is_set() and time.monotonic() < deadline:
                alloc, freed = page_counts()
                # Net pages taken by anyone on the node since the start, the reserve's own frees left out.
                consumed = ((alloc - alloc_at_start) - (freed - freed_at_start)) * mmap.PAGESIZE + self.released
                self._release(max(consumed, 0) + AHEAD)
                time.sleep(POLL_S)
        finally:
            self._release(self._held)
            self.close()
            log_event(logger, "memory_reserve_handed_over", bytes=self.released)

    def close(self) -> None:
        self._stop_populating.set()
        if threading.current_thread() is not self._populating:
            self._populating.join(timeout=5)  # at most one chunk in flight
        with self._lock:
            if self._mm is not None:
                self._mm.close()
                self._mm = None
