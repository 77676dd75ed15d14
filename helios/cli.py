"""The `helios` command: build the demo model, check a config, run Helios locally."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from helios.ray_env import ray_cluster_env, reap_orphaned_haproxy

app = typer.Typer(help="Helios: LLM serving on Ray Serve and vLLM.", no_args_is_help=True, add_completion=False)
demo_app = typer.Typer(help="The built-in demo model.", no_args_is_help=True)
config_app = typer.Typer(help="Serve configs.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
app.add_typer(config_app, name="config")
console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@demo_app.command("build")
def demo_build(
    preset: str = typer.Argument("tiny", help="Preset name: tiny (~10 MB) or bench (~1.4 GB)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the model into (must not exist)."),
) -> None:
    """Build the demo model (byte-identical on every machine) into a directory."""
    from helios.engine.demo_model import PRESETS, build, file_digests

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if out.exists() and any(out.iterdir()):
        _fail(f"{out} already exists and is not empty")
    if out.exists():
        out.rmdir()
    size_gb = PRESETS[preset].weight_bytes() / 1e9
    console.print(f"Building demo model [bold]{preset}[/bold] ({size_gb:.2f} GB of weights) into {out}")
    with console.status("writing...") as status:
        build(preset, out, progress=lambda msg: status.update(msg))
    for name, digest in file_digests(out):
        console.print(f"  {name}  sha256:{digest[:16]}…")
    console.print(f"[green]done[/green]: {out}")


def _load_config(path: Path) -> dict[str, Any]:
    """The Serve config document, which must hold an `applications:` list."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        _fail(f"config file {path} does not exist")
    except yaml.YAMLError as exc:
        _fail(f"{path} is not valid YAML: {exc}")
    apps = (data or {}).get("applications")
    if not isinstance(apps, list) or not apps:
        _fail(f"{path} has no `applications:` list")
    return data


def _check(path: Path) -> dict[str, Any]:
    """Load a Serve config and validate the args of every Helios application in it."""
    from helios.config import ConfigError, parse_args

    data = _load_config(path)
    for i, application in enumerate(data["applications"]):
        if application.get("import_path") == "helios.app:build_app":
            try:
                parse_args(application.get("args") or {})
            except ConfigError as exc:
                _fail(f"{path}: applications.{i}.args: {exc}")
    return data


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="A Serve config YAML.")) -> None:
    """Validate a Serve config's Helios `args:` without starting anything."""
    _check(path)
    console.print(f"[green]ok[/green]: {path}")


def _ray_running() -> bool:
    return subprocess.run(["ray", "status"], capture_output=True).returncode == 0


def _announce_when_ready(port: int, stop: threading.Event) -> None:
    import requests

    base = f"http://localhost:{port}"
    while not stop.wait(2.0):
        try:
            if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            continue
    else:
        return
    models = requests.get(f"{base}/v1/models", timeout=5).json().get("data", [])
    names = ", ".join(m["id"] for m in models)
    console.rule("[green]Helios is ready")
    console.print(f"OpenAI API: [bold]{base}/v1[/bold]   models: {names}")
    console.print(f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{models[0]['id'] if models else 'MODEL'}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
    console.print("Press Ctrl-C to stop.")
    console.rule()


@app.command("serve")
def serve_cmd(
    config: Path = typer.Argument(Path("serve_configs/local.yaml"), help="A Serve config YAML."),
    num_cpus: int = typer.Option(8, help="Logical CPUs the local Ray head advertises (replicas reserve them)."),
) -> None:
    """Run a Serve config on a local Ray head (`serve run` under the hood) and print the URL."""
    data = _check(config)
    apps = data["applications"]
    port = int((data.get("http_options") or {}).get("port", 8000))
    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    started_ray = False
    if not _ray_running():
        console.print(f"Starting a local Ray head with {num_cpus} logical CPUs…")
        subprocess.run(["ray", "start", "--head", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                        "--include-dashboard=false"], check=True, capture_output=True, env=ray_cluster_env())
        started_ray = True
    console.print(f"Deploying {len(apps)} application(s) from {config}; the first start builds the demo model "
                  "and starts vLLM (about a minute on a CPU)…")
    stop = threading.Event()
    threading.Thread(target=_announce_when_ready, args=(port, stop), daemon=True).start()
    # The child gets a default SIGINT even if ours is ignored (as under `nohup` or `&`).
    child = subprocess.Popen([shutil.which("serve") or "serve", "run", "--address", "auto", str(config)],
                             env=ray_cluster_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def _forward(signum: int, _frame: object) -> None:
        # `serve run` shuts the applications down cleanly on SIGINT, whichever signal we got;
        # a second signal, or 30 s without an exit, ends it outright.
        console.print("Stopping Helios…")
        if stop.is_set():
            child.terminate()
            return
        stop.set()
        child.send_signal(signal.SIGINT)
        threading.Timer(30, lambda: child.poll() is None and child.terminate()).start()

    signal.signal(signal.SIGINT, _forward)
    signal.signal(signal.SIGTERM, _forward)
    try:
        child.wait()
    finally:
        stop.set()
        if started_ray:
            console.print("Stopping the local Ray head…")
            subprocess.run(["ray", "stop", "--force"], capture_output=True, check=False)
            reap_orphaned_haproxy()
    raise typer.Exit(child.returncode if child.returncode and child.returncode > 0 else 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
