"""The registry's prefetch rounds: feed the planner every request, plan every interval, act on the plan.

`PrefetchPlanner` (`helios/storage/prefetch.py`) decides; this module gives it the facts
and carries the decisions out. Facts: each model's default version, its bytes (the
manifest) and the fastest tier holding all of it (the registry's own store, upgraded by
what nodes reported to the warm view). Decisions go to every alive node as one Ray task
per node (`NodeDispatcher`):

- keep-alive and idle hints are written to `<ram tier root>/hints.json`: eviction policies
  live in each replica's process, and every `LocalTier` reads the file when it syncs its
  policy, before it plans an eviction;
- prewarms bring the version into the RAM tier on the nodes running replicas of the model
  (every node when none does), and only from a local tier: a node that has the model only on
  the remote skips it, as the planner's `prewarm_from` says.

A round runs in three steps so the actor holds its lock only around registry state:
`targets` reads the store (unlocked), `decide` asks the planner (locked: requests mutate
it), the dispatcher waits on the nodes (unlocked), and `finish` records what happened.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from helios.observability.logs import get_logger, log_event
from helios.registry.catalog import VersionRecord
from helios.registry.usage import UsageBook
from helios.storage.manifest import Manifest
from helios.storage.node_ops import apply_on_node, fastest_kind, held_locally, ram_tier
from helios.storage.prefetch import (
    Idle,
    KeepAlive,
    ModelState,
    ModelUsage,
    PrefetchPlan,
    PrefetchPlanner,
    Prewarm,
)
from helios.storage.store import ModelStore

logger = get_logger("registry.prefetch")

SETTLE_S = 5.0
"""Seconds a request stamp waits before it is final: routers send usage once a second, each on its own."""
MAX_SKEW_S = 60.0
"""Stamps further than this in the future are refused (a skewed clock)."""

Resolve = Callable[[str, str, str], Manifest]
"""(model id, version, source) -> the version's manifest (raises HeliosError when the store lacks it)."""
WarmTiers = Mapping[str, Mapping[str, Mapping[str, int]]]
"""node id -> model id -> tier kind -> bytes cached there (the warm view's `tiers`)."""


@dataclass(frozen=True)
class Target:
    """A model's default version as the planner sees it."""

    model_id: str
    version: str
    manifest: Manifest
    tier: str  # the fastest tier holding all of it, here or on any node that reported


@dataclass
class NodePlan:
    """A plan and its blob hints (digest -> until, what a tier's eviction policy reads)."""

    plan: PrefetchPlan
    keep_alive: dict[str, float] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, plan: PrefetchPlan, targets: Mapping[str, Target]) -> NodePlan:
        out = cls(plan)
        for i in plan.idle:
            out.idle.update(dict.fromkeys(_digests(targets[i.model_id]), i.until))
        for k in plan.keep_alive:
            for digest in _digests(targets[k.model_id]):
                out.keep_alive[digest] = max(k.until, out.keep_alive.get(digest, 0.0))
                out.idle.pop(digest, None)  # a blob shared with an idle version stays: keep-alive wins
        return out

    @property
    def empty(self) -> bool:
        return not (self.keep_alive or self.idle or self.plan.prewarm)


@dataclass
class Decision:
    """One round's plans, translated into blob hints and per-node prewarm work.

    `cluster` is made on the cluster-wide view (the registry's own tiers and the warm view)
    and goes to nodes that have not yet reported what they hold; `nodes` holds a plan per
    node that has, made on that node's own tiers: a model in RAM on one node and only on NVMe
    on another is kept alive on the first and prewarmed on the second."""

    at: float
    targets: dict[str, Target]
    cluster: NodePlan
    nodes: dict[str, NodePlan] = field(default_factory=dict)
    prewarm_nodes: dict[str, list[str]] = field(default_factory=dict)  # model id -> replica nodes ([]: any)

    def _for(self, node_id: str | None) -> NodePlan:
        return self.nodes.get(node_id, self.cluster)  # type: ignore[arg-type]

    @property
    def empty(self) -> bool:
        return self.cluster.empty and all(n.empty for n in self.nodes.values())

    def plans(self) -> list[PrefetchPlan]:
        """The plans in effect: every node's own, or the cluster-wide one while no node has reported."""
        return [n.plan for n in self.nodes.values()] or [self.cluster.plan]

    def hints(self, node_id: str | None = None) -> dict[str, dict[str, float]]:
        mine = self._for(node_id)
        return {"keep_alive": dict(mine.keep_alive), "idle": dict(mine.idle)}

    def prewarms_for(self, node_id: str, alive: Iterable[str]) -> list[dict[str, Any]]:
        """Manifests (as JSON) to bring into RAM on `node_id`: of the models its plan prewarms, those
        whose replicas run there, and those with no replica on an alive node (they may start anywhere)."""
        alive = set(alive)
        out = []
        for p in self._for(node_id).plan.prewarm:
            nodes = set(self.prewarm_nodes.get(p.model_id, ())) & alive
            if not nodes or node_id in nodes:
                out.append(self.targets[p.model_id].manifest.model_dump(mode="json"))
        return out

    def report(self) -> list[dict[str, Any]]:
        """Every target's manifest (as JSON), for nodes to say which of their tiers hold it."""
        return [t.manifest.model_dump(mode="json") for t in self.targets.values()]


class Prefetcher:
    """The registry's planner and what it needs to act: the store, the interval, manifests seen."""

    def __init__(
        self,
        store: ModelStore | None,
        interval_s: float,
        bandwidths: Mapping[str, float] | None = None,
        planner: PrefetchPlanner | None = None,
        retry_s: float = 300.0,
    ) -> None:
        """`retry_s`: how long a default version the store cannot resolve (a plain directory) is
        left out before it is looked up again."""
        self.store = store
        self.interval_s = interval_s
        self.ram = ram_tier(store)
        capacity = self.ram.capacity if self.ram else 0
        self.planner = planner or PrefetchPlanner(capacity, bandwidths, interval_s=interval_s or 30.0)
        self.retry_s = retry_s
        self.last: dict[str, Any] | None = None  # the last round, for status()
        self._manifests: dict[tuple[str, str, str, str | None], Manifest] = {}
        self._unresolved: dict[tuple[str, str, str, str | None], float] = {}
        self._state: dict[str, str] = {}  # model id -> "keep_alive" | "idle": log changes, not renewals
        self._reports: dict[str, tuple[float, dict[str, str]]] = {}  # node -> (round, model -> fastest tier)
        self._pending: list[tuple[float, str]] = []  # (time, model id) heap of stamps not yet settled
        self._dirty = False  # histograms changed since state() was last taken
        self.dropped = {"future": 0, "late": 0}  # stamps no histogram took, by reason

    @property
    def enabled(self) -> bool:
        """Rounds run only with an interval and a RAM tier to prewarm into and hint."""
        return self.interval_s > 0 and self.ram is not None

    # --- usage ---
    def record(self, counts: Mapping[str, Iterable[float]], now: float | None = None) -> None:
        """Request timestamps per model. They wait `SETTLE_S` before reaching the histograms:
        router replicas send their batches independently, so stamps arrive out of order, and a
        histogram only takes gaps in time order. Stamps from the future (a skewed clock) are
        dropped, or they would freeze the model's history until that time."""
        now = time.time() if now is None else now
        for model_id, stamps in counts.items():
            for s in stamps:
                t = float(s)
                if t > now + MAX_SKEW_S:
                    self.dropped["future"] += 1
                    continue
                heapq.heappush(self._pending, (t, model_id))
        self.release(now)

    def release(self, now: float) -> None:
        """Feed the histograms every pending stamp older than `now - SETTLE_S`, oldest first."""
        while self._pending and self._pending[0][0] <= now - SETTLE_S:
            t, model_id = heapq.heappop(self._pending)
            if not self.planner.record(model_id, t):
                self.dropped["late"] += 1
            self._dirty = True

    def seed(self, book: UsageBook, saved: Mapping[str, Any] | None = None) -> None:
        """Restore the histograms a restarted registry had: the saved ones (`state()`), then the
        persisted requests newer than each; models without a saved histogram are rebuilt from the
        retained history (which, bounded, may lack a busy model's older long gaps)."""
        restored = 0
        for model_id, data in (saved or {}).items():
            usage = ModelUsage.from_dict(data)
            if usage is not None and model_id in book.models:
                self.planner.usage[model_id] = usage
                restored += 1
        for model_id, u in book.models.items():
            known = self.planner.usage.get(model_id)
            after = known.last if known is not None and known.last is not None else float("-inf")
            for t in u.times:  # sorted
                if t > after:
                    self.planner.record(model_id, t)
        if saved is not None:
            log_event(logger, "prefetch_seeded", restored=restored, rebuilt=len(book.models) - restored)

    def state(self) -> dict[str, Any] | None:
        """The histograms as JSON-ready data when they changed since the last call, else None."""
        if not self._dirty:
            return None
        self._dirty = False
        return {m: u.to_dict() for m, u in self.planner.usage.items()}

    def forget(self, model_id: str) -> None:
        self.planner.forget(model_id)
        self._pending = [e for e in self._pending if e[1] != model_id]
        heapq.heapify(self._pending)
        self._state.pop(model_id, None)
        self._dirty = True

    # --- a round ---
    def targets(
        self, candidates: Iterable[tuple[str, VersionRecord]], warm: WarmTiers, resolve: Resolve
    ) -> dict[str, Target]:
        """Each candidate's manifest and fastest tier (reads the store and local tiers; no registry state)."""
        now = time.time()
        out = {}
        for model_id, record in candidates:
            if model_id not in self.planner.usage:
                continue  # never requested: nothing to predict, no need to look it up
            manifest = self._manifest(model_id, record, resolve, now)
            if manifest is None or manifest.total_bytes <= 0:
                continue
            try:
                tier = self._fastest(model_id, manifest, warm)
            except Exception as exc:  # noqa: BLE001 - an unreadable tier: this model sits the round out
                log_event(logger, "prefetch_tier_unreadable", model=model_id, error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            out[model_id] = Target(model_id, record.version, manifest, tier)
        return out

    def decide(self, now: float, targets: Mapping[str, Target], replicas: Mapping[str, list[str]]) -> Decision:
        """The planner's verdict at `now` as blob hints and prewarm work; logs every change of mind."""
        self.release(now)
        states = {m: ModelState(t.manifest.total_bytes, t.tier) for m, t in targets.items()}
        d = Decision(now, dict(targets), NodePlan.of(self.planner.plan(now, states), targets))
        for node, tiers in self.node_reports(now).items():
            mine = {m: ModelState(s.size, tiers.get(m, s.tier)) for m, s in states.items()}
            d.nodes[node] = NodePlan.of(self.planner.plan(now, mine), targets)
        for node, node_plan in [(n, p.plan) for n, p in d.nodes.items()] or [("unreported", d.cluster.plan)]:
            for p in node_plan.prewarm:
                t = targets[p.model_id]
                d.prewarm_nodes[p.model_id] = sorted(replicas.get(p.model_id, ()))
                log_event(
                    logger, "prefetch_prewarm", model=p.model_id, version=t.version, source=p.source, node=node,
                    bytes=t.manifest.total_bytes, fetch_s=round(p.fetch_s, 1), probability=round(p.probability, 3),
                    expected_use=p.expected_use, replica_nodes=d.prewarm_nodes[p.model_id] or "all",
                )
        self._log_changes(_merged(d.plans()))
        return d

    def node_reports(self, now: float) -> dict[str, dict[str, str]]:
        """node id -> model id -> the fastest of its tiers holding the model, from recent rounds only
        (a node that stopped reporting, gone or busy for long, falls back to the cluster-wide view)."""
        horizon = now - max(10 * self.interval_s, 600.0)
        self._reports = {n: r for n, r in self._reports.items() if r[0] >= horizon}
        return {n: tiers for n, (_, tiers) in self._reports.items()}

    def finish(
        self, decision: Decision, results: Mapping[str, Mapping[str, Any]], seconds: float, error: str | None = None
    ) -> dict:
        """Record a round's outcome (what each node did) for status(), and log each prewarm's result."""
        done: dict[str, dict[str, Any]] = {}
        for node, result in results.items():
            tiers = result.get("tiers")
            if isinstance(tiers, dict):
                self._reports[node] = (decision.at, {str(m): str(k) for m, k in tiers.items()})
            why = {k: result[k] for k in ("error", "busy_since") if k in result}
            if why:
                log_event(logger, "prefetch_node_skipped", node=node, **why)
            for item in result.get("prewarmed", ()):
                done.setdefault(item["model"], {})[node] = item
                log_event(logger, "prefetch_prewarmed", node=node, **item)
        plan = _merged(decision.plans())
        self.last = {
            "last_run": decision.at,
            "seconds": round(seconds, 3),
            "error": error,
            "models": len(decision.targets),
            "prewarmed": [
                {"model": p.model_id, "version": decision.targets[p.model_id].version, "source": p.source,
                 "probability": round(p.probability, 3), "expected_use": p.expected_use,
                 "nodes": done.get(p.model_id, {})}
                for p in plan.prewarm
            ],
            "keep_alive": [_hinted(k) for k in plan.keep_alive],
            "idle": [_hinted(i) for i in plan.idle],
            "nodes": {n: {"keep_alive": sorted({k.model_id for k in p.plan.keep_alive}),
                          "idle": sorted({i.model_id for i in p.plan.idle}),
                          "prewarm": sorted({w.model_id for w in p.plan.prewarm})} for n, p in decision.nodes.items()},
        }
        return self.last

    def status(self) -> dict:
        return {"enabled": self.enabled, "interval_s": self.interval_s, "pending_stamps": len(self._pending),
                "dropped_stamps": dict(self.dropped), **(self.last or {"last_run": None})}

    # --- internals ---
    def _manifest(self, model_id: str, record: VersionRecord, resolve: Resolve, now: float) -> Manifest | None:
        key = (model_id, record.version, record.source, record.manifest_digest)
        if key in self._manifests:
            return self._manifests[key]
        if self._unresolved.get(key, 0.0) > now:
            return None
        try:
            manifest = resolve(model_id, record.version, record.source)
        except Exception as exc:  # noqa: BLE001 - a directory model, the remote down, a corrupt manifest
            self._unresolved[key] = now + self.retry_s
            log_event(logger, "prefetch_unresolved", model=model_id, version=record.version, error=str(exc)[:200])
            return None
        if len(self._manifests) > 10_000:  # bounded: versions come and go
            self._manifests.clear()
        self._manifests[key] = manifest
        return manifest

    def _fastest(self, model_id: str, manifest: Manifest, warm: WarmTiers) -> str:
        """The fastest tier holding the whole version: local tiers here (stats, no network), or a faster
        one a node reported; "remote" when none does (the store's durable copy)."""
        kinds = set(held_locally(self.store, manifest)) if self.store else set()
        for models in warm.values():
            kinds |= {k for k, size in models.get(model_id, {}).items() if size >= manifest.total_bytes}
        return fastest_kind(kinds)

    def _log_changes(self, plan: PrefetchPlan) -> None:
        now_state = {i.model_id: "idle" for i in plan.idle} | {k.model_id: "keep_alive" for k in plan.keep_alive}
        for item in (*plan.keep_alive, *plan.idle):
            state = now_state[item.model_id]
            if isinstance(item, KeepAlive) == (state == "keep_alive") and self._state.get(item.model_id) != state:
                log_event(logger, f"prefetch_{state}", **_hinted(item))
        for model_id in self._state.keys() - now_state.keys():
            log_event(logger, "prefetch_released", model=model_id, was=self._state[model_id])
        self._state = now_state


def _merged(plans: list[PrefetchPlan]) -> PrefetchPlan:
    """One plan for status and logs: each model once, kept alive if any node keeps it, idle if every
    node that decided on it called it idle, prewarmed if any node prewarms it."""
    if len(plans) == 1:
        return plans[0]
    keep: dict[str, KeepAlive] = {}
    warm: dict[str, Prewarm] = {}
    idle: dict[str, Idle] = {}
    for p in plans:
        for k in p.keep_alive:
            if k.model_id not in keep or k.until > keep[k.model_id].until:
                keep[k.model_id] = k
        for w in p.prewarm:
            warm.setdefault(w.model_id, w)
        for i in p.idle:
            idle.setdefault(i.model_id, i)
    return PrefetchPlan(list(keep.values()), list(warm.values()), [i for m, i in idle.items() if m not in keep])


def _hinted(item: KeepAlive | Idle) -> dict[str, Any]:
    return {"model": item.model_id, "until": item.until, "probability": round(item.probability, 3)}


def _digests(target: Target) -> list[str]:
    return [f.sha256 for f in target.manifest.files]


class NodeDispatcher:
    """Runs each round on every alive node, at most one prewarm in flight per node: a call on the
    node's cache actor (`storage.node_cache`, the default), so the round's hints and prewarms reach
    the one policy every process there uses, or else a Ray task pinned there. A node still busy
    with a long prewarm gets only the round's hints (a call of its own), and the prewarm's result
    is reported when it lands."""

    def __init__(self, storage: dict[str, Any], cache_root: str, prewarm_from: Iterable[str]) -> None:
        self.storage = storage
        self.cache_root = cache_root
        self.prewarm_from = list(prewarm_from)
        self.node_cache = bool(storage.get("node_cache", True))
        self._inflight: dict[str, tuple[Any, float]] = {}  # node id -> (object ref, started)
        self._task: Any = None  # the Ray remote function, made once
        self._hint_refs: list[Any] = []  # hints-only calls sent to busy nodes, not waited on

    def _submit(self, node: str, name: str, *args: Any) -> Any:
        """One node's share of a round, on its cache actor or as a pinned task: an object ref."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self.node_cache:
            from helios.storage.node_cache import node_cache_handle

            return node_cache_handle(self.storage, self.cache_root, node).prefetch_round.remote(*args)
        if self._task is None:
            self._task = ray.remote(num_cpus=0, max_retries=0)(apply_on_node)
        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        return self._task.options(scheduling_strategy=strategy, name=name).remote(self.storage, self.cache_root, *args)

    def run(self, decision: Decision, wait_s: float) -> dict[str, dict[str, Any]]:
        """node id -> what it did (or {"error"} / {"busy_since"}), waiting at most `wait_s` for this round."""
        import ray

        from helios.storage.node_ops import alive_nodes

        results = self.collect(0)
        nodes = alive_nodes()
        report = decision.report()
        if self._hint_refs:  # forget the hints-only calls that are done
            _, self._hint_refs = ray.wait(self._hint_refs, num_returns=len(self._hint_refs), timeout=0)
        for node in nodes:
            hints = decision.hints(node)
            if node in self._inflight:  # still prewarming: this round's hints go out on their own
                results[node] = {"busy_since": self._inflight[node][1]}
                self._hint_refs.append(self._submit(node, "helios-hints", hints, [], self.prewarm_from))
                continue
            ref = self._submit(node, "helios-prefetch", hints, decision.prewarms_for(node, nodes), self.prewarm_from,
                               report)
            self._inflight[node] = (ref, time.time())
        results.update(self.collect(wait_s))
        return results

    def collect(self, wait_s: float) -> dict[str, dict[str, Any]]:
        import ray

        if not self._inflight:
            return {}
        refs = {ref: node for node, (ref, _) in self._inflight.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
        out = {}
        for ref in ready:
            node = refs[ref]
            del self._inflight[node]
            try:
                out[node] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the node died, or the task failed: say so, next round tries again
                out[node] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        return out
