"""Start one of the compared OpenAI servers on a port and keep it up until SIGTERM.

Run by the benchmarks as a subprocess, one system at a time, so each gets the whole
machine and leaves nothing behind:

    python benchmarks/servers.py {raw_vllm|rayserve_llm|helios} MODEL_DIR PORT ENGINE_JSON

ENGINE_JSON holds the engine settings every system gets alike (dtype, max_model_len,
max_num_seqs, enforce_eager, kv_cache_space_gib).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time

MODEL_ID = "helios-demo-tiny"


def _wait_for_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


def raw_vllm(model_dir: str, port: int, engine: dict) -> None:
    """vLLM's own OpenAI server, as its users run it."""
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", engine["dtype"], "--max-model-len", str(engine["max_model_len"]),
        "--max-num-seqs", str(engine["max_num_seqs"]), "--seed", "0", "--disable-log-stats",
    ]
    if engine.get("enforce_eager"):
        args.append("--enforce-eager")
    os.execv(sys.executable, args)


def _ray_serve(app_builder, port: int) -> None:
    import ray
    from ray import serve

    # A cluster of its own ("local"), even beside another system's: overhead.py --observability runs three at once.
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(), name="bench", route_prefix="/")
    try:
        _wait_for_sigterm()
    finally:
        serve.shutdown()
        ray.shutdown()


def rayserve_llm(model_dir: str, port: int, engine: dict) -> None:
    """Ray Serve LLM's OpenAI app (`build_openai_app`) with the same engine settings."""

    def build():
        from ray.serve.llm import LLMConfig, build_openai_app

        config = LLMConfig(
            model_loading_config={"model_id": MODEL_ID, "model_source": model_dir},
            accelerator_config={"kind": "cpu"},
            engine_kwargs={
                "dtype": engine["dtype"], "max_model_len": engine["max_model_len"],
                "max_num_seqs": engine["max_num_seqs"], "enforce_eager": engine["enforce_eager"], "seed": 0,
            },
            deployment_config=_rsllm_deployment(),
            runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(engine["kv_cache_space_gib"])}},
        )
        return build_openai_app({"llm_configs": [config]})

    _ray_serve(build, port)


def _rsllm_deployment() -> dict:
    """One replica, or (HELIOS_BENCH_RSLLM_AUTOSCALING: JSON) Serve's default autoscaling with those
    settings; `max_ongoing_requests` among them goes to the deployment."""
    scaling = json.loads(os.environ.get("HELIOS_BENCH_RSLLM_AUTOSCALING", "{}"))
    if not scaling:
        return {"num_replicas": 1}
    ongoing = scaling.pop("max_ongoing_requests", None)
    return {"autoscaling_config": scaling, **({"max_ongoing_requests": ongoing} if ongoing else {})}


def helios(model_dir: str, port: int, engine: dict) -> None:
    """Helios's router + engine deployments, on a Ray cluster started as `helios serve` starts it."""
    from helios.ray_env import ray_cluster_env

    os.environ.update(ray_cluster_env())

    def build():
        from helios.app import build_app

        # HELIOS_BENCH_DEPLOYMENT / _ENGINE / _ROUTER: JSON settings over the shared ones, to measure a knob.
        deployment = json.loads(os.environ.get("HELIOS_BENCH_DEPLOYMENT", "{}"))
        engine_args = {**engine, **json.loads(os.environ.get("HELIOS_BENCH_ENGINE", "{}"))}
        router = json.loads(os.environ.get("HELIOS_BENCH_ROUTER", "{}"))
        observability = json.loads(os.environ.get("HELIOS_BENCH_OBSERVABILITY", "{}"))
        model = {"id": MODEL_ID, "source": model_dir, "engine": engine_args, "deployment": deployment}
        return build_app({"models": [model], "router": router, "observability": observability})

    _ray_serve(build, port)


def helios_metrics_off(model_dir: str, port: int, engine: dict) -> None:
    """Helios with its and vLLM's metrics off (HELIOS_METRICS=0): what metrics cost."""
    os.environ["HELIOS_METRICS"] = "0"
    helios(model_dir, port, engine)


def helios_tracing(model_dir: str, port: int, engine: dict) -> None:
    """Helios tracing every request (sample ratio 1.0) to the OTLP receiver at HELIOS_BENCH_OTLP."""
    os.environ["HELIOS_BENCH_OBSERVABILITY"] = json.dumps(
        {"tracing": {"endpoint": os.environ["HELIOS_BENCH_OTLP"], "sample_ratio": 1.0}})
    helios(model_dir, port, engine)


def helios_token_latency(model_dir: str, port: int, engine: dict) -> None:
    """Helios with vLLM's per-token inter-token histogram on too (`observability.engine_token_latency`)."""
    os.environ["HELIOS_BENCH_OBSERVABILITY"] = json.dumps({"engine_token_latency": True})
    helios(model_dir, port, engine)


def helios_colocated(model_dir: str, port: int, engine: dict) -> None:
    """Helios with the engine in the router's replica (`router.colocate_engine`): no Ray call per request."""
    router = json.loads(os.environ.get("HELIOS_BENCH_ROUTER", "{}"))
    os.environ["HELIOS_BENCH_ROUTER"] = json.dumps({**router, "colocate_engine": True})
    helios(model_dir, port, engine)


def rayserve_llm_haproxy(model_dir: str, port: int, engine: dict) -> None:
    """Ray Serve LLM on Ray Serve's HAProxy ingress too: shows what of Helios's lead is that choice."""
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    rayserve_llm(model_dir, port, engine)


def cold_start_controller(port: int) -> None:
    """For the cold-start benchmark: Ray and Serve up first, then apps deployed on command.

    Commands are JSON lines on stdin; answers are JSON lines on stdout prefixed `@@cold `:
    `{"cmd": "deploy", "system": "helios"|"rayserve_llm", "args": {...}}` answers
    `deploying` with `t0` (wall clock, taken before the app is built) and later `running`
    (when `serve.run` returns) or `error`; `{"cmd": "info", "deployment": NAME}` calls that
    deployment's `info()`; `{"cmd": "delete"}` deletes the app; `{"cmd": "exit"}` stops.
    The cluster is started as each system's users start it (Helios: `ray_cluster_env()`);
    the caller sets any other environment (AWS_* for S3, HF_HUB_CACHE) before launching.
    """
    import traceback

    import ray
    from ray import serve

    if os.environ.get("HELIOS_BENCH_CLUSTER") == "helios":
        from helios.ray_env import ray_cluster_env

        os.environ.update(ray_cluster_env())

    def say(event: str, **fields) -> None:
        print("@@cold " + json.dumps({"event": event, **fields}, default=str), flush=True)

    def build(system: str, args: dict):
        if system == "helios":
            from helios.app import build_app

            return build_app(args)
        from ray.serve.llm import LLMConfig, build_openai_app

        return build_openai_app({"llm_configs": [LLMConfig(**args)]})

    # A cluster of its own ("local"), even beside another system's: overhead.py --observability runs three at once.
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    say("ready")
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            try:
                if cmd["cmd"] == "deploy":
                    t0 = time.time()
                    say("deploying", t0=t0)
                    serve.run(build(cmd["system"], cmd["args"]), name="bench", route_prefix="/")
                    say("running", t=time.time())
                elif cmd["cmd"] == "info":
                    handle = serve.get_deployment_handle(cmd["deployment"], app_name="bench")
                    say("info", info=handle.info.remote().result(timeout_s=60))
                elif cmd["cmd"] == "app_info":  # an application's ingress (a model started on demand)
                    say("info", info=serve.get_app_handle(cmd["app"]).info.remote().result(timeout_s=60))
                elif cmd["cmd"] == "pool":
                    from helios.engine.pool import POOL_NAME, POOL_NAMESPACE

                    status = ray.get(ray.get_actor(POOL_NAME, namespace=POOL_NAMESPACE).status.remote(), timeout=30)
                    say("pool", status=status)
                elif cmd["cmd"] == "delete":
                    for name in list(serve.status().applications):  # models started on demand too
                        serve.delete(name)
                    say("deleted")
                elif cmd["cmd"] == "exit":
                    break
            except Exception as exc:  # noqa: BLE001 - report it and keep serving commands
                say("error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    finally:
        serve.shutdown()
        ray.shutdown()


SYSTEMS = {"raw_vllm": raw_vllm, "rayserve_llm": rayserve_llm, "rayserve_llm_haproxy": rayserve_llm_haproxy,
           "helios": helios, "helios_metrics_off": helios_metrics_off, "helios_tracing": helios_tracing,
           "helios_token_latency": helios_token_latency, "helios_colocated": helios_colocated}


def _free_port() -> int:
    from helios.ray_env import side_port

    return side_port()


_launched: list[subprocess.Popen] = []


def _stop_launched() -> None:
    """At the benchmark's exit: stop every server it launched and has not stopped (an error, SIGTERM)."""
    for proc in _launched:
        if proc.poll() is None:
            stop(proc, grace_s=10)


def exit_on_sigterm() -> None:
    """A benchmark stopped with SIGTERM (`timeout`, a CI job's end) exits as on an error: its `finally`s
    and `_stop_launched` run, so no server it started (each in a session of its own) outlives it."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def launch(system: str, model_dir: str, port: int, engine: dict, log_path: str) -> subprocess.Popen:
    """Start `system` in its own process group, logging to `log_path`; it is stopped at exit if still up."""
    exit_on_sigterm()
    if not _launched:
        atexit.register(_stop_launched)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(engine["kv_cache_space_gib"]),
           # Fresh HAProxy side ports, so a previous system's HAProxy still draining cannot clash.
           "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port())}
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, __file__, system, model_dir, str(port), json.dumps(engine)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    _launched.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server (Ray ones shut their cluster down), then kill what is left of its tree."""
    import psutil

    from helios.engine.reaper import release_segments, shm_segments

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    # vLLM's shared-memory queues: a killed engine (raw vLLM's, or Helios's with its watchdog
    # killed in the same sweep) leaves them in /dev/shm.
    segments = set().union(*(shm_segments(p.pid) for p in tree))
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # Ray's HAProxy and vLLM's engine processes can outlive a killed parent.
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
    release_segments(segments)


if __name__ == "__main__":
    if sys.argv[1] == "cold_start":  # python servers.py cold_start PORT
        cold_start_controller(int(sys.argv[2]))
        sys.exit(0)
    name, model_dir, port, engine_json = sys.argv[1:5]
    SYSTEMS[name](model_dir, int(port), json.loads(engine_json))
