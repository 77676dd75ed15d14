"""A watchdog that kills a replica's engine processes when the replica dies, however it dies.

vLLM's engine core runs in a process the replica spawns, and its workers in processes
the engine core spawns. The workers watch the engine core (vLLM's death pipe), but the
engine core does not watch the replica: a replica that is SIGKILLed (Ray's `ray.kill`,
`serve.shutdown`, `ray stop`, the OOM killer) leaves it running, holding its memory
(and on a GPU node the GPU's), reparented to init where nothing will ever stop it.

Ray's raylet subreaper could catch some of these cases, but only on clusters started
with its flag, and not after `ray stop`, which kills the raylet too. So each replica
starts this watchdog: a plain process in its own session (outside the replica's
process group and Ray's lifecycle) that records the replica's descendants and, when
the replica is gone, SIGKILLs every one of them that is still the process it
recorded (same pid and start time), with their own descendants. Then it exits.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import psutil

POLL_S = 0.5  # how soon a death is acted on without a pidfd, and how often descendants are recorded at start
STEADY_POLL_S = 5.0  # after START_S, the engine's processes exist: record less often (each scan reads /proc)
START_S = 120.0


_watchdog: subprocess.Popen | None = None


def ensure_reaper() -> subprocess.Popen:
    """This process's watchdog, started on first use (one per process, however many engines it starts)."""
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = start_reaper()
    return _watchdog


def start_reaper(pid: int | None = None) -> subprocess.Popen:
    """Watch `pid` (this process by default): its descendants die with it."""
    pid = pid or os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "helios.engine.reaper", str(pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def _descendants(proc: psutil.Process) -> dict[int, float]:
    """pid -> start time of each live descendant of `proc` (this watchdog left out)."""
    out = {}
    for child in proc.children(recursive=True):
        if child.pid == os.getpid():
            continue
        try:
            out[child.pid] = child.create_time()
        except psutil.Error:
            continue
    return out


def _wait_for_exit(proc: psutil.Process, pidfd: int | None, timeout: float) -> bool:
    """Wait up to `timeout` for `proc` to exit (POLL_S without a pidfd); True once it has."""
    if pidfd is not None:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    time.sleep(POLL_S)
    return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def kill_recorded(recorded: dict[int, float]) -> list[int]:
    """SIGKILL each recorded process that is still the same process, and its descendants; the pids killed."""
    victims: dict[int, psutil.Process] = {}
    for pid, started in recorded.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != started:
                continue  # the pid was reused by an unrelated process
            for p in [proc, *proc.children(recursive=True)]:
                victims.setdefault(p.pid, p)
        except psutil.Error:
            continue
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    return sorted(victims)


def watch(pid: int) -> None:
    """Record `pid`'s descendants (often at start, then every few seconds) until it exits; kill what is left."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll instead
        pidfd = None
    recorded: dict[int, float] = {}
    started = time.monotonic()
    while True:
        try:
            recorded.update(_descendants(proc))
        except psutil.Error:
            break
        interval = POLL_S if time.monotonic() - started < START_S else STEADY_POLL_S
        if _wait_for_exit(proc, pidfd, interval):
            break
    kill_recorded(recorded)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
