"""The watchdog kills a dead replica's engine processes (no Ray: a parent shaped like vLLM's tree)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

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


# The same tree with vLLM's shared-memory queue: the "engine core" creates a segment, the "worker"
# maps it. Neither is registered with Python's resource tracker, which dies in the same kill
# (the segments of SIGKILLed vLLM engines stay in /dev/shm).
REPLICA_SHM = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from multiprocessing import resource_tracker, shared_memory
    from helios.engine.reaper import ensure_reaper

    def worker(name):
        resource_tracker.register = lambda *a, **k: None
        seg = shared_memory.SharedMemory(name=name)
        seg.buf[0] = 7
        time.sleep(600)

    def engine_core(q):
        seg = shared_memory.SharedMemory(create=True, size=1 << 20)
        resource_tracker.unregister(seg._name, "shared_memory")
        w = mp.get_context("spawn").Process(target=worker, args=(seg.name,))
        w.start()
        q.put((os.getpid(), w.pid, seg.name))
        time.sleep(600)

    if __name__ == "__main__":
        reaper = ensure_reaper()
        q = mp.get_context("spawn").Queue()
        core = mp.get_context("spawn").Process(target=engine_core, args=(q,))
        core.start()
        core_pid, worker_pid, name = q.get()
        print(reaper.pid, core_pid, worker_pid, name, flush=True)
        time.sleep(600)
""")


# The engine core makes its segment a moment before its replica is SIGKILLed: after the watchdog
# recorded the core, before it read the core's maps again.
_MAKE_SEGMENT = "    seg = shared_memory.SharedMemory(create=True, size=1 << 20)"
REPLICA_SHM_LATE = REPLICA_SHM.replace(_MAKE_SEGMENT, f"    time.sleep(1.5)\n{_MAKE_SEGMENT}")
assert REPLICA_SHM_LATE != REPLICA_SHM


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


@contextlib.contextmanager
def _shm_replica(tmp_path: Path, script_text: str) -> Iterator[tuple[subprocess.Popen, list[int], Path]]:
    """Run a REPLICA_SHM-shaped script: (the replica, [core, worker, watchdog] pids, the segment);
    afterwards nothing of it is left, whatever the test saw."""
    script = tmp_path / "replica_shm.py"
    script.write_text(script_text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    replica = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    segment = None
    try:
        reaper_pid, core_pid, worker_pid, name = replica.stdout.readline().split()
        segment = Path("/dev/shm") / name
        yield replica, [int(core_pid), int(worker_pid), int(reaper_pid)], segment
    finally:
        if replica.poll() is None:
            replica.kill()
        if segment is not None:
            segment.unlink(missing_ok=True)


@pytest.mark.parametrize("script_text", [REPLICA_SHM, REPLICA_SHM_LATE], ids=["mapped-for-a-while", "just-made"])
def test_a_killed_engines_shared_memory_is_unlinked(tmp_path: Path, script_text: str) -> None:
    """The /dev/shm segment the dead replica's engine processes mapped does not outlive them, also one
    made just before the kill."""
    with _shm_replica(tmp_path, script_text) as (replica, pids, segment):
        if script_text is REPLICA_SHM:
            time.sleep(1.5)  # the watchdog records descendants and their segments every POLL_S
        assert segment.exists()
        replica.send_signal(signal.SIGKILL)
        replica.wait()
        assert _wait_gone(pids) == []
        assert not segment.exists()


def test_the_watchdog_outlives_a_replica_whose_children_are_killed_with_it(tmp_path: Path) -> None:
    """Ray kills an exiting worker's direct children before the worker itself (the core worker's
    KillChildProcs): the watchdog must not be one of them, or the engine's segment stays behind."""
    with _shm_replica(tmp_path, REPLICA_SHM) as (replica, pids, segment):
        time.sleep(1.5)  # the watchdog records descendants and their segments every POLL_S
        assert pids[-1] not in {c.pid for c in psutil.Process(replica.pid).children()}
        for child in psutil.Process(replica.pid).children():  # as Ray does, then the worker goes
            child.kill()
        replica.send_signal(signal.SIGKILL)
        replica.wait()
        assert _wait_gone(pids) == []
        assert not segment.exists()


def test_a_segment_another_process_still_uses_is_kept() -> None:
    """Only segments nobody maps or holds open are unlinked: a live process's segment stays until it is done."""
    from multiprocessing import resource_tracker, shared_memory

    from helios.engine.reaper import release_segments, shm_segments

    seg = shared_memory.SharedMemory(create=True, size=1 << 16)
    resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    path = f"/dev/shm/{seg.name}"
    user = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import mmap, os, sys, time
        fd = os.open({path!r}, os.O_RDWR)
        m = mmap.mmap(fd, 0)
        os.close(fd)
        print("mapped", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout.readline().strip() == "mapped"
        seg.close()  # this process lets go: only the other one maps it now
        assert shm_segments(user.pid) == {path}
        assert release_segments({path}) == []
        assert os.path.exists(path)
        user.stdin.close()
        user.wait(timeout=10)
        assert release_segments({path}) == [path]
        assert not os.path.exists(path)
    finally:
        if user.poll() is None:
            user.kill()
        if os.path.exists(path):
            os.unlink(path)
