"""The model store against a real S3 server (moto on loopback, through s3fs)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helios.errors import BlobNotFound, ModelVersionNotFound, RemoteUnavailable, TierFull
from helios.storage import arrivals
from helios.storage.arrivals import is_weight_file
from helios.storage.manifest import hash_file
from helios.storage.store import ModelStore
from tests.storage.conftest import S3Server, random_bytes, storage_config, write_model

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path, s3: S3Server) -> ModelStore:
    return ModelStore.from_config(storage_config(tmp_path, s3.url(), s3.options), tmp_path)


def _remote_blobs(store: ModelStore) -> set[str]:
    return {b.digest for b in store.remote.blobs()}


def test_push_then_pull_gives_the_same_bytes(store: ModelStore, tmp_path: Path) -> None:
    src = write_model(tmp_path / "src", random_bytes(5 << 20))
    manifest = store.push(src, "org/model", "v1")
    assert {f.name for f in manifest.files} == {"config.json", "model.safetensors"}
    assert _remote_blobs(store) == {f.sha256 for f in manifest.files}

    local = store.ensure_local("org/model")
    assert local.tier == "ram" and local.sources == {"remote": manifest.total_bytes}
    for f in manifest.files:
        assert (local.path / f.name).read_bytes() == (src / f.name).read_bytes()
    # The load went remote -> RAM and left a copy on NVMe for the next cold start.
    assert store.holders(manifest) == ["ram", "nvme", "remote"]


def test_second_pull_is_a_ram_hit(store: ModelStore, tmp_path: Path) -> None:
    store.push(write_model(tmp_path / "src", random_bytes(1 << 20)), "m", "v1")
    store.ensure_local("m")
    again = store.ensure_local("m")
    assert again.fetched_bytes == 0 and set(again.sources) == {"ram"}


def test_a_file_shared_by_two_versions_is_stored_once(store: ModelStore, tmp_path: Path) -> None:
    weights = random_bytes(2 << 20)
    v1 = store.push(write_model(tmp_path / "v1", weights, config='{"v": 1}'), "m", "v1")
    v2 = store.push(write_model(tmp_path / "v2", weights, config='{"v": 2}'), "m", "v2")
    shared = {f.sha256 for f in v1.files} & {f.sha256 for f in v2.files}
    assert len(shared) == 1
    assert len(_remote_blobs(store)) == 3  # two configs, one weights blob
    store.ensure_local("m", "v1")
    second = store.ensure_local("m", "v2")
    assert second.fetched_bytes == len('{"v": 2}')  # only the new config moved
    assert [m.version for m in store.versions("m")] == ["v2", "v1"]


def test_corrupt_blob_on_disk_is_detected_and_refetched(store: ModelStore, tmp_path: Path) -> None:
    src = write_model(tmp_path / "src", random_bytes(3 << 20))
    manifest = store.push(src, "m", "v1")
    store.ensure_local("m")
    store.evict("m", tier="ram")
    weights = next(f for f in manifest.files if f.name == "model.safetensors")
    nvme_blob = store.tier("nvme").blob_path(weights.sha256)
    data = bytearray(nvme_blob.read_bytes())
    data[1000] ^= 0xFF  # one flipped bit-pattern, same size
    nvme_blob.write_bytes(bytes(data))

    local = store.ensure_local("m")
    assert local.sources.get("remote") == weights.size  # the bad NVMe copy was skipped
    assert hash_file(local.path / "model.safetensors") == weights.sha256
    assert hash_file(nvme_blob) == weights.sha256  # and replaced by a good one


_PULL = """
import json, sys
from pathlib import Path
from helios.config import StorageConfig
from helios.storage.store import ModelStore
cfg, root, ref = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
store = ModelStore.from_config(StorageConfig.model_validate_json(cfg), root)
local = store.ensure_local(ref, tier="nvme")
print("RESULT " + json.dumps({"fetched": local.fetched_bytes, "resumed": local.resumed_bytes}))
"""


def _pull_process(cfg, root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _PULL, cfg.model_dump_json(), str(root), "m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
    )


def test_weights_deferred_for_an_early_engine_start_arrive_behind_the_small_files(
    store: ModelStore, tmp_path: Path
) -> None:
    src = write_model(tmp_path / "src", random_bytes(9 << 20))
    manifest = store.push(src, "m", "v1")

    local = store.localize(manifest, defer=is_weight_file)
    assert (local.path / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert local.arriving is not None  # the weights were in no local tier: they follow in a thread
    assert arrivals.wait_for(local.path / "model.safetensors", local.path) >= 0
    local.arriving.result(timeout=120)
    assert (local.path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert not [p.name for p in local.path.iterdir() if p.name.startswith(".helios-")]  # marker gone
    assert local.sources == {"remote": manifest.total_bytes} and local.timings["fetch_s"] > 0
    assert store.holders(manifest)[0] == "ram"

    again = store.localize(manifest, defer=is_weight_file)
    assert again.arriving is None and set(again.sources) == {"ram"}  # nothing to wait for


def test_a_second_start_of_a_version_keeps_the_first_ones_request_for_its_weights(
    store: ModelStore, tmp_path: Path
) -> None:
    """Two starts of one version on a node, each fetching its weights only if asked: the first one's
    loader asks, then the second start links the snapshot again; the fetch still begins."""
    manifest = store.push(write_model(tmp_path / "src", random_bytes(2 << 20)), "m", "v1")
    first = store.localize(manifest, defer=is_weight_file, only_if_wanted=threading.Event())
    arrivals.want(first.path)
    second = store.localize(manifest, defer=is_weight_file, only_if_wanted=threading.Event())
    assert second.path == first.path and arrivals.wanted(second.path)
    assert arrivals.wait_for(first.path / "model.safetensors", first.path) >= 0
    first.arriving.result(timeout=60)
    second.arriving.result(timeout=60)
    assert (first.path / "model.safetensors").read_bytes() == (tmp_path / "src" / "model.safetensors").read_bytes()
    # The weights evicted later (by size: the snapshot stays): a start that need not read them does not
    # inherit the old request, so they stay remote.
    weights = next(f for f in manifest.files if is_weight_file(f.name))
    store.local[0].delete(weights.sha256)
    engine_started = threading.Event()
    third = store.localize(manifest, defer=is_weight_file, only_if_wanted=engine_started)
    assert not arrivals.wanted(third.path)
    engine_started.set()
    third.arriving.result(timeout=60)
    assert store.local[0].stat(weights.sha256) is None


def test_a_background_fill_waits_for_the_engine_start_it_was_held_for(store: ModelStore, tmp_path: Path) -> None:
    manifest = store.push(write_model(tmp_path / "src", random_bytes(2 << 20)), "m", "v1")
    gate = threading.Event()
    local = store.localize(manifest, background_fill=True, fill_after=gate)
    time.sleep(0.5)
    assert "nvme" not in store.holders(manifest)  # the engine would be loading now: no copy competes
    gate.set()
    local.fill.join(timeout=60)
    assert store.holders(manifest) == ["ram", "nvme", "remote"]


def test_a_deferred_fetch_that_fails_reaches_the_waiting_loader_and_leaves_no_blob(
    store: ModelStore, tmp_path: Path
) -> None:
    manifest = store.push(write_model(tmp_path / "src", random_bytes(3 << 20)), "m", "v1")
    weights = next(f for f in manifest.files if f.name == "model.safetensors")
    store.remote.delete(weights.sha256)  # the bucket lost it after the manifest was written

    local = store.localize(manifest, defer=is_weight_file)
    assert local.arriving is not None
    with pytest.raises(arrivals.WeightsNotArrived, match="BlobNotFound"):
        arrivals.wait_for(local.path / "model.safetensors", local.path)
    with pytest.raises(BlobNotFound):
        local.arriving.result(timeout=60)
    assert store.tier("ram").stat(weights.sha256) is None
    assert not list((tmp_path / "ram").rglob("*.part"))


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def test_killed_transfer_leaves_no_blob_and_resumes(tmp_path: Path, s3: S3Server) -> None:
    cfg = storage_config(tmp_path, s3.url(), s3.options, transfer={"chunk_mib": 1, "concurrency": 2})
    store = ModelStore.from_config(cfg, tmp_path)
    size = 48 << 20
    manifest = store.push(write_model(tmp_path / "src", random_bytes(size)), "m", "v1")
    digest = next(f.sha256 for f in manifest.files if f.size == size)
    nvme = store.tier("nvme")

    proc = _pull_process(cfg, tmp_path)
    part = nvme.partial_path(digest)
    deadline = time.time() + 120
    while not (part.exists() and part.stat().st_size >= 6 << 20):
        assert proc.poll() is None and time.time() < deadline, "transfer ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert nvme.stat(digest) is None  # nothing under the final name
    assert part.exists() and 0 < part.stat().st_size < size

    local = store.ensure_local("m", tier="nvme")
    assert local.resumed_bytes >= 6 << 20
    assert local.fetched_bytes < manifest.total_bytes
    assert hash_file(local.path / "model.safetensors") == digest
    assert not part.exists()


def test_two_concurrent_pulls_download_once(tmp_path: Path, s3: S3Server) -> None:
    cfg = storage_config(tmp_path, s3.url(), s3.options, transfer={"chunk_mib": 1, "concurrency": 2})
    store = ModelStore.from_config(cfg, tmp_path)
    manifest = store.push(write_model(tmp_path / "src", random_bytes(24 << 20)), "m", "v1")
    procs = [_pull_process(cfg, tmp_path) for _ in range(2)]
    results = [_result(p) for p in procs]
    assert sum(r["fetched"] for r in results) == manifest.total_bytes  # one fetched, the other waited
    assert store.tier("nvme").has_all(manifest)


def test_tier_over_capacity_evicts_least_recently_used(tmp_path: Path, s3: S3Server) -> None:
    cfg = storage_config(tmp_path, s3.url(), s3.options, ram="12MiB")
    store = ModelStore.from_config(cfg, tmp_path)
    a = store.push(write_model(tmp_path / "a", random_bytes(7 << 20), '{"m": "a"}'), "a", "v1")
    b = store.push(write_model(tmp_path / "b", random_bytes(7 << 20), '{"m": "b"}'), "b", "v1")
    store.ensure_local("a")
    store.ensure_local("b")
    ram = store.tier("ram")
    assert ram.used() <= 12 << 20
    assert ram.has_all(b) and not ram.has_all(a)
    assert store.holders(a) == ["nvme", "remote"]  # still one NVMe read away
    big = store.push(write_model(tmp_path / "big", random_bytes(13 << 20)), "big", "v1")
    with pytest.raises(TierFull, match="capacity"):
        store.ensure_local("big")
    assert ram.has_all(b) and big.total_bytes > 12 << 20


def test_evict_keeps_blobs_another_version_uses(store: ModelStore, tmp_path: Path) -> None:
    weights = random_bytes(1 << 20)
    store.push(write_model(tmp_path / "v1", weights, '{"v": 1}'), "m", "v1")
    v2 = store.push(write_model(tmp_path / "v2", weights, '{"v": 2}'), "m", "v2")
    store.ensure_local("m", "v1")
    store.ensure_local("m", "v2")
    freed = store.evict("m", "v1", tier="ram")
    assert freed == len('{"v": 1}')
    assert store.tier("ram").has_all(v2)


def test_evict_drops_the_derived_blobs_of_the_versions_it_drops(store: ModelStore, tmp_path: Path) -> None:
    """A layout or shared-weights blob is made from a version's snapshot; it goes with the version."""
    import torch

    from helios.storage.derived import model_digest, write_blob

    weights = random_bytes(1 << 20)
    store.push(write_model(tmp_path / "v1", weights, '{"v": 1}'), "m", "v1")
    store.push(write_model(tmp_path / "v2", weights, '{"v": 2}'), "m", "v2")
    derived = store.tier("ram").root / "derived"
    blobs = {}
    for version in ("v1", "v2"):
        local = store.ensure_local("m", version)
        blobs[version] = derived / f"{version}.safetensors"
        write_blob(blobs[version], {"w": torch.ones(256)}, {"model_digest": model_digest(local.path)})
    size = blobs["v1"].stat().st_size
    freed = store.evict("m", "v1", tier="ram")
    assert not blobs["v1"].exists() and blobs["v2"].exists()
    assert freed == len('{"v": 1}') + size  # v1's own config blob and its derived blob
    store.evict(tier="ram")
    assert not list(derived.glob("*.safetensors"))


def test_a_sharded_model_only_in_s3_is_profiled_from_its_ranged_reads(tiny_model_dir: Path, tmp_path: Path,
                                                                         s3: S3Server) -> None:
    """The registry profiles a version it finds in the store before any tier holds it: config, index
    and shard headers come as ranged S3 reads (obstore's buffers), which must parse as bytes do."""
    import shutil

    from helios.registry.profile import profile_from_dir, profile_from_store
    from helios.storage.loader import MappedSafetensors

    src = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, src)
    names = MappedSafetensors(src / "model.safetensors").names()
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    store = ModelStore.from_config(storage_config(tmp_path, s3.url(), s3.options), tmp_path)
    manifest = store.push(src, "org/sharded", "v1")
    assert store.holders(manifest) == ["remote"]
    assert profile_from_store(store, manifest) == profile_from_dir(src)


def test_missing_model_and_version_give_clear_errors(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelVersionNotFound, match="'nope' is not in the store"):
        store.ensure_local("nope")
    store.push(write_model(tmp_path / "src", b"x"), "m", "v1")
    with pytest.raises(ModelVersionNotFound, match=r"no version 'v9' \(have: v1\)"):
        store.ensure_local("m", "v9")


def test_missing_bucket_is_a_clear_error(tmp_path: Path, s3: S3Server) -> None:
    store = ModelStore.from_config(storage_config(tmp_path, "s3://no-such-bucket/x", s3.options), tmp_path)
    with pytest.raises((ModelVersionNotFound, RemoteUnavailable), match="no-such-bucket"):
        store.ensure_local("m")


def test_no_credentials_is_a_clear_error(tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    store = ModelStore.from_config(
        storage_config(tmp_path, s3.url(), {"endpoint_url": s3.endpoint_url}), tmp_path
    )
    with pytest.raises(RemoteUnavailable, match="no credentials"):
        store.push(write_model(tmp_path / "src", b"x"), "m", "v1")


def test_unreachable_endpoint_and_unknown_scheme_are_clear_errors(tmp_path: Path) -> None:
    opts = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}}}
    store = ModelStore.from_config(storage_config(tmp_path, "s3://b/p", opts), tmp_path)
    with pytest.raises(RemoteUnavailable, match="cannot connect"):
        store.resolve("m")
    with pytest.raises(RemoteUnavailable, match="nosuch"):
        ModelStore.from_config(storage_config(tmp_path, "nosuch://b/p"), tmp_path)
