"""Contract tests: every tier (local dir, file:// remote, S3 remote) stores blobs the same way."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from helios.errors import CorruptBlob, TierFull
from helios.storage.manifest import FileEntry, Manifest
from helios.storage.tiers import LocalTier, RemoteTier, Tier


@pytest.fixture(params=["local", "file", "s3", "s3-fsspec"])
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Tier:
    """Every kind of tier; S3 with blob ranges read by obstore (the default) and by s3fs."""
    if request.param == "local":
        return LocalTier("nvme", tmp_path / "nvme", capacity=1 << 30)
    if request.param == "file":
        return RemoteTier(f"file://{tmp_path / 'remote'}")
    s3 = request.getfixturevalue("s3")
    reader = "fsspec" if request.param == "s3-fsspec" else "obstore"
    return RemoteTier(s3.url(), s3.options, reader)


def test_s3_ranges_are_read_by_obstore_and_a_missing_blob_is_not_found(s3) -> None:
    from helios.errors import RemoteUnavailable

    tier = RemoteTier(s3.url(), s3.options)
    assert tier._ranges is not None  # auto: obstore is installed
    data, digest = _blob(1 << 20)
    tier.write(digest, [data])
    assert bytes(tier.read_range(digest, 1000, 5000)) == data[1000:5000]
    with pytest.raises(FileNotFoundError):
        tier.read_range("0" * 64, 0, 10)
    dead = RemoteTier(s3.url(), {**s3.options, "endpoint_url": "http://127.0.0.1:9"}, "obstore")
    with pytest.raises(RemoteUnavailable):
        dead.read_range(digest, 0, 10)


def _blob(n: int = 3 << 20) -> tuple[bytes, str]:
    data = os.urandom(n)
    return data, hashlib.sha256(data).hexdigest()


def test_write_then_stat_read_and_delete(tier: Tier) -> None:
    data, digest = _blob()
    assert tier.stat(digest) is None
    tier.write(digest, [data[:1000], data[1000:]])
    assert tier.stat(digest).size == len(data)
    assert tier.read_range(digest, 10, 5000) == data[10:5000]
    with tier.open(digest) as f:
        assert f.read() == data
    assert digest in {b.digest for b in tier.blobs()}
    tier.delete(digest)
    assert tier.stat(digest) is None


def test_write_with_wrong_digest_leaves_nothing(tier: Tier) -> None:
    data, _ = _blob(4096)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(CorruptBlob):
        tier.write(wrong, [data])
    assert tier.stat(wrong) is None
    assert tier.blobs() == []


def test_write_interrupted_midway_leaves_nothing(tier: Tier) -> None:
    data, digest = _blob(4096)

    def chunks():
        yield data[:100]
        raise KeyboardInterrupt  # a kill between two chunks

    with pytest.raises(KeyboardInterrupt):
        tier.write(digest, chunks())
    assert tier.stat(digest) is None


def test_manifests_by_model_and_version(tier: Tier) -> None:
    entry = FileEntry(name="config.json", size=2, sha256="0" * 64)
    a1 = Manifest(model_id="org/a", version="v1", files=[entry])
    a2 = Manifest(model_id="org/a", version="v2", files=[entry])
    b1 = Manifest(model_id="b", version="v1", files=[entry])
    for m in (a1, a2, b1):
        tier.put_manifest(m)
    assert sorted(m.version for m in tier.manifests("org/a")) == ["v1", "v2"]
    assert {m.ref for m in tier.manifests()} == {"org/a:v1", "org/a:v2", "b:v1"}
    assert tier.get_manifest("org/a", "v2") == a2
    tier.delete_manifest("org/a", "v1")
    assert tier.get_manifest("org/a", "v1") is None


def test_local_tier_refuses_a_blob_larger_than_its_capacity(tmp_path: Path) -> None:
    tier = LocalTier("ram", tmp_path / "ram", capacity=1000)
    data, digest = _blob(2000)
    with pytest.raises(TierFull, match="exceeds its capacity"):
        tier.write(digest, [data])
    assert list((tmp_path / "ram" / "blobs").iterdir()) == []


def test_a_fresh_process_evicts_the_blobs_used_longest_ago(tmp_path: Path) -> None:
    """Blobs another process fetched and used: a new process's cost policy knows no counts for
    them, so it must go by their access times (mtime), not by directory or hash order."""
    from helios.storage.eviction import CostAwarePolicy

    first = LocalTier("ram", tmp_path / "ram", capacity=8000)
    ages = [5, 80, 20, 70, 10, 60, 30, 40]  # seconds since last use; the three oldest: 80, 70, 60
    digests = []
    for fill, age in enumerate(ages):
        data = bytes([fill]) * 1000
        digest = hashlib.sha256(data).hexdigest()
        first.write(digest, [data])
        os.utime(first.blob_path(digest), (1_000_000 - age, 1_000_000 - age))
        digests.append(digest)
    fresh = LocalTier("ram", tmp_path / "ram", capacity=8000, policy=CostAwarePolicy("nvme"))
    data = b"\xff" * 3000
    fresh.write(hashlib.sha256(data).hexdigest(), [data])
    gone = sorted(age for age, d in zip(ages, digests) if not fresh.blob_path(d).exists())
    assert gone == [60, 70, 80]
