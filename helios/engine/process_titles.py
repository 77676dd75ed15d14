"""Imported first by the zygote (`warm_start.PRELOAD`): sets up `setproctitle` before anything changes the environment.

`setproctitle` finds the process's argv by walking back from `environ`; once an import has
replaced the first environment variable (vLLM, torch and Ray set variables as they load), that
walk fails and every process forked from the zygote keeps the zygote's command line instead of
`VLLM::EngineCore` / `VLLM::Worker`, which is what operators and Helios's own lifetime checks
look for. Set up here, the forked children inherit a working `setproctitle`.
"""

try:
    import setproctitle
except ImportError:  # vLLM then leaves its processes untitled too
    setproctitle = None

if setproctitle is not None:
    setproctitle.setproctitle(setproctitle.getproctitle())
