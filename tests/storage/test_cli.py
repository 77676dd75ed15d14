"""`helios models` and `helios cache`: what an operator types and reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helios.cli import app
from tests.storage.conftest import random_bytes, write_model


@pytest.fixture
def config(tmp_path: Path) -> Path:
    storage = {
        "tiers": [
            {"kind": "ram", "path": str(tmp_path / "ram"), "capacity": "64MiB"},
            {"kind": "nvme", "path": str(tmp_path / "nvme"), "capacity": "256MiB"},
            {"kind": "remote", "url": f"file://{tmp_path / 'remote'}"},
        ]
    }
    doc = {"applications": [{"name": "helios", "import_path": "helios.app:build_app", "args": {
        "models": [{"id": "m", "source": "demo://tiny"}], "storage": storage, "cache_root": str(tmp_path)}}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def said(out: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(out.split())


def test_push_ls_pull_cache_ls_and_evict(config: Path, tmp_path: Path) -> None:
    src = write_model(tmp_path / "src", random_bytes(3 << 20))
    code, out = run("models", "push", str(src), "--model", "org/m", "--version", "v1", "--config", str(config))
    assert code == 0, out
    assert "pushed org/m:v1" in out
    assert (tmp_path / "remote" / "manifests").exists()

    code, out = run("models", "ls", "--config", str(config))
    assert code == 0 and "org/m" in out and "v1" in out and "remote" in out

    code, out = run("models", "pull", "org/m:v1", "--config", str(config))
    assert code == 0, out
    path = Path(out.strip().splitlines()[-1])
    assert (path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert "from remote" in out

    code, out = run("cache", "ls", "--config", str(config))
    assert code == 0 and "org/m:v1" in out and "ram" in out and "nvme" in out

    code, out = run("cache", "evict", "org/m", "--tier", "ram", "--config", str(config))
    assert code == 0 and "3.0 MiB freed" in said(out)
    assert not any((tmp_path / "ram" / "blobs").iterdir())
    code, out = run("models", "pull", "org/m", "--config", str(config))
    assert code == 0 and "from nvme" in out  # the next pull is local


def test_pull_of_a_missing_model_says_so(config: Path) -> None:
    code, out = run("models", "pull", "nope:v1", "--config", str(config))
    assert code == 2
    assert "'nope' is not in the store" in said(out) and "Traceback" not in out


def test_push_of_a_missing_directory_says_so(config: Path, tmp_path: Path) -> None:
    code, out = run("models", "push", str(tmp_path / "absent"), "-m", "m", "-v", "v1", "--config", str(config))
    assert code == 2 and "is not a directory" in said(out)


def test_a_bad_remote_url_is_named(config: Path, tmp_path: Path) -> None:
    doc = yaml.safe_load(config.read_text())
    doc["applications"][0]["args"]["storage"]["tiers"][2]["url"] = "nosuch://bucket/x"
    config.write_text(yaml.safe_dump(doc))
    code, out = run("models", "ls", "--config", str(config))
    assert code == 2 and "nosuch://bucket/x" in said(out)


def test_evict_needs_a_model_or_all(config: Path) -> None:
    code, out = run("cache", "evict", "--config", str(config))
    assert code == 2 and "--all" in out


def test_cache_ls_counts_kv_blocks_and_evict_all_drops_them(config: Path, tmp_path: Path) -> None:
    """KV blocks share the tiers' budget (kv/blocks/ beside blobs/): `cache ls` shows them in the
    tier's use and `cache evict --all` empties them too."""
    blocks = tmp_path / "ram" / "kv" / "blocks" / "ab"
    blocks.mkdir(parents=True)
    for i in range(3):
        (blocks / f"ab{i:030x}").write_bytes(b"k" * (1 << 20))
    code, out = run("cache", "ls", "--config", str(config))
    assert code == 0, out
    ram_row = next(line for line in out.splitlines() if " ram " in f" {line} ")
    assert "3 (3.0 MiB)" in ram_row and "3.0 MiB" in ram_row.split("3 (3.0 MiB)")[0]
    code, out = run("cache", "evict", "--all", "--config", str(config))
    assert code == 0 and "3.0 MiB freed" in said(out)
    assert not any(blocks.iterdir())
