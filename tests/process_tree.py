"""Killing a probe subprocess and everything it started, shared memory included.

vLLM's engine core and workers can outlive their parent, and the /dev/shm segments they talk
through (hundreds of MB for a demo model) are unlinked only by a clean shutdown: a probe killed
after a timeout would leave them behind for the rest of the run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil

from helios.engine.reaper import release_segments, shm_segments


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a probe (started in its own session) and every descendant, then unlink the /dev/shm
    segments they mapped that no live process still uses.

    The process group catches orphans whose parent already exited; the psutil walk catches
    anything that left the group."""
    try:
        parent = psutil.Process(proc.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        procs = []
    procs += [p for p in psutil.process_iter() if p not in procs and _group(p.pid) == proc.pid]  # orphans
    segments = {s for p in procs for s in shm_segments(p.pid)}
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    release_segments(segments)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
