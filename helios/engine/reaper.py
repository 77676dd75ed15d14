"""A watchdog that kills a replica's engine processes when the replica dies, however it dies.

vLLM's engine core runs in a process the replica spawns, and its workers in processes
the engine core spawns. The workers watch the engine core (vLLM's death pipe), but the
engine core does not watch the replica: a replica that is SIGKILLed (Ray's `ray.kill`,
`serve.shutdown`, `ray stop`, the OOM killer) leaves it running, holding its memory
(and on a GPU node the GPU's), reparented to init where nothing will ever stop it.

Ray's raylet subreaper could catch some of these cases, but only on clusters started
with its flag, and not after `ray stop`, which kills the raylet too. So each replica
starts this watchdog: a plain process in its own session and not its child (outside the
replica's process group and Ray's lifecycle, which kills a worker's children as it exits) that records the replica's descendants and, when
the replica is gone, SIGKILLs every one of them that is still the process it
recorded (same pid and start time), with their own descendants. Then it exits.

A killed engine also leaves its shared memory behind: vLLM's engine core and workers talk
through `/dev/shm` segments (hundreds of MB each) that only a clean shutdown unlinks. The
watchdog records which segments the descendants map and, after the kill, unlinks those
that no live process maps or holds open any more.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import subprocess
import sys
import time

import psutil

POLL_S = 0.5  # how soon a death is acted on without a pidfd, and how often descendants are recorded at start
STEADY_POLL_S = 5.0  # after START_S, the engine's processes exist: record less often (each scan reads /proc)
START_S = 120.0
SHM_DIR = "/dev/shm"
_SHM_IN_MAPS = b" " + SHM_DIR.encode() + b"/"  # a maps line's path field, after its whitespace


class Watchdog:
    """A running watchdog, known by pid: it is not this process's child (see `start_reaper`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def alive(self) -> bool:
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


_watchdog: Watchdog | None = None


def ensure_reaper() -> Watchdog:
    """This process's watchdog, started on first use (one per process, however many engines it starts)."""
    global _watchdog
    if _watchdog is None or not _watchdog.alive():
        _watchdog = start_reaper()
    return _watchdog


def start_reaper(pid: int | None = None) -> Watchdog:
    """Watch `pid` (this process by default): its descendants die with it.

    Started through `sh`, which puts it in the background and exits at once, so the watchdog is
    no child of the process it watches: a Ray worker that exits (`ray.kill`, a replica stopped)
    first kills its own children (the core worker's KillChildProcs), which took the watchdog with
    it, before it could unlink the engine's shared memory (160-250 MB left in /dev/shm per engine)."""
    pid = pid or os.getpid()
    launch = f"{shlex.quote(sys.executable)} -m helios.engine.reaper {pid} </dev/null >/dev/null 2>&1 & echo $!"
    out = subprocess.run(["/bin/sh", "-c", launch], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, check=True, text=True)
    return Watchdog(int(out.stdout.strip()))


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


def shm_segments(pid: int) -> set[str]:
    """The files under /dev/shm that `pid` maps (not those already unlinked)."""
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                at = line.find(_SHM_IN_MAPS)
                if at >= 0 and not line.endswith(b" (deleted)\n"):
                    found.add(os.fsdecode(line[at + 1:].rstrip(b"\n")))
    except OSError:
        pass
    return found


def _shm_names() -> list[str] | None:
    try:
        return sorted(os.listdir(SHM_DIR))
    except OSError:
        return None


def _in_use(paths: set[str]) -> set[str]:
    """Those of `paths` that some live process maps or holds open (processes this user cannot read
    are skipped: they cannot open this user's 0600 segments either)."""
    used: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        used |= shm_segments(int(entry.name)) & paths
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if (target := os.readlink(fd.path)) in paths:
                        used.add(target)
        except OSError:
            continue
    return used


def release_segments(paths: set[str]) -> list[str]:
    """Unlink each of `paths` that this user owns, nobody else can open, and no live process uses; the paths unlinked."""
    removed = []
    for path in sorted(paths - _in_use(paths)):
        try:
            st = os.stat(path)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    return removed


def _wait_for_exit(proc: psutil.Process, pidfd: int | None, timeout: float) -> bool:
    """Wait up to `timeout` for `proc` to exit (POLL_S without a pidfd); True once it has."""
    if pidfd is not None:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    time.sleep(POLL_S)
    return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def _recorded_tree(recorded: dict[int, float]) -> dict[int, psutil.Process]:
    """Each recorded process that is still the same process, and its descendants now."""
    tree: dict[int, psutil.Process] = {}
    for pid, started in recorded.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != started:
                continue  # the pid was reused by an unrelated process
            for p in [proc, *proc.children(recursive=True)]:
                tree.setdefault(p.pid, p)
        except psutil.Error:
            continue
    return tree


def kill_recorded(recorded: dict[int, float], victims: dict[int, psutil.Process] | None = None) -> list[int]:
    """SIGKILL each recorded process that is still the same process, and its descendants (`victims`
    when the caller has just listed them); the pids killed."""
    victims = _recorded_tree(recorded) if victims is None else victims
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    return sorted(victims)


def watch(pid: int) -> None:
    """Record `pid`'s descendants and their shared memory (often at start, then every few seconds) until it
    exits; kill what is left and unlink the segments nobody uses any more."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll instead
        pidfd = None
    recorded: dict[int, float] = {}
    segments: set[str] = set()
    shm_seen: list[str] | None = None  # /dev/shm's names when the descendants' maps were last read
    rescan = False
    started = time.monotonic()
    while True:
        try:
            live = _descendants(proc)
        except psutil.Error:
            break
        recorded.update(live)
        # Reading every descendant's maps (thousands of lines each with torch) on each poll cost
        # more CPU than the rest of the watch: read them when /dev/shm changed, and once more on
        # the next poll (a segment is created a moment before it is mapped).
        names = _shm_names()
        if names != shm_seen or rescan:
            rescan = names != shm_seen
            shm_seen = names
            for child in live:
                segments |= shm_segments(child)
        interval = POLL_S if time.monotonic() - started < START_S else STEADY_POLL_S
        if _wait_for_exit(proc, pidfd, interval):
            break
    # What the tree maps now, read once more before the kill: a segment made since the last read (an
    # engine starting as its replica was killed) would otherwise stay in /dev/shm.
    victims = _recorded_tree(recorded)
    for child in victims:
        segments |= shm_segments(child)
    kill_recorded(recorded, victims)
    release_segments(segments)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
