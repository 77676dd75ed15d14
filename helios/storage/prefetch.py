"""Keep-alive and prefetch for the RAM tier, planned from each model's inter-arrival histogram.

Requests for a model come in bursts: short gaps inside a burst, long ones between bursts,
and for scheduled jobs a period. One mean cannot describe that, so each model keeps a
histogram of the gaps between its requests (log-spaced bins, online, slowly forgetting)
and the planner asks it a conditional question: the model has been idle for `age`
seconds; how likely is a request within the next `h` seconds? Inside a burst the answer
is high (keep the model in RAM); past the burst it drops (let it go); for a periodic
model it rises again just before the next period (start fetching it now, so it lands in
RAM before the request does).

Pure logic, no Ray and no files; the registry owns one planner and acts on its plans
(`helios/registry/prefetch.py`)::

    planner = PrefetchPlanner(ram_capacity, bandwidths={t.kind: t.bytes_per_s() for t in storage.tiers},
                              interval_s=registry.prefetch_interval_s)
    planner.record(model_id, t)                       # on every request (epoch seconds)
    # every interval_s:
    plan = planner.plan(now, {model_id: ModelState(size=bytes, tier="nvme"), ...})
    # on every node:
    write_hints(ram.root, keep_alive={digest: k.until for each blob of plan.keep_alive},
                idle={digest: i.until for each blob of plan.idle})
    for p in plan.prewarm:                            # start now
        store.localize(manifest_of(p.model_id), tier="ram")

`ModelState.tier` is the fastest tier holding all of the model ("ram", "nvme", "ssd",
"remote"; a model being fetched into RAM counts as "ram"). Keep-alive and idle are hints
to the `cost` eviction policy (kept-alive blobs are evicted last, never refused; idle ones
first); `lru` ignores them. Each round runs on every node's cache actor (`node_cache.py`),
which holds the one policy per tier that all processes there use; it also leaves the hints in
the RAM tier's root (`hints.json`), where a restarted actor, or a process keeping its own policy
(`storage.node_cache: false`), picks them up when it syncs.
Prewarms come only from local tiers by default (`prewarm_from`): a speculative fetch from
the remote holds up the demand misses that share its link, which the benchmark showed
costs more than it saves.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from helios.config import DEFAULT_BANDWIDTH


class InterArrivalHistogram:
    """Gaps between a model's requests in log-spaced bins, from `min_s` to `max_s`.

    Counts decay with time, halving every `half_life_s` (a day: yesterday's pattern still
    counts, last week's hardly), so the histogram follows a model whose pattern changes.
    Time, not request count: decaying per gap would let one busy burst of a thousand short
    gaps wash out the long gaps between bursts, and the model would look idle exactly when
    its next burst is due. Gaps below `min_s` share one bin,
    gaps beyond `max_s` count as "did not come back" (mass at infinity)."""

    def __init__(
        self, min_s: float = 1.0, max_s: float = 14 * 86400, bins_per_decade: int = 32,
        half_life_s: float = 86400.0,
    ) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        decades = math.log10(max_s / min_s)
        n = max(1, math.ceil(decades * bins_per_decade))
        self.edges = [0.0] + [min_s * (max_s / min_s) ** (i / n) for i in range(n + 1)]
        self.counts = [0.0] * (len(self.edges) - 1)
        self.beyond = 0.0  # gaps longer than max_s
        self.half_life_s = half_life_s
        self.gaps = 0
        self._log_weight = 0.0  # decay by growing the weight of new gaps with time: O(1) per add
        self._cum: list[float] | None = None

    @property
    def total(self) -> float:
        return sum(self.counts) + self.beyond

    def add(self, gap: float) -> None:
        """A gap of `gap` seconds ended now (so the clock moved on by `gap`)."""
        gap = max(gap, 0.0)
        self.gaps += 1
        self._log_weight += gap / self.half_life_s * math.log(2)
        if self._log_weight > 200:  # rescale before floats overflow; shares are unchanged
            factor = math.exp(-self._log_weight)  # 0.0 after a very long silence: the past is forgotten
            self.counts = [c * factor for c in self.counts]
            self.beyond *= factor
            self._log_weight = 0.0
        weight = math.exp(self._log_weight)
        self._cum = None
        if gap >= self.edges[-1]:
            self.beyond += weight
            return
        i = max(0, bisect.bisect_right(self.edges, gap) - 1)
        self.counts[i] += weight

    def to_dict(self) -> dict:
        """The histogram's state as JSON-ready data (the registry persists it across restarts)."""
        return {"edges": [self.edges[1], self.edges[-1]], "counts": self.counts, "beyond": self.beyond,
                "gaps": self.gaps, "log_weight": self._log_weight}

    def load(self, data: dict) -> bool:
        """Restore `to_dict` output; False (and nothing changed) when it does not fit these bins."""
        try:
            counts = [float(c) for c in data["counts"]]
            fits = (len(counts) == len(self.counts) and math.isclose(data["edges"][0], self.edges[1])
                    and math.isclose(data["edges"][1], self.edges[-1]))
            beyond, gaps, log_weight = float(data["beyond"]), int(data["gaps"]), float(data["log_weight"])
        except (KeyError, TypeError, ValueError, IndexError):
            return False
        if not fits or not all(math.isfinite(c) and c >= 0 for c in [*counts, beyond, log_weight]):
            return False
        self.counts, self.beyond, self.gaps, self._log_weight = counts, beyond, gaps, log_weight
        self._cum = None
        return True

    def cdf(self, x: float) -> float:
        """Share of gaps up to `x` seconds (log-linear inside a bin, linear in the first)."""
        if self._cum is None:
            self._cum = [0.0]
            for c in self.counts:
                self._cum.append(self._cum[-1] + c)
        cum = self._cum
        total = cum[-1] + self.beyond
        if total <= 0 or x <= 0:
            return 0.0
        if x >= self.edges[-1]:
            return cum[-1] / total
        i = bisect.bisect_right(self.edges, x) - 1
        lo, hi = self.edges[i], self.edges[i + 1]
        frac = x / hi if i == 0 else math.log(x / lo) / math.log(hi / lo)
        return (cum[i] + self.counts[i] * frac) / total

    def p_within(self, age: float, horizon: float) -> float:
        """P(the current gap ends within `horizon` more seconds | it has lasted `age`)."""
        survive = 1.0 - self.cdf(age)
        if survive <= 1e-12:
            return 0.0
        return max(0.0, min(1.0, (self.cdf(age + horizon) - self.cdf(age)) / survive))

    def median_remaining(self, age: float) -> float | None:
        """Median seconds until the current gap ends, given it has lasted `age`; None when the
        histogram says it probably does not end (no mass left, or most of it at infinity)."""
        start = self.cdf(age)
        target = start + 0.5 * (1.0 - start)
        if 1.0 - start <= 1e-12 or target > sum(self.counts) / max(self.total, 1e-12):
            return None
        lo, hi = age, self.edges[-1]
        for _ in range(60):  # bisection on the monotone cdf
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.cdf(mid) < target else (lo, mid)
        return hi - age


@dataclass
class ModelUsage:
    """One model's request history: the last request and the histogram of gaps."""

    histogram: InterArrivalHistogram = field(default_factory=InterArrivalHistogram)
    last: float | None = None

    def record(self, t: float) -> bool:
        """Count a request at `t`; False when it is older than the last one (its gap is lost)."""
        if self.last is not None and t < self.last:
            return False
        if self.last is not None:
            self.histogram.add(t - self.last)
        self.last = t
        return True

    def to_dict(self) -> dict:
        return {"last": self.last, "histogram": self.histogram.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelUsage | None:
        """A usage saved by `to_dict`, or None when the data is not one (bins changed, corrupt)."""
        usage = cls()
        last = data.get("last") if isinstance(data, dict) else None
        if not isinstance(last, (int, float)) or isinstance(last, bool) or not math.isfinite(last):
            return None
        if not isinstance(data.get("histogram"), dict) or not usage.histogram.load(data["histogram"]):
            return None
        usage.last = float(last)
        return usage

    def p_within(self, now: float, horizon: float, min_gaps: int = 3) -> float:
        """P(a request in (now, now + horizon]); 0 until `min_gaps` gaps have been seen."""
        if self.last is None or self.histogram.gaps < min_gaps:
            return 0.0
        return self.histogram.p_within(max(now - self.last, 0.0), horizon)

    def next_use(self, now: float, min_gaps: int = 3) -> float | None:
        """The median predicted time of the next request, or None when there is no telling."""
        if self.last is None or self.histogram.gaps < min_gaps:
            return None
        remaining = self.histogram.median_remaining(max(now - self.last, 0.0))
        return None if remaining is None else now + remaining


@dataclass(frozen=True)
class ModelState:
    """What the planner needs about a model now: its bytes and the fastest tier holding all of it."""

    size: int
    tier: str


@dataclass(frozen=True)
class KeepAlive:
    model_id: str
    until: float
    probability: float  # of a request before `until`


@dataclass(frozen=True)
class Prewarm:
    model_id: str
    source: str  # the tier to fetch from
    fetch_s: float  # expected transfer seconds
    probability: float  # of a request before a fetch started at the next planning round would land
    expected_use: float | None  # median predicted time of the next request


@dataclass(frozen=True)
class Idle:
    model_id: str
    until: float
    probability: float  # of a request before `until`


@dataclass
class PrefetchPlan:
    keep_alive: list[KeepAlive] = field(default_factory=list)
    prewarm: list[Prewarm] = field(default_factory=list)
    idle: list[Idle] = field(default_factory=list)


class PrefetchPlanner:
    """Decides, every `interval_s`, which models RAM should keep and which it should fetch now.

    Keep-alive: a model in RAM whose chance of a request within `keep_horizon_s` is at
    least `keep_threshold`, until now + `keep_horizon_s` (renewed by the next plan while
    it holds). Prewarm: a model outside RAM whose chance of a request before a fetch
    started at the *next* round could land (lead = fetch seconds from its tier + `margin_s`,
    plus `interval_s`) is at least `prewarm_threshold`; it is then kept alive until that
    window has passed. Both are ranked by expected cold-start seconds saved per byte and cut
    at `keep_share` and `prewarm_share` of the RAM capacity, so the hints never claim all of
    RAM and a wrong prediction costs at most a bounded share of it.
    """

    def __init__(
        self,
        capacity: int,
        bandwidths: Mapping[str, float] | None = None,
        interval_s: float = 30.0,
        margin_s: float = 10.0,
        keep_horizon_s: float = 600.0,
        keep_threshold: float = 0.3,
        prewarm_threshold: float = 0.3,
        keep_share: float = 0.5,
        prewarm_share: float = 0.25,
        min_gaps: int = 3,
        refetch_from: str = "nvme",
        prewarm_from: tuple[str, ...] = ("nvme", "ssd"),
        idle_horizon_s: float = 3600.0,
        idle_threshold: float = 0.05,
    ) -> None:
        self.capacity = capacity
        self.refetch_from = refetch_from  # where a model evicted from RAM would come back from
        self.bandwidths: dict[str, float] = {**DEFAULT_BANDWIDTH, **(bandwidths or {})}
        self.interval_s = interval_s
        self.margin_s = margin_s
        self.keep_horizon_s = keep_horizon_s
        self.keep_threshold = keep_threshold
        self.prewarm_threshold = prewarm_threshold
        self.keep_share = keep_share
        self.prewarm_share = prewarm_share
        self.min_gaps = min_gaps
        self.prewarm_from = prewarm_from
        self.idle_horizon_s = idle_horizon_s
        self.idle_threshold = idle_threshold
        self.usage: dict[str, ModelUsage] = {}

    def record(self, model_id: str, t: float) -> bool:
        """A request for `model_id` at `t` (epoch seconds); False when older than its last request."""
        return self.usage.setdefault(model_id, ModelUsage()).record(t)

    def forget(self, model_id: str) -> None:
        self.usage.pop(model_id, None)

    def fetch_s(self, size: int, tier: str) -> float:
        return size / self.bandwidths[tier]

    def plan(self, now: float, models: Mapping[str, ModelState]) -> PrefetchPlan:
        """Keep-alive and prewarm decisions at `now` for the models given (others are ignored)."""
        plan = PrefetchPlan()
        keep: list[tuple[float, int, KeepAlive]] = []
        warm: list[tuple[float, int, Prewarm]] = []
        for model_id, state in models.items():
            usage = self.usage.get(model_id)
            if usage is None or state.size <= 0:
                continue
            if state.tier == "ram":
                p = usage.p_within(now, self.keep_horizon_s, self.min_gaps)
                if usage.histogram.gaps >= self.min_gaps:
                    q = usage.p_within(now, self.idle_horizon_s, self.min_gaps)
                    if q <= self.idle_threshold:
                        plan.idle.append(Idle(model_id, now + self.idle_horizon_s, q))
                if p >= self.keep_threshold:
                    value = p * self.fetch_s(state.size, self.refetch_from) / state.size
                    keep.append((value, state.size, KeepAlive(model_id, now + self.keep_horizon_s, p)))
                continue
            if state.tier not in self.prewarm_from:
                continue
            fetch_s = self.fetch_s(state.size, state.tier)
            window = fetch_s + self.margin_s + self.interval_s
            p = usage.p_within(now, window, self.min_gaps)
            if p >= self.prewarm_threshold:
                item = Prewarm(model_id, state.tier, fetch_s, p, usage.next_use(now, self.min_gaps))
                warm.append((p * fetch_s / state.size, state.size, item))
        kept_bytes = 0
        for _, size, k in sorted(keep, key=lambda x: -x[0]):
            if kept_bytes + size <= self.keep_share * self.capacity:
                plan.keep_alive.append(k)
                kept_bytes += size
        warm_bytes = 0
        for _, size, w in sorted(warm, key=lambda x: -x[0]):
            if warm_bytes + size <= self.prewarm_share * self.capacity:
                plan.prewarm.append(w)
                until = now + w.fetch_s + self.margin_s + self.interval_s + self.keep_horizon_s
                plan.keep_alive.append(KeepAlive(w.model_id, until, w.probability))
                warm_bytes += size
        return plan
