"""Which blobs the RAM and NVMe tiers keep: Helios's policy vs LRU vs Belady, on a simulated trace.

No engines and no disks: a seeded catalog of models (sizes log-uniform 1-140 GB, split
into 5 GB shards as on the Hub) is requested by a Zipf popularity (alpha 0.8, 1.0, 1.2)
in bursts (per model an on-off process: Markov-modulated Poisson for most models, a
jittered period for the share that are scheduled jobs). Each request needs its model in
RAM; a shard not there is fetched from NVMe or, failing that, the remote tier, at the
bandwidths of a Helios storage config, and the request waits for it (its cold start).
Fetched shards are promoted into RAM and filled behind into NVMe (when NVMe's policy admits
them), and a hit in RAM also counts for the NVMe copy, as `ModelStore` does.

The policies are the real classes from `helios/storage` driven by a simulated clock:
- helios: `CostAwarePolicy` on both tiers (RAM's asks whether a shard is still on NVMe
  through its `locate` hook) plus `PrefetchPlanner` every 30 s: its keep-alive hints go
  to the RAM policy, its prewarms are fetched into RAM.
- helios_evict_only: the same eviction without the planner (what prefetch adds).
- lru: `LRUPolicy` on both tiers.
- belady: evict the shard whose model is next requested farthest in the future (offline,
  knows the trace). With variable sizes and two tiers that is the standard Belady
  heuristic, an approximation of the optimum, not the optimum itself; it does not prefetch.

Prefetches are paid for: they evict like any fetch, share the source link (a demand fetch
waits for prefetch traffic already queued on its link; a prefetch queued after a demand
fetch starts when it ends), and a request arriving before its prefetch has landed waits
for the rest and counts as a miss.

    python benchmarks/cache_policy.py [--quick] [--out PATH] [--config serve_configs/local.yaml]
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from helios.config import StorageConfig
from helios.storage.eviction import CostAwarePolicy, EvictionPolicy, LRUPolicy
from helios.storage.prefetch import ModelState, PrefetchPlanner

ROOT = Path(__file__).resolve().parents[1]
GB = 10**9
SHARD = 5 * GB
ALPHAS = (0.8, 1.0, 1.2)
POLICY_NAMES = ("helios", "helios_evict_only", "lru", "belady")


def log(msg: str) -> None:
    print(f"[cache_policy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- workload


@dataclass
class Model:
    id: str
    size: int
    shards: list[tuple[str, int]]
    periodic: bool = False


@dataclass(frozen=True)
class Workload:
    n_models: int = 60
    min_gb: float = 1.0
    max_gb: float = 140.0
    duration_s: float = 7 * 86400
    rate: float = 0.3  # requests/s over the whole catalog
    burst_requests: float = 40.0  # mean requests per burst
    on_s: float = 600.0  # mean length of a burst (shorter for models that come back sooner)
    periodic_share: float = 0.25  # models that are scheduled jobs (a jittered period)
    jitter: float = 0.05  # of the period, for periodic models
    ram_share: float = 0.15
    nvme_share: float = 0.30
    seed: int = 7


def make_catalog(w: Workload) -> list[Model]:
    """Sizes log-uniform in [min_gb, max_gb], split into 5 GB shards; a seeded share are periodic."""
    rng = random.Random(w.seed)
    models = []
    for i in range(w.n_models):
        size = int(GB * math.exp(rng.uniform(math.log(w.min_gb), math.log(w.max_gb))))
        shards = [(f"m{i:03d}-s{j:02d}", min(SHARD, size - j * SHARD)) for j in range(math.ceil(size / SHARD))]
        models.append(Model(f"m{i:03d}", size, shards))
    for m in rng.sample(models, round(w.periodic_share * w.n_models)):
        m.periodic = True
    return models


def make_trace(models: list[Model], alpha: float, w: Workload) -> list[tuple[float, int]]:
    """(time, model index), sorted. Zipf ranks are a seeded shuffle of the catalog, so size and
    popularity are independent. A model's bursts come every burst_requests / rate_i seconds on
    average: exponential gaps (on-off Markov-modulated Poisson) or a jittered period."""
    rng = random.Random(w.seed * 1000 + round(alpha * 100))
    ranks = list(range(len(models)))
    rng.shuffle(ranks)
    weights = [1.0 / (r + 1) ** alpha for r in ranks]
    total = sum(weights)
    trace: list[tuple[float, int]] = []
    for i, m in enumerate(models):
        rate = w.rate * weights[i] / total
        cycle = w.burst_requests / rate
        on = min(w.on_s, cycle / 3)
        t = rng.uniform(0, cycle)
        while t < w.duration_s:
            length = on * rng.uniform(0.5, 1.5) if m.periodic else rng.expovariate(1 / on)
            s = t + rng.expovariate(w.burst_requests / on)
            while s < min(t + length, w.duration_s):
                trace.append((s, i))
                s += rng.expovariate(w.burst_requests / on)
            if m.periodic:
                t += cycle * (1 + rng.gauss(0, w.jitter))
            else:
                t += length + rng.expovariate(1 / max(cycle - on, 1.0))
    trace.sort()
    return trace


# --------------------------------------------------------------------------- the hierarchy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimTier:
    """A local tier's bookkeeping without files: `commit` makes room by the policy's plan and
    inserts, as `LocalTier.commit` does when a transfer has landed (bytes in flight take no room,
    as `partial/` files do not)."""

    def __init__(self, kind: str, capacity: int, policy: EvictionPolicy, clock: Clock) -> None:
        self.kind, self.capacity, self.policy, self.clock = kind, capacity, policy, clock
        self.size: dict[str, int] = {}
        self.used = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.refused = 0

    def has(self, digest: str) -> bool:
        return digest in self.size

    def touch(self, digest: str) -> None:
        self.policy.on_hit(digest, self.clock.now)

    def commit(self, digest: str, size: int, protected: Collection[str]) -> bool:
        """Evict by the policy's plan until the shard fits, then insert it; False (not cached) when
        the policy cannot free enough."""
        if digest in self.size:
            return True
        need = self.used + size - self.capacity
        if need > 0:
            victims = self.policy.plan(need, set(protected) | {digest})
            if sum(self.size[v] for v in victims) < need:
                self.refused += 1
                return False
            for v in victims:
                freed = self.size.pop(v)
                self.used -= freed
                self.policy.on_remove(v)
                self.evictions += 1
                self.evicted_bytes += freed
        self.size[digest] = size
        self.used += size
        self.policy.on_insert(digest, size, self.clock.now)
        return True


@dataclass
class Link:
    """Reads from one source tier: prefetches queue on it; demand fetches wait only for them."""

    prefetch_until: float = 0.0
    demand_until: float = 0.0


def next_use(models: list[Model], trace: list[tuple[float, int]], clock: Clock) -> Callable[[str], float]:
    """Belady's key: when a shard's model is next requested after `clock.now` (inf if never)."""
    model_of = {d: i for i, m in enumerate(models) for d, _ in m.shards}
    times: list[list[float]] = [[] for _ in models]
    for t, i in trace:
        times[i].append(t)

    def key(digest: str) -> float:
        ts = times[model_of[digest]]
        k = bisect.bisect_right(ts, clock.now)
        return ts[k] if k < len(ts) else math.inf

    return key


class BeladyPolicy(EvictionPolicy):
    """Evict the shard whose model is requested next farthest in the future (offline)."""

    def __init__(self, next_use: Callable[[str], float]) -> None:
        self._size: dict[str, int] = {}
        self.next_use = next_use

    def on_insert(self, digest: str, size: int, now: float) -> None:
        self._size[digest] = size

    def on_hit(self, digest: str, now: float) -> None:
        pass

    def on_remove(self, digest: str) -> None:
        self._size.pop(digest, None)

    def plan(self, need: int, protected: Collection[str] = ()) -> list[str]:
        victims, freed = [], 0
        candidates = [d for d in self._size if d not in protected]
        for digest in sorted(candidates, key=self.next_use, reverse=True):
            if freed >= need:
                break
            victims.append(digest)
            freed += self._size[digest]
        return victims

    def known(self) -> dict[str, int]:
        return dict(self._size)


@dataclass
class Metrics:
    requests: int = 0
    hits: int = 0
    requested_bytes: int = 0
    hit_bytes: int = 0
    cold_start_s: float = 0.0  # per cold start: the wait of the request that found its model not ready
    cold_starts: int = 0
    request_wait_s: float = 0.0  # every request's wait, those that queued behind a cold start included
    waited_on_prefetch_s: float = 0.0  # part of cold_start_s: waits for prefetch traffic on a link
    late_prefetch_requests: int = 0  # requests that found their prefetch still in flight
    bytes_from: dict[str, int] = field(default_factory=lambda: {"nvme": 0, "remote": 0})
    prefetch_bytes: int = 0
    prefetch_used_bytes: int = 0  # prefetched bytes a request found in RAM or on their way (not evicted first)

    def report(self, tiers: list[SimTier]) -> dict:
        return {
            "cold_start_s": self.cold_start_s,
            "hit_ratio": self.hits / max(self.requests, 1),
            "byte_hit_ratio": self.hit_bytes / max(self.requested_bytes, 1),
            "requests": self.requests,
            "hits": self.hits,
            "cold_starts": self.cold_starts,
            "mean_cold_start_s": self.cold_start_s / max(self.cold_starts, 1),
            "request_wait_s": self.request_wait_s,
            "waited_on_prefetch_s": self.waited_on_prefetch_s,
            "late_prefetch_requests": self.late_prefetch_requests,
            "bytes_from_nvme": self.bytes_from["nvme"],
            "bytes_from_remote": self.bytes_from["remote"],
            "prefetch_bytes": self.prefetch_bytes,
            "prefetch_used_bytes": self.prefetch_used_bytes,
            "evictions": {t.kind: t.evictions for t in tiers},
            "evicted_bytes": {t.kind: t.evicted_bytes for t in tiers},
            "refused_commits": {t.kind: t.refused for t in tiers},
        }


class Simulation:
    """One policy over one trace: RAM and NVMe `SimTier`s in front of a remote that has everything."""

    def __init__(self, models: list[Model], trace: list[tuple[float, int]], policy: str, storage: StorageConfig,
                 planner_kwargs: dict | None = None) -> None:
        self.models, self.trace, self.policy = models, trace, policy
        self.clock = Clock()
        self.bw = {t.kind: float(t.bytes_per_s()) for t in storage.tiers}
        caps = {t.kind: int(t.capacity) for t in storage.tiers if t.kind != "remote"}
        self.links = {"nvme": Link(), "remote": Link()}
        self.prefetched: set[str] = set()
        self.inflight: dict[str, float] = {}  # digest -> when its transfer into RAM lands
        self.arrivals: list[tuple[float, str, int, str, int]] = []  # heap: (lands, digest, size, source, model)
        self.by_id = {m.id: m for m in models}
        self.waiting_until: dict[int, float] = {}  # model -> end of the cold start its requests wait for
        self.planner: PrefetchPlanner | None = None
        if policy.startswith("helios"):
            ram_policy = CostAwarePolicy("nvme", self.bw, locate=self._locate, clock=self.clock)
            nvme_policy = CostAwarePolicy("remote", self.bw, clock=self.clock)
            if policy == "helios":
                self.planner = PrefetchPlanner(caps["ram"], self.bw, **(planner_kwargs or {}))
        elif policy == "lru":
            ram_policy, nvme_policy = LRUPolicy(), LRUPolicy()
        elif policy == "belady":
            key = next_use(models, trace, self.clock)
            ram_policy, nvme_policy = BeladyPolicy(key), BeladyPolicy(key)
        else:
            raise ValueError(f"unknown policy {policy!r}; choose one of {POLICY_NAMES}")
        self.ram = SimTier("ram", caps["ram"], ram_policy, self.clock)
        self.nvme = SimTier("nvme", caps["nvme"], nvme_policy, self.clock)
        self.m = Metrics()

    def _locate(self, digest: str) -> str:
        """The RAM policy's `locate` hook: a shard evicted from RAM comes back from NVMe if it is there."""
        return "nvme" if self.nvme.has(digest) else "remote"


    def run(self, progress: tqdm | None = None, interval_s: float = 30.0) -> dict:
        next_tick = 0.0
        for n, (t, i) in enumerate(self.trace):
            while self.planner is not None and next_tick <= t:
                self._land(next_tick)
                self.clock.now = next_tick
                self._plan_round()
                next_tick += interval_s
            self._land(t)
            self.clock.now = t
            self._request(i)
            if progress is not None and n % 1000 == 999:
                progress.update(1000)
        if progress is not None:
            progress.update(len(self.trace) % 1000)
        return self.m.report([self.ram, self.nvme])

    # -- transfers ------------------------------------------------------------------------

    def _source(self, digest: str) -> str:
        return "nvme" if self.nvme.has(digest) else "remote"

    def _start(self, digest: str, size: int, source: str, start: float, model: int) -> float:
        """A transfer into RAM from `source` beginning at `start`; returns when it lands."""
        done = start + size / self.bw[source]
        self.inflight[digest] = done
        heapq.heappush(self.arrivals, (done, digest, size, source, model))
        self.m.bytes_from[source] += size
        return done

    def _land(self, until: float) -> None:
        """Commit every transfer that has landed by `until`, at its own time (RAM, and NVMe behind it)."""
        while self.arrivals and self.arrivals[0][0] <= until:
            done, digest, size, source, model = heapq.heappop(self.arrivals)
            self.clock.now = done
            self.inflight.pop(digest, None)
            protected = {d for d, _ in self.models[model].shards}
            self.ram.commit(digest, size, protected)
            if source == "remote" and self.nvme.policy.admit(digest, size, self.nvme.used + size - self.nvme.capacity):
                self.nvme.commit(digest, size, protected)  # filled behind the load, as ModelStore does

    # -- requests -------------------------------------------------------------------------

    def _request(self, index: int) -> None:
        model, now = self.models[index], self.clock.now
        if self.planner is not None:
            self.planner.record(model.id, now)
        done, ready_bytes, late = now, 0, False
        for digest, size in model.shards:
            if digest in self.prefetched:  # its first request since the prefetch
                self.prefetched.discard(digest)
                if self.ram.has(digest) or digest in self.inflight:  # not evicted before it was used
                    self.m.prefetch_used_bytes += size
                    late = late or digest in self.inflight
            if self.ram.has(digest):
                self.ram.touch(digest)
                if self.nvme.has(digest):
                    self.nvme.touch(digest)  # a hit counts for the slower copy too, as ModelStore does
                ready_bytes += size
            elif digest in self.inflight:  # already coming (a prefetch, or an earlier request's fetch)
                done = max(done, self.inflight[digest])
            else:
                source = self._source(digest)
                link = self.links[source]
                start = max(done, link.prefetch_until)
                self.m.waited_on_prefetch_s += start - done
                done = self._start(digest, size, source, start, index)
                link.demand_until = max(link.demand_until, done)
                if source == "nvme":
                    self.nvme.touch(digest)
        self.m.requests += 1
        self.m.requested_bytes += model.size
        self.m.hit_bytes += ready_bytes
        self.m.late_prefetch_requests += late
        if done <= now:
            self.m.hits += 1
            return
        self.m.request_wait_s += done - now
        if self.waiting_until.get(index, 0.0) <= now:  # a new cold start, not a request queued behind one
            self.m.cold_start_s += done - now
            self.m.cold_starts += 1
        self.waiting_until[index] = max(self.waiting_until.get(index, 0.0), done)

    # -- the planner ----------------------------------------------------------------------

    def _plan_round(self) -> None:
        now = self.clock.now
        states = {}
        for m in self.models:
            if m.id not in self.planner.usage:
                continue
            if all(self.ram.has(d) or d in self.inflight for d, _ in m.shards):
                tier = "ram"
            elif all(self.ram.has(d) or d in self.inflight or self.nvme.has(d) for d, _ in m.shards):
                tier = "nvme"
            else:
                tier = "remote"
            states[m.id] = ModelState(m.size, tier)
        plan = self.planner.plan(now, states)
        for k in plan.keep_alive:
            self.ram.policy.set_keepalive([d for d, _ in self.by_id[k.model_id].shards], k.until)
        for idle in plan.idle:
            self.ram.policy.set_idle([d for d, _ in self.by_id[idle.model_id].shards], idle.until)
        for p in plan.prewarm:
            self._prewarm(self.by_id[p.model_id])

    def _prewarm(self, model: Model) -> None:
        """Fetch a model into RAM on idle links only: a prewarm starts when no fetch is in flight on
        any link it needs (so at most one prewarm per link; the next round decides again)."""
        now = self.clock.now
        missing = [(d, size, self._source(d)) for d, size in model.shards
                   if not self.ram.has(d) and d not in self.inflight]
        if any(max(self.links[src].prefetch_until, self.links[src].demand_until) > now for _, _, src in missing):
            return
        index = self.models.index(model)
        for digest, size, source in missing:
            link = self.links[source]
            link.prefetch_until = self._start(digest, size, source, max(now, link.prefetch_until), index)
            self.m.prefetch_bytes += size
            self.prefetched.add(digest)


# --------------------------------------------------------------------------- the run


def storage_config(catalog_bytes: int, w: Workload, config: Path | None) -> StorageConfig:
    """Bandwidths from a Serve config's storage section (or the config models' defaults); capacities
    as shares of the catalog; the remote tier holds everything."""
    tiers = {"ram": {"kind": "ram"}, "nvme": {"kind": "nvme"}, "remote": {"kind": "remote", "url": "s3://sim/helios"}}
    if config is not None:
        import yaml

        doc = yaml.safe_load(config.read_text())
        apps = doc.get("applications", [doc])
        section = next((a.get("args", {}).get("storage") for a in apps if a.get("args", {}).get("storage")), None)
        for t in (section or {}).get("tiers", []):
            if t["kind"] in tiers and t.get("bandwidth"):
                tiers[t["kind"]]["bandwidth"] = t["bandwidth"]
    tiers["ram"]["capacity"] = int(w.ram_share * catalog_bytes)
    tiers["nvme"]["capacity"] = int(w.nvme_share * catalog_bytes)
    return StorageConfig.model_validate({"tiers": list(tiers.values())})


def run(w: Workload, alphas: tuple[float, ...] = ALPHAS, policies: tuple[str, ...] = POLICY_NAMES,
        config: Path | None = None, progress: bool = True) -> dict:
    """Simulate every policy at every alpha; the report `main` writes as JSON."""
    started = time.monotonic()
    models = make_catalog(w)
    catalog = sum(m.size for m in models)
    storage = storage_config(catalog, w, config)
    largest = max(m.size for m in models)
    if int(storage.tiers[0].capacity) < largest:
        raise ValueError(f"RAM ({storage.tiers[0].capacity} B) is smaller than the largest model ({largest} B)")
    traces = {a: make_trace(models, a, w) for a in alphas}
    bar = tqdm(total=sum(len(tr) for tr in traces.values()) * len(policies), unit="req", disable=not progress,
               desc="simulating")
    results: dict = {}
    for a in alphas:
        results[f"{a:.1f}"] = {p: Simulation(models, traces[a], p, storage).run(bar) for p in policies}
    bar.close()
    ratios: dict = {}
    for a, r in results.items():
        if "helios" in r and "lru" in r:
            ratios[f"{a}_helios_over_lru_cold_start"] = r["helios"]["cold_start_s"] / r["lru"]["cold_start_s"]
        if "helios" in r and "belady" in r:
            ratios[f"{a}_helios_over_belady_cold_start"] = r["helios"]["cold_start_s"] / r["belady"]["cold_start_s"]
        if "lru" in r and "belady" in r:
            ratios[f"{a}_lru_over_belady_cold_start"] = r["lru"]["cold_start_s"] / r["belady"]["cold_start_s"]
    met = {a: ratios[f"{a}_helios_over_lru_cold_start"] <= 0.85 for a in results
           if f"{a}_helios_over_lru_cold_start" in ratios}
    return {
        "benchmark": "cache_policy",
        "alphas": results,
        "ratios": ratios,
        "targets_met": {"helios_le_0.85x_lru_cold_start_at_every_alpha": all(met.values()) if met else None, **met},
        "config": {
            "workload": w.__dict__,
            "catalog": {"models": len(models), "bytes": catalog, "largest": largest,
                        "periodic_models": sum(m.periodic for m in models),
                        "shards": sum(len(m.shards) for m in models)},
            "requests": {f"{a:.1f}": len(tr) for a, tr in traces.items()},
            "tiers": {t.kind: {"capacity": int(t.capacity) if t.kind != "remote" else None,
                               "bandwidth": t.bytes_per_s()} for t in storage.tiers},
            "storage_config": str(config) if config else "defaults of helios.config tier models",
            "planner": "PrefetchPlanner defaults, interval 30 s",
            "belady": "offline: evicts the shard whose model is requested next farthest in the future; with "
                      "variable sizes and two tiers this is the standard Belady heuristic, an approximation of "
                      "the optimum, and it does not prefetch",
            "cold_start": "seconds each request waited for its model's missing shards: size / bandwidth of the "
                          "tier each comes from (NVMe or remote), plus waits for prefetch traffic queued on that "
                          "link, plus the rest of a transfer already in flight; requests served from RAM wait 0",
        },
        "seconds": time.monotonic() - started,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = list(report["alphas"])
    policies = list(report["alphas"][alphas[0]])
    colors = {"helios": "#1f77b4", "helios_evict_only": "#aec7e8", "lru": "#ff7f0e", "belady": "#2ca02c"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(policies)
    for k, p in enumerate(policies):
        xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(alphas))]
        cold = [report["alphas"][al][p]["cold_start_s"] / 3600 for al in alphas]
        hits = [report["alphas"][al][p]["hit_ratio"] for al in alphas]
        a.bar(xs, cold, width, label=p, color=colors.get(p))
        b.bar(xs, hits, width, label=p, color=colors.get(p))
        for x, c in zip(xs, cold):
            a.text(x, c, f"{c:.0f}", ha="center", va="bottom", fontsize=7)
    for ax, title in ((a, "Total cold start (hours, lower is better)"), (b, "RAM hit ratio (higher is better)")):
        ax.set_xticks(range(len(alphas)), [f"Zipf alpha {al}" for al in alphas])
        ax.set_title(title, fontsize=10)
    a.legend(fontsize=8)
    c = report["config"]["catalog"]
    fig.suptitle(f"Cache policies on a simulated trace: {c['models']} models, {c['bytes'] / 1e12:.1f} TB, "
                 f"RAM {report['config']['workload']['ram_share']:.0%} / NVMe "
                 f"{report['config']['workload']['nvme_share']:.0%} of the catalog")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out: Path) -> None:
    """The JSON report at `out` and its chart beside it (same name, .png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))


def summary(report: dict) -> str:
    lines = [(f"{'alpha':<6} {'policy':<18} {'cold start h':>12} {'hit ratio':>10} {'byte hit':>9} "
              f"{'prefetch TB':>11} {'remote TB':>10}")]
    for a, r in report["alphas"].items():
        for p, m in r.items():
            lines.append(f"{a:<6} {p:<18} {m['cold_start_s'] / 3600:>12.1f} {m['hit_ratio']:>10.3f} "
                         f"{m['byte_hit_ratio']:>9.3f} {m['prefetch_bytes'] / 1e12:>11.2f} "
                         f"{m['bytes_from_remote'] / 1e12:>10.2f}")
    for k, v in report["ratios"].items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="One simulated day instead of a week (under 2 minutes).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_policy.json")
    parser.add_argument("--config", type=Path, default=None,
                        help="A Serve config whose storage section gives tier bandwidths (default: config defaults).")
    parser.add_argument("--seed", type=int, default=Workload.seed)
    parser.add_argument("--periodic-share", type=float, default=Workload.periodic_share,
                        help="Share of models that are scheduled jobs (a jittered period).")
    args = parser.parse_args(argv)
    w = Workload(seed=args.seed, periodic_share=args.periodic_share,
                 duration_s=86400 if args.quick else Workload.duration_s)
    report = run(w, config=args.config)
    report["quick"] = args.quick
    write(report, args.out)
    print(summary(report), flush=True)
    log(f"wrote {args.out} and {args.out.with_suffix('.png')} after {report['seconds']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
