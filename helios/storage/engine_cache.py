"""vLLM's own caches in the tiers: torch.compile artifacts and startup plans, shared cluster-wide.

On a GPU a cold start spends most of its time in `torch.compile` and CUDA-graph capture, and
vLLM keeps what it can reuse under its cache root (`VLLM_CACHE_ROOT`): compiled graphs in
`torch_compile_cache/<hash>/rank_<r>_<dp>/...` and, when enabled, the memory-profiling result
in `startup_plan/` (GPU workers only). Both are keyed inside by vLLM's own hashes of config,
code and compiler, so a directory can hold any number of them safely; what vLLM lacks is a
way to find a cache another node already built.

Helios gives each engine a cache root of its own, filled before the engine starts from the
store (`restore`) and pushed back after it started (`save`) when vLLM wrote something new:
the directory is stored as a model version in the content-addressed tiers (model id
`helios-engine-cache/<vllm version>`, version = the key's digest), so unchanged artifacts are
not uploaded twice, transfers are verified and resumable, and the second start of a model
anywhere in the cluster reads its compiled graphs from the nearest tier instead of compiling.

The key (`EngineCacheKey`) holds what must match for artifacts to be usable at all: vLLM and
torch versions, the model's manifest digest, the parallel layout and the device type. It is
coarser than vLLM's hashes on purpose: those decide, per artifact, what is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from helios.errors import StorageError
from helios.observability.logs import get_logger, log_event
from helios.storage.manifest import MANIFEST_NAME, Manifest, build_manifest
from helios.storage.store import ENGINE_CACHE_PREFIX, ModelStore

logger = get_logger("storage.engine_cache")

MODEL_PREFIX = ENGINE_CACHE_PREFIX
CACHED = ("torch_compile_cache/", "startup_plan/")  # what is worth sharing; vLLM also keeps downloads there


def cached(name: str) -> bool:
    return name.startswith(CACHED)


@dataclass(frozen=True)
class EngineCacheKey:
    """What two engines must share for one's compile cache to serve the other."""

    vllm: str
    torch: str
    model: str  # the model's manifest digest (or its directory, for a model outside the store)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    device: str = "cpu"  # the accelerator's name, e.g. "NVIDIA H200"
    dtype: str = "auto"
    prefix: ClassVar[str] = MODEL_PREFIX  # the store's model id begins with it (one per kind of artefact)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def model_id(self) -> str:
        """The store's model id for this vLLM version's caches (ids allow `[A-Za-z0-9._:/-]`)."""
        return f"{self.prefix}/{re.sub(r'[^A-Za-z0-9._-]', '-', self.vllm)}"

    @classmethod
    def current(cls, model: str, tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1,
                dtype: str = "auto") -> EngineCacheKey:
        """The key for an engine about to start in this process's environment."""
        import torch
        import vllm

        device = "cpu"
        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
        return cls(str(vllm.__version__), str(torch.__version__), model, tensor_parallel, pipeline_parallel,
                   data_parallel, device, dtype)


def restore(store: ModelStore, key: EngineCacheKey, root: Path) -> Manifest | None:
    """Fill `root` (the engine's VLLM_CACHE_ROOT) with the stored cache for `key`; the manifest
    restored, or None when none is stored. Files are copied, not linked: vLLM writes beside them."""
    manifest = store.find(key.model_id(), key.digest())
    if manifest is None:
        return None
    local = store.localize(manifest)
    root.mkdir(parents=True, exist_ok=True)
    for f in local.manifest.files:
        dst = root / f.name
        if dst.exists() and dst.stat().st_size == f.size:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
        shutil.copyfile(local.path / f.name, tmp)
        os.replace(tmp, dst)
    log_event(logger, "engine_cache_restored", key=key.digest(), files=len(local.manifest.files),
              bytes=local.manifest.total_bytes, sources=local.sources)
    return local.manifest


def save(store: ModelStore, key: EngineCacheKey, root: Path, restored: Manifest | None) -> Manifest | None:
    """Push `root` back to the store when vLLM added or changed files since `restored`; the new
    manifest, or None when there was nothing new (or nothing at all)."""
    if not root.is_dir() or not any(p.is_file() and cached(str(p.relative_to(root))) for p in root.rglob("*")):
        return None
    current = build_manifest(root, key.model_id(), key.digest(), source=f"vllm cache {key.digest()}", select=cached)
    if restored is not None and {(f.name, f.sha256) for f in current.files} == {
        (f.name, f.sha256) for f in restored.files
    }:
        return None
    try:
        manifest = store.push(root, key.model_id(), key.digest(), select=cached)
    except StorageError as exc:  # a full or unreachable store: the next start compiles again
        log_event(logger, "engine_cache_save_failed", key=key.digest(), error=str(exc))
        return None
    log_event(logger, "engine_cache_saved", key=key.digest(), files=len(manifest.files), bytes=manifest.total_bytes)
    return manifest


def cache_files(root: Path) -> list[str]:
    """The files vLLM keeps under a cache root (relative paths), for logs and tests."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
