"""Turning a model's `source` into a loadable local directory, through the store when there is one.

`demo://` models are built once and, with a `storage:` section, pushed into the durable
tier like any other model, so even the default run goes remote -> NVMe -> RAM -> engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from helios.config import ModelConfig, StorageConfig
from helios.errors import ModelVersionNotFound
from helios.observability.logs import get_logger, log_event
from helios.storage.arrivals import is_weight_file
from helios.storage.demo_model import resolve_source
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
        """The engine has started (or failed to): slower tiers may be filled now."""
        if self.local is not None and self.local.fill_after is not None:
            self.local.fill_after.set()


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
    defer = is_weight_file if storage.transfer.overlap_engine_start else None
    # The fill of slower tiers waits for the engine's start (`PreparedModel.started`).
    local = store.localize(manifest, progress=progress, background_fill=True, defer=defer,
                           fill_after=threading.Event())
    return PreparedModel(local.path, True, local.timings, local, store)
