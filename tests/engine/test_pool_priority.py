"""An engine host's priority covers every thread: Linux keeps a nice value per thread, and a host
that reniced only its main thread fetched and loaded at its idle priority after being taken."""

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
_renice(want)
late = {}
def later():
    late["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
l = threading.Thread(target=later); l.start(); l.join()
print(json.dumps({"want": want, "main": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                  "earlier_thread": os.getpriority(os.PRIO_PROCESS, t.native_id), "later_thread": late["nice"]}))
done.set(); t.join()
"""


def test_renice_reaches_threads_started_before_and_after() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    nice = json.loads(out.stdout.strip().splitlines()[-1])
    want = nice.pop("want")
    assert nice == {"main": want, "earlier_thread": want, "later_thread": want}
