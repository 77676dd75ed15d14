"""Eviction policies for local tiers: pure bookkeeping that returns a plan.

A policy is told about inserts, hits and removals and, asked to free bytes, answers
with the blobs to drop, in order. It never touches files: the tier executes the plan,
so policies are tested without disks and swapped by name in config. The registry issue
adds a cost-aware policy behind the same contract; LRU is the baseline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection


class EvictionPolicy(ABC):
    """Chooses victims in one tier. Implementations must never plan a protected blob,
    and must return victims whose sizes add up to at least `need` when that is possible
    without protected blobs (fewer otherwise, and the tier then reports it is full)."""

    @abstractmethod
    def on_insert(self, digest: str, size: int, now: float) -> None: ...

    @abstractmethod
    def on_hit(self, digest: str, now: float) -> None: ...

    @abstractmethod
    def on_remove(self, digest: str) -> None: ...

    @abstractmethod
    def plan(self, need: int, protected: Collection[str] = ()) -> list[str]:
        """Blobs to drop, in order, to free `need` bytes."""

    @abstractmethod
    def known(self) -> dict[str, int]:
        """digest -> size of every blob the policy tracks."""


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._size: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def on_insert(self, digest: str, size: int, now: float) -> None:
        self._size[digest] = size
        self._last[digest] = now

    def on_hit(self, digest: str, now: float) -> None:
        if digest in self._size:
            self._last[digest] = max(now, self._last[digest])

    def on_remove(self, digest: str) -> None:
        self._size.pop(digest, None)
        self._last.pop(digest, None)

    def plan(self, need: int, protected: Collection[str] = ()) -> list[str]:
        victims, freed = [], 0
        for digest in sorted(self._last, key=self._last.__getitem__):
            if freed >= need:
                break
            if digest in protected:
                continue
            victims.append(digest)
            freed += self._size[digest]
        return victims

    def known(self) -> dict[str, int]:
        return dict(self._size)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}
