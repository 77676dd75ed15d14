"""An engine host's priority covers every thread: Linux keeps a nice value and a scheduling class
per thread, and a host that reniced only its main thread fetched and loaded at its idle priority
after being taken. A waiting host runs in SCHED_IDLE (Ray's workers run at nice 15, so a nice
value alone would rank a refill's imports above serving) and a taken one back in SCHED_OTHER."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, os, threading
from helios.engine.pool import _renice
started = threading.Event(); done = threading.Event()
def idle():
    started.set(); done.wait()
t = threading.Thread(target=idle); t.start(); started.wait()
want = min(os.getpriority(os.PRIO_PROCESS, 0) + 3, 19)  # raising needs no privilege
def state(tid):
    return [os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)]
def snapshot():
    late = {}
    def later():
        late["state"] = state(threading.get_native_id())
    l = threading.Thread(target=later); l.start(); l.join()
    return {"main": state(threading.get_native_id()), "earlier_thread": state(t.native_id),
            "later_thread": late["state"]}
_renice(want, idle_class=True)
idle = snapshot()
_renice(want)
normal = snapshot()
print(json.dumps({"want": want, "idle": idle, "normal": normal,
                  "SCHED_IDLE": os.SCHED_IDLE, "SCHED_OTHER": os.SCHED_OTHER}))
done.set(); t.join()
"""


def test_renice_reaches_threads_started_before_and_after() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = got["want"]
    every = ("main", "earlier_thread", "later_thread")
    assert got["idle"] == {k: [want, got["SCHED_IDLE"]] for k in every}
    assert got["normal"] == {k: [want, got["SCHED_OTHER"]] for k in every}
