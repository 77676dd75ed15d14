"""The cost-aware policy in the live system: a Zipf trace replayed through real tiers, real
processes and the node cache actor, with `cost` and with `lru`, against the simulation's
prediction for the same trace.

The catalog and trace are `cache_policy.py`'s (sizes log-uniform, 5-unit shards, Zipf
popularity in bursts), scaled to this machine: a "GB" of the simulation is a MB here, so
the catalog is a few hundred MB of random blobs in a file:// remote, RAM is a directory in
/dev/shm and NVMe one on disk, both with the simulation's shares of the catalog. Several
Ray worker processes on the node (replicas, as far as the cache can tell; each model is
served by one of them) call `ModelStore.ensure_local(model, tier="ram")` for each request
in trace order, so every fetch, fill, hit and eviction is the real code's.

Cold-start seconds are counted as the simulation counts them: each request that had to
fetch waits size / bandwidth for every blob it took from NVMe or the remote, at the tier
bandwidths both share (the remote here is a local directory, so its wall time would not
show a slow link; wall seconds are recorded too). The same trace runs through the
simulation (`helios_evict_only`, i.e. the cost policy without prefetch, and `lru`), and through
Belady's offline policy (each tier evicts the blob used again farthest in the future), the
floor no online policy can go below: `sim.belady_over_lru` says how much room the trace leaves.

Three live runs: `cost` and `lru` through the node cache (one policy per tier per node),
and `cost` with `storage.node_cache: false` (each process keeps its own policy, as before
the node cache), which shows what the shared view is worth.

    python benchmarks/cache_live.py [--quick] [--out PATH] [--alpha 1.0] [--processes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache_policy
from common import machine

from helios.config import DEFAULT_BANDWIDTH, StorageConfig

ROOT = Path(__file__).resolve().parents[1]
SCALE = 1e-3  # a simulated GB is a MB here
# Bandwidths scale with the sizes, so a shard's transfer time, and its weight against the policy's
# fixed per-fetch latency, is the simulation's: a 5 MB shard from the remote costs 25 s as a 5 GB one does.
BANDWIDTH = {kind: max(1, int(bw * SCALE)) for kind, bw in DEFAULT_BANDWIDTH.items()}


def log(msg: str) -> None:
    print(f"[cache_live {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StoreProcess:
    """One worker process using the store as a replica does: one store, kept across requests."""

    def __init__(self, storage: dict[str, Any], cache_root: str) -> None:
        from helios.storage.store import ModelStore

        self.store = ModelStore.from_config(StorageConfig.model_validate(storage), Path(cache_root))

    def load(self, model: str) -> dict[str, Any]:
        started = time.perf_counter()
        local = self.store.ensure_local(model, "v1", tier="ram")
        return {"sources": local.sources, "fetched": local.fetched_bytes, "wall_s": time.perf_counter() - started,
                "pid": os.getpid()}


def scaled_catalog(w: cache_policy.Workload) -> list[cache_policy.Model]:
    """The simulation's catalog with every size scaled (shards keep their names until pushed)."""
    models = cache_policy.make_catalog(w)
    for m in models:
        m.shards = [(d, max(1, int(s * SCALE))) for d, s in m.shards]
        m.size = sum(s for _, s in m.shards)
    return models


def publish(models: list[cache_policy.Model], remote: Path, work: Path) -> None:
    """Random blobs per shard, pushed as model directories into the remote; shard names become
    the blobs' digests so the simulation and the live run talk about the same blobs."""
    from helios.storage.store import ModelStore

    cfg = StorageConfig.model_validate({"tiers": [
        {"kind": "nvme", "path": str(work / "push-local"), "capacity": "1GiB"},
        {"kind": "remote", "url": f"file://{remote}"},
    ]})
    store = ModelStore.from_config(cfg, work, shared=False)
    for m in tqdm(models, desc="publishing", unit="model"):
        src = work / "src" / m.id
        src.mkdir(parents=True)
        (src / "config.json").write_text(json.dumps({"model": m.id}))
        for j, (_, size) in enumerate(m.shards):
            (src / f"model-{j:05d}.safetensors").write_bytes(os.urandom(size))
        manifest = store.push(src, m.id, "v1")
        m.shards = [(f.sha256, f.size) for f in manifest.files]  # what a load brings, in the manifest's order
        m.size = sum(size for _, size in m.shards)
        shutil.rmtree(src)
    shutil.rmtree(work / "push-local", ignore_errors=True)


def live_storage(remote: Path, ram: Path, nvme: Path, caps: dict[str, int], eviction: str, shared: bool) -> dict:
    return {
        "tiers": [
            {"kind": "ram", "path": str(ram), "capacity": caps["ram"], "eviction": eviction,
             "bandwidth": BANDWIDTH["ram"]},
            {"kind": "nvme", "path": str(nvme), "capacity": caps["nvme"], "eviction": eviction,
             "bandwidth": BANDWIDTH["nvme"]},
            {"kind": "remote", "url": f"file://{remote}", "bandwidth": BANDWIDTH["remote"]},
        ],
        "node_cache": shared,
    }


def replay(name: str, trace: list[tuple[float, int]], models: list[cache_policy.Model], storage: dict,
           cache_root: Path, processes: int) -> dict[str, Any]:
    """Every request of the trace, in order, through `processes` worker processes."""
    import ray

    actor = ray.remote(StoreProcess).options(num_cpus=0)
    procs = [actor.remote(storage, str(cache_root)) for _ in range(processes)]
    bw = {k: float(v) for k, v in BANDWIDTH.items()}
    cold_s = wall_s = 0.0
    cold_starts = hits = 0
    bytes_from: dict[str, int] = {}
    pids: set[int] = set()
    for _, i in tqdm(trace, desc=name, unit="req"):
        r = ray.get(procs[i % processes].load.remote(models[i].id))
        pids.add(r["pid"])
        wall_s += r["wall_s"]
        waited = sum(n / bw[src] for src, n in r["sources"].items() if src != "ram")
        for src, n in r["sources"].items():
            bytes_from[src] = bytes_from.get(src, 0) + n
        if waited > 0:
            cold_s += waited
            cold_starts += 1
        else:
            hits += 1
    for p in procs:
        ray.kill(p)
    return {"cold_start_s": cold_s, "cold_starts": cold_starts, "hits": hits, "requests": len(trace),
            "bytes_from": bytes_from, "wall_s": round(wall_s, 2), "processes": len(pids)}


def replay_model(models: list[cache_policy.Model], trace: list[tuple[float, int]], caps: dict[str, int],
                 policy: str) -> dict[str, Any]:
    """The simulation of one policy over the trace with the live replay's semantics: the real
    policy classes on `cache_policy.SimTier`s, one policy per tier, transfers landing at once
    (the live replay waits for each load before the next request), and `ModelStore`'s steps: a
    blob comes from the first tier holding it, a RAM hit also counts in NVMe's policy, a blob
    taken from NVMe is a hit there, and after a load that fetched anything every blob of the
    model missing from NVMe is offered to it (the fill behind the load, if the policy admits it)."""
    from helios.storage.eviction import CostAwarePolicy, LRUPolicy

    clock = cache_policy.Clock()
    bw = {k: float(v) for k, v in BANDWIDTH.items()}
    if policy == "cost":
        nvme = cache_policy.SimTier("nvme", caps["nvme"], CostAwarePolicy("remote", bw, clock=clock), clock)
        ram_policy = CostAwarePolicy("nvme", bw, locate=lambda d: "nvme" if nvme.has(d) else "remote", clock=clock)
    elif policy == "belady":  # offline: what no online policy can beat on this trace
        next_use = cache_policy.next_use(models, trace, clock)
        nvme = cache_policy.SimTier("nvme", caps["nvme"], cache_policy.BeladyPolicy(next_use), clock)
        ram_policy = cache_policy.BeladyPolicy(next_use)
    else:
        nvme = cache_policy.SimTier("nvme", caps["nvme"], LRUPolicy(), clock)
        ram_policy = LRUPolicy()
    ram = cache_policy.SimTier("ram", caps["ram"], ram_policy, clock)
    cold_s, cold_starts = 0.0, 0
    for t, i in trace:
        clock.now = t
        blobs = models[i].shards
        protected = {d for d, _ in blobs}
        waited = 0.0
        for digest, size in blobs:
            clock.now += 1e-6  # the live tiers see each access at its own time: no ties in LRU order
            if ram.has(digest):
                ram.touch(digest)
                nvme.touch(digest)  # ModelStore touches the slower tiers too, held there or not
                continue
            source = "nvme" if nvme.has(digest) else "remote"
            waited += size / bw[source]
            if source == "nvme":
                nvme.touch(digest)
            ram.commit(digest, size, protected)
        if waited > 0:
            cold_s += waited
            cold_starts += 1
            for digest, size in blobs:
                clock.now += 1e-6
                if not nvme.has(digest) and nvme.policy.admit(digest, size, nvme.used + size - nvme.capacity):
                    nvme.commit(digest, size, protected)
    return {"cold_start_s": cold_s, "cold_starts": cold_starts, "requests": len(trace)}


def simulate(models: list[cache_policy.Model], trace: list[tuple[float, int]], caps: dict[str, int]) -> dict[str, Any]:
    """The prediction the live run is held to (`replay_model`), and for context `cache_policy`'s own
    timed simulation of the same trace (transfers take their time, requests queue behind them)."""
    out: dict[str, Any] = {p: replay_model(models, trace, caps, p) for p in ("cost", "lru", "belady")}
    out["cost_over_lru"] = out["cost"]["cold_start_s"] / out["lru"]["cold_start_s"]
    # The floor for any policy under the same steps: how much room below LRU the trace leaves.
    out["belady_over_lru"] = out["belady"]["cold_start_s"] / out["lru"]["cold_start_s"]
    storage = StorageConfig.model_validate({"tiers": [
        {"kind": "ram", "capacity": caps["ram"], "bandwidth": BANDWIDTH["ram"]},
        {"kind": "nvme", "capacity": caps["nvme"], "bandwidth": BANDWIDTH["nvme"]},
        {"kind": "remote", "url": "s3://sim/helios", "bandwidth": BANDWIDTH["remote"]},
    ]})
    timed = {}
    for policy, label in (("helios_evict_only", "cost"), ("lru", "lru")):
        r = cache_policy.Simulation(models, trace, policy, storage).run()
        timed[label] = {"cold_start_s": r["cold_start_s"], "cold_starts": r["cold_starts"]}
    timed["cost_over_lru"] = timed["cost"]["cold_start_s"] / timed["lru"]["cold_start_s"]
    out["timed"] = timed
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short trace: 1500 requests (about 5 minutes)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cache_live.json")
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of model popularity")
    ap.add_argument("--processes", type=int, default=3, help="worker processes on the node")
    ap.add_argument("--requests", type=int, default=None, help="trace length (default 1500 quick, 12000 full)")
    ap.add_argument("--models", type=int, default=None, help="catalog size (default 30)")
    args = ap.parse_args()
    started = time.monotonic()

    import ray

    n_models = args.models or 30
    n_requests = args.requests or (1500 if args.quick else 12000)
    # the simulation's catalog shape (1-140 "GB", 5-unit shards, RAM 15 % / NVMe 30 %) at half its
    # models; a replay covers hours of the simulation's week, and short windows vary (README)
    w = cache_policy.Workload(n_models=n_models, max_gb=140.0)
    models = scaled_catalog(w)
    trace: list[tuple[float, int]] = []
    duration = n_requests / w.rate
    while len(trace) < n_requests:  # bursts start at random offsets: the first stretch is sparse
        duration *= 2
        w = cache_policy.Workload(**{**w.__dict__, "duration_s": duration})
        trace = cache_policy.make_trace(models, args.alpha, w)
    trace = trace[:n_requests]
    catalog = sum(m.size for m in models)
    caps = {"ram": max(int(w.ram_share * catalog), max(m.size for m in models) + (1 << 20)),
            "nvme": int(w.nvme_share * catalog)}
    log(f"{len(models)} models, {catalog / 1e6:.0f} MB, {len(trace)} requests; RAM {caps['ram'] / 1e6:.0f} MB, "
        f"NVMe {caps['nvme'] / 1e6:.0f} MB, {args.processes} processes")

    work = Path(tempfile.mkdtemp(prefix="helios-cache-live-"))
    shm = Path(tempfile.mkdtemp(prefix="helios-cache-live-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        remote = work / "remote"
        publish(models, remote, work)
        sim = simulate(models, trace, caps)
        log(f"simulation: cost/lru {sim['cost_over_lru']:.3f}, offline optimum (Belady)/lru "
            f"{sim['belady_over_lru']:.3f} (timed simulation {sim['timed']['cost_over_lru']:.3f})")
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        live: dict[str, Any] = {}
        for name, eviction, shared in (("cost", "cost", True), ("lru", "lru", True), ("cost_per_process", "cost", False)):
            ram, nvme = shm / name, work / name / "nvme"
            storage = live_storage(remote, ram, nvme, caps, eviction, shared)
            live[name] = replay(name, trace, models, storage, work / name, args.processes)
            log(f"{name}: cold start {live[name]['cold_start_s']:.2f} s over {live[name]['cold_starts']} cold starts")
            shutil.rmtree(ram, ignore_errors=True)
            shutil.rmtree(work / name, ignore_errors=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    cost_over_lru = live["cost"]["cold_start_s"] / live["lru"]["cold_start_s"]
    per_process = live["cost_per_process"]["cold_start_s"] / live["lru"]["cold_start_s"]
    report = {
        "benchmark": "cache_live",
        "quick": args.quick,
        "machine": machine(),
        "live": {"cost_over_lru": cost_over_lru, "per_process_cost_over_lru": per_process, **live},
        "sim": sim,
        "difference": abs(cost_over_lru - sim["cost_over_lru"]),
        "targets": {"live_within_0.05_of_sim": abs(cost_over_lru - sim["cost_over_lru"]) <= 0.05,
                    "live_cost_over_lru_below_0.9": cost_over_lru < 0.9},
        "config": {"alpha": args.alpha, "models": len(models), "catalog_bytes": catalog, "requests": len(trace),
                   "capacities": caps, "processes": args.processes, "scale": SCALE,
                   "bandwidths": BANDWIDTH, "workload": w.__dict__},
        "cold_start_seconds": "modelled: size / bandwidth of each blob a request took from NVMe or the remote",
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    log(f"live cost/lru {cost_over_lru:.3f} (per-process policies {per_process:.3f}), simulation "
        f"{sim['cost_over_lru']:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
