"""A real S3 server on loopback (moto in server mode), reached through s3fs like production S3."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str = "helios-test"

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}

    def url(self) -> str:
        """A fresh prefix per test, so tests share the server but not their objects."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s = S3Server(f"http://{host}:{port}")
    s3fs.S3FileSystem(**s.options).mkdir(s.bucket)
    yield s
    server.stop()


def write_model(root: Path, weights: bytes, config: str = '{"model_type": "llama"}') -> Path:
    """A model-shaped directory: a config and one weights file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config)
    (root / "model.safetensors").write_bytes(weights)
    return root


def storage_config(root: Path, remote_url: str, remote_options: dict[str, Any] | None = None, **over: Any):
    from helios.config import StorageConfig

    tiers = over.pop("tiers", None) or [
        {"kind": "ram", "path": str(root / "ram"), "capacity": over.pop("ram", "256MiB")},
        {"kind": "nvme", "path": str(root / "nvme"), "capacity": over.pop("nvme", "1GiB")},
    ]
    tiers.append({"kind": "remote", "url": remote_url, "storage_options": remote_options or {}})
    transfer = {"chunk_mib": 1, "concurrency": 4, **over.pop("transfer", {})}
    return StorageConfig.model_validate({"tiers": tiers, "transfer": transfer})


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
