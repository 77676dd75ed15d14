"""Processes forked from the zygote carry vLLM's titles and the parent's environment."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, multiprocessing, os
    from helios.engine import warm_start
    from tests.engine import zygote_probe

    multiprocessing.set_forkserver_preload([*warm_start.PRELOAD[:1], "tests.engine.zygote_probe"])
    os.environ["HELIOS_TEST_LATE"] = "set after the zygote started"
    queue = warm_start.WARM_CONTEXT.Queue()
    proc = warm_start.WARM_CONTEXT.Process(target=zygote_probe.report, args=(queue,))
    proc.start()
    print(json.dumps(queue.get(timeout=60)))
    proc.join(30)
""")


def test_a_forked_engine_process_is_titled_and_sees_the_parents_environment_at_its_start() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).parents[2])
    cmdline, late, method = json.loads(out.stdout.strip().splitlines()[-1])
    assert cmdline.startswith("VLLM::EngineCore"), cmdline
    assert late == "set after the zygote started"
    assert method == "fork"  # the engine core forks its own worker
