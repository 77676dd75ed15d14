"""The `helios` command: build the demo model, check a config, manage the model store, run Helios."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from helios.config import default_cache_root
from helios.ray_env import cluster_gone, gcs_address, ray_cluster_env, reap_orphaned_haproxy
from helios.ray_tls import make_certificates, tls_enabled, tls_env

app = typer.Typer(help="Helios: LLM serving on Ray Serve and vLLM.", no_args_is_help=True, add_completion=False)
demo_app = typer.Typer(help="The built-in demo model.", no_args_is_help=True)
config_app = typer.Typer(help="Serve configs.", no_args_is_help=True)
models_app = typer.Typer(help="Models in the store: push, pull, list.", no_args_is_help=True)
cache_app = typer.Typer(help="This node's cache tiers.", no_args_is_help=True)
tls_app = typer.Typer(help="Ray's mutual TLS: certificates for a TLS cluster.", no_args_is_help=True)
kuberay_app = typer.Typer(help="KubeRay RayService manifests (kuberay/).", no_args_is_help=True)
app.add_typer(demo_app, name="demo")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")
app.add_typer(tls_app, name="tls")
app.add_typer(kuberay_app, name="kuberay")
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
    from helios.storage.demo_model import PRESETS, build, file_digests

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


def _ray_running(env: dict[str, str] | None = None) -> bool:
    """Whether a local Ray cluster answers. Ray >= 2.5x turns token auth on at `ray start`, yet its
    `ray status` asks without the token unless told to: ask both ways."""
    for auth in ({}, {"RAY_AUTH_MODE": "token"}):
        if subprocess.run(["ray", "status"], capture_output=True, check=False,
                          env={**(env or os.environ), **auth}).returncode == 0:
            return True
    return False


def _announce_when_ready(port: int, stop: threading.Event, dashboard: bool = True) -> None:
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
    console.print(f"Metrics: {base}/metrics" + ("   Ray dashboard (applications, replicas, logs): http://localhost:8265"
                                                  if dashboard else ""))
    console.print("Press Ctrl-C to stop.")
    console.rule()


def _stop_when_cluster_gone(child: subprocess.Popen, stop: threading.Event, gone: threading.Event) -> None:
    """`ray stop` (or a crashed head) ends the cluster but not `serve run`, which would wait
    for good: when the GCS refuses connections three times running, stop it and say why."""
    address = gcs_address()
    if address is None:
        return
    while not stop.wait(5.0) and child.poll() is None:
        if cluster_gone(address):
            console.print(f"The Ray cluster at {address[0]}:{address[1]} is gone; stopping Helios.")
            gone.set()
            stop.set()
            child.terminate()
            threading.Timer(15, lambda: child.poll() is None and child.kill()).start()
            return


def _start_ray_head(num_cpus: int, env: dict[str, str]) -> bool:
    """`ray start --head` with the dashboard; without it when the dashboard alone keeps the head
    from starting (its port taken, or it does not come up in time on a loaded machine): serving
    matters more than the dashboard, and the user is told which it was."""
    base = ["ray", "start", "--head", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    first = subprocess.run([*base, "--include-dashboard=true"], capture_output=True, text=True, check=False, env=env)
    if first.returncode == 0:
        return True
    subprocess.run(["ray", "stop", "--force"], capture_output=True, check=False, env=env)
    second = subprocess.run([*base, "--include-dashboard=false"], capture_output=True, text=True, check=False, env=env)
    if second.returncode != 0:
        _fail("`ray start --head` failed:\n" + _tail(second.stderr or second.stdout), code=1)
    console.print("[yellow]warning:[/yellow] the Ray head did not start with its dashboard, so it runs without "
                  "one (metrics stay on /metrics). Ray said:\n" + _tail(first.stderr or first.stdout, 12))
    return False


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


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
    env = ray_cluster_env()
    if tls_enabled():
        directory = Path(os.environ.get("HELIOS_TLS_DIR") or default_cache_root() / "tls")
        if not (directory / "tls.crt").exists():
            make_certificates(directory)
            console.print(f"Made a CA and this node's certificate in {directory}")
        env.update(tls_env(directory))
        console.print(f"Ray mutual TLS on (certificates in {directory}): processes without them cannot join.")
    started_ray, dashboard = False, True  # a running cluster's dashboard is its own business
    if not _ray_running(env):
        console.print(f"Starting a local Ray head with {num_cpus} logical CPUs…")
        dashboard = _start_ray_head(num_cpus, env)
        started_ray = True
    console.print(f"Deploying {len(apps)} application(s) from {config}; the first start builds the demo model "
                  "and starts vLLM (about a minute on a CPU)…")
    stop = threading.Event()
    threading.Thread(target=_announce_when_ready, args=(port, stop, dashboard), daemon=True).start()
    # The child gets a default SIGINT even if ours is ignored (as under `nohup` or `&`).
    child = subprocess.Popen([shutil.which("serve") or "serve", "run", "--address", "auto", str(config)],
                             env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - one signal call, nothing that takes a lock

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
    gone = threading.Event()
    threading.Thread(target=_stop_when_cluster_gone, args=(child, stop, gone), daemon=True).start()
    try:
        child.wait()
    finally:
        stop.set()
        if started_ray:
            console.print("Stopping the local Ray head…")
            subprocess.run(["ray", "stop", "--force"], capture_output=True, check=False, env=env)
            reap_orphaned_haproxy()
    if gone.is_set():
        raise typer.Exit(1)
    raise typer.Exit(child.returncode if child.returncode and child.returncode > 0 else 0)


@tls_app.command("init")
def tls_init(
    directory: Path = typer.Argument(..., help="Where to write ca.crt, ca.key, tls.crt and tls.key."),
    name: list[str] = typer.Option(None, "--name", help="DNS names the node is reached at [default: this host's]."),
    ip: list[str] = typer.Option(None, "--ip", help="IP addresses the node is reached at [default: this host's]."),
) -> None:
    """Make a CA (kept if DIR has one) and a node certificate it signs, for Ray's mutual TLS."""
    paths = make_certificates(directory, name or None, ip or None)
    console.print(f"Wrote {', '.join(str(p) for p in paths.values())}")
    console.print("Start every Ray process with:")
    for key, value in tls_env(directory).items():
        console.print(f"  export {key}={value}")
    console.print("or run `HELIOS_TLS=1 HELIOS_TLS_DIR=DIR helios serve`.")


# --- the store ---------------------------------------------------------------------

_CONFIG_OPTION = typer.Option(
    None, "--config", "-c", envvar="HELIOS_CONFIG",
    help="Serve config whose `storage:` section names the tiers [default: serve_configs/local.yaml].",
)


def _store(config: Path | None):
    """The ModelStore of the first Helios application in a Serve config that has a `storage:` section."""
    from helios.config import parse_args
    from helios.errors import HeliosError
    from helios.storage.store import ModelStore

    path = config or Path("serve_configs/local.yaml")
    data = _check(path)
    for application in data["applications"]:
        if application.get("import_path") == "helios.app:build_app":
            args = parse_args(application.get("args") or {})
            if args.storage is not None:
                try:
                    return ModelStore.from_config(args.storage, args.resolved_cache_root())
                except HeliosError as exc:
                    _fail(str(exc))
    _fail(f"{path} has no Helios application with a `storage:` section")


@contextlib.contextmanager
def _storage_errors():
    """Print a storage failure as one plain line, not a traceback."""
    from helios.errors import HeliosError

    try:
        yield
    except (HeliosError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        _fail(str(getattr(exc, "message", "") or exc))


def _table(*columns: str):
    """A table whose cells wrap instead of being cut short in a narrow terminal (ids and paths matter)."""
    from rich.table import Table

    table = Table()
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


@models_app.command("push")
def models_push(
    src: Path = typer.Argument(..., help="Model directory (config.json, tokenizer, safetensors)."),
    model: str = typer.Option(..., "--model", "-m", help="Model id, e.g. org/name."),
    version: str = typer.Option(..., "--version", "-v", help="Version name, e.g. v1."),
    config: Path | None = _CONFIG_OPTION,
) -> None:
    """Hash a model directory and upload its new files and manifest to the durable tier."""
    from helios.storage.manifest import model_files
    from helios.storage.transfer import progress_bar

    store = _store(config)
    if not src.is_dir():
        _fail(f"{src} is not a directory")
    total = sum(p.stat().st_size for p in model_files(src))
    console.print(f"Pushing {src} as [bold]{model}:{version}[/bold] ({_gib(total)}) to {store.durable.describe()}")
    with _storage_errors(), progress_bar(total, "upload") as progress:
        manifest = store.push(src, model, version, progress)
    console.print(f"[green]pushed[/green] {manifest.ref}: {len(manifest.files)} files, {_gib(manifest.total_bytes)}")


@models_app.command("pull")
def models_pull(
    ref: str = typer.Argument(..., help="ID or ID:VERSION (newest version when omitted)."),
    tier: str | None = typer.Option(None, help="Local tier to pull into: ram, nvme or ssd [default: fastest]."),
    config: Path | None = _CONFIG_OPTION,
) -> None:
    """Bring a model version into a local tier, from the fastest tier that has it."""
    from helios.storage.manifest import parse_ref
    from helios.storage.transfer import progress_bar

    store = _store(config)
    model_id, version = parse_ref(ref)
    with _storage_errors():
        manifest = store.resolve(model_id, version)
        with progress_bar(manifest.total_bytes, f"pull {manifest.ref}") as progress:
            local = store.localize(manifest, tier, progress)
    seconds = local.timings["fetch_s"]
    moved = local.fetched_bytes
    rate = f", {moved / max(seconds, 1e-9) / 1e9:.2f} GB/s" if moved else ""
    sources = ", ".join(f"{_gib(n)} from {k}" for k, n in local.sources.items())
    console.print(f"[green]ready[/green] {manifest.ref} in {local.tier}: {sources} ({seconds:.1f} s{rate})")
    typer.echo(str(local.path))


@models_app.command("ls")
def models_ls(config: Path | None = _CONFIG_OPTION) -> None:
    """Every model version in the store and the tiers holding all of it."""
    store = _store(config)
    with _storage_errors():
        manifests = store.models()
        table = _table("model", "version", "files", "size", "pushed", "tiers")
        for m in manifests:
            pushed = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
            tiers = " ".join(store.holders(m))
            table.add_row(m.model_id, m.version, str(len(m.files)), _gib(m.total_bytes), pushed, tiers)
    if not manifests:
        console.print("The store holds no models yet; add one with `helios models push DIR --model ID --version V`.")
        return
    Console().print(table)


@cache_app.command("ls")
def cache_ls(config: Path | None = _CONFIG_OPTION) -> None:
    """What each local tier holds, its size and capacity."""
    store = _store(config)
    table = _table("tier", "path", "used", "capacity", "blobs", "KV blocks", "models held")
    for t in store.local:
        held = [m.ref for m in t.manifests() if t.has_all(m)]
        blobs, kv = t.blobs(), t.kv_blocks()
        kv_bytes = sum(b.size for b in kv)
        table.add_row(t.kind, str(t.root), _gib(sum(b.size for b in blobs) + kv_bytes), _gib(t.capacity),
                      str(len(blobs)), f"{len(kv)} ({_gib(kv_bytes)})" if kv else "0", ", ".join(held) or "-")
    Console().print(table)


@cache_app.command("evict")
def cache_evict(
    ref: str | None = typer.Argument(None, help="ID or ID:VERSION to drop; omit with --all to empty the tiers."),
    tier: str | None = typer.Option(None, help="Only this local tier [default: every local tier]."),
    all_: bool = typer.Option(False, "--all", help="Drop everything from the local tier(s), KV blocks included."),
    config: Path | None = _CONFIG_OPTION,
) -> None:
    """Drop models from local tiers (the remote tier keeps them); blobs other versions use stay."""
    from helios.storage.manifest import parse_ref

    if not ref and not all_:
        _fail("name a model (ID or ID:VERSION) or pass --all")
    store = _store(config)
    model_id, version = parse_ref(ref) if ref else (None, None)
    with _storage_errors():
        if model_id:
            store.resolve(model_id, version)  # a clear error for a name the store does not know
        freed = store.evict(model_id, version, tier)
    console.print(f"[green]evicted[/green] {ref or 'everything'} from {tier or 'every local tier'}: {_gib(freed)} freed")


# --- KubeRay manifests ---------------------------------------------------------------


@kuberay_app.command("render")
def kuberay_render(
    config: Path = typer.Argument(..., help="A Serve config YAML, e.g. serve_configs/production.yaml."),
    template: Path | None = typer.Option(
        None, "--template", "-t", help="Manifest whose `serveConfigV2: |` block to fill [default: every "
        "kuberay/*.yaml whose helios/serve-config annotation names CONFIG]."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Where to write [default: the template itself, in place]; `-` for stdout."),
) -> None:
    """Write a Serve config (validated first) into a RayService manifest's serveConfigV2."""
    from helios.scaling.kuberay import ManifestError, manifests_embedding, render

    _check(config)
    templates = [template] if template else manifests_embedding(config, Path.cwd())
    if not templates:
        _fail(f"no kuberay/*.yaml names {config} in its helios/serve-config annotation; pass --template")
    if out is not None and len(templates) > 1:
        _fail(f"{len(templates)} manifests embed {config}; pass --template with --out")
    for path in templates:
        try:
            text = render(config, path)
        except (ManifestError, OSError, yaml.YAMLError) as exc:
            _fail(f"{path}: {exc}")
        target = out or path
        if str(target) == "-":
            typer.echo(text, nl=False)
            continue
        same = target.exists() and target.read_text() == text
        target.write_text(text)
        console.print(f"[green]{'unchanged' if same else 'wrote'}[/green]: {target} (serveConfigV2 from {config})")


@kuberay_app.command("check")
def kuberay_check(
    files: list[Path] = typer.Argument(..., help="Manifests to check (multi-document YAML)."),
    crds: Path | None = typer.Option(None, "--crds", help="Directory of KubeRay CRDs [default: kuberay/crds]."),
) -> None:
    """Validate manifests offline: KubeRay CRDs, Kubernetes schemas, the embedded Serve config and its drift."""
    try:
        from helios.scaling.kuberay_schemas import CRD_DIR, check_file
    except ImportError as exc:
        _fail(f"{exc.name} is missing: pip install 'helios[kuberay]'")
    from helios.scaling.kuberay import serve_config_problems

    failed = 0
    for path in files:
        try:
            problems = [str(p) for p in check_file(path, crds or CRD_DIR)]
        except (OSError, yaml.YAMLError) as exc:
            _fail(f"{path}: {exc}")
        problems += serve_config_problems(path, Path.cwd())
        failed += bool(problems)
        console.print(f"{path}: " + ("[green]ok[/green]" if not problems else f"[red]{len(problems)} problem(s)[/red]"))
        for problem in problems:
            console.print(f"    {problem}", markup=False, highlight=False)
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
