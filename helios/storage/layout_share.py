"""Layout blobs in the remote tier: a node that never served a model fetches its weights in vLLM's layout.

The layout cache (`layout_cache.py`) spares a *later* start on the same node the checkpoint load:
the first start writes the loaded parameters to a derived blob beside the tier, the next maps it.
A node that never served the model had to fetch the checkpoint and load it (on the bench model:
1.4 GB fetched, then 3.1 s of loading where mapping the layout blob takes 1.7 s). This module
makes the blob a cluster-wide artefact, as `engine_cache.py` does for vLLM's compile caches: after
a start wrote it (or mapped it), the replica pushes it to the durable tier as a model version
(model id `helios-layout-cache/<vllm version>`, version = the key's digest); a start on a node
without it looks that version up, fetches it into the fastest local tier, links it where the
loader looks for it, and leaves the checkpoint's weight files in the remote tier unless the
loader asks for them (`arrivals.want`: a blob this build does not fit is loaded as absent).

The lookup key is coarse and computable before the engine starts (model digest, engine dtype,
parallel layout, runner, extra engine arguments, vLLM and torch versions, device); the files in
the version are named by the loader's own `DerivedKey`, whose metadata the loader checks, so a
key that matches here but not there costs a fetch, never a wrong model. A blob more than
`MAX_SIZE_RATIO` times the checkpoint's weights (a bf16 checkpoint served in float32) is not
fetched: it would cost more transfer than the load it saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from helios.errors import StorageError
from helios.observability.logs import get_logger, log_event
from helios.storage.arrivals import is_weight_file
from helios.storage.engine_cache import EngineCacheKey
from helios.storage.store import LAYOUT_CACHE_PREFIX

if TYPE_CHECKING:
    from helios.config import EngineConfig
    from helios.storage.manifest import Manifest
    from helios.storage.store import ModelStore

logger = get_logger("storage.layout_share")

MODEL_PREFIX = LAYOUT_CACHE_PREFIX
MAX_SIZE_RATIO = 1.25  # fetch the blob instead of the checkpoint's weights only when it is not much larger
PUSH_NICE = 19  # the push runs while the replica serves
WRITTEN_WAIT_S = 900.0  # how long a push waits for the engine's writer to finish the blob


@dataclass(frozen=True)
class LayoutShareKey(EngineCacheKey):
    """What a start knows before its engine does and a layout blob depends on: the engine cache's
    key plus the runner and the extra engine arguments (overrides and quantization change modules)."""

    runner: str = "auto"
    extra: str = ""
    prefix: ClassVar[str] = MODEL_PREFIX

    @classmethod
    def for_engine(cls, manifest: Manifest, engine: EngineConfig) -> LayoutShareKey:
        base = EngineCacheKey.current(manifest.digest(), engine.tensor_parallel_size, engine.pipeline_parallel_size,
                                      dtype=engine.dtype)
        from helios.cpu_features import native_bf16
        from helios.storage.derived import FORMAT_VERSION  # a new blob layout is a new key

        # "auto" and bf16 resolve by what the CPU computes natively: two CPUs may build other layouts.
        cpu = ("native-bf16" if native_bf16() else "no-bf16") if base.device == "cpu" else ""
        extra = hashlib.sha256(json.dumps([engine.extra_args, FORMAT_VERSION, cpu], sort_keys=True,
                                          default=str).encode()).hexdigest()[:16]
        return cls(**dataclasses.asdict(base), runner=engine.runner, extra=extra)


def shares(engine: EngineConfig, store: ModelStore | None) -> bool:
    """Whether starts of this engine take and leave layout blobs in the remote tier: the layout cache
    and the tiers' caches on, no `share_weights` (its blob is another loader's), a remote tier, and
    one rank (the push knows only rank 0's blob, so sharded engines keep theirs local)."""
    return bool(engine.layout_cache and engine.cache_in_tiers and not engine.share_weights
                and engine.tensor_parallel_size * engine.pipeline_parallel_size == 1
                and store is not None and store.remote is not None)


def fetch(store: ModelStore, key: LayoutShareKey, derived: Path, weight_bytes: int,
          fill_after: threading.Event | None = None) -> list[str] | None:
    """Bring the layout blob stored for `key` into the fastest local tier and link it into `derived`
    (where the loader looks); the blob names placed, or None when none is stored or it is too large
    to be worth it. Fails like a fetch fails (the caller falls back to the checkpoint)."""
    manifest = store.find(key.model_id(), key.digest())
    if manifest is None:
        return None
    if manifest.total_bytes > MAX_SIZE_RATIO * weight_bytes:
        log_event(logger, "layout_share_skipped", key=key.digest(), bytes=manifest.total_bytes,
                  checkpoint_weight_bytes=weight_bytes, reason="larger than the checkpoint's weights")
        return None
    names = [f.name for f in manifest.files]
    derived.mkdir(parents=True, exist_ok=True)
    if all((derived / n).is_file() for n in names):
        return names
    started = time.monotonic()
    local = store.localize(manifest, background_fill=fill_after is not None, fill_after=fill_after)
    for name in names:
        _place(Path(os.path.realpath(local.path / name)), derived / name)
    log_event(logger, "layout_share_fetched", key=key.digest(), files=names, bytes=manifest.total_bytes,
              sources=local.sources, seconds=round(time.monotonic() - started, 3))
    return names


def _place(blob: Path, dst: Path) -> None:
    """`dst` becomes the tier's blob: a hard link on the same file system (no copy), else a copy;
    either way under a temporary name first, so the loader never maps half a file."""
    from helios.storage.derived import writer_lock  # a layout writer on the node holds it too

    with writer_lock(dst):
        if dst.is_file() and dst.stat().st_size == blob.stat().st_size:
            return
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            try:
                os.link(blob, tmp)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(blob, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)


def push_when_written(store: ModelStore, key: LayoutShareKey, blob: Path, on_done: Callable[[str], None] | None = None,
                      wait_s: float = WRITTEN_WAIT_S, hold: Callable[[], bool] | None = None) -> str:
    """Push `blob` for `key` once the engine's writer has finished it (it appears whole, by rename);
    what happened: "present" (the store has it), "pushed", "not_written", "dropped" or "failed".
    `hold`: waits until the push may begin (the engine's first answer), False to drop it."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUSH_NICE)  # this thread only
    state = "failed"
    try:
        state = _push(store, key, blob, wait_s) if hold is None or hold() else "dropped"
    finally:
        if on_done is not None:
            on_done(state)
    return state


def _push(store: ModelStore, key: LayoutShareKey, blob: Path, wait_s: float) -> str:
    if store.remote is None:
        return "not_shared"
    try:
        stored = store.durable.get_manifest(key.model_id(), key.digest())
        if stored is not None:
            if blob.name not in {f.name for f in stored.files}:  # same coarse key, another build's blob
                log_event(logger, "layout_share_other_blob", key=key.digest(), stored=[f.name for f in stored.files],
                          ours=blob.name)
            return "present"
    except StorageError as exc:  # an unreachable store: the next node loads the checkpoint
        log_event(logger, "layout_share_push_failed", key=key.digest(), error=f"{type(exc).__name__}: {exc}")
        return "failed"
    deadline = time.monotonic() + wait_s
    while not blob.is_file():
        if time.monotonic() > deadline:
            log_event(logger, "layout_share_not_written", key=key.digest(), path=str(blob))
            return "not_written"
        time.sleep(1.0)
    try:
        manifest = store.push(blob.parent, key.model_id(), key.digest(), select=lambda name: name == blob.name)
    except (StorageError, OSError) as exc:  # a full or unreachable store: the next node loads the checkpoint
        log_event(logger, "layout_share_push_failed", key=key.digest(), error=f"{type(exc).__name__}: {exc}")
        return "failed"
    log_event(logger, "layout_share_pushed", key=key.digest(), bytes=manifest.total_bytes)
    return "pushed"


def weight_bytes(manifest: Manifest) -> int:
    return sum(f.size for f in manifest.files if is_weight_file(f.name))
