"""The watchdog kills a dead replica's engine processes (no Ray: a parent shaped like vLLM's tree)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

# A "replica" that starts the watchdog, then spawns an "engine core" (multiprocessing spawn, as vLLM
# does in a Ray actor) that spawns a "worker"; it prints the pids and sleeps until killed.
REPLICA = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from helios.engine.reaper import ensure_reaper

    def worker():
        time.sleep(600)

    def engine_core(q):
        ctx = mp.get_context("spawn")
        w = ctx.Process(target=worker)
        w.start()
        q.put((os.getpid(), w.pid))
        time.sleep(600)

    if __name__ == "__main__":
        reaper = ensure_reaper()
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        core = ctx.Process(target=engine_core, args=(q,))
        core.start()
        core_pid, worker_pid = q.get()
        print(reaper.pid, core_pid, worker_pid, flush=True)
        time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if not _gone(p)]


def test_sigkilled_replica_leaves_no_engine_process(tmp_path: Path) -> None:
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    replica = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        reaper_pid, core_pid, worker_pid = map(int, replica.stdout.readline().split())
        time.sleep(1.5)  # the watchdog records descendants every POLL_S
        assert not _gone(core_pid) and not _gone(worker_pid)
        replica.send_signal(signal.SIGKILL)
        replica.wait()
        assert _wait_gone([core_pid, worker_pid, reaper_pid]) == []
    finally:
        if replica.poll() is None:
            replica.kill()


def test_a_reused_pid_is_not_killed() -> None:
    """Only a process that is still the one recorded dies: a pid with another start time is left alone."""
    from helios.engine.reaper import kill_recorded

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(bystander.pid).create_time()
        assert kill_recorded({bystander.pid: started - 100.0}) == []
        assert bystander.poll() is None
        assert kill_recorded({bystander.pid: started}) == [bystander.pid]
        assert _wait_gone([bystander.pid]) == []
    finally:
        if bystander.poll() is None:
            bystander.kill()
