"""Turning a model's `source` into a loadable local directory, through the store when there is one.

`demo://` models are built once and, with a `storage:` section, pushed into the durable
tier like any other model, so even the default run goes remote -> NVMe -> RAM -> engine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from helios.config import ModelConfig, StorageConfig
from helios.errors import ModelVersionNotFound
from helios.observability.logs import get_logger, log_event
from helios.storage.arrivals import is_weight_file
from helios.storage.demo_model import resolve_source
from helios.storage.layout_share import LayoutShareKey, fetch, shares, weight_bytes
from helios.storage.manifest import Manifest, parse_ref
from helios.storage.store import LocalModel, ModelStore
from helios.storage.transfer import LogProgress

logger = get_logger("storage.sources")


@dataclass
class PreparedModel:
    """A model directory ready for vLLM, and how it got there."""

    path: Path
    via_store: bool
    timings: dict[str, float] = field(default_factory=dict)
    local: LocalModel | None = None
    store: ModelStore | None = None  # the node's tiers it came through (their fill is reported again later)

    @property
    def manifest(self) -> Manifest | None:
        return self.local.manifest if self.local else None

    def started(self) -> None:
        """The engine has started (or failed to): slower tiers may be filled now, and weights fetched
        only if asked for will not be asked for any more."""
        if self.local is not None and self.local.fill_after is not None:
            self.local.fill_after.set()
        if self.local is not None and self.local.only_if_wanted is not None:
            self.local.only_if_wanted.set()


def demo_version(preset: str) -> str:
    return f"demo-{preset}"


def store_manifest(model: ModelConfig, store: ModelStore, cache_root: Path) -> Manifest:
    """The manifest a model's source names in the store, publishing a demo model first."""
    if model.source.startswith("store://"):
        return store.resolve(*parse_ref(model.source.removeprefix("store://")))
    preset = model.source.removeprefix("demo://")
    version = demo_version(preset)
    try:
        return store.resolve(model.id, version)
    except ModelVersionNotFound:
        manifest = store.push(resolve_source(model.source, cache_root), model.id, version)
        log_event(logger, "demo_published", model=model.id, version=version, tier=store.durable.kind)
        return manifest


def prepare(model: ModelConfig, storage: StorageConfig | None, cache_root: Path) -> PreparedModel:
    """Make `model` loadable on this node; slower local tiers are filled in the background.

    With `transfer.overlap_engine_start`, weight files may still be arriving when this returns
    (`prepared.local.arriving`): the engine can start meanwhile, and its loader waits for them."""
    if storage is None or not model.uses_store():
        return PreparedModel(resolve_source(model.source, cache_root), via_store=False)
    store = ModelStore.from_config(storage, cache_root)
    manifest = store_manifest(model, store, cache_root)
    progress = LogProgress(manifest.total_bytes, manifest.ref)
    fill_after = threading.Event()  # the fill of slower tiers waits for the engine's start (`PreparedModel.started`)
    began = time.monotonic()
    layout = _shared_layout(model, store, manifest, fill_after)
    layout_s = time.monotonic() - began
    # With the model's layout blob on the node its weights are fetched only if the loader asks for them.
    defer = is_weight_file if storage.transfer.overlap_engine_start or layout else None
    local = store.localize(manifest, progress=progress, background_fill=True, defer=defer, fill_after=fill_after,
                           only_if_wanted=threading.Event() if layout else None)
    if layout:
        local.timings["layout_fetch_s"] = layout_s
    return PreparedModel(local.path, True, local.timings, local, store)


def _shared_layout(model: ModelConfig, store: ModelStore, manifest: Manifest, fill_after: threading.Event) -> bool:
    """Fetch the model's layout blob from the store when this node has neither it nor the checkpoint's
    weights (`helios.storage.layout_share`); whether it is now where the loader looks. Any failure
    means the checkpoint is fetched and loaded as without it."""
    if not shares(model.engine, store):
        return False
    try:
        if any(t.has_all(manifest) for t in store.local):
            return False  # a local tier holds the checkpoint: load that
        key = LayoutShareKey.for_engine(manifest, model.engine)
        names = fetch(store, key, store.local[0].root / "derived", weight_bytes(manifest), fill_after)
    except Exception as exc:  # noqa: BLE001 - a start without the blob is a slower start, not a failed one
        log_event(logger, "layout_share_fetch_failed", model=model.id, error=f"{type(exc).__name__}: {exc}")
        return False
    return bool(names)
