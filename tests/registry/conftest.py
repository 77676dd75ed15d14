"""Registry fixtures: demo model directories, stores with a file:// remote tier, periodic usage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def bench_model_dir(cache_root: Path) -> Path:
    """The 1.4 GB `bench` demo model, built once per session (about 40 s on two cores)."""
    from helios.storage.demo_model import resolve_source

    return resolve_source("demo://bench", cache_root)


def store_section(root: Path) -> dict[str, Any]:
    """A `storage:` section: one NVMe tier and a file:// remote, all under `root`."""
    return {
        "tiers": [
            {"kind": "nvme", "path": str(root / "nvme"), "capacity": "1GiB"},
            {"kind": "remote", "url": f"file://{root / 'remote'}"},
        ]
    }


def ram_store_config(root: Path, ram_eviction: str = "cost"):
    """A StorageConfig with RAM and NVMe tiers and a file:// remote, all under `root`."""
    from helios.config import StorageConfig

    return StorageConfig.model_validate({
        "tiers": [
            {"kind": "ram", "path": str(root / "ram"), "capacity": "64MiB", "eviction": ram_eviction},
            {"kind": "nvme", "path": str(root / "nvme"), "capacity": "256MiB"},
            {"kind": "remote", "url": f"file://{root / 'remote'}"},
        ],
        "transfer": {"chunk_mib": 1, "concurrency": 2},
    })


HOUR = 3600.0


def periodic(start: float, bursts: int = 12) -> list[float]:
    """Bursts of five requests ten seconds apart, one burst an hour from `start` (a scheduled job)."""
    return [start + k * HOUR + 10 * i for k in range(bursts) for i in range(5)]
