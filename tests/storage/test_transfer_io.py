"""Blobs fetched into a disk tier are written with O_DIRECT (the same bytes, resumable, around the page cache),
and the blobs of a version are fetched side by side within one budget of reads."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helios.config import TransferConfig
from helios.errors import TierFull
from helios.storage.direct_write import ChunkWriter
from helios.storage.manifest import hash_file
from helios.storage.store import ModelStore
from helios.storage.tiers import LocalTier
from helios.storage.transfer import ReadBudget, fetch_blob
from tests.storage.conftest import S3Server, random_bytes, storage_config, write_model

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:  # writable for ctypes, never written
        start = ctypes.c_char.from_buffer(m)  # the mapping's first byte, for its address
        vec = (ctypes.c_ubyte * pages)()
        ok = _libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec) == 0
        del start  # the mapping can close only once nothing points into it
        if not ok:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec)


@pytest.mark.integration
@pytest.mark.parametrize("direct_io", [True, False])
def test_a_fetch_into_the_nvme_tier_keeps_its_bytes_out_of_the_page_cache(
    tmp_path: Path, s3: S3Server, direct_io: bool
) -> None:
    tiers = [{"kind": "nvme", "path": str(tmp_path / "nvme"), "capacity": "1GiB"}]
    cfg = storage_config(tmp_path, s3.url(), s3.options, tiers=tiers,
                         transfer={"chunk_mib": 1, "concurrency": 3, "direct_io": direct_io})
    store = ModelStore.from_config(cfg, tmp_path)
    weights = random_bytes((5 << 20) + 12345)  # a tail that is not a whole block
    manifest = store.push(write_model(tmp_path / "src", weights), "m", "v1")
    digest = next(f.sha256 for f in manifest.files if f.size == len(weights))

    local = store.ensure_local("m", tier="nvme")

    blob = store.tier("nvme").blob_path(digest)
    assert blob.stat().st_size == len(weights)
    cached_while_written = resident_pages(blob)
    assert hash_file(local.path / "model.safetensors") == digest
    assert (local.path / "model.safetensors").read_bytes() == weights
    if direct_io:
        assert cached_while_written == 0
    else:
        assert cached_while_written > 0  # what O_DIRECT saves: the buffered write left the blob in memory
    assert not list((tmp_path / "nvme" / "partial").glob("*.part"))


def test_a_resumed_write_keeps_the_prefix_and_ends_at_the_true_length(tmp_path: Path) -> None:
    chunk = 1 << 20
    data = random_bytes(3 * chunk + 777)
    part = tmp_path / "blob.part"
    part.write_bytes(data[:chunk])  # an interrupted transfer got one chunk in
    with ChunkWriter(part, chunk, chunk, direct=True) as w:
        assert w.direct  # the test's filesystem takes O_DIRECT, so the padded tail is what is tested
        for off in range(chunk, len(data), chunk):
            w.write(memoryview(data)[off : off + chunk])
    assert part.read_bytes() == data


def test_a_full_disk_reaches_the_caller_as_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    part = tmp_path / "blob.part"
    part.touch()
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as err, ChunkWriter(part, 0, 1 << 20, direct=True) as w:
        w.write(random_bytes(1 << 20))
    assert err.value.errno == errno.ENOSPC  # not a BufferError from closing the aligned buffer


def test_a_filesystem_that_refuses_o_direct_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):  # as tmpfs on older kernels and some network filesystems
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    data = random_bytes((2 << 20) + 5)
    part = tmp_path / "blob.part"
    part.touch()
    with ChunkWriter(part, 0, 1 << 20, direct=True) as w:
        assert not w.direct
        for off in range(0, len(data), 1 << 20):
            w.write(data[off : off + (1 << 20)])
    assert part.read_bytes() == data


class CountingTier(LocalTier):
    """A real local tier that records how many ranged reads are in flight at once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = self.most = 0
        self._count = threading.Lock()

    def read_buffer(self, digest: str, start: int, end: int) -> bytes:
        with self._count:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(0.01)  # a network's latency, so reads overlap
            return super().read_buffer(digest, start, end)
        finally:
            with self._count:
                self.in_flight -= 1


def test_blobs_fetched_side_by_side_share_one_budget_of_reads(tmp_path: Path) -> None:
    src = CountingTier("ssd", tmp_path / "ssd", capacity=1 << 30)
    dst = LocalTier("nvme", tmp_path / "nvme", capacity=1 << 30)
    blobs = [random_bytes((6 << 20) + n) for n in (1, 4097)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    for b, d in zip(blobs, digests, strict=True):
        src.write(d, [b])
    cfg = TransferConfig(chunk_mib=1, concurrency=3)
    budget = ReadBudget(cfg.concurrency)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: fetch_blob(src, dst, digests[i], len(blobs[i]), cfg, budget=budget), (0, 1)))
    assert [r.fetched for r in results] == [len(b) for b in blobs]
    assert [dst.blob_path(d).read_bytes() for d in digests] == blobs
    assert src.most == cfg.concurrency  # both blobs together, never more than the budget


def test_a_disk_that_fills_mid_fetch_stops_it_with_tier_full_and_no_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write runs on a thread of its own: its error still stops the fetch, as the disk's own error,
    and no blob or writer thread is left behind."""
    src = LocalTier("ssd", tmp_path / "ssd", capacity=1 << 30)
    dst = LocalTier("nvme", tmp_path / "nvme", capacity=1 << 30)
    blob = random_bytes((8 << 20) + 3)
    digest = hashlib.sha256(blob).hexdigest()
    src.write(digest, [blob])
    written = []
    real_pwrite = os.pwrite

    def fills_after_two_chunks(fd, data, offset):
        if len(written) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fills_after_two_chunks)
    with pytest.raises(TierFull):
        fetch_blob(src, dst, digest, len(blob), TransferConfig(chunk_mib=1, concurrency=2))
    assert written == [0, 1 << 20]  # in order, and nothing after the failure
    assert dst.stat(digest) is None
    assert not any(t.name in ("helios-write", "helios-hash") and t.is_alive() for t in threading.enumerate())
