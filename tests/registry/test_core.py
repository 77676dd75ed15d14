"""The registry's logic without Ray: registration, store discovery, missing profiles."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from helios.config import StorageConfig
from helios.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from helios.registry.core import RegistryCore
from helios.storage.manifest import Manifest
from helios.storage.store import ModelStore
from tests.registry.conftest import store_section

TINY_WEIGHT_BYTES = 9_987_072  # see test_profile.py


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore.from_config(StorageConfig.model_validate(store_section(tmp_path / "store")), tmp_path)


def _register(core: RegistryCore, model_id: str, version: str, source: str, **kw: object) -> dict:
    record = core.new_record(model_id, version, source, None, pinned=bool(kw.pop("pinned", False)))
    return core.put(model_id, record, **kw)  # type: ignore[arg-type]


def test_a_directory_source_gets_its_profile_at_registration(tiny_model_dir: Path) -> None:
    core = RegistryCore()
    out = _register(core, "m", "v1", str(tiny_model_dir), pinned=True)
    assert out["profile"]["weight_bytes"] == TINY_WEIGHT_BYTES and out["is_default"] and out["pinned"]
    assert core.memory_needed("m", 100, 1) == TINY_WEIGHT_BYTES + 4096 * 100


def test_a_demo_model_not_built_yet_gets_its_profile_once_it_is(tiny_model_dir: Path, tmp_path: Path) -> None:
    core = RegistryCore(cache_root=tmp_path, profile_retry_s=0)
    out = _register(core, "demo", "demo-tiny", "demo://tiny")
    assert out["profile"] is None and "no model files" in out["profile_error"]
    with pytest.raises(ServiceUnavailable, match="no resource profile yet"):
        core.memory_needed("demo", 100, 1)
    shutil.copytree(tiny_model_dir, tmp_path / "demo" / "tiny")  # what the replica's build leaves
    (model_id, record), = core.profiles_to_retry()
    assert core.set_profile(model_id, record, *core.retry_profile(model_id, record))
    assert core.version_dict("demo")["profile"]["weight_bytes"] == TINY_WEIGHT_BYTES


def test_a_malformed_checkpoint_fails_registration(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}x")
    with pytest.raises(InvalidRequest, match="the file has"):
        _register(RegistryCore(), "m", "v1", str(tmp_path))


def test_store_versions_are_discovered_once_and_deletions_stick(
    tiny_model_dir: Path, store: ModelStore
) -> None:
    core = RegistryCore(store=store, sync_interval_s=0)
    store.push(tiny_model_dir, "org/pushed", "v1")
    manifests = core.store_manifests()
    new = core.unknown(manifests)
    assert [m.ref for m in new] == ["org/pushed:v1"]
    assert core.add_synced(new[0], core.synced_record(new[0]))
    got = core.version_dict("org/pushed")
    assert got["source"] == "store://org/pushed:v1" and got["profile"]["weight_bytes"] == TINY_WEIGHT_BYTES
    assert got["manifest_digest"] == new[0].digest()
    assert core.unknown(core.store_manifests()) == []

    core.delete("org/pushed", "v1")
    assert core.unknown(core.store_manifests()) == []  # still in the store, but deleted here
    with pytest.raises(ModelNotFound):
        core.version_dict("org/pushed")


def test_an_engine_artefact_in_the_store_is_not_found_as_a_model(tiny_model_dir: Path, store: ModelStore) -> None:
    """A request naming a layout blob's id must not register the blob as a model to serve."""
    from helios.storage.store import LAYOUT_CACHE_PREFIX

    artefact = f"{LAYOUT_CACHE_PREFIX}/0.0.0"
    store.push(tiny_model_dir, artefact, "abc")
    core = RegistryCore(store=store, sync_interval_s=0)
    assert store.versions(artefact) and core.store_manifests(artefact) == []
    assert core.unknown(core.store_manifests()) == []


def test_a_version_whose_profile_fails_unexpectedly_still_syncs_with_the_others(
    tiny_model_dir: Path, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One version's profile failing on a fault of Helios's own (here a TypeError) is recorded on
    that version; the sync still registers it and every other version."""
    import helios.registry.core as core_module

    real = core_module.profile_from_store

    def failing(store: ModelStore, manifest: Manifest, *a: Any, **kw: Any) -> Any:
        if manifest.model_id == "org/bad":
            raise TypeError("the JSON object must be str, bytes or bytearray, not memoryview")
        return real(store, manifest, *a, **kw)

    monkeypatch.setattr(core_module, "profile_from_store", failing)
    store.push(tiny_model_dir, "org/bad", "v1")
    store.push(tiny_model_dir, "org/good", "v1")
    core = RegistryCore(store=store, sync_interval_s=0)
    found = [(m, core.synced_record(m)) for m in core.unknown(core.store_manifests())]
    assert sum(core.add_synced(m, r) for m, r in found) == 2
    assert core.version_dict("org/good")["profile"]["weight_bytes"] == TINY_WEIGHT_BYTES
    bad = core.version_dict("org/bad")
    assert bad["profile"] is None and "TypeError" in bad["profile_error"]


def test_a_store_source_without_version_uses_the_registered_one(tiny_model_dir: Path, store: ModelStore) -> None:
    store.push(tiny_model_dir, "org/m", "v1")
    core = RegistryCore(store=store)
    out = _register(core, "org/m", "v1", "store://org/m")
    assert out["profile"]["kv_bytes_per_token"] == 4096


def test_full_syncs_are_spaced_and_misses_per_id(store: ModelStore) -> None:
    core = RegistryCore(store=store, sync_interval_s=5, miss_sync_interval_s=1)
    assert core.sync_due(now=100) and not core.sync_due(now=104) and core.sync_due(now=105)
    assert core.sync_due("a", now=100) and not core.sync_due("a", now=100.5) and core.sync_due("b", now=100.5)
    assert not RegistryCore().sync_due(now=100)  # no store, nothing to sync


def test_a_replica_reports_the_profile_of_a_directory_on_its_node(tiny_model_dir: Path, tmp_path: Path) -> None:
    from helios.registry.profile import profile_from_dir

    core = RegistryCore()
    out = _register(core, "m", "v1", str(tmp_path / "only-on-another-node"))
    assert out["profile"] is None
    got = core.report_profile("m", "v1", profile_from_dir(tiny_model_dir))
    assert got["profile"]["weight_bytes"] == TINY_WEIGHT_BYTES and got["profile_error"] is None
    with pytest.raises(ModelNotFound):
        core.report_profile("m", "v9", profile_from_dir(tiny_model_dir))


def test_warm_nodes_go_from_running_replicas_to_the_fastest_tier_holding_the_model() -> None:
    core = RegistryCore()
    core.warm.set_tiers("nvme-node", {"m": {"nvme": 100}, "other": {"ram": 100}})
    core.warm.set_tiers("ram-node", {"m": {"ram": 40, "nvme": 100}})
    core.warm.set_tiers("remote-only", {"m": {"remote": 100}})
    core.warm.set_tiers("cold", {"other": {"ram": 100}})
    assert core.warm_nodes("m") == [["ram-node"], ["nvme-node"]]
    core.warm.set_replica("m", "r1", "cold", loaded=True, version="v1")  # its weights are mapped there
    assert core.warm_nodes("m") == [["cold"], ["ram-node"], ["nvme-node"]]
    assert core.warm_nodes("unknown") == []


def test_expected_starts_count_models_not_running_on_their_warmest_node(tiny_model_dir: Path) -> None:
    """The engine pool's prediction: a model requested every minute and idle for 50 s will most
    likely start within two minutes (on the node holding it); one requested hourly will not; a
    model already running needs no start."""
    from helios.engine.pool import pool_targets

    core = RegistryCore()
    for model in ("minutely", "hourly", "running"):
        _register(core, model, "v1", str(tiny_model_dir))
    t0 = 1_000_000.0
    core.record_requests({"minutely": [t0 + 60 * i for i in range(10)],
                          "running": [t0 + 60 * i for i in range(10)],
                          "hourly": [t0 - 3600 * 10 + 3600 * i for i in range(10)]})
    core.warm.set_tiers("n1", {"minutely": {"ram": 100}})
    core.warm.set_replica("running", "r1", "n2", loaded=True, version="v1")
    now = t0 + 60 * 9 + 50
    expected = core.expected_starts(120, now)
    assert expected.get("n1", 0) > 0.9
    assert "n2" not in expected  # the running model's node expects nothing
    assert expected.get("", 0) < 0.3  # the hourly model, held nowhere: unlikely within two minutes
    assert pool_targets(0, 2, expected, {"n1", "n2"}) == {"n1": 1, "n2": 0}
    assert pool_targets(1, 2, expected, {"n1", "n2"}) == {"n1": 1, "n2": 1}
    assert pool_targets(0, 2, {"n1": 5.0, "": 1.0}, {"n1", "n2"}) == {"n1": 2, "n2": 1}  # capped; shared out
    assert pool_targets(1, 0, {"n1": 5.0}, {"n1"}) == {"n1": 1}  # predictions off: the config's size
    assert core.expected_starts(120, t0 + 60 * 9 + 3600 * 3) == {}  # nothing expected after long silence
