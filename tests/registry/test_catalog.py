"""Catalog rules (defaults, deletion, scale) and its JSON file, without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from helios.errors import InvalidRequest, ModelNotFound, ModelVersionNotFound
from helios.registry.catalog import Catalog, VersionRecord, scale_settings


def _v(version: str, created: float, **kw: object) -> VersionRecord:
    return VersionRecord(version=version, source=f"/models/{version}", created=created, **kw)


def test_first_version_is_default_until_another_is_made_default() -> None:
    c = Catalog()
    c.put("org/m", _v("v1", 1))
    c.put("org/m", _v("v2", 2))
    assert c.get("org/m").version == "v1"
    c.put("org/m", _v("v3", 3), make_default=True)
    assert c.get("org/m").version == "v3"
    c.set_default("org/m", "v2")
    assert c.get("org/m").version == "v2"


def test_deleting_the_default_picks_the_newest_left() -> None:
    c = Catalog()
    for i, v in enumerate(["v1", "v2", "v3"]):
        c.put("m", _v(v, i), make_default=(v == "v2"))
    c.delete("m", "v2")
    assert c.get("m").version == "v3"
    assert c.is_deleted("m", "v2")
    c.delete("m")
    with pytest.raises(ModelNotFound):
        c.get("m")
    assert c.is_deleted("m", "v1") and c.is_deleted("m", "v3")


def test_registering_again_clears_a_deletion_and_keeps_the_pin() -> None:
    c = Catalog()
    c.put("m", _v("v1", 1, pinned=True))
    c.put("m", _v("v1", 1))
    assert c.get("m").pinned
    c.delete("m", "v1")
    c.put("m", _v("v1", 1))
    assert not c.is_deleted("m", "v1")


def test_unknown_ids_and_versions_are_not_found() -> None:
    c = Catalog()
    c.put("m", _v("v1", 1))
    with pytest.raises(ModelVersionNotFound, match="have: v1"):
        c.get("m", "v9")
    with pytest.raises(ModelNotFound):
        c.set_default("other", "v1")
    with pytest.raises(ModelNotFound):
        c.delete("m", "v9")


def test_bad_ids_and_scales_name_the_key() -> None:
    with pytest.raises(InvalidRequest, match="version"):
        Catalog().put("m", _v("bad version", 1))
    with pytest.raises(InvalidRequest, match="scale.max_replicas"):
        scale_settings(0, 0)
    with pytest.raises(InvalidRequest, match="exceeds max_replicas"):
        scale_settings(3, 2)


def test_saved_catalog_reads_back_and_a_bad_file_is_set_aside(tmp_path: Path) -> None:
    c = Catalog()
    c.put("m", _v("v1", 1), deploy={"engine": {"dtype": "float32"}}, scale=scale_settings(1, 3))
    path = tmp_path / "catalog.json"
    c.save(path)
    again = Catalog.load(path)
    assert again.state == c.state

    path.write_text("{not json")
    assert Catalog.load(path).models == {}
    assert [p.name.startswith("catalog.json.unreadable-") for p in tmp_path.iterdir()] == [True]

