"""KubeRay manifests that embed a Serve config: one source of truth for both.

A RayService carries its Serve config as a string (`spec.serveConfigV2`). Helios keeps that
config in `serve_configs/`, and a manifest names the file it embeds in an annotation:

    metadata:
      annotations:
        helios/serve-config: serve_configs/production.yaml
    spec:
      serveConfigV2: |
        <the file's text, verbatim, indented>

`render` rewrites only that block, so the manifest's own comments and layout stay as
written; the config's comments travel into the block (KubeRay parses it as YAML and drops
them). `drift` says when a committed manifest no longer holds its config's text.
Needs only pyyaml; the schema checks live in `helios.scaling.kuberay_schemas`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from helios.config import ConfigError, parse_args

SERVE_CONFIG_ANNOTATION = "helios/serve-config"
HELIOS_IMPORT_PATH = "helios.app:build_app"
_BLOCK_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: *\|-? *(#.*)?$")


class ManifestError(ValueError):
    """A manifest render cannot fill in, or a config it cannot embed; the message says which and why."""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_key_line(lines: list[str]) -> int:
    found = [i for i, line in enumerate(lines) if _BLOCK_KEY.match(line.rstrip("\n"))]
    if len(found) != 1:
        raise ManifestError(f"expected exactly one `serveConfigV2: |` block, found {len(found)}")
    return found[0]


def embed(manifest: str, config: str) -> str:
    """`manifest` with the body of its `serveConfigV2: |` block replaced by `config`'s text."""
    first = next((line for line in config.splitlines() if line.strip()), "")
    if not first or first[0] in " \t":
        raise ManifestError("the Serve config must start at column 0 (a YAML mapping)")
    lines = manifest.splitlines(keepends=True)
    key = _block_key_line(lines)
    key_indent = _indent(lines[key])
    end = key + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > key_indent):
        end += 1
    while end > key + 1 and not lines[end - 1].strip():  # blank lines before the next key stay outside
        end -= 1
    pad = " " * (key_indent + 2)
    body = [f"{pad}{line}" if line.strip() else "" for line in config.rstrip("\n").split("\n")]
    out = "".join(lines[: key + 1]) + "\n".join(body) + "\n" + "".join(lines[end:])
    if embedded_config(out) != yaml.safe_load(config):
        raise ManifestError("the embedded block does not read back as the config (unexpected indentation?)")
    return out


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a (multi-document) manifest."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _service(text: str) -> dict[str, Any]:
    services = [doc for doc in documents(text) if doc.get("kind") == "RayService"]
    if len(services) != 1:
        raise ManifestError(f"expected one RayService in the manifest, found {len(services)}")
    return services[0]


def embedded_config(text: str) -> Any:
    """The Serve config a manifest's RayService embeds, parsed."""
    return yaml.safe_load((_service(text).get("spec") or {}).get("serveConfigV2") or "")


def config_path(text: str) -> str | None:
    """The serve config file (relative to the repository root) a manifest says it embeds."""
    annotations = (_service(text).get("metadata") or {}).get("annotations") or {}
    return annotations.get(SERVE_CONFIG_ANNOTATION)


def render(config: Path, template: Path) -> str:
    """The manifest `template` with `config`'s text in its serveConfigV2 block."""
    return embed(template.read_text(), config.read_text())


def manifests_embedding(config: Path, root: Path) -> list[Path]:
    """Manifests in `root`/kuberay whose annotation names `config` (a path under `root`)."""
    try:
        wanted = config.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return []
    return [p for p in sorted((root / "kuberay").glob("*.yaml")) if _names(p, wanted)]


def _names(path: Path, wanted: str) -> bool:
    try:
        return config_path(path.read_text()) == wanted
    except ManifestError:
        return False  # not a RayService manifest


def drift(manifest: Path, root: Path) -> str | None:
    """Why `manifest` no longer embeds its annotated config verbatim, or None when it does."""
    text = manifest.read_text()
    name = config_path(text)
    if name is None:
        return f"no `{SERVE_CONFIG_ANNOTATION}` annotation names the config it embeds"
    config = root / name
    if not config.is_file():
        return f"its annotation names {name}, which does not exist"
    if embed(text, config.read_text()) != text:
        return f"its serveConfigV2 differs from {name}; run `helios kuberay render {name}`"
    return None


def helios_config_errors(serve_config: Any) -> list[str]:
    """Helios's own validation of every `helios.app:build_app` application in a Serve config."""
    apps = (serve_config or {}).get("applications") if isinstance(serve_config, dict) else None
    if not isinstance(apps, list) or not apps:
        return ["serveConfigV2: no `applications:` list"]
    errors = []
    for i, app in enumerate(apps):
        if app.get("import_path") == HELIOS_IMPORT_PATH:
            try:
                parse_args(app.get("args") or {})
            except ConfigError as exc:
                errors.append(f"serveConfigV2.applications[{i}].args: {exc}")
    return errors


def serve_config_problems(manifest: Path, root: Path) -> list[str]:
    """What is wrong with the Serve config a manifest embeds: Helios's own validation of it and,
    when the manifest names its config file, any drift from that file (paths relative to `root`)."""
    text = manifest.read_text()
    try:
        problems = helios_config_errors(embedded_config(text))
        named = config_path(text)
    except ManifestError:
        return []  # no RayService in this file: nothing embedded
    except yaml.YAMLError as exc:
        return [f"serveConfigV2: not YAML: {exc}"]
    if named is not None:
        why = drift(manifest, root)
        problems += [f"serveConfigV2: {why}"] if why else []
    return problems
