"""Eviction policies for local tiers: pure bookkeeping that returns a plan.

A policy is told about inserts, hits and removals and, asked to free bytes, answers
with the blobs to drop, in order. It never touches files: the tier executes the plan,
so policies are tested without disks and swapped by name in config.

Two policies: `lru`, the baseline, and `cost` (`CostAwarePolicy`), which evicts the blobs
whose loss costs the fewest cold-start seconds per byte freed. Policies may also take
hints through optional hooks that default to no-ops, so a plug-in implements only what it
uses: `for_tier` (where this tier's misses are served from, and how fast), `set_keepalive`
and `set_idle` (the registry's predictions, see `prefetch.py`), `observe_bandwidth` (how fast
a refetch really was) and `admit` (whether an optional copy, filling a slower tier behind a
load, is worth what it would push out).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from typing import Any

from helios.config import DEFAULT_BANDWIDTH

Locate = Callable[[str], "str | None"]
"""digest -> kind of the tier an evicted copy would be fetched back from (None: the default)."""


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

    def tracks(self, digest: str) -> bool:
        """Whether the policy tracks `digest` (override: `known()` copies every entry)."""
        return digest in self.known()

    def total(self) -> int:
        """Bytes of everything tracked."""
        return sum(self.known().values())

    # -- optional hints: no-ops unless a policy uses them ------------------------------

    @classmethod
    def for_tier(
        cls, refetch_from: str, bandwidths: Mapping[str, float], locate: Locate | None = None
    ) -> EvictionPolicy:
        """The policy of one tier, told where its evicted blobs would come back from and how fast
        each tier reads (bytes/s by kind). Policies that weigh no cost ignore it."""
        return cls()

    def set_keepalive(self, digests: Collection[str], until: float) -> None:
        """A hint that these blobs will be needed before `until` (epoch seconds): plan them last.
        Unlike `protected` it is not a hard rule, so a tier never fills up on stale predictions."""

    def admit(self, digest: str, size: int, need: int) -> bool:
        """Whether a copy that is optional (filling a slower tier behind a load) should come in
        when `need` bytes must be evicted for it. A blob a load needs is never asked about."""
        return True

    def set_idle(self, digests: Collection[str], until: float) -> None:
        """A hint that these blobs will not be needed before `until`: plan them first. A new use
        cancels it (the prediction was wrong)."""

    def observe_bandwidth(self, source: str, nbytes: int, seconds: float) -> None:
        """A fetch from tier kind `source` into this tier moved `nbytes` in `seconds`."""

    def state(self) -> dict:
        """What the policy learned, as JSON-ready data, so a restarted keeper does not start from zero."""
        return {}

    def restore(self, state: Mapping) -> bool:
        """Take back `state()` output; False (nothing changed) when it does not fit."""
        return False


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

    def tracks(self, digest: str) -> bool:
        return digest in self._size

    def total(self) -> int:
        """Bytes of everything tracked."""
        return sum(self._size.values())

    def state(self) -> dict:
        return {"blobs": {d: [self._size[d], self._last[d]] for d in self._size}}

    def restore(self, state: Mapping) -> bool:
        try:
            blobs = {str(d): (int(v[0]), float(v[1])) for d, v in dict(state["blobs"]).items()}
        except (KeyError, TypeError, ValueError, IndexError):
            return False
        for digest, (size, last) in blobs.items():
            self.on_insert(digest, size, last)
        return True


class CostAwarePolicy(EvictionPolicy):
    """Greedy-Dual-Size-Frequency with cold-start seconds as the cost (Cherkasova, 1998).

    A blob's priority is `H = L + f * cost / size`: `cost` the seconds a miss would cost
    (a fixed latency plus size / read bandwidth of the tier the copy would come back from,
    asked per blob through `locate`), `f` how often it was used, `size` in GB, and `L` the
    inflation value, the priority of the last blob evicted, which every access re-bases on.
    The lowest H goes first. Why not plain GreedyDual-Size: with a cost that grows with size,
    cost / size is one number per source tier and GDS degenerates to LRU; the use count is
    what tells a model that comes back every hour from one that was tried once, and L ages
    counts that stopped growing so yesterday's favourite does not stay forever.

    A blob that is evicted and fetched again keeps its count (a bounded ghost list, as in
    ARC), so a model that cycles through a small RAM tier is still recognised as popular.
    Kept-alive blobs (`set_keepalive`) go after every other candidate, idle ones (`set_idle`)
    before; blobs whose copy is only on the slow remote cost more than those still on NVMe,
    so they stay longer.

    `admit` turns away fill-behind copies whose recent use is worth less than what they would
    evict, so one big model used once does not flush NVMe (TinyLFU's admission, Einziger et
    al. 2017, weighted by cost per byte). It compares *recent* uses, counted for blobs the tier
    holds and for blobs it does not (a model served from RAM, or refused here, still counts)
    and halved every `memory` × (blobs held) accesses of the tier, as TinyLFU halves its
    counters every ten cache sizes of samples. Comparing the eviction priorities instead let
    the tier freeze: residents' counts grow on every use while a newcomer's grew only when it
    was offered, and the inflation value does not move while nothing is evicted, so in bursty
    traces NVMe kept one past burst's models and sent every later one to the remote
    (`benchmarks/cache_live.py`: 1.12-1.40x LRU's cold-start seconds; now 0.77 on its full trace).
    """

    def __init__(
        self,
        refetch_from: str = "remote",
        bandwidths: Mapping[str, float] | None = None,
        locate: Locate | None = None,
        latency_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        history: int = 4096,
        memory: float = 10.0,
    ) -> None:
        """`refetch_from`: the kind of tier a miss here is served from when `locate` does not
        say (the next slower tier); `bandwidths`: read bytes/s by tier kind (defaults from
        config); `latency_s`: fixed seconds per fetch on top of the transfer; `clock`: what
        "now" is for keep-alive deadlines (a simulation passes its own); `history`: how many
        evicted blobs' use counts are remembered; `memory`: the half-life of a recent use, in
        accesses of this tier per blob it holds (what `admit` weighs)."""
        self.refetch_from = refetch_from
        self.bandwidths: dict[str, float] = {**DEFAULT_BANDWIDTH, **(bandwidths or {})}
        self.locate = locate
        self.latency_s = latency_s
        self.clock = clock
        self.inflation = 0.0
        self.kv_weight = 1.0  # a KV block's cost against a model blob's (storage.kv_blocks.weight)
        self._size: dict[str, int] = {}
        self._freq: dict[str, float] = {}
        self._base: dict[str, float] = {}
        self._ghost: OrderedDict[str, float] = OrderedDict()
        self._history = history
        self._keep: dict[str, float] = {}
        self._idle: dict[str, float] = {}
        self._planned: dict[str, float] = {}
        self.memory = memory
        self.accesses = 0  # uses of model blobs seen by this tier: the clock recent uses decay on
        self._blobs = 0  # model blobs held (KV blocks not counted): the half-life's unit
        self._recent: dict[str, tuple[float, int]] = {}  # held digest -> (recent uses, at access)
        self._absent: OrderedDict[str, tuple[float, int]] = OrderedDict()  # model blobs not held, newest `history`

    @classmethod
    def for_tier(
        cls, refetch_from: str, bandwidths: Mapping[str, float], locate: Locate | None = None
    ) -> CostAwarePolicy:
        return cls(refetch_from, bandwidths, locate)

    # -- accounting ---------------------------------------------------------------------

    def on_insert(self, digest: str, size: int, now: float) -> None:
        if digest not in self._size and not digest.startswith("kv:"):
            self._blobs += 1
        self._size[digest] = size
        self._freq[digest] = self._ghost.pop(digest, 0.0) + 1
        self._base[digest] = self.inflation
        if digest in self._absent:
            self._recent[digest] = self._absent.pop(digest)
        self._used(digest)

    def on_hit(self, digest: str, now: float) -> None:
        """A use of `digest`, held here or not (the store reports a load's use to every tier)."""
        if digest in self._size:
            self._freq[digest] += 1
            self._base[digest] = self.inflation
            self._idle.pop(digest, None)
        self._used(digest)

    def _half_life(self) -> float:
        return self.memory * max(self._blobs, 1)

    def _used(self, digest: str) -> None:
        """Count one recent use. Only model blobs advance the clock (KV churn would age every blob's
        count) and are remembered once gone; a KV block's uses count while it is held."""
        kv = digest.startswith("kv:")
        if not kv:
            self.accesses += 1
        uses = (self.recent_uses(digest) + 1, self.accesses)
        if digest in self._size:
            self._recent[digest] = uses
        elif not kv:
            self._keep_newest(self._absent, digest, uses)

    def recent_uses(self, digest: str) -> float:
        """Uses of `digest`, each weighing half as much for every half-life of accesses since."""
        uses, at = self._recent.get(digest) or self._absent.get(digest) or (0.0, self.accesses)
        return uses * 0.5 ** ((self.accesses - at) / self._half_life())

    def on_remove(self, digest: str) -> None:
        if digest in self._planned:  # an eviction this policy chose: it sets the new floor
            self.inflation = max(self.inflation, self._planned.pop(digest))
        if digest in self._freq and not digest.startswith("kv:"):  # KV churn must not crowd out blobs' history
            self._remember(digest, self._freq[digest])
        recent = self._recent.pop(digest, None)
        if digest in self._size and not digest.startswith("kv:"):
            self._blobs -= 1
            if recent is not None:
                self._keep_newest(self._absent, digest, recent)
        self._size.pop(digest, None)
        self._freq.pop(digest, None)
        self._base.pop(digest, None)

    def _remember(self, digest: str, uses: float) -> None:
        """Keep the use count of a blob that is not (or no longer) here, the newest `history` of them."""
        self._keep_newest(self._ghost, digest, uses)

    def _keep_newest(self, table: OrderedDict[str, Any], digest: str, value: Any) -> None:
        """`table[digest] = value` as its newest entry, dropping the oldest past `history` entries."""
        table[digest] = value
        table.move_to_end(digest)
        while len(table) > self._history:
            table.popitem(last=False)

    def set_keepalive(self, digests: Collection[str], until: float) -> None:
        for digest in digests:
            self._keep[digest] = until
            self._idle.pop(digest, None)

    def set_idle(self, digests: Collection[str], until: float) -> None:
        for digest in digests:
            self._idle[digest] = until
            self._keep.pop(digest, None)

    def observe_bandwidth(self, source: str, nbytes: int, seconds: float) -> None:
        """Move the source's bandwidth towards what a real fetch achieved (small fetches say
        more about latency than bandwidth, so they are ignored)."""
        if nbytes < _MIN_OBSERVED or seconds <= 0:
            return
        old = self.bandwidths.get(source, nbytes / seconds)
        self.bandwidths[source] = (1 - _EWMA) * old + _EWMA * nbytes / seconds

    # -- planning -----------------------------------------------------------------------

    def cost_s(self, digest: str) -> float:
        """Seconds of cold start a miss on this blob would cost now. A KV block (`kv:<key>`) costs
        the seconds to read it back from where it would be spilled, or to recompute it (source
        `recompute`), times `kv_weight`, with no fixed fetch latency: it is read or recomputed
        as part of a prefill, not fetched on its own."""
        source = (self.locate(digest) if self.locate else None) or self.refetch_from
        if digest.startswith("kv:"):
            bandwidth = self.bandwidths.get(source) or self.bandwidths.get("recompute") or DEFAULT_BANDWIDTH["nvme"]
            return self.kv_weight * self._size[digest] / bandwidth
        return self.latency_s + self._size[digest] / self.bandwidths[source]

    def priority(self, digest: str) -> float:
        size_gb = max(self._size[digest], 1) / 1e9
        return self._base[digest] + self._freq[digest] * self.cost_s(digest) / size_gb

    def admit(self, digest: str, size: int, need: int) -> bool:
        """Only if its recent uses, this one included, are worth more per byte than those of every
        blob it would push out (lowest eviction priority first, until `need` bytes are freed; a KV
        block's worth is its recent uses times its own cost, `kv_weight` included); kept-alive
        blobs are never pushed out for it. A refused offer counts as a use, so a blob that keeps
        being asked for gets in, and the residents' counts decay meanwhile: the tier cannot freeze."""
        if need <= 0:
            return True
        kept = self.kept_alive(self.clock())
        cost = self.latency_s + size / self.bandwidths[self.refetch_from]
        incoming = (self.recent_uses(digest) + 1) * cost / (max(size, 1) / 1e9)
        freed = 0
        for d in sorted(self._size, key=self.priority):
            if freed >= need:
                break
            if d in kept or self.recent_uses(d) * self.cost_s(d) / (max(self._size[d], 1) / 1e9) > incoming:
                break
            freed += self._size[d]
        if freed < need:
            self._used(digest)
        return freed >= need

    def kept_alive(self, now: float) -> set[str]:
        self._keep = {d: until for d, until in self._keep.items() if until > now}
        return set(self._keep)

    def idle(self, now: float) -> set[str]:
        self._idle = {d: until for d, until in self._idle.items() if until > now}
        return set(self._idle)

    def plan(self, need: int, protected: Collection[str] = ()) -> list[str]:
        if need <= 0:
            return []
        now = self.clock()
        kept, idle = self.kept_alive(now), self.idle(now)
        scored = {d: self.priority(d) for d in self._size if d not in protected}
        victims, freed = [], 0
        self._planned = {}
        for digest in sorted(scored, key=lambda d: (d in kept, d not in idle, scored[d])):
            if freed >= need:
                break
            victims.append(digest)
            self._planned[digest] = scored[digest]
            freed += self._size[digest]
        return victims

    def known(self) -> dict[str, int]:
        return dict(self._size)

    def tracks(self, digest: str) -> bool:
        return digest in self._size

    def total(self) -> int:
        """Bytes of everything tracked."""
        return sum(self._size.values())

    def state(self) -> dict:
        """Counts, bases, the inflation value, the ghost list and learned bandwidths (hints are
        not kept: the registry sends them again every round)."""
        return {
            "inflation": self.inflation,
            "blobs": {d: [self._size[d], self._freq[d], self._base[d]] for d in self._size},
            "ghost": [[d, f] for d, f in self._ghost.items()],
            "bandwidths": dict(self.bandwidths),
            "accesses": self.accesses,
            "recent": [[d, uses, at] for table in (self._absent, self._recent) for d, (uses, at) in table.items()],
        }

    def restore(self, state: Mapping) -> bool:
        try:
            inflation = float(state["inflation"])
            blobs = {str(d): (int(v[0]), float(v[1]), float(v[2])) for d, v in dict(state["blobs"]).items()}
            ghost = [(str(d), float(f)) for d, f in state.get("ghost", [])]
            bandwidths = {str(k): float(v) for k, v in dict(state.get("bandwidths", {})).items()
                          if float(v) > 0 and k != "recompute"}  # configured, not learned: the config wins
            accesses = int(state.get("accesses", 0))  # absent in a state saved before recent uses were kept
            recent = [(str(d), float(u), int(a)) for d, u, a in state.get("recent", [])]
        except (KeyError, TypeError, ValueError, IndexError):
            return False
        self.inflation = inflation
        for digest, (size, freq, base) in blobs.items():
            self._size[digest], self._freq[digest], self._base[digest] = size, freq, base
        for digest, uses in ghost:
            self._remember(digest, uses)
        self.bandwidths.update(bandwidths)
        self.accesses = accesses
        self._blobs = sum(1 for d in self._size if not d.startswith("kv:"))
        for digest, uses, at in recent:
            if digest in self._size:
                self._recent[digest] = (uses, min(at, accesses))
            elif not digest.startswith("kv:"):
                self._keep_newest(self._absent, digest, (uses, min(at, accesses)))
        for digest in self._size:  # a state saved before recent uses were kept: start from the counts
            self._recent.setdefault(digest, (self._freq[digest], accesses))
        return True


_MIN_OBSERVED = 64 << 20
_EWMA = 0.3

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "cost": CostAwarePolicy}
