"""How long requests wait for capacity under bursty load: Serve's default autoscaling, Helios reactive, Helios predictive.

A trace-driven simulation over the real policy code, in simulated time (no Ray, no engine):

- `serve_default`: Ray Serve's own `replica_queue_length_autoscaling_policy` wrapped by
  `_apply_autoscaling_config`, exactly as Serve's controller wraps it (upscale/downscale
  delays, scaling factors, the cold-start fast path), fed Serve's metric: ongoing requests
  (on replicas plus queued at the router), averaged over `look_back_period_s`;
- `reactive`: Helios's `RegistryBoundedPolicy` (`helios/scaling/policy.py`) with prediction
  off, wrapped the same way, fed the replicas' `record_autoscaling_stats` series
  (`ctx.raw_metrics`: running, waiting, KV-cache use);
- `predictive`: the same policy with prediction on: burst onsets from the load it sees,
  and the model's request-gap histogram (as the registry would hand it over, requests
  settled `SETTLE_S` after they arrive).

All three run under the same autoscaling config (the one `helios.engine.deployment.autoscaling_config`
gives an engine deployment: upscale 2 s, downscale 10 s, target ongoing requests per
replica) with `min_replicas: 0`, and see metrics `report_delay_s` old. Serve's delay
logic reads `time.time()`; the simulation points it at its own clock.

The cluster: a replica starts `cold_start_s` (uniform in a range, seeded) after the
policy asks for it and costs replica-seconds from then until it is stopped and drained.
It runs `slots` requests at once while their KV fits (each request holds a seeded share
of the KV cache for a seeded service time) and holds up to `max_ongoing` (the rest
waits inside it, as in vLLM); beyond that requests queue at the router and go to the
least-loaded ready replica. A request's *wait for capacity* is from its arrival until it
starts running on an engine. Traces: periodic bursts (start jittered) over Poisson
background, seeded; the first `warmup_s` of every trace trains the policies and is not
counted (a deployed policy has seen yesterday's bursts).

    python benchmarks/scaling.py [--quick] [--out PATH]

Then a short real run (`benchmarks/scaling_real.py`): the demo model on a real Serve app,
started from zero and scaled up by a burst, Helios against Serve's default autoscaling as
Ray Serve LLM runs it (`--quick`: Helios alone; `--no-real`: the simulation alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.serve.autoscaling_policy as serve_policy
from ray.serve._private.common import TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import machine

from helios.scaling.policy import RegistryBoundedPolicy
from helios.storage.prefetch import ModelUsage

POLICIES = ("serve_default", "reactive", "predictive")
SETTLE_S = 5.0  # the registry's settle time for request stamps (helios/registry/prefetch.py)


def log(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class Scenario:
    name: str
    period_s: float
    burst_s: float
    burst_rps: float
    background_rps: float
    jitter_s: float = 10.0


SCENARIOS = (
    Scenario("bursts_over_background", period_s=600, burst_s=90, burst_rps=10.0, background_rps=1.0),
    Scenario("short_frequent_bursts", period_s=300, burst_s=45, burst_rps=14.0, background_rps=1.5),
    Scenario("quiet_model_scale_to_zero", period_s=900, burst_s=60, burst_rps=6.0, background_rps=0.0),
)


@dataclass
class Sim:
    """Cluster and workload parameters (the defaults are the committed run's)."""

    dt: float = 0.5
    slots: int = 16
    max_ongoing: int = 32
    target_ongoing: float = 16.0
    max_replicas: int = 8
    service_s: float = 4.0  # mean; lognormal, sigma 0.5
    kv_share: float = 1 / 20  # mean KV share of one request; lognormal, sigma 0.6
    cold_start_s: tuple[float, float] = (20.0, 70.0)
    report_delay_s: float = 5.0
    look_back_s: float = 30.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0
    lead_s: float = 90.0
    warmup_s: float = 3600.0


@dataclass
class Request:
    arrival: float
    service: float
    kv: float
    start: float | None = None


@dataclass
class Replica:
    rid: str
    ready_at: float
    started_at: float
    running: list[tuple[float, Request]] = field(default_factory=list)  # (finish time, request)
    waiting: deque[Request] = field(default_factory=deque)
    stopping: bool = False

    def kv(self) -> float:
        return sum(r.kv for _, r in self.running)

    def unfinished(self) -> int:
        return len(self.running) + len(self.waiting)


def trace(sc: Scenario, duration: float, seed: int, sim: Sim) -> list[Request]:
    """Poisson background plus bursts every `period_s` (start jittered), each request with its service and KV."""
    rng = random.Random(seed)
    times: list[float] = []
    t = 0.0
    while sc.background_rps > 0:
        t += rng.expovariate(sc.background_rps)
        if t >= duration:
            break
        times.append(t)
    start = sc.period_s / 2
    while start < duration:
        s = start + rng.uniform(-sc.jitter_s, sc.jitter_s)
        t = s
        while True:
            t += rng.expovariate(sc.burst_rps)
            if t >= min(s + sc.burst_s, duration):
                break
            times.append(t)
        start += sc.period_s
    times.sort()
    sd, kd = 0.5, 0.6
    return [Request(a, rng.lognormvariate(math.log(sim.service_s) - sd * sd / 2, sd),
                    min(0.9, rng.lognormvariate(math.log(sim.kv_share) - kd * kd / 2, kd))) for a in times]


class Clock:
    """Serve's delay logic calls `time.time()`: this answers with simulated time."""

    now = 0.0

    @classmethod
    def time(cls) -> float:
        return cls.now


def make_policy(name: str, sim: Sim) -> tuple[Any, RegistryBoundedPolicy | None]:
    if name == "serve_default":
        return serve_policy._apply_autoscaling_config(serve_policy.replica_queue_length_autoscaling_policy), None
    helios = RegistryBoundedPolicy("sim-model", 0, sim.max_replicas, predictive=name == "predictive",
                                   lead_s=sim.lead_s, registry=lambda: None)
    return serve_policy._apply_autoscaling_config(helios), helios


def run(policy_name: str, sc: Scenario, duration: float, seed: int, sim: Sim) -> dict[str, Any]:
    """One policy over one trace: waits of the requests after warm-up, replica-seconds, replica counts."""
    rng = random.Random(seed * 7919 + 1)
    requests = trace(sc, duration, seed, sim)
    config = AutoscalingConfig(min_replicas=0, max_replicas=sim.max_replicas, initial_replicas=1,
                               target_ongoing_requests=sim.target_ongoing, upscale_delay_s=sim.upscale_delay_s,
                               downscale_delay_s=sim.downscale_delay_s, look_back_period_s=sim.look_back_s)
    policy, helios = make_policy(policy_name, sim)
    usage = ModelUsage()
    replicas: list[Replica] = [Replica("r0", 0.0, 0.0)]
    draining: list[Replica] = []
    router: deque[Request] = deque()
    history: deque[tuple[float, float, dict[str, tuple[int, int, int, float]]]] = deque()
    state: dict[str, Any] = {}
    target, next_id, i_arr, i_usage = 1, 1, 0, 0
    replica_s, counts = 0.0, []
    steps = int(duration / sim.dt)
    for step in range(steps + 1):
        now = step * sim.dt
        Clock.now = now
        while i_arr < len(requests) and requests[i_arr].arrival <= now:
            router.append(requests[i_arr])
            i_arr += 1
        ready = [r for r in replicas if r.ready_at <= now]
        for r in ready + draining:  # finish, then start waiting requests that fit
            r.running = [(f, q) for f, q in r.running if f > now]
            while r.waiting and len(r.running) < sim.slots and r.kv() + r.waiting[0].kv <= 1.0:
                q = r.waiting.popleft()
                q.start = now
                r.running.append((now + q.service, q))
        draining = [r for r in draining if r.running]
        while router and ready:  # the router sends to the least-loaded ready replica with room
            best = min(ready, key=Replica.unfinished)
            if best.unfinished() >= sim.max_ongoing:
                break
            q = router.popleft()
            if len(best.running) < sim.slots and not best.waiting and best.kv() + q.kv <= 1.0:
                q.start = now
                best.running.append((now + q.service, q))
            else:
                best.waiting.append(q)
        stats = {r.rid: (r.unfinished(), len(r.running), len(r.waiting), r.kv()) for r in ready}
        history.append((now, sum(s[0] for s in stats.values()) + len(router), stats))
        while history and history[0][0] < now - sim.report_delay_s - sim.look_back_s - 1:
            history.popleft()
        while i_usage < i_arr and requests[i_usage].arrival <= now - SETTLE_S:  # the registry's request history
            usage.record(requests[i_usage].arrival)
            i_usage += 1
        if helios is not None:
            helios.usage = usage
        ctx = context(now, history, sim, config, ready, target, len(router), state)
        decision, state = policy(ctx)
        target = max(0, min(sim.max_replicas, math.ceil(decision)))
        next_id = resize(replicas, draining, router, target, now, next_id, rng, sim)
        if now >= sim.warmup_s:
            replica_s += (len(replicas) + len(draining)) * sim.dt
            counts.append((now, len([r for r in replicas if r.ready_at <= now]), len(replicas)))
    waits = [q.start - q.arrival for q in requests if q.arrival >= sim.warmup_s and q.start is not None]
    unserved = sum(1 for q in requests if q.arrival >= sim.warmup_s and q.start is None)
    return {"waits": waits, "unserved": unserved, "replica_s": replica_s, "counts": counts}


def context(now: float, history: deque, sim: Sim, config: AutoscalingConfig, ready: list[Replica], target: int,
            queued: int, state: dict[str, Any]) -> AutoscalingContext:
    """What Serve's controller would hand the policy: metrics `report_delay_s` old, Serve's count averaged
    over the look-back window, each replica's raw series of its `record_autoscaling_stats` numbers."""
    seen = now - sim.report_delay_s
    window = [(t, total) for t, total, _ in history if seen - sim.look_back_s <= t <= seen]
    total = sum(v for _, v in window) / len(window) if window else 0.0
    raw: dict[str, dict[str, list[TimeStampedValue]]] = {k: {} for k in ("unfinished", "running", "waiting",
                                                                          "kv_cache_usage")}
    latest = next((s for t, _, s in reversed(history) if t <= seen), {})
    for rid, values in latest.items():
        for k, v in zip(raw, values):
            raw[k][rid] = [TimeStampedValue(seen, float(v))]
    ids = [r.rid for r in ready]
    return AutoscalingContext(
        deployment_id=None, deployment_name="engine-sim", app_name="sim", current_num_replicas=len(ready),
        target_num_replicas=target, running_replicas=ids, total_num_requests=total,
        total_queued_requests=float(queued), aggregated_metrics={}, raw_metrics=raw,
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=dict(state), last_scale_up_time=None, last_scale_down_time=None, current_time=now,
        config=config)


def resize(replicas: list[Replica], draining: list[Replica], router: deque, target: int, now: float, next_id: int,
           rng: random.Random, sim: Sim) -> int:
    """Start replicas (ready after a cold start) or stop them: starting ones first, then the least loaded,
    whose queued requests go back to the router and whose running ones drain."""
    while len(replicas) < target:
        replicas.append(Replica(f"r{next_id}", now + rng.uniform(*sim.cold_start_s), now))
        next_id += 1
    while len(replicas) > target:
        starting = [r for r in replicas if r.ready_at > now]
        victim = starting[-1] if starting else min(replicas, key=Replica.unfinished)
        replicas.remove(victim)
        router.extendleft(reversed(victim.waiting))
        victim.waiting.clear()
        if victim.running:
            draining.append(victim)
    return next_id


def p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


def plot(report: dict, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"serve_default": "#7f7f7f", "reactive": "#1f77b4", "predictive": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 2.2]})
    names = list(POLICIES)
    axes[0].bar(names, [report["p99_wait_s"][n] for n in names], color=[colors[n] for n in names])
    axes[0].set_title("p99 wait for capacity (s)")
    axes[1].bar(names, [report["replica_s"][n] / 3600 for n in names], color=[colors[n] for n in names])
    axes[1].set_title("replica-hours")
    for ax in axes[:2]:
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=15)
    sc = SCENARIOS[0].name
    ax = axes[2]
    for n in names:
        counts = runs[(n, sc)]["counts"]
        t0 = counts[0][0]
        window = [(t - t0, ready) for t, ready, _ in counts if t - t0 <= 2 * SCENARIOS[0].period_s]
        ax.step([w[0] for w in window], [w[1] for w in window], where="post", color=colors[n], label=n)
    ax.set_title(f"ready replicas, first 2 periods after warm-up ({sc})")
    ax.set_xlabel("s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle("Autoscaling on bursty traces (simulation over the real policy code)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="One seed per scenario, 3 h traces (under a minute).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    parser.add_argument("--no-real", action="store_true", help="The simulation only, without the real Serve run.")
    args = parser.parse_args()
    sim = Sim()
    duration, seeds = (3 * 3600.0, (1,)) if args.quick else (8 * 3600.0, (1, 2, 3))
    serve_policy.time = Clock  # Serve's delay logic reads time.time(): make it read simulated time
    logging.getLogger("ray.serve.helios.scaling").setLevel(logging.WARNING)  # a decision log line per change
    started = time.monotonic()
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    per_scenario: dict[str, dict[str, Any]] = {}
    pooled = {n: {"waits": [], "replica_s": 0.0, "unserved": 0} for n in POLICIES}
    for sc in SCENARIOS:
        per_scenario[sc.name] = {"scenario": vars(sc)}
        for name in POLICIES:
            merged = {"waits": [], "replica_s": 0.0, "unserved": 0}
            for seed in seeds:
                out = run(name, sc, duration, seed, sim)
                merged["waits"] += out["waits"]
                merged["replica_s"] += out["replica_s"]
                merged["unserved"] += out["unserved"]
                runs.setdefault((name, sc.name), out)
            for k, v in merged.items():
                pooled[name][k] += v
            per_scenario[sc.name][name] = {
                "requests": len(merged["waits"]), "p50_wait_s": p(merged["waits"], 0.5),
                "p99_wait_s": p(merged["waits"], 0.99), "max_wait_s": max(merged["waits"], default=0.0),
                "replica_s": merged["replica_s"], "unserved": merged["unserved"]}
            s = per_scenario[sc.name][name]
            log(f"{sc.name:27s} {name:13s} p99 wait {s['p99_wait_s']:6.1f} s, {s['replica_s'] / 3600:6.2f} replica-h")
    p99 = {n: p(pooled[n]["waits"], 0.99) for n in POLICIES}
    rs = {n: pooled[n]["replica_s"] for n in POLICIES}
    report = {
        "benchmark": "scaling",
        "quick": args.quick,
        "kind": "trace-driven simulation over helios.scaling.policy and ray.serve.autoscaling_policy",
        "machine": machine(),
        "ray": __import__("ray").__version__,
        "sim": {k: v for k, v in vars(sim).items()},
        "trace_s": duration,
        "seeds": list(seeds),
        "p99_wait_s": p99,
        "p50_wait_s": {n: p(pooled[n]["waits"], 0.5) for n in POLICIES},
        "replica_s": rs,
        "requests": {n: len(pooled[n]["waits"]) for n in POLICIES},
        "unserved": {n: pooled[n]["unserved"] for n in POLICIES},
        "ratios": {
            "predictive_over_serve_default_p99_wait": p99["predictive"] / p99["serve_default"] if p99["serve_default"] else None,
            "reactive_over_serve_default_p99_wait": p99["reactive"] / p99["serve_default"] if p99["serve_default"] else None,
            "predictive_over_serve_default_replica_s": rs["predictive"] / rs["serve_default"],
            "reactive_over_serve_default_replica_s": rs["reactive"] / rs["serve_default"],
        },
        "target": "predictive p99 wait <= 0.5x serve_default at <= 1.2x its replica-seconds",
        "scenarios": per_scenario,
        "seconds": time.monotonic() - started,
    }
    r = report["ratios"]
    report["target_met"] = (r["predictive_over_serve_default_p99_wait"] is not None
                            and r["predictive_over_serve_default_p99_wait"] <= 0.5
                            and r["predictive_over_serve_default_replica_s"] <= 1.2)
    if not args.no_real:
        from scaling_real import real_run

        report["real_run"] = real_run(args.quick)
        report["seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, runs, args.out.with_suffix(".png"))
    log(f"wrote {args.out}: p99 wait {', '.join(f'{n} {p99[n]:.1f} s' for n in POLICIES)}; predictive/default "
        f"p99 {r['predictive_over_serve_default_p99_wait']:.2f}, replica-s {r['predictive_over_serve_default_replica_s']:.2f}"
        f" (target met: {report['target_met']})")


if __name__ == "__main__":
    main()
