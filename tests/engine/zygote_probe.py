"""For test_warm_start: preloaded by a zygote after Helios's own first module, it changes the
zygote's first environment variable (as an import of vLLM, torch or Ray can); `report` runs in a
process forked from that zygote."""

import os
from typing import Any

_first = next(iter(os.environ))
os.environ[_first] = os.environ[_first] + "-changed-by-an-import"


def report(queue: Any) -> None:
    """Title this process as vLLM titles its engine core, then report its command line and environment."""
    from vllm.utils.system_utils import set_process_title

    set_process_title("EngineCore")
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode().strip()
    queue.put([cmdline, os.environ.get("HELIOS_TEST_LATE"), os.environ["VLLM_WORKER_MULTIPROC_METHOD"]])
