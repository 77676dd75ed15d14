"""Registry fixtures: demo model directories and a store with a file:// remote tier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def bench_model_dir(cache_root: Path) -> Path:
    """The 1.4 GB `bench` demo model, built once per session (about 40 s on two cores)."""
    from helios.engine.demo_model import resolve_source

    return resolve_source("demo://bench", cache_root)


def store_section(root: Path) -> dict[str, Any]:
    """A `storage:` section: one NVMe tier and a file:// remote, all under `root`."""
    return {
        "tiers": [
            {"kind": "nvme", "path": str(root / "nvme"), "capacity": "1GiB"},
            {"kind": "remote", "url": f"file://{root / 'remote'}"},
        ]
    }
