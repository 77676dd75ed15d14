"""The package imports downward only (DESIGN.md, "Layout"): a lower layer never imports a higher one.

Every import counts, including those inside functions and under TYPE_CHECKING: a cycle
hidden behind a local import is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "helios"
LAYERS = {
    "config": 0, "cpu_features": 0, "errors": 0, "observability": 0, "ray_env": 0, "ray_tls": 0,
    "storage": 1,
    "registry": 2,
    "engine": 3,
    "scaling": 4,
    "api": 5,
    "router": 6,
    "app": 7, "cli": 7,
}


def _part(module: str) -> str:
    """`helios.engine.kv_store` -> `engine`."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "helios" else [f"helios.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n.startswith("helios.")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("helios.")]
    return out


def _violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts
        if len(parts) < 2 or parts[1] == "__init__":
            continue
        src = parts[1]
        for line, module in _imports(path):
            dst = _part(module)
            if dst not in LAYERS or src not in LAYERS:
                bad.append(f"{rel}:{line}: {src} or {dst} has no layer in this test")
            elif LAYERS[dst] > LAYERS[src]:
                bad.append(f"{rel}:{line}: {src} (layer {LAYERS[src]}) imports {module} (layer {LAYERS[dst]})")
    return bad


def test_every_package_has_a_layer() -> None:
    found = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert found <= set(LAYERS), found - set(LAYERS)


def test_layers_import_downward_only() -> None:
    assert _violations(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "helios"
    (pkg / "storage").mkdir(parents=True)
    (pkg / "storage" / "x.py").write_text("def f():\n    from helios.router.core import RouterCore\n")
    (pkg / "config.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from helios.engine import http\n")
    found = _violations(pkg)
    assert len(found) == 2 and "storage (layer 1) imports helios.router.core" in found[1]


@pytest.mark.parametrize("module", ["helios.router.core", "helios.engine.http", "helios.api.bodies"])
def test_router_core_and_wire_types_import_without_ray_or_vllm(module: str) -> None:
    import subprocess
    import sys

    code = f"import sys, {module}; bad = [m for m in ('ray', 'vllm', 'torch') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
