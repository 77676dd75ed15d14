"""Layout blobs through the remote tier: a node that never held a model fetches its weights in vLLM's
layout instead of the checkpoint's, and the checkpoint's weights are fetched only if the loader asks.

Two nodes' stores over one real S3 server (moto); the engine's side (the loader mapping the blob,
the replica pushing it) is exercised end to end in tests/test_engine_pool.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from helios.config import ModelConfig
from helios.storage import arrivals
from helios.storage.layout_share import MAX_SIZE_RATIO, LayoutShareKey, push_when_written, weight_bytes
from helios.storage.sources import prepare
from helios.storage.store import ModelStore
from tests.storage.conftest import S3Server, storage_config

MODEL = "layout-share"
ENGINE = {"layout_cache": True, "dtype": "float32"}
BLOB = "0123456789abcdef0123456789abcdef01234567.safetensors"  # named by the loader's DerivedKey


@pytest.fixture
def url(s3: S3Server) -> str:
    return s3.url()  # one bucket prefix: the cluster's remote tier


@pytest.fixture
def node_a(tmp_path: Path, s3: S3Server, url: str, tiny_model_dir: Path) -> tuple[ModelStore, object]:
    store = ModelStore.from_config(storage_config(tmp_path / "a", url, s3.options), tmp_path / "a", shared=False)
    return store, store.push(tiny_model_dir, MODEL, "v1")


def node_b(tmp_path: Path, s3: S3Server, url: str, **over: object):
    return storage_config(tmp_path / "b", url, s3.options, **over)


def model(**engine: object) -> ModelConfig:
    return ModelConfig.model_validate({"id": MODEL, "source": f"store://{MODEL}:v1", "engine": {**ENGINE, **engine}})


def shared_blob(store: ModelStore, manifest, tmp_path: Path, size: int) -> tuple[Path, LayoutShareKey]:
    """What a start on node A leaves: its layout blob written beside its tier, then pushed."""
    blob = tmp_path / "a-derived" / BLOB
    blob.parent.mkdir()
    blob.write_bytes(os.urandom(size))
    key = LayoutShareKey.for_engine(manifest, model().engine)
    assert push_when_written(store, key, blob) == "pushed"
    assert push_when_written(store, key, blob) == "present"  # once per key, cluster-wide
    return blob, key


def test_a_node_without_the_checkpoint_maps_the_shared_blob_and_never_fetches_the_weights(
    node_a, tmp_path: Path, s3: S3Server, url: str
) -> None:
    store, manifest = node_a
    blob, key = shared_blob(store, manifest, tmp_path, weight_bytes(manifest) // 2)
    assert key.model_id() not in {m.model_id for m in store.models()}  # an artefact, not a model to serve

    prepared = prepare(model(), node_b(tmp_path, s3, url), tmp_path / "b")
    derived = tmp_path / "b" / "ram" / "derived" / BLOB
    assert derived.read_bytes() == blob.read_bytes()
    tier_blob = tmp_path / "b" / "ram" / "blobs"
    assert derived.stat().st_nlink == 2 and any(p.stat().st_ino == derived.stat().st_ino
                                                 for p in tier_blob.rglob("*") if p.is_file())  # linked, not copied
    weights = [f.name for f in manifest.files if arrivals.is_weight_file(f.name)]
    others = [f.name for f in manifest.files if not arrivals.is_weight_file(f.name)]
    assert all((prepared.path / n).is_file() for n in others)  # the engine starts from these
    assert not any((prepared.path / n).exists() for n in weights)
    assert prepared.local.arriving is not None and not prepared.local.arriving.done()
    assert prepared.timings["layout_fetch_s"] > 0

    prepared.local.only_if_wanted.set()  # the engine started and never asked for them
    prepared.local.arriving.result(timeout=10)
    b = ModelStore.from_config(node_b(tmp_path, s3, url), tmp_path / "b", shared=False)
    assert b.holders(manifest) == ["remote"]
    assert not any((prepared.path / n).exists() for n in weights)
    assert prepared.timings["fetch_s"] >= 0


def test_a_loader_that_asks_gets_the_weights(node_a, tiny_model_dir: Path, tmp_path: Path, s3: S3Server, url: str) -> None:
    """A blob this build does not fit is loaded as absent: the loader asks, the fetch begins."""
    store, manifest = node_a
    shared_blob(store, manifest, tmp_path, 4096)
    prepared = prepare(model(), node_b(tmp_path, s3, url), tmp_path / "b")
    time.sleep(0.3)
    assert not prepared.local.arriving.done()
    arrivals.want(prepared.path)
    prepared.local.arriving.result(timeout=60)
    prepared.local.only_if_wanted.set()
    for f in manifest.files:
        assert (prepared.path / f.name).read_bytes() == (tiny_model_dir / f.name).read_bytes()
    assert "ram" in ModelStore.from_config(node_b(tmp_path, s3, url), tmp_path / "b", shared=False).holders(manifest)


def test_without_a_usable_blob_the_checkpoint_is_fetched_as_before(node_a, tmp_path: Path, s3: S3Server,
                                                                     url: str) -> None:
    store, manifest = node_a
    # No blob for this key yet: the first start anywhere loads the checkpoint.
    first = prepare(model(), node_b(tmp_path, s3, url), tmp_path / "b")
    assert first.local.arriving is None and "layout_fetch_s" not in first.timings
    assert all((first.path / f.name).is_file() for f in manifest.files)
    # A blob much larger than the checkpoint's weights (a bf16 checkpoint served in float32 would be 2x)
    # costs more transfer than the load it saves: the next fresh node fetches the checkpoint.
    shared_blob(store, manifest, tmp_path, int(weight_bytes(manifest) * (MAX_SIZE_RATIO + 0.2)))
    fresh = prepare(model(), node_b(tmp_path / "c", s3, url), tmp_path / "c" / "b")
    assert fresh.local.arriving is None and "layout_fetch_s" not in fresh.timings
    assert not (tmp_path / "c" / "b" / "ram" / "derived").exists()
    # And a model without the layout cache, or with the tiers' caches off, never looks.
    off = prepare(model(cache_in_tiers=False), node_b(tmp_path / "d", s3, url), tmp_path / "d" / "b")
    assert off.local.arriving is None


def test_a_push_waits_for_the_writer_to_finish_the_blob(node_a, tmp_path: Path) -> None:
    store, manifest = node_a
    blob = tmp_path / "late" / BLOB
    blob.parent.mkdir()
    key = LayoutShareKey.for_engine(manifest, model().engine)
    data = os.urandom(8192)

    def writer() -> None:  # the engine's writer: a temp file, renamed once whole
        time.sleep(1.5)
        tmp = blob.with_name(".partial.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, blob)

    threading.Thread(target=writer).start()
    states: list[str] = []
    assert push_when_written(store, key, blob, states.append) == "pushed" and states == ["pushed"]
    stored = store.resolve(key.model_id(), key.digest())
    assert [f.name for f in stored.files] == [BLOB] and stored.total_bytes == len(data)
    assert push_when_written(store, key, tmp_path / "never" / BLOB, wait_s=0) == "present"
