"""A model version as a manifest: its files, each with size and sha256.

Blobs are stored by digest, so the manifest is all that names a version; two versions
that share a file share its blob. The manifest's own digest (over its canonical JSON)
keys anything derived from the version, such as the loader's fused-weight blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "helios-manifest.json"
_HASH_BLOCK = 8 << 20


def snapshot_digest(manifest_json: bytes) -> str:
    """The model digest of a snapshot holding this manifest file: what derived blobs are keyed by."""
    return "manifest:" + hashlib.sha256(manifest_json).hexdigest()


class FileEntry(BaseModel):
    """One file of a model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., description="Path inside the model directory (no '..').")
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """A model version: id, version, files and where it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = 1
    model_id: str
    version: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    source: str = Field("", description="Where the files were pushed from (a path or URL).")
    created: float = Field(default_factory=time.time)
    files: list[FileEntry]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def ref(self) -> str:
        return f"{self.model_id}:{self.version}"

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()

    def digest(self) -> str:
        """sha256 of the canonical JSON: changes whenever any file or name changes."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        return cls.model_validate_json(data)


def model_key(model_id: str) -> str:
    """A model id as one path segment (ids may hold '/' and ':')."""
    return quote(model_id, safe="")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`ID[:VERSION]` -> (id, version or None). A model id never holds ':' after its last '/'."""
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail and tail:
        return head, tail
    return ref, None


def hash_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def model_files(src_dir: Path) -> list[Path]:
    """Every regular file under a model directory, sorted, skipping hidden files and an old manifest."""
    files = []
    for path in sorted(src_dir.rglob("*")):
        rel = path.relative_to(src_dir)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts) and rel.name != MANIFEST_NAME:
            files.append(path)
    return files


def build_manifest(
    src_dir: Path, model_id: str, version: str, source: str = "", select: Callable[[str], bool] | None = None
) -> Manifest:
    """Hash every file of a model directory (those whose relative name `select` accepts) into a manifest."""
    entries = [
        FileEntry(name=str(p.relative_to(src_dir)), size=p.stat().st_size, sha256=hash_file(p))
        for p in model_files(src_dir)
        if select is None or select(str(p.relative_to(src_dir)))
    ]
    if not entries:
        raise FileNotFoundError(f"{src_dir} holds no model files")
    return Manifest(model_id=model_id, version=version, source=source or str(src_dir), files=entries)
