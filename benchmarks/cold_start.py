"""Cold start: how fast a model gets from storage to its first token, through Helios and without it.

One run, on the `bench` demo model (16 layers, hidden 2048, bf16, ~1.4 GB in 3 shards), with
a local S3 server (s3rver, Node.js, on loopback) standing in for the remote tier:

* load_gbps: reading the safetensors bytes from the on-disk NVMe tier with a cold page cache:
  a raw sequential `readinto` (the disk's ceiling), `safetensors.torch.load_file`, and
  Helios's loader (`iter_mapped_weights`, the mmapped tensors its vLLM loader hands vLLM).
  Both loaders end with every tensor copied into one preallocated destination buffer, as
  vLLM copies checkpoint tensors into its parameters, so both read and move every byte.
* s3_gbps: the model's files from s3rver to local disk: plain s3fs `get` of each file vs
  Helios's `ensure_local` (concurrent ranged reads) into an empty NVMe tier.
* first_token_s: seconds from `serve.run` (on a Ray cluster with Serve already started)
  to the first streamed token of a completion request, polled over HTTP: Helios from its
  S3, NVMe and RAM tiers (with its fetch / load / engine-start split), Ray Serve LLM
  downloading the same model from s3rver, and `engine_start`: a fresh Python process
  running `vllm.LLM(...)` on a local directory with the weights already in the page cache,
  from process spawn to its first generated token. Helios's S3 starts run twice, side by side:
  as configured (every file fetched, then the engine started) and as `*_s3_overlap` with the engine
  started beside the weights' fetch (`transfer.overlap_engine_start`); `ratios.*_s3_overlap_over_s3`
  below 1 is what the overlap gains.
* first_token_s.helios_pool_ram / helios_pool_s3: Helios with a warm pool (`engine_pool`), the
  bench model started on demand into a pooled engine host that imported vLLM ahead, its blobs in
  the RAM tier or only in S3: from the request to its first streamed token. The bench model runs
  with `engine.layout_cache`: the S3 start (run first, nothing of the model on the node, no layout
  blob) writes its weights in vLLM's layout beside the RAM tier, and the RAM start maps them, as a
  model that served on the node before does (`layout_cache_hit` per run says so); `start_split_s`
  sets the phases of a fresh start (helios_ram) beside a pooled one (imports, weights, KV
  allocation with warm-up, engine process start).
* first_token_s.helios_pool_s3_layout: the pooled start from S3 of a model that served elsewhere in
  the cluster before: nothing of it on the node, its checkpoint and its layout blob (pushed by the
  pooled RAM start, untimed) in the bucket; the start fetches the layout blob instead of the
  checkpoint's weights (`helios.storage.layout_share`). helios_pool_s3 and _s3_overlap are first
  starts anywhere (`engine.cache_in_tiers` off: no layout blob taken from or left in the bucket).
* share_weights: private memory (USS of the engine's process tree) of a second engine on
  the same RAM-tier snapshot with Helios's `share_weights` loader option on and off, and
  greedy decode tokens/s of each.

    python benchmarks/cold_start.py [--quick] [--out PATH] [--skip PARTS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s3rver
import servers
from common import bench_dtype, machine

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "cold_start"
RAM_TIER = Path("/dev/shm") / "helios-bench-cold-start"
MODEL_NAME = "bench"  # the id clients send
STORE_ID, STORE_VERSION = "bench-model", "v1"
ENGINE = {"dtype": bench_dtype(), "max_model_len": 512, "max_num_seqs": 64, "enforce_eager": True, "kv_cache_space_gib": 1}
PARTS = ("local", "s3", "rayserve", "runai", "helios", "pool", "engine", "share")
_CACHE_METHOD: str | None = None


def log(msg: str) -> None:
    print(f"[cold_start {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- page cache


def drop_page_cache(files: list[Path]) -> str:
    """Empty the page cache (all of it, as root) or at least evict `files`; returns the method used."""
    global _CACHE_METHOD
    os.sync()
    if _CACHE_METHOD in (None, "drop_caches"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            _CACHE_METHOD = "drop_caches"
            return _CACHE_METHOD
        except OSError:
            _CACHE_METHOD = "fadvise_dontneed"
    evict_from_page_cache(files)
    return _CACHE_METHOD


def evict_from_page_cache(files: list[Path]) -> None:
    """Only these files leave the page cache (fsync, then POSIX_FADV_DONTNEED)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    """Pull files into the page cache (s3rver's objects: the remote side is not our disk)."""
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def tree_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- local load rates


def raw_read(files: list[Path]) -> int:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def odirect_parallel(files: list[Path], threads: int = 8, block: int = 16 << 20) -> int:
    """The disk's limit: every byte read with O_DIRECT (no page cache), `threads` aligned blocks in
    flight across the files, as a tuned reader would do it (not one `read` loop)."""
    import mmap as mmap_mod
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, block)]
    local = threading.local()

    def read(job: tuple[Path, int]) -> int:
        path, off = job
        if not hasattr(local, "buf"):
            local.buf = mmap_mod.mmap(-1, block)  # page-aligned, as O_DIRECT needs
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [local.buf], off)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(read, jobs))


def runai_streamer_load(files: list[Path], dst) -> int:
    """Run:ai Model Streamer (vLLM's `load_format="runai_streamer"` reader): its own threads read the
    files into a CPU buffer and yield tensors, each copied into `dst`."""
    import torch
    from runai_model_streamer import SafetensorsStreamer

    total = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(f) for f in files])
        for _, t in streamer.get_tensors():
            flat = t.reshape(-1).view(torch.uint8)
            dst[: flat.numel()].copy_(flat)
            total += flat.numel()
    return total


def fastsafetensors_load(files: list[Path], dst) -> int:
    """fastsafetensors on the CPU (no GDS): files read in parallel into one buffer, tensors as views,
    each copied into `dst`."""
    import torch
    from fastsafetensors import fastsafe_open

    total = 0
    with fastsafe_open(filenames=[str(f) for f in files], nogds=True, device="cpu", debug_log=False) as f:
        for key in f.keys():  # noqa: SIM118 - not a dict: fastsafetensors has no __iter__
            flat = f.get_tensor(key).reshape(-1).view(torch.uint8)
            dst[: flat.numel()].copy_(flat)
            total += flat.numel()
    return total


def safetensors_load(files: list[Path], dst) -> int:
    """`safetensors.torch.load_file` of each file, then each tensor copied into `dst`."""
    import torch
    from safetensors.torch import load_file

    total = 0
    for path in files:
        tensors = load_file(str(path))
        for t in tensors.values():
            flat = t.reshape(-1).view(torch.uint8)
            dst[: flat.numel()].copy_(flat)
            total += flat.numel()
        del tensors
    return total


def helios_load(files: list[Path], dst) -> int:
    """Helios's loader iteration (mmapped views of the safetensors), each tensor copied into `dst`."""
    import torch

    from helios.storage.loader import iter_mapped_weights

    total = 0
    for _, t in iter_mapped_weights([str(f) for f in files]):
        flat = t.reshape(-1).view(torch.uint8)
        dst[: flat.numel()].copy_(flat)
        total += flat.numel()
    return total


def measure_local(files: list[Path], repeats: int) -> dict:
    import torch

    from helios.storage.loader import MappedSafetensors

    biggest = max(m.nbytes(k) for f in files for m in [MappedSafetensors(f)] for k in m.names())
    dst = torch.zeros(biggest, dtype=torch.uint8)  # preallocated and faulted in, like vLLM's parameters
    methods = {"raw_read": lambda: raw_read(files), "odirect_parallel": lambda: odirect_parallel(files),
               "safetensors": lambda: safetensors_load(files, dst),
               "runai_streamer": lambda: runai_streamer_load(files, dst),
               "fastsafetensors": lambda: fastsafetensors_load(files, dst),
               "helios": lambda: helios_load(files, dst)}
    rates: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # interleaved, order rotated: drift hits all alike
            fn = methods[name]
            method = drop_page_cache(files)
            t = time.perf_counter()
            nbytes = fn()
            rates[name].append(nbytes / (time.perf_counter() - t) / 1e9)
        log(f"local load round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} GB/s" for k, v in rates.items()))
    gbps = {k: median(v) for k, v in rates.items()}
    return {
        "load_gbps": gbps,
        "load_gbps_rounds": rates,
        "helios_over_raw_read": gbps["helios"] / gbps["raw_read"],
        # The disk's speed drifts between rounds; the ratio within each round is steadier.
        "helios_over_raw_read_paired": median([h / r for h, r in zip(rates["helios"], rates["raw_read"])]),
        "helios_over_safetensors": gbps["helios"] / gbps["safetensors"],
        "helios_over_best_anchor": gbps["helios"] / max(gbps["runai_streamer"], gbps["fastsafetensors"]),
        "helios_over_odirect_parallel": gbps["helios"] / gbps["odirect_parallel"],
        "load_bytes": sum(f.stat().st_size for f in files),
        "page_cache_method": method,
        "load_method": {
            "raw_read": "sequential readinto of 16 MiB into one reused buffer, file by file",
            "safetensors": "safetensors.torch.load_file per file, then every tensor copied into a preallocated "
            "buffer (torch.Tensor.copy_)",
            "helios": "helios.storage.loader.iter_mapped_weights (mmap views, MADV_SEQUENTIAL), every tensor "
            "copied into the same preallocated buffer",
            "odirect_parallel": "O_DIRECT preadv of 16 MiB aligned blocks, 8 threads across the files (no copy)",
            "runai_streamer": "runai_model_streamer.SafetensorsStreamer over the files (its default threads), every "
            "tensor copied into the preallocated buffer",
            "fastsafetensors": "fastsafetensors.fastsafe_open(nogds=True, device='cpu'), every tensor copied into "
            "the preallocated buffer",
        },
    }


# --------------------------------------------------------------------------- S3 transfer


def obstore_ranged_gbps(server, key: str, size: int, chunk: int, concurrency: int) -> float:
    """GB/s reading one object as `chunk`-byte ranged GETs through obstore, `concurrency` threads."""
    from concurrent.futures import ThreadPoolExecutor

    import obstore
    from obstore.store import S3Store

    store = S3Store(server.bucket, config={"endpoint": server.endpoint_url, "access_key_id": server.key,
                                           "secret_access_key": server.secret, "region": "us-east-1"},
                    client_options={"allow_http": True})
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = sum(pool.map(lambda off: len(obstore.get_range(store, key, start=off, end=min(off + chunk, size))),
                           range(0, size, chunk)))
    assert got == size, f"read {got} of {size} bytes"
    return size / (time.perf_counter() - started) / 1e9


def runai_streamer_s3(server, plain_prefix: str, weights: list[Path]) -> int:
    """Run:ai Model Streamer reading the weights from the S3 server (path-style, the server's
    credentials), each tensor copied into a preallocated buffer as vLLM would copy it."""
    import torch
    from runai_model_streamer import SafetensorsStreamer

    env = {**server.env, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        dst = torch.empty(512 << 20, dtype=torch.uint8)
        total = 0
        with SafetensorsStreamer() as streamer:
            streamer.stream_files([f"s3://{plain_prefix}/{f.name}" for f in weights])
            for _, t in streamer.get_tensors():
                flat = t.reshape(-1).view(torch.uint8)
                dst[: flat.numel()].copy_(flat)
                total += flat.numel()
        return total
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_s3(server, plain_prefix: str, files: list[Path], store_cfg, cache_root: Path, repeats: int,
               server_files: list[Path]) -> dict:
    import s3fs

    from helios.storage.store import ModelStore

    total = sum(f.stat().st_size for f in files)
    dl = WORK / "s3fs_download"
    nvme_only = ModelStore.from_config(store_cfg, cache_root)
    import psutil

    def cpu_s(pid: int) -> float:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)

    cpu: dict[str, dict[str, list[float]]] = {m: {"client": [], "server": []}
                                              for m in ("s3fs", "helios", "runai_streamer")}

    def timed(method: str, fn) -> float:
        c0, s0, t = cpu_s(os.getpid()), cpu_s(server.pid), time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        cpu[method]["client"].append(cpu_s(os.getpid()) - c0)
        cpu[method]["server"].append(cpu_s(server.pid) - s0)
        return dt

    rates: dict[str, list[float]] = {"s3fs": [], "helios": [], "runai_streamer": [], "ranged_get_in_memory": [],
                                     "ranged_get_in_memory_s3fs": [], "ranged_get_in_memory_obstore": []}
    biggest = max(files, key=lambda f: f.stat().st_size)
    weights = [f for f in files if f.name.endswith(".safetensors")]
    for r in range(repeats):
        # What the server and each client manage with no disk write and no hashing: the ceiling.
        warm(server_files)
        cfg = store_cfg.transfer
        key = f"{plain_prefix.split('/', 1)[1]}/{biggest.name}"
        bare = {"s3fs": s3rver.ranged_get_gbps(server, key, biggest.stat().st_size, cfg.chunk_mib << 20,
                                               cfg.concurrency)[0],
                "obstore": obstore_ranged_gbps(server, key, biggest.stat().st_size, cfg.chunk_mib << 20,
                                               cfg.concurrency)}
        for client, rate in bare.items():
            rates[f"ranged_get_in_memory_{client}"].append(rate)
        rates["ranged_get_in_memory"].append(max(bare.values()))

        # Run:ai Model Streamer streaming the weights straight from the bucket into memory (vLLM's
        # load_format="runai_streamer" reader), every tensor copied into a preallocated buffer.
        rates["runai_streamer"].append(sum(f.stat().st_size for f in weights) / timed(
            "runai_streamer", lambda: runai_streamer_s3(server, plain_prefix, weights)) / 1e9)

        # s3fs: one `get` per file, as a user of fsspec would fetch a model directory.
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir(parents=True)
        fs = s3fs.S3FileSystem(**server.storage_options, skip_instance_cache=True)
        os.sync()

        def plain_get(fs=fs) -> None:
            for f in files:
                fs.get(f"{plain_prefix}/{f.name}", str(dl / f.name))

        rates["s3fs"].append(total / timed("s3fs", plain_get) / 1e9)
        shutil.rmtree(dl, ignore_errors=True)

        nvme_only.evict(STORE_ID, STORE_VERSION)
        os.sync()  # the last run's writes are not this one's work
        got: list = []
        seconds = timed("helios", lambda got=got: got.append(nvme_only.ensure_local(STORE_ID, STORE_VERSION)))
        local = got[0]
        rates["helios"].append(local.manifest.total_bytes / seconds / 1e9)
        log(f"S3 round {r + 1}/{repeats}: s3fs {rates['s3fs'][-1]:.3f} GB/s, helios {rates['helios'][-1]:.3f} GB/s, "
            f"runai_streamer {rates['runai_streamer'][-1]:.3f} GB/s, in-memory ranged GETs s3fs "
            f"{bare['s3fs']:.3f} / obstore {bare['obstore']:.3f} GB/s "
            f"(helios fetch_s {local.timings.get('fetch_s', float('nan')):.2f})")
    nvme_only.evict(STORE_ID, STORE_VERSION)
    gbps = {k: median(v) for k, v in rates.items()}
    best_bare = max(gbps["ranged_get_in_memory"], gbps["runai_streamer"])
    return {"s3_gbps": gbps, "s3_gbps_rounds": rates, "helios_over_s3fs": gbps["helios"] / gbps["s3fs"],
            "helios_over_best_bare_s3": gbps["helios"] / best_bare,
            "helios_over_runai_streamer_s3": gbps["helios"] / gbps["runai_streamer"],
            "s3_bytes": total,
        "s3_cpu_s": {m: {k: median(v) for k, v in d.items()} for m, d in cpu.items()},
            "s3_method": {"s3fs": "s3fs.S3FileSystem.get(remote_file, local_file) for each file in turn",
                          "helios": "ModelStore.ensure_local into an empty NVMe-only tier set (ranged reads, "
                          "sliding window, sha256 verified), transfer settings as configured",
                          "ranged_get_in_memory": "the best of ranged_get_in_memory_<client>: the largest shard "
                          "as concurrent ranged GETs (same chunk size and concurrency as Helios) into memory, no "
                          "write, no hash; s3fs async and obstore threads; the ceiling of this server here",
                          "runai_streamer": "runai_model_streamer.SafetensorsStreamer over the s3:// weights "
                          "(path-style, its default concurrency) into memory, each tensor copied into a buffer"}}


# --------------------------------------------------------------------------- serve runs


class EventChild:
    """A child in its own process group that takes JSON commands on stdin and prints `PREFIX {json}`
    event lines; everything it prints goes to `log_path`, the events to a queue."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, prefix: str) -> None:
        self.prefix = prefix
        self.events: queue.Queue[dict] = queue.Queue()
        self.log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process it logs
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, text=True, bufsize=1,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if line.startswith(self.prefix):
                self.events.put(json.loads(line[len(self.prefix):]))
        self.events.put({"event": "exited", "rc": self.proc.wait()})

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()


class Controller(EventChild):
    """`servers.py cold_start PORT` in its own process group: Ray + Serve up, apps deployed on command."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path) -> None:
        self.port = port
        self.shm_before = set(Path("/dev/shm").glob("psm_*"))
        super().__init__([sys.executable, str(Path(servers.__file__)), "cold_start", str(port)], env, log_path,
                         "@@cold ")

    def expect(self, *names: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {names} from the controller in {timeout}s") from None
            if ev["event"] in names:
                return ev
            if ev["event"] in ("error", "exited"):
                raise RuntimeError(f"controller: {ev}")

    def deploy(self, system: str, args: dict, deployment: str | None = None) -> dict:
        """Deploy, and time the first token from the moment `serve.run` was called."""
        self.send(cmd="deploy", system=system, args=args)
        t0 = self.expect("deploying")["t0"]
        first = asyncio.run(first_token(f"http://127.0.0.1:{self.port}", self.proc))
        running = self.expect("running")["t"]
        result = {"first_token_s": first - t0, "serve_run_s": running - t0}
        if deployment:
            self.send(cmd="info", deployment=deployment)
            result["info"] = self.expect("info")["info"]
        return result

    def delete(self) -> None:
        """Delete the app; its replicas are killed (the measurement is over), not left to drain for 20 s."""
        import psutil

        self.send(cmd="delete")
        time.sleep(0.5)
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        doomed = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if "ServeReplica:bench" in p.name() or "ServeReplica:bench" in " ".join(p.cmdline()[:1]):
                    doomed += [p, *p.children(recursive=True)]
        # The engine core first, alone, with SIGTERM: it stops its workers and removes its shared-memory
        # queues from /dev/shm (killed all at once they are left behind); then the rest of the replica.
        def name(q) -> str:
            with contextlib.suppress(psutil.Error):
                return q.name()
            return ""

        cores = [q for q in doomed if name(q).startswith("VLLM::EngineCore")]
        for group, grace in ((cores, 15), (doomed, 5)):
            for q in group:
                with contextlib.suppress(psutil.Error):
                    q.terminate()
            _, alive = psutil.wait_procs(group, timeout=grace)
            for q in alive if group is doomed else ():
                with contextlib.suppress(psutil.Error):
                    q.kill()
        self.expect("deleted", timeout=120)
        remove_orphaned_shm(self.shm_before)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send(cmd="exit")
            self.proc.wait(60)
        servers.stop(self.proc)
        self.log.close()


def remove_orphaned_shm(before: set[Path]) -> None:
    """vLLM shared-memory queues (/dev/shm/psm_*) made since `before` that no live process maps:
    what a replica killed mid-teardown leaves behind."""
    new = set(Path("/dev/shm").glob("psm_*")) - before
    if not new:
        return
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped.update(line.rsplit("/", 1)[-1].strip() for line in maps.read_text().splitlines() if "psm_" in line)
    for path in new:
        if path.name not in mapped:
            path.unlink(missing_ok=True)


async def first_token(base: str, proc: subprocess.Popen, timeout_s: float = 900, model: str = MODEL_NAME) -> float:
    """Wall-clock time the first streamed token arrives; retries while the app is not up yet."""
    import aiohttp

    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0, "stream": True}
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited with {proc.returncode}")
            try:
                async with http.post(f"{base}/v1/completions", json=body) as resp:
                    if resp.status == 200:
                        async for line in resp.content:
                            if line.startswith(b"data: {") and json.loads(line[6:]).get("choices"):
                                return time.time()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"no first token within {timeout_s}s")


def controller_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_space_gib"]),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(servers._free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(servers._free_port()), **extra}


def measure_rayserve(server, plain_url: str, port: int, server_files: list[Path], repeats: int) -> dict:
    """Ray Serve LLM with `model_source: s3://...`: it lists the prefix and downloads every file
    with boto3 (`download_file`, threads) into HF_HUB_CACHE/models--<id>/snapshots/<hash>/, then
    starts vLLM on that directory. boto3 takes the endpoint and keys from AWS_* variables."""
    hf_cache = WORK / "rayserve_hf_cache"  # emptied before each run, as are its download locks in ~
    env = {**server.env, "HF_HUB_CACHE": str(hf_cache), "HELIOS_BENCH_CLUSTER": "plain"}
    ctl = Controller(port, controller_env(env), WORK / "rayserve_llm.log")
    runs = []
    try:
        ctl.expect("ready", timeout=180)
        args = {
            "model_loading_config": {"model_id": MODEL_NAME, "model_source": plain_url},
            "accelerator_config": {"kind": "cpu"},
            "engine_kwargs": {k: ENGINE[k] for k in ("dtype", "max_model_len", "max_num_seqs", "enforce_eager")}
            | {"seed": 0},
            "deployment_config": {"num_replicas": 1},
            "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_space_gib"]),
                                         **env, "HELIOS_BENCH_CLUSTER": "plain"}},
        }
        for r in range(repeats):
            shutil.rmtree(hf_cache, ignore_errors=True)
            for lock in Path.home().glob(f"{MODEL_NAME}*.lock"):
                lock.unlink(missing_ok=True)
            warm(server_files)
            log(f"Ray Serve LLM from S3 ({r + 1}/{repeats}): deploying")
            result = ctl.deploy("rayserve_llm", args)
            downloaded = sum(p.stat().st_size for p in tree_files(hf_cache))
            result["downloaded_bytes"] = downloaded
            if downloaded == 0:
                raise RuntimeError("Ray Serve LLM downloaded nothing into HF_HUB_CACHE: was the model local already?")
            result.update(rayserve_split(WORK / "rayserve_llm.log"))
            # The download's span from file times: refs/main is written first, the weights last.
            refs = next(hf_cache.glob("models--*/refs/main"), None)
            if refs is not None:
                result["download_s"] = max(p.stat().st_mtime for p in tree_files(hf_cache)) - refs.stat().st_mtime
            log(f"Ray Serve LLM from S3: first token after {result['first_token_s']:.1f}s "
                f"(download {result.get('download_s', float('nan')):.1f}s)")
            ctl.delete()
            runs.append(result)
    finally:
        ctl.close()
        shutil.rmtree(hf_cache, ignore_errors=True)
    return summarize(runs, ("download_s", "load_weights_s", "init_engine_s"))


def summarize(runs: list[dict], split_keys) -> dict:
    """Median first token and median of each split key over the runs, with every run kept."""
    split = {k: median([r[k] for r in runs if k in r]) for k in split_keys if any(k in r for r in runs)}
    return {"first_token_s": median([r["first_token_s"] for r in runs]), "split": split, "runs": runs}


def rayserve_split(log_path: Path) -> dict:
    """Best effort: vLLM's own load timings from the replica logs Ray forwards to the driver."""
    import re

    text = log_path.read_text(errors="replace")
    out = {}
    for key, pattern in (("load_weights_s", r"Loading weights took ([\d.]+) seconds"),
                         ("init_engine_s", r"init engine \(profile.*?took ([\d.]+) s")):
        m = re.findall(pattern, text)
        if m:
            out[key] = float(m[-1])
    return out


def helios_args(storage: dict, cache_root: Path) -> dict:
    return {
        "models": [{"id": MODEL_NAME, "source": f"store://{STORE_ID}:{STORE_VERSION}", "engine": {
            k: ENGINE[k] for k in ("dtype", "max_model_len", "max_num_seqs", "enforce_eager", "kv_cache_space_gib")}}],
        "storage": storage,
        "cache_root": str(cache_root),
    }


def helios_split(info: dict) -> dict:
    """The engine deployment's fetch / load / engine-start split, wherever `info()` puts it."""
    found: dict[str, float] = {}

    def walk(d):
        if isinstance(d, dict):
            for k, v in d.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith("_s"):
                    found.setdefault(k, float(v))
                else:
                    walk(v)

    walk(info)
    return found


def helios_controller(storage: dict, cache_root: Path, port: int, log_name: str) -> tuple[Any, Controller]:
    """The model store Helios serves from, and a controller for a Helios cluster using it."""
    from helios.config import StorageConfig
    from helios.storage.store import ModelStore

    store = ModelStore.from_config(StorageConfig.model_validate(storage), cache_root)
    ctl = Controller(port, controller_env({"HELIOS_BENCH_CLUSTER": "helios", "HELIOS_CACHE_ROOT": str(cache_root)}),
                     WORK / log_name)
    return store, ctl


def place_model(store: Any, storage: dict, tier: str) -> list[str]:
    """Leave the bench model where a start from `tier` finds it: only in S3 ("s3", OVERLAP), on NVMe with cold
    pages and not in RAM ("nvme"), or in the RAM tier ("ram"). Returns the tiers holding it."""
    manifest = store.resolve(STORE_ID, STORE_VERSION)
    if tier in ("s3", OVERLAP):
        store.evict(STORE_ID, STORE_VERSION)
    elif tier == "nvme":
        if "nvme" not in store.holders(manifest):
            store.ensure_local(STORE_ID, STORE_VERSION, tier="nvme")
        store.evict(STORE_ID, STORE_VERSION, tier="ram")
        # Cold model bytes, warm software: the NVMe tier's blobs leave the page cache.
        evict_from_page_cache(tree_files(Path(storage["tiers"][1]["path"])))
    elif "ram" not in store.holders(manifest):
        store.ensure_local(STORE_ID, STORE_VERSION, tier="ram")
    return store.holders(manifest)


# The S3 start again with the engine started beside the weights' fetch (transfer.overlap_engine_start on;
# the default fetches every file first), side by side, so what the overlap gains is measured in one run.
OVERLAP = "s3_overlap"


def overlapped(storage: dict) -> dict:
    return {**storage, "transfer": {**storage.get("transfer", {}), "overlap_engine_start": True}}


# With transfer.overlap_engine_start the fetch runs beside the engine's start: weights_wait_s is the
# part of load_s the loader spent waiting for weights still arriving.
HELIOS_SPLIT = ("fetch_s", "load_s", "weights_wait_s", "engine_start_s", "engine_init_s", "total_s")


def measure_helios(storage: dict, cache_root: Path, port: int, server_files: list[Path], repeats: int) -> dict:
    from helios.engine.deployment import deployment_name

    store, ctl = helios_controller(storage, cache_root, port, "helios.log")
    runs: dict[str, list[dict]] = {"s3": [], OVERLAP: [], "nvme": [], "ram": []}
    try:
        ctl.expect("ready", timeout=180)
        for rep in range(repeats):
            for tier, tier_runs in runs.items():
                holders = place_model(store, storage, tier)
                warm(server_files)
                log(f"Helios from {tier} ({rep + 1}/{repeats}; model held by {holders}): deploying")
                used = overlapped(storage) if tier == OVERLAP else storage
                r = ctl.deploy("helios", helios_args(used, cache_root), deployment_name(MODEL_NAME))
                r["held_by_before"] = holders
                r.update(helios_split(r.get("info", {})))
                tier_runs.append(r)
                log(f"Helios from {tier}: first token after {r['first_token_s']:.1f}s; "
                    + ", ".join(f"{k} {r[k]}" for k in HELIOS_SPLIT if k in r))
                ctl.delete()
    finally:
        ctl.close()
    return {tier: summarize(rs, HELIOS_SPLIT) for tier, rs in runs.items()}


def pool_reserve_gib(model_bytes: int) -> float:
    """The pooled host's memory reserve (`engine_pool.reserve_gib`) sized as the README says: the bench
    model's weights in the engine's dtype (stored in bf16) twice (a checkpoint load on the CPU holds the
    loaded parameters beside vLLM's oneDNN-packed copy), its KV cache, its checkpoint (the S3 run fetches
    it into the RAM tier during the start) and 1 GiB for the new replica's and engine's processes."""
    weights = model_bytes * {"float32": 4, "bfloat16": 2, "float16": 2}[ENGINE["dtype"]] / 2
    return round((2 * weights + model_bytes) / (1 << 30) + ENGINE["kv_cache_space_gib"] + 1.0, 2)


def pool_args(storage: dict, cache_root: Path, state_dir: Path, reserve_gib: float = 0.0,
              shared_layout: bool = True) -> dict:
    """Helios serving the tiny demo model from its config, with one pooled engine host per node and
    the bench model startable on demand (it is in the store), with the same engine settings.
    `shared_layout` False: the layout blob stays on the node (`engine.cache_in_tiers` off), so a start
    from S3 is a first start anywhere whatever the bucket holds."""
    engine = {k: ENGINE[k] for k in ("dtype", "max_model_len", "max_num_seqs", "enforce_eager", "kv_cache_space_gib")}
    engine["cache_in_tiers"] = shared_layout
    return {
        "models": [{"id": "tiny", "source": "demo://tiny", "engine": {**engine, "max_num_seqs": 4}}],
        "storage": storage,
        "cache_root": str(cache_root),
        # The bench model keeps its weights in vLLM's layout beside the tier after a start (layout_cache).
        "registry": {"state_dir": str(state_dir), "max_dynamic_models": 1, "start_timeout_s": 600,
                     "prefetch_interval_s": 0, "defaults": {"engine": {**engine, "layout_cache": True}}},
        "engine_pool": {"size_per_node": 1, "reserve_gib": reserve_gib},
    }


START_SPLIT = ("imports_s", "fetch_s", "layout_fetch_s", "engine_process_start_s", "load_s", "weights_wait_s", "kv_alloc_warmup_s",
               "engine_init_s", "total_s", "first_token_s")


def start_split(timings: dict) -> dict:
    """A start's phases from the replica's timings: imports, fetch, engine process start, weights,
    KV allocation with warm-up, and what is left of the engine's construction (vLLM's own set-up)."""
    out = {k: float(timings[k]) for k in START_SPLIT if k in timings}
    out.setdefault("imports_s", 0.0)  # a pooled start imports nothing
    known = sum(out.get(k, 0.0) for k in ("engine_process_start_s", "load_s", "kv_alloc_warmup_s"))
    if "engine_init_s" in out:
        out["engine_other_s"] = max(out["engine_init_s"] - known, 0.0)
    return out


# A pooled start from S3 of a model that served elsewhere before: its layout blob is in the bucket
# (`helios.storage.layout_share`), fetched instead of the checkpoint's weights.
SHARED = "s3_layout"


def wait_layout_shared(ctl: Controller, app: str, info: dict, timeout_s: float = 600) -> str | None:
    """Wait until the replica's push of its layout blob to the bucket is over; its outcome."""
    deadline = time.monotonic() + timeout_s
    while info.get("layout_share") == "pending" and time.monotonic() < deadline:
        time.sleep(2)
        ctl.send(cmd="app_info", app=app)
        info = ctl.expect("info")["info"]
    log(f"layout blob shared through the bucket: {info.get('layout_share')}")
    return info.get("layout_share")


def measure_pool(storage: dict, cache_root: Path, port: int, server_files: list[Path], repeats: int,
                 reserve_gib: float) -> dict:
    """First token of the bench model started on demand into a pooled host (`engine_pool`), its blobs
    in the RAM tier or only in S3: from the request to its first streamed token, the router and a
    ready host already up (what a scale-up or a request for a model not running waits)."""
    from helios.router.on_demand import app_name
    from helios.storage.store import LAYOUT_CACHE_PREFIX

    store, ctl = helios_controller(storage, cache_root, port, "helios_pool.log")
    # S3 first: that start finds nothing of the model on the node and leaves its blobs and its layout
    # blob in the RAM tier, where the RAM start after it finds them (a model that served here before).
    # The S3 starts are first starts anywhere (the layout blob is not shared through the bucket); the RAM
    # start pushes its layout blob to the bucket (untimed: after its first token), and SHARED starts
    # from S3 on a node that never held the model, its layout blob in the bucket: a model that served
    # elsewhere in the cluster before.
    runs: dict[str, list[dict]] = {"s3": [], OVERLAP: [], "ram": [], SHARED: []}
    try:
        ctl.expect("ready", timeout=180)
        for rep in range(repeats):
            for tier, tier_runs in runs.items():
                if tier in ("s3", OVERLAP, SHARED):  # nothing derived from the model either
                    for t in storage["tiers"]:
                        if "path" in t:
                            shutil.rmtree(Path(t["path"]) / "derived", ignore_errors=True)
                if tier == SHARED:  # the layout blob fetched by an earlier run is not local either
                    for model_id in {m.model_id for t in store.local for m in t.manifests()}:
                        if model_id.startswith(f"{LAYOUT_CACHE_PREFIX}/"):
                            store.evict(model_id)
                holders = place_model(store, storage, "s3" if tier == SHARED else tier)
                warm(server_files)
                state = WORK / f"pool_registry_{tier}_{rep}"
                shutil.rmtree(state, ignore_errors=True)
                used = overlapped(storage) if tier == OVERLAP else storage
                ctl.send(cmd="deploy", system="helios", args=pool_args(used, cache_root, state, reserve_gib,
                                                                       shared_layout=tier in ("ram", SHARED)))
                ctl.expect("running")
                deadline = time.monotonic() + 600
                while True:  # a pooled host on the node has finished importing and faulting in its reserve
                    ctl.send(cmd="pool")
                    status = ctl.expect("pool")["status"]
                    nodes = status["nodes"]
                    if any(n["ready"] and max(n.get("reserve_populated_bytes") or [0]) >= status["reserve_bytes"]
                           for n in nodes.values()):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no ready engine host: {nodes}")
                    time.sleep(1)
                time.sleep(5)  # the tiny model's replica and the host settle
                log(f"Helios pooled from {tier} ({rep + 1}/{repeats}; model held by {holders}): requesting")
                t0 = time.time()
                first = asyncio.run(first_token(f"http://127.0.0.1:{port}", ctl.proc, model=STORE_ID))
                ctl.send(cmd="app_info", app=app_name(STORE_ID))
                info = ctl.expect("info")["info"]
                r = {"first_token_s": first - t0, "held_by_before": holders, "pooled": "host_pid" in info,
                     "reserve_handed_over_bytes": info.get("timings", {}).get("host_reserve_handed_over_bytes", 0),
                     "layout_cache_hit": bool(info.get("timings", {}).get("layout_cache_hit")),
                     "layout_from_bucket": "layout_fetch_s" in info.get("timings", {}),
                     **start_split(info.get("timings", {}))}
                if tier == "ram":  # its layout blob goes to the bucket for SHARED (after the first token)
                    r["layout_share"] = wait_layout_shared(ctl, app_name(STORE_ID), info)
                tier_runs.append(r)
                log(f"Helios pooled from {tier}: first token after {r['first_token_s']:.1f}s (pooled host: "
                    f"{r['pooled']}); " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_s")))
                ctl.delete()
                # The deleted app's on-demand manager exits up to ~20 s later; an app redeployed under the same
                # name meanwhile gets the exiting one, and its on-demand requests never start (see README).
                time.sleep(30)
    finally:
        ctl.close()
    return {tier: summarize(rs, [*START_SPLIT, "engine_other_s"]) for tier, rs in runs.items()}


# --------------------------------------------------------------------------- plain vLLM engines


def engine_child(spec: dict) -> None:
    """Run in a fresh process: start vLLM, print timestamps, decode, then wait for stdin to close."""
    t_start = time.time()
    from vllm import LLM, SamplingParams

    t_import = time.time()
    kwargs = {k: spec["engine"][k] for k in ("dtype", "max_model_len", "max_num_seqs", "enforce_eager")}
    llm = LLM(model=spec["model"], seed=0, **kwargs, **spec.get("extra", {}))
    t_built = time.time()
    llm.generate(["Hello"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    t_first = time.time()
    print("@@engine " + json.dumps({"event": "first_token", "t_start": t_start, "t_import": t_import,
                                    "t_built": t_built, "t_first": t_first}), flush=True)
    print("@@engine " + json.dumps({"event": "idle"}), flush=True)
    for line in sys.stdin:  # {"decode": N}: one greedy request of N tokens; EOF: exit
        n = json.loads(line)["decode"]
        t = time.perf_counter()
        out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                           use_tqdm=False)
        tokens = len(out[0].outputs[0].token_ids)
        print("@@engine " + json.dumps({"event": "decoded", "tok_s": tokens / (time.perf_counter() - t),
                                        "tokens": tokens}), flush=True)


class Engine(EventChild):
    """`vllm.LLM` in a child process (see `engine_child`), decoding when told."""

    def __init__(self, spec: dict, log_path: Path) -> None:
        self.spawned = time.time()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_space_gib"])}
        super().__init__([sys.executable, __file__, "--engine-child", json.dumps(spec)], env, log_path, "@@engine ")

    def expect(self, name: str, timeout: float = 600) -> dict:
        ev = self.events.get(timeout=timeout)
        if ev["event"] != name:
            raise RuntimeError(f"engine: expected {name}, got {ev} (log {self.log.name})")
        return ev

    def decode(self, tokens: int) -> dict:
        self.send(decode=tokens)
        return self.expect("decoded")

    def uss_mib(self) -> dict:
        """Private (USS) and proportional (PSS) memory of the engine's whole process tree, MiB."""
        import psutil

        root = psutil.Process(self.proc.pid)
        uss = pss = 0
        for p in [root] + root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                m = p.memory_full_info()
                uss += m.uss
                pss += m.pss
        return {"uss_mib": uss / 2**20, "pss_mib": pss / 2**20}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # the child returns and vLLM shuts down cleanly (its /dev/shm queues too)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        servers.stop(self.proc, grace_s=20)  # whatever is left; the engine core is in the child's group
        self.log.close()


def measure_engine_start(model_dir: Path, repeats: int) -> dict:
    """vLLM from a local directory with its default loader, weights in the page cache."""
    runs = []
    for r in range(repeats):
        warm(tree_files(model_dir))
        runs.append(engine_run({"model": str(model_dir), "engine": ENGINE}, WORK / "engine_start.log"))
        log(f"engine_start ({r + 1}/{repeats}; plain vLLM, warm page cache): first token after "
            f"{runs[-1]['first_token_s']:.1f}s")
    return summarize(runs, ("import_s", "construct_s", "generate_s"))


SETTLE_S = 30.0


def settle_memory() -> None:
    """Let memory freed by the run before be returned to the host (virtio-balloon free page reporting) so
    that a plain engine does not start on pages freed moments ago, which are ~20x cheaper to touch than
    the steady state of a node (see helios/engine/memory_reserve.py); the pooled runs wait as long."""
    time.sleep(SETTLE_S)


def engine_run(spec: dict, log_path: Path) -> dict:
    """One plain vLLM engine from spawn to first token: its phases in seconds."""
    settle_memory()
    eng = Engine(spec, log_path)
    try:
        ev = eng.expect("first_token")
        run = {"first_token_s": ev["t_first"] - eng.spawned, "import_s": ev["t_import"] - eng.spawned,
               "construct_s": ev["t_built"] - ev["t_import"], "generate_s": ev["t_first"] - ev["t_built"]}
        eng.expect("idle")
    finally:
        eng.close()
    return run


def measure_runai_s3(server, plain_url: str, server_files: list[Path], repeats: int) -> dict:
    """vLLM with `load_format="runai_streamer"` on the model's s3:// prefix (config and tokenizer pulled
    by vLLM, weights streamed by Run:ai Model Streamer), spawn to first token: the S3 anchor."""
    env = {**server.env, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
    saved = {k: os.environ.get(k) for k in env}
    runs = []
    try:
        os.environ.update(env)  # the child inherits them
        for r in range(repeats):
            warm(server_files)
            runs.append(engine_run({"model": plain_url, "engine": ENGINE, "extra": {"load_format": "runai_streamer"}},
                                   WORK / "runai_streamer_s3.log"))
            log(f"runai_streamer_s3 ({r + 1}/{repeats}; vLLM load_format=runai_streamer from s3rver): first token "
                f"after {runs[-1]['first_token_s']:.1f}s")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return summarize(runs, ("import_s", "construct_s", "generate_s"))


def measure_share(snapshot: Path, derived: Path, decode_tokens: int, decode_rounds: int) -> dict:
    """A second engine on the same RAM-tier snapshot, with `share_weights` on and off."""
    import psutil

    def spec(share: bool) -> dict:
        return {"model": str(snapshot), "engine": ENGINE,
                "extra": {"load_format": "helios",
                          "model_loader_extra_config": {"share_weights": share, "derived_dir": str(derived)}}}

    shutil.rmtree(derived, ignore_errors=True)
    engines: list[Engine] = []
    out: dict = {}
    try:
        log("share_weights on: first replica (writes the derived blob)")
        first = Engine(spec(True), WORK / "share_on_1.log")
        engines.append(first)
        first.expect("first_token")
        first.expect("idle")
        # The second replica with sharing on, and one with it off, started side by side beside the first
        # (start times are not measured here); then each decodes alone.
        log("share_weights: a second replica with it on and one with it off")
        on_eng = Engine(spec(True), WORK / "share_on_2.log")
        engines.append(on_eng)
        off_eng = Engine(spec(False), WORK / "share_off.log")
        engines.append(off_eng)
        for e in (on_eng, off_eng):
            e.expect("first_token")
            e.expect("idle")
        time.sleep(2)
        mem_on, mem_off = on_eng.uss_mib(), off_eng.uss_mib()
        out["first_replica_on"] = first.uss_mib()
        on_rates, off_rates = [], []
        for _ in range(decode_rounds):
            on_rates.append(on_eng.decode(decode_tokens)["tok_s"])
            off_rates.append(off_eng.decode(decode_tokens)["tok_s"])
        on, off = {"tok_s": median(on_rates)}, {"tok_s": median(off_rates)}
        out["tok_s_rounds"] = {"on": on_rates, "off": off_rates}
    finally:
        for e in engines:
            e.close()
    out.update({
        "private_mib_second_replica_on": mem_on["uss_mib"],
        "private_mib_second_replica_off": mem_off["uss_mib"],
        "pss_mib_second_replica_on": mem_on["pss_mib"],
        "pss_mib_second_replica_off": mem_off["pss_mib"],
        "tok_s_on": on["tok_s"],
        "tok_s_off": off["tok_s"],
        "decode_tokens": decode_tokens,
        "method": "vllm.LLM(load_format='helios', model_loader_extra_config={'share_weights': on/off}) in fresh "
        "processes on the RAM-tier snapshot: a first share_weights=on engine (it writes the derived blob), then a "
        "second one on and one off side by side, all three alive while measured; private = USS summed over the "
        "engine's process tree (psutil memory_full_info); tok/s = median over rounds of one greedy request of "
        "decode_tokens tokens (ignore_eos), each engine decoding alone",
        "machine_mem_available_mib": psutil.virtual_memory().available / 2**20,
    })
    log(f"share_weights: second replica private {out['private_mib_second_replica_on']:.0f} MiB on vs "
        f"{out['private_mib_second_replica_off']:.0f} MiB off; {out['tok_s_on']:.1f} vs {out['tok_s_off']:.1f} tok/s")
    return out


# --------------------------------------------------------------------------- plot


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    load = report.get("load_gbps") or {}
    if load:
        a.bar(["raw read", "safetensors\nload_file", "Helios loader"],
              [load.get(n, 0) for n in ("raw_read", "safetensors", "helios")], color=["#888888", "#dd8452", "#4c72b0"])
        a.axhline(0.8 * load["raw_read"], color="black", ls="--", lw=0.8, label="target: 0.8 x raw read")
        a.legend(fontsize=7)
    a.set_title("Load from the NVMe tier, cold page cache (GB/s)", fontsize=10)
    s3 = report.get("s3_gbps") or {}
    if s3:
        b.bar(["s3fs get", "Helios\nensure_local", "ranged GETs\nin memory"],
              [s3.get("s3fs", 0), s3.get("helios", 0), s3.get("ranged_get_in_memory", 0)],
              color=["#dd8452", "#4c72b0", "#cccccc"])
        b.axhline(3 * s3["s3fs"], color="black", ls="--", lw=0.8, label="target: 3 x s3fs")
        b.legend(fontsize=7)
    b.set_title(f"{report.get('s3_server', {}).get('name', 'S3')} to local disk (GB/s)", fontsize=10)
    ft = report.get("first_token_s") or {}
    split = report.get("first_token_split") or {}
    order = [("engine_start", "vLLM engine\n(warm cache)"), ("rayserve_llm_s3", "Ray Serve LLM\nfrom S3"),
             ("helios_s3", "Helios\nfrom S3"), (f"helios_{OVERLAP}", "Helios from S3,\nengine beside fetch"),
             ("helios_nvme", "Helios\nfrom NVMe"), ("helios_ram", "Helios\nfrom RAM"),
             ("helios_pool_s3", "Helios pooled\nfrom S3"), (f"helios_pool_{OVERLAP}", "pooled from S3,\nengine beside fetch"),
             (f"helios_pool_{SHARED}", "pooled from S3,\nlayout blob shared"), ("helios_pool_ram", "Helios pooled\nfrom RAM")]
    # Which split key of each system is fetch, load and engine start.
    parts = [("fetch / download", "#55a868", ("fetch_s", "download_s")),
             ("weight load", "#c44e52", ("load_s", "load_weights_s")),
             ("engine start (less load)", "#8172b2", ("engine_start_s",))]
    labels: list[str] = []
    seen: set[str] = set()
    for key, label in order:
        if ft.get(key) is None:
            continue
        x = len(labels)
        labels.append(label)
        total, sp, bottom = ft[key], split.get(key, {}), 0.0
        for name, color, keys in parts:
            v = next((sp[k] for k in keys if sp.get(k)), None)
            if v:
                c.bar(x, v, bottom=bottom, color=color, label=None if name in seen else name)
                seen.add(name)
                bottom += v
        c.bar(x, max(total - bottom, 0), bottom=bottom, color="#bbbbbb",
              label=None if "other" in seen else "rest: Serve, process start, imports, HTTP")
        seen.add("other")
        c.text(x, total, f"{total:.0f} s", ha="center", va="bottom", fontsize=8)
    if ft.get("engine_start"):
        c.axhline(1.2 * ft["engine_start"], color="black", ls="--", lw=0.8, label="target for RAM: 1.2 x engine")
    c.set_xticks(range(len(labels)), labels, fontsize=8)
    c.set_title("Deploy to first token (s); split as reported by each system", fontsize=10)
    c.legend(fontsize=7, loc="upper right")
    n = report["workload"].get("first_token_repeats", 1)
    quick = " (--quick: one deploy each)" if n == 1 else f" (first token: median of {n} deploys)"
    fig.suptitle(f"Cold start of the bench demo model (1.4 GB bf16, {report['machine']['cpus']} CPUs){quick}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer repeats and a shorter decode (under 10 minutes).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cold_start.json")
    parser.add_argument("--skip", default="", help=f"Comma-separated parts to leave out: {','.join(PARTS)}.")
    parser.add_argument("--first-token-repeats", type=int, default=None,
                        help="Deploys per first-token measurement (default 1 with --quick, else 3; medians reported).")
    parser.add_argument("--port", type=int, default=8341)
    args = parser.parse_args()
    servers.exit_on_sigterm()  # a SIGTERM still stops the servers, s3rver and engines it started
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    repeats = 2 if args.quick else 5  # S3 transfers (~10 s each)
    local_repeats = 5 if args.quick else 9  # cold-cache local loads (~1-3 s each)
    ft_repeats = args.first_token_repeats or (1 if args.quick else 3)  # first-token runs (~30-60 s each)
    decode_tokens = 32 if args.quick else 128  # ~5 tok/s on 2 cores
    started = time.monotonic()

    import s3fs

    from helios.config import StorageConfig
    from helios.storage.demo_model import resolve_source
    from helios.storage.store import ModelStore

    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_source("demo://bench", ROOT / "benchmarks" / ".work" / "cache")
    model_files = sorted(p for p in model_dir.iterdir() if p.is_file())
    cache_root = WORK / "cache_root"
    nvme_root = WORK / "tiers" / "nvme"
    for d in (cache_root, nvme_root.parent, RAM_TIER):
        shutil.rmtree(d, ignore_errors=True)
    report: dict = {"benchmark": "cold_start", "quick": args.quick,
                    "machine": machine(),
                    "workload": {"model": "demo://bench", "model_bytes": sum(f.stat().st_size for f in model_files),
                                 "engine": ENGINE, "s3_repeats": repeats,
                                 "local_repeats": local_repeats, "first_token_repeats": ft_repeats}}

    with s3rver.running(directory=WORK / "s3rver-data", log_path=WORK / "s3rver.log") as server:
        report["s3_server"] = {"name": "s3rver", "version": server.version, "endpoint": server.endpoint_url,
                               "backend": "filesystem directory on the local disk, served from the page cache "
                               "(warmed before each S3 measurement; the client side is cold)"}
        remote = {"kind": "remote", "url": f"s3://{server.bucket}/helios", "storage_options": server.storage_options}
        nvme = {"kind": "nvme", "path": str(nvme_root), "capacity": "20GiB"}
        ram = {"kind": "ram", "path": str(RAM_TIER), "capacity": "4GiB"}
        transfer = {"chunk_mib": 16, "concurrency": 16}
        full = {"tiers": [ram, nvme, remote], "transfer": transfer}
        store = ModelStore.from_config(StorageConfig.model_validate(full), cache_root)

        log(f"s3rver {server.version} on {server.endpoint_url}; uploading the model (plain files, Helios push)")
        fs = s3fs.S3FileSystem(**server.storage_options, skip_instance_cache=True)
        plain = f"{server.bucket}/plain/{MODEL_NAME}"
        for f in model_files:  # s3rver's data directory is kept between runs: upload only what is missing
            try:
                have = fs.info(f"{plain}/{f.name}")["size"]
            except FileNotFoundError:
                have = None
            if have != f.stat().st_size:
                fs.put_file(str(f), f"{plain}/{f.name}")
        store.push(model_dir, STORE_ID, STORE_VERSION)  # dedups: uploads only blobs the remote lacks
        server_files = tree_files(server.directory)
        report["workload"]["transfer"] = transfer

        if "s3" not in skip:
            nvme_cfg = StorageConfig.model_validate({"tiers": [nvme, remote], "transfer": transfer})
            report.update(measure_s3(server, plain, model_files, nvme_cfg, cache_root, repeats, server_files))

        # The NVMe tier's copy, read by the local load measurements.
        snap = store.ensure_local(STORE_ID, STORE_VERSION, tier="nvme").path
        if "local" not in skip:
            from helios.storage.loader import safetensors_files

            files = [Path(os.path.realpath(f)) for f in safetensors_files(snap)]
            report.update(measure_local(files, local_repeats))

        first: dict = {}
        split: dict = {}
        if "rayserve" not in skip:
            r = measure_rayserve(server, f"s3://{plain}", args.port, server_files, ft_repeats)
            first["rayserve_llm_s3"] = r["first_token_s"]
            split["rayserve_llm_s3"] = r["split"]
            report["rayserve_llm_s3"] = r
        if "runai" not in skip:
            ra = measure_runai_s3(server, f"s3://{plain}", server_files, ft_repeats)
            first["runai_streamer_s3"] = ra["first_token_s"]
            split["runai_streamer_s3"] = ra["split"]
            report["runai_streamer_s3"] = ra
        if "helios" not in skip:
            h = measure_helios(full, cache_root, args.port + 1, server_files, ft_repeats)
            for tier, r in h.items():
                first[f"helios_{tier}"] = r["first_token_s"]
                split[f"helios_{tier}"] = r["split"]
            report["helios_runs"] = h
        if "pool" not in skip:
            reserve_gib = pool_reserve_gib(sum(f.stat().st_size for f in model_files))
            pooled = measure_pool(full, cache_root, args.port + 2, server_files, ft_repeats, reserve_gib)
            report["workload"]["pool_reserve_gib"] = reserve_gib
            for tier, r in pooled.items():
                first[f"helios_pool_{tier}"] = r["first_token_s"]
                split[f"helios_pool_{tier}"] = r["split"]
            report["helios_pool_runs"] = pooled
            fresh = report.get("helios_runs", {}).get("ram", {}).get("runs", [])
            report["start_split_s"] = {
                "fresh": {k: median([start_split(r)[k] for r in fresh if k in start_split(r)])
                          for k in ("imports_s", "load_s", "kv_alloc_warmup_s", "engine_process_start_s")
                          if any(k in start_split(r) for r in fresh)},
                "pooled": {k: v for k, v in pooled["ram"]["split"].items()
                           if k in ("imports_s", "load_s", "kv_alloc_warmup_s", "engine_process_start_s")},
            }
        if "engine" not in skip:
            e = measure_engine_start(model_dir, ft_repeats)
            first["engine_start"] = e["first_token_s"]
            split["engine_start"] = e["split"]
            report["engine_start"] = e
        report["first_token_s"] = first
        report["first_token_split"] = split
        report["first_token_method"] = (
            "helios_* and rayserve_llm_s3: wall clock from serve.run (Ray and Serve already up; the app is built "
            "inside the timed span) to the first streamed token of a 1-token completion, polled every 0.2 s. Cold "
            "model bytes, warm software: nothing of the model on local disk for the S3 runs (Ray Serve LLM's "
            "HF_HUB_CACHE and Helios's local tiers emptied), the NVMe tier's blobs evicted from the page cache "
            "for helios_nvme (fadvise DONTNEED), RAM tier in /dev/shm for helios_ram; Python packages stay in "
            "the page cache; s3rver's files are served warm. engine_start: a fresh python process, spawn to the "
            "first token of vllm.LLM.generate, local directory, vLLM's default loader, weights in the page cache "
            "(after the runs above had imported the same packages).")

        if "share" not in skip:
            local = store.ensure_local(STORE_ID, STORE_VERSION, tier="ram")
            report["share_weights"] = measure_share(local.path, RAM_TIER / "derived", decode_tokens, 1 if args.quick else 3)

    shutil.rmtree(RAM_TIER, ignore_errors=True)  # 1.4 GB (and a derived copy) of /dev/shm
    ratios = {}
    if "engine_start" in first:
        for k in ("helios_ram", "helios_nvme", "helios_s3", "rayserve_llm_s3", "helios_pool_ram"):
            if k in first:
                ratios[f"{k}_over_engine_start"] = first[k] / first["engine_start"]
    for k in ("helios_s3", "helios_pool_s3", f"helios_pool_{SHARED}"):
        if k in first and "rayserve_llm_s3" in first:
            ratios[f"{k}_over_rayserve_llm_s3"] = first[k] / first["rayserve_llm_s3"]
    if "helios_s3" in first and "runai_streamer_s3" in first:
        ratios["helios_s3_over_runai_streamer_s3"] = first["helios_s3"] / first["runai_streamer_s3"]
    for k in ("helios", "helios_pool"):  # below 1: starting the engine beside the fetch is faster
        if f"{k}_s3" in first and f"{k}_{OVERLAP}" in first:
            ratios[f"{k}_{OVERLAP}_over_s3"] = first[f"{k}_{OVERLAP}"] / first[f"{k}_s3"]
    report["ratios"] = ratios
    targets = {}
    if "helios_over_raw_read" in report:
        targets["loader_ge_0.8x_raw_read"] = report["helios_over_raw_read"] >= 0.8
        targets["loader_ge_0.8x_odirect_parallel"] = report["helios_over_odirect_parallel"] >= 0.8
        targets["loader_ge_best_of_runai_fastsafetensors"] = report["helios_over_best_anchor"] >= 1
    if "helios_s3_over_runai_streamer_s3" in ratios:
        targets["s3_first_token_ahead_of_runai_streamer"] = ratios["helios_s3_over_runai_streamer_s3"] < 1
    if "helios_over_best_bare_s3" in report:
        targets["s3_ge_0.8x_best_bare_ranged_get"] = report["helios_over_best_bare_s3"] >= 0.8
        targets["s3_ahead_of_runai_streamer_fetch"] = report["helios_over_runai_streamer_s3"] > 1
    if "helios_over_s3fs" in report:
        targets["s3_ge_3x_s3fs"] = report["helios_over_s3fs"] >= 3
    if "helios_ram_over_engine_start" in ratios:
        targets["ram_first_token_le_1.2x_engine_start"] = ratios["helios_ram_over_engine_start"] <= 1.2
    if "helios_s3_over_rayserve_llm_s3" in ratios:
        targets["s3_first_token_ahead_of_rayserve_llm"] = ratios["helios_s3_over_rayserve_llm_s3"] < 1
    if "helios_pool_ram_over_engine_start" in ratios:
        targets["pool_ram_first_token_le_0.25x_engine_start"] = ratios["helios_pool_ram_over_engine_start"] <= 0.25
    if "helios_pool_s3_over_rayserve_llm_s3" in ratios:
        targets["pool_s3_first_token_le_0.2x_rayserve_llm_s3"] = ratios["helios_pool_s3_over_rayserve_llm_s3"] <= 0.2
    if f"helios_pool_{SHARED}_over_rayserve_llm_s3" in ratios:  # the same target, for a model served before elsewhere
        targets["pool_s3_layout_first_token_le_0.2x_rayserve_llm_s3"] = (
            ratios[f"helios_pool_{SHARED}_over_rayserve_llm_s3"] <= 0.2)
    report["targets_met"] = targets
    report["seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')} after {report['seconds']:.0f}s")
    print(json.dumps({k: report.get(k) for k in ("load_gbps", "helios_over_raw_read", "s3_gbps", "helios_over_s3fs",
                                                  "first_token_s", "targets_met")}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--engine-child":
        engine_child(json.loads(sys.argv[2]))
    else:
        main()
