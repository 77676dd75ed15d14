"""The cache's tiers: local directories (RAM in /dev/shm, NVMe, SSD) and a remote fsspec store.

Every tier holds blobs by sha256 and manifests by model and version, in the same layout
(`blobs/<digest>`, `manifests/<model>/<version>.json`), so a tier can be inspected
with `ls` and copied with any tool. Writes are atomic: a blob is written under a
temporary name and renamed only once its digest is checked.

KV blocks (helios/engine/kv_store.py) may share a local tier with the blobs: they live under
`kv/blocks/<xx>/<key>` and the tier's policy tracks them as `kv:<key>`, so one byte budget and
one policy decide between a cold model and stale KV. A KV block evicted from a tier that has a
slower local tier behind it (`kv_spill`) moves there instead of going.

A local tier's root may also hold `hints.json`, the registry's keep-alive and idle hints
(`write_hints`), and `cache_state.json`, its policy's use counts: both are what the node
cache actor (`node_cache.py`) rebuilds its view from after a restart.

Who keeps a tier's budget: its own policy in this process (a tool outside Ray, a test), or,
under Ray, the node's one cache actor (`TierAccounts`), so that one policy per tier per node
sees every process's hits. Bytes never go through the accounts: processes read, write and
rename files themselves and only report what they did and ask for room.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from helios.errors import CorruptBlob, RemoteUnavailable, TierFull
from helios.observability.metrics import CACHE_EVICTED_BYTES, CACHE_EVICTIONS
from helios.storage.eviction import EvictionPolicy, LRUPolicy
from helios.storage.manifest import MANIFEST_NAME, Manifest, model_key

LOCAL_KINDS = ("ram", "nvme", "ssd")
HINTS_NAME = "hints.json"
STATE_NAME = "cache_state.json"
RESERVATION_S = 900.0  # room granted for a blob that never arrived is given back after this
KV_PREFIX = "kv:"
KV_DIR = "kv"


def is_kv(digest: str) -> bool:
    """Whether a tracked name is a KV block (`kv:<key>`) rather than a model blob's sha256."""
    return digest.startswith(KV_PREFIX)


def scan_blocks(blocks: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path, stat) of every KV block file under `blocks/<xx>/` (files that vanish meanwhile skipped)."""
    with contextlib.suppress(FileNotFoundError):
        for sub in os.scandir(blocks):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(FileNotFoundError):
                    yield entry.path, entry.stat()


def scan_blobs(blobs: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(name, stat) of every blob file in a tier's `blobs/` (files that vanish meanwhile skipped)."""
    for entry in os.scandir(blobs):
        with contextlib.suppress(FileNotFoundError):
            yield entry.name, entry.stat()


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    last_access: float = 0.0


class Tier(ABC):
    """One level of the cache. Implementations must make `write` atomic and verified:
    after a crash a blob is either absent or complete, and never stored under a digest
    its bytes do not have."""

    kind: str

    @abstractmethod
    def stat(self, digest: str) -> BlobInfo | None: ...

    @abstractmethod
    def read_range(self, digest: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob."""

    def read_buffer(self, digest: str, start: int, end: int) -> bytes | memoryview:
        """`read_range` for callers that only write or hash the bytes: a tier may hand over its
        client's buffer instead of copying it into `bytes`."""
        return self.read_range(digest, start, end)

    @abstractmethod
    def open(self, digest: str) -> BinaryIO: ...

    @abstractmethod
    def write(self, digest: str, chunks: Iterable[bytes]) -> None: ...

    @abstractmethod
    def delete(self, digest: str) -> None: ...

    @abstractmethod
    def blobs(self) -> list[BlobInfo]: ...

    @abstractmethod
    def put_manifest(self, manifest: Manifest) -> None: ...

    @abstractmethod
    def manifests(self, model_id: str | None = None) -> list[Manifest]: ...

    @abstractmethod
    def delete_manifest(self, model_id: str, version: str) -> None: ...

    @abstractmethod
    def get_manifest(self, model_id: str, version: str) -> Manifest | None:
        """One version's manifest by direct lookup (no listing), or None."""

    def describe(self) -> str:
        return self.kind


class TierAccounts(ABC):
    """A local tier's budget and eviction kept outside this process: the node cache actor.

    Hits, inserts and removals are reported (batched, not waited on); room and admission are
    asked for and answered with the evictions already done. A call that cannot reach the
    keeper returns None and the tier falls back to its own policy for that call, so a node
    whose actor is restarting still serves."""

    @abstractmethod
    def hit(self, kind: str, digest: str, now: float) -> None: ...

    @abstractmethod
    def inserted(self, kind: str, digest: str, size: int, now: float) -> None: ...

    @abstractmethod
    def removed(self, kind: str, digest: str) -> None: ...

    @abstractmethod
    def observe_bandwidth(self, kind: str, source: str, nbytes: int, seconds: float) -> None: ...

    @abstractmethod
    def make_room(self, kind: str, size: int, protected: Collection[str], digest: str | None) -> list[str] | None:
        """Evict until `size` more bytes fit (reserving them for `digest`): the victims, or None
        when the keeper cannot be reached. Raises TierFull as the tier would."""

    @abstractmethod
    def admit(self, kind: str, digest: str, size: int) -> bool | None:
        """Whether an optional copy should come in (None: the keeper cannot be reached)."""

    def flush(self) -> None:
        """Send what is batched now (a store calls it when an operation ends)."""


def _check_digest(h: Any, digest: str, where: str) -> None:
    if h.hexdigest() != digest:
        raise CorruptBlob(f"bytes written for blob {digest[:12]} in {where} hash to {h.hexdigest()[:12]}")


class LocalTier(Tier):
    """A directory on this node (tmpfs for RAM), with a byte capacity kept by an eviction policy."""

    def __init__(self, kind: str, root: Path, capacity: int, policy: EvictionPolicy | None = None) -> None:
        self.kind = kind
        self.root = Path(root).expanduser()
        self.capacity = capacity
        self.policy = policy or LRUPolicy()
        self.shared: TierAccounts | None = None  # the node cache actor's accounts, when under Ray
        self.kv_spill: LocalTier | None = None  # where KV blocks evicted from here go (the next local tier)
        self._hints_seen: tuple[int, int] | None = None  # (inode, mtime) of the hints file last applied
        self._reserved: dict[str, tuple[int, float]] = {}  # digest -> (bytes, until): room granted, not yet written
        self._lock = threading.RLock()  # the policy is shared by the threads of a process (fills, the actor's calls)
        for sub in ("blobs", "partial", "locks", "manifests", "snapshots"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"{self.kind} ({self.root})"

    # --- blobs ---
    def blob_path(self, digest: str) -> Path:
        if is_kv(digest):
            key = digest[len(KV_PREFIX) :]
            return self.root / KV_DIR / "blocks" / key[:2] / key
        return self.root / "blobs" / digest

    def partial_path(self, digest: str) -> Path:
        """Where a transfer into this tier keeps its bytes until they are verified (resumable)."""
        return self.root / "partial" / f"{digest}.part"

    def lock(self, digest: str, timeout: float = -1):
        """A lock per blob across processes, so a node fetches a blob once."""
        from filelock import FileLock

        return FileLock(str(self.root / "locks" / f"{digest}.lock"), timeout=timeout)

    def stat(self, digest: str) -> BlobInfo | None:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(digest, st.st_size, st.st_mtime)

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        with open(self.blob_path(digest), "rb", buffering=0) as f:
            return os.pread(f.fileno(), end - start, start)

    def open(self, digest: str) -> BinaryIO:
        return open(self.blob_path(digest), "rb")

    def touch(self, digest: str) -> None:
        """Record a hit: the mtime is the access time a policy rebuilt from the directory sees."""
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.blob_path(digest), (now, now))
        self.record_hit(digest, now)

    def record_hit(self, digest: str, now: float) -> None:
        """A process used this blob (here, or anywhere on the node when this is the node cache)."""
        if self.shared is not None:
            self.shared.hit(self.kind, digest, now)
            return
        with self._lock:
            if not self.policy.tracks(digest) and self.stat(digest) is not None:
                self.sync_policy()  # another process brought it: learn it before counting the hit
            self.policy.on_hit(digest, now)

    def write(self, digest: str, chunks: Iterable[bytes], protected: Collection[str] = ()) -> None:
        tmp = self.root / "partial" / f"{digest}.{uuid.uuid4().hex}.tmp"
        h = hashlib.sha256()
        try:
            with self.disk_errors(), open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    h.update(chunk)
            _check_digest(h, digest, self.describe())
            self.commit(digest, tmp, protected)
        finally:
            tmp.unlink(missing_ok=True)

    def commit(self, digest: str, verified: Path, protected: Collection[str] = ()) -> None:
        """Move a verified file in under its digest, making room for it first."""
        size = verified.stat().st_size
        self.make_room(size, set(protected) | {digest}, digest)
        os.replace(verified, self.blob_path(digest))
        self.record_insert(digest, size, time.time())

    def record_insert(self, digest: str, size: int, now: float) -> None:
        """A blob arrived under its digest (written here, or by another process the actor hears from)."""
        if self.shared is not None:
            self.shared.inserted(self.kind, digest, size, now)
            return
        with self._lock:
            self._reserved.pop(digest, None)
            if not self.policy.tracks(digest):  # a directory sync may have learned it first: keep its count
                self.policy.on_insert(digest, size, now)

    def delete(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)
        self.partial_path(digest).unlink(missing_ok=True)
        self.record_remove(digest)

    def record_remove(self, digest: str) -> None:
        if self.shared is not None:
            self.shared.removed(self.kind, digest)
            return
        with self._lock:
            self._reserved.pop(digest, None)
            self.policy.on_remove(digest)

    def plan(self, need: int) -> list[str]:
        """What the policy would evict first to free `need` bytes now (nothing is evicted)."""
        with self._lock:
            self.sync_policy()
            return self.policy.plan(need)

    def blobs(self) -> list[BlobInfo]:
        return [BlobInfo(name, st.st_size, st.st_mtime) for name, st in scan_blobs(self.root / "blobs")]

    def kv_blocks(self) -> list[BlobInfo]:
        """The KV blocks stored in this tier (`kv:<key>`), which `blobs()` leaves out."""
        return [BlobInfo(KV_PREFIX + os.path.basename(path), st.st_size, st.st_mtime)
                for path, st in scan_blocks(self.root / KV_DIR / "blocks")]

    def used(self) -> int:
        return sum(b.size for b in self.blobs()) + sum(b.size for b in self.kv_blocks())

    def release(self, digest: str) -> None:
        """Give back room held for a blob that will not arrive."""
        with self._lock:
            self._reserved.pop(digest, None)

    def tracked_bytes(self) -> int:
        """Bytes the policy knows of (no directory scan: what reports and syncs told it)."""
        with self._lock:
            return self.policy.total()

    def sync_policy(self) -> int:
        """Align the policy with the directory, which other processes also change; returns bytes in
        use, counting room granted for blobs still being written."""
        with self._lock:
            self.apply_hints()
            on_disk = {b.digest: b for b in (*self.blobs(), *self.kv_blocks())}
            known = self.policy.known()
            for digest in known.keys() - on_disk.keys():
                self.policy.on_remove(digest)
            # Oldest first: a policy knows no counts for blobs other processes fetched, so among equal
            # priorities it goes by the order it learned them in, which should be their access times.
            for b in sorted((on_disk[d] for d in on_disk.keys() - known.keys()), key=lambda b: b.last_access):
                self.policy.on_insert(b.digest, b.size, b.last_access)
            now = time.monotonic()
            self._reserved = {d: r for d, r in self._reserved.items() if r[1] > now and d not in on_disk}
            return sum(b.size for b in on_disk.values()) + sum(size for size, _ in self._reserved.values())

    def admit(self, digest: str, size: int) -> bool:
        """Whether an optional copy (filling this tier behind a load) should come in, by the policy."""
        if self.shared is not None:
            answer = self.shared.admit(self.kind, digest, size)
            if answer is not None:
                return answer
        with self._lock:
            return self.policy.admit(digest, size, self.sync_policy() + size - self.capacity)

    def observe_bandwidth(self, source: str, nbytes: int, seconds: float) -> None:
        """A fetch from tier kind `source` into this tier moved `nbytes` in `seconds`."""
        if self.shared is not None:
            self.shared.observe_bandwidth(self.kind, source, nbytes, seconds)
            return
        with self._lock:
            self.policy.observe_bandwidth(source, nbytes, seconds)

    def save_state(self) -> None:
        """Write the policy's counts next to the blobs (`cache_state.json`), for a restarted keeper."""
        with self._lock:
            body = {"written": time.time(), "policy": type(self.policy).__name__, "state": self.policy.state()}
        atomic_write_bytes(self.root / STATE_NAME, json.dumps(body).encode())

    def load_state(self) -> bool:
        """Take back counts `save_state` wrote (same policy only), then align with the directory."""
        try:
            body = json.loads((self.root / STATE_NAME).read_bytes())
        except (OSError, ValueError):
            body = None
        restored = False
        with self._lock:
            if isinstance(body, dict) and body.get("policy") == type(self.policy).__name__:
                restored = self.policy.restore(body.get("state") or {})
            self.sync_policy()
        return restored

    def apply_hints(self) -> None:
        """Hand the registry's hints (`hints.json`) to the policy, once per new file; deadlines
        already given stay until they pass (every hint expires on its own)."""
        path = self.root / HINTS_NAME
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._hints_seen:
            return
        self._hints_seen = stamp
        keep, idle = read_hints(path)
        for until, digests in _by_deadline(idle).items():
            self.policy.set_idle(digests, until)
        for until, digests in _by_deadline(keep).items():  # after idle: keep-alive wins a conflict
            self.policy.set_keepalive(digests, until)

    def make_room(self, size: int, protected: Collection[str] = (), digest: str | None = None) -> list[str]:
        """Evict by policy until `size` more bytes fit; TierFull when they cannot. With `digest`,
        the room is held for that blob until it arrives, so two writers cannot both take it."""
        if size > self.capacity:
            raise TierFull(f"tier {self.describe()}: a {size} B blob exceeds its capacity of {self.capacity} B")
        if self.shared is not None:
            victims = self.shared.make_room(self.kind, size, protected, digest)
            if victims is not None:
                return victims
        with self._lock:
            if digest is not None:
                self._reserved.pop(digest, None)  # asked again for the same blob: one reservation
            used = self.sync_policy()
            need = used + size - self.capacity
            victims = self.policy.plan(need, protected) if need > 0 else []
            freed = 0
            for victim in victims:
                info = self.stat(victim)
                if is_kv(victim) and self.kv_spill is not None and info is not None:
                    self._spill_kv(victim, info.size, protected)
                else:
                    self.delete(victim)
                freed += info.size if info else 0
            if victims:
                CACHE_EVICTIONS.inc(len(victims), tier=self.kind, reason="capacity")
                CACHE_EVICTED_BYTES.inc(freed, tier=self.kind, reason="capacity")
            if freed < need:
                raise TierFull(
                    f"tier {self.describe()}: needs {need} B more room but only {freed} B are evictable "
                    f"(capacity {self.capacity} B, in use {used - freed} B)"
                )
            if digest is not None and self.stat(digest) is None:
                self._reserved[digest] = (size, time.monotonic() + RESERVATION_S)
            return victims

    def _spill_kv(self, digest: str, size: int, protected: Collection[str] = ()) -> None:
        """Move an evicted KV block to the next local tier (copied and renamed in first, so a reader
        always finds it in one of them); dropped when that tier has no room for it either."""
        target = self.kv_spill
        assert target is not None
        if target.stat(digest) is not None and target.policy.tracks(digest):
            self.delete(digest)  # promoted from there on a hit: its copy there is still good
            return
        try:
            target.make_room(size, protected, digest)
            final = target.blob_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.root / KV_DIR / "tmp" / f"{final.name}.spill.{uuid.uuid4().hex[:8]}"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(self.blob_path(digest), tmp)
                os.rename(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            target.record_insert(digest, size, time.time())
        except (TierFull, OSError):  # no room behind, or gone meanwhile: the block is recomputed if needed
            target.release(digest)
        self.delete(digest)

    @contextlib.contextmanager
    def disk_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFull(f"tier {self.describe()}: the disk is full ({exc.strerror})") from exc
            raise

    # --- manifests and snapshots ---
    def _manifest_path(self, model_id: str, version: str) -> Path:
        return self.root / "manifests" / model_key(model_id) / f"{version}.json"

    def put_manifest(self, manifest: Manifest) -> None:
        path = self._manifest_path(manifest.model_id, manifest.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, manifest.to_json())

    def manifests(self, model_id: str | None = None) -> list[Manifest]:
        base = self.root / "manifests"
        dirs = [base / model_key(model_id)] if model_id else [d for d in base.iterdir() if d.is_dir()]
        out = []
        for d in dirs:
            for p in sorted(d.glob("*.json")) if d.is_dir() else []:
                with contextlib.suppress(FileNotFoundError):
                    out.append(Manifest.from_json(p.read_bytes()))
        return out

    def get_manifest(self, model_id: str, version: str) -> Manifest | None:
        try:
            return Manifest.from_json(self._manifest_path(model_id, version).read_bytes())
        except FileNotFoundError:
            return None

    def delete_manifest(self, model_id: str, version: str) -> None:
        self._manifest_path(model_id, version).unlink(missing_ok=True)
        shutil.rmtree(self.snapshot_path(model_id, version), ignore_errors=True)

    def snapshot_path(self, model_id: str, version: str) -> Path:
        return self.root / "snapshots" / model_key(model_id) / version

    def has_all(self, manifest: Manifest) -> bool:
        return all(self.stat(f.sha256) is not None for f in manifest.files)

    def snapshot(self, manifest: Manifest, marker: str | None = None, carry: tuple[str, ...] = ()) -> Path:
        """A model directory of symlinks into this tier's blobs, plus the manifest, for vLLM to load.

        `marker`: a file to create in it from the start, saying that a fetch is still bringing some
        of the blobs its links point at (see `helios.storage.arrivals`). `carry`: files of the
        directory this one replaces that it keeps (another start's request to a fetch of the same
        version that waits to be asked, which would otherwise wait for good)."""
        final = self.snapshot_path(manifest.model_id, manifest.version)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            for f in manifest.files:
                link = tmp / f.name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.blob_path(f.sha256))
            (tmp / MANIFEST_NAME).write_bytes(manifest.to_json())
            if marker is not None:
                (tmp / marker).touch()
            for name in carry:
                if (final / name).exists():
                    (tmp / name).touch()
            old = final.parent / f".{final.name}.old.{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, old)
            os.rename(tmp, final)
            for name in carry:  # made in the old directory while this one was being linked
                if (old / name).exists():
                    (final / name).touch()
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name and rename it: readers see all of it or none."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_hints(root: Path, keep_alive: Mapping[str, float], idle: Mapping[str, float]) -> Path:
    """Publish keep-alive and idle hints (digest -> until, epoch seconds) for the tier at `root`."""
    path = Path(root) / HINTS_NAME
    body = {"written": time.time(), "keep_alive": dict(keep_alive), "idle": dict(idle)}
    atomic_write_bytes(path, json.dumps(body, sort_keys=True).encode())
    return path


def read_hints(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(keep_alive, idle) from a hints file; a missing or malformed file (or entry) is no hint."""
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}, {}
    out: list[dict[str, float]] = []
    for key in ("keep_alive", "idle"):
        entries = body.get(key) if isinstance(body, dict) else None
        good = {}
        for digest, until in (entries or {}).items() if isinstance(entries, dict) else ():
            if isinstance(until, (int, float)) and not isinstance(until, bool):
                good[str(digest)] = float(until)
        out.append(good)
    return out[0], out[1]


def _by_deadline(hints: Mapping[str, float]) -> dict[float, list[str]]:
    grouped: dict[float, list[str]] = {}
    for digest, until in hints.items():
        grouped.setdefault(until, []).append(digest)
    return grouped


class RemoteTier(Tier):
    """The durable store behind the node: any fsspec URL. Object stores publish an object
    only when its upload completes, and local paths are written under a temporary name
    and renamed, so both keep writes atomic."""

    kind = "remote"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, reader: str = "auto") -> None:
        """`reader`: how blob ranges are read from an s3:// remote: "obstore" (GIL-free, see
        s3_reads.py), "fsspec" (s3fs), or "auto" (obstore when installed)."""
        import fsspec

        self.url = url
        self._ranges = None
        if url.startswith("s3://") and reader != "fsspec":
            from helios.storage import s3_reads

            if reader == "obstore" or s3_reads.available():
                self._ranges, self._range_prefix = s3_reads.obstore_reader(url, storage_options or {})
        if url.startswith("file://"):
            url = "file://" + str(Path(url.removeprefix("file://")).expanduser())
        options = dict(storage_options or {})
        if not url.startswith("file://"):
            options.setdefault("use_listings_cache", False)  # other nodes write here too
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ValueError, ImportError) as exc:
            raise RemoteUnavailable(f"remote tier {self.url}: {exc}") from exc
        self.root = root.rstrip("/")
        self._local = "file" in _protocols(self.fs)
        if self._local:
            self.fs.makedirs(self.root, exist_ok=True)

    def describe(self) -> str:
        return f"remote ({self.url})"

    def _blob(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest}"

    def _manifest(self, model_id: str, version: str) -> str:
        return f"{self.root}/manifests/{model_key(model_id)}/{version}.json"

    def stat(self, digest: str) -> BlobInfo | None:
        with self.errors():
            try:
                info = self.fs.info(self._blob(digest))
            except FileNotFoundError:
                return None
        return BlobInfo(digest, int(info["size"]))

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        return bytes(self.read_buffer(digest, start, end))  # callers parse it (json.loads takes no memoryview)

    def read_buffer(self, digest: str, start: int, end: int) -> bytes | memoryview:
        if self._ranges is not None:  # obstore's own buffer: no copy of each chunk on the transfer path
            return self._ranges(f"{self._range_prefix}blobs/{digest}", start, end)
        with self.errors():
            return self.fs.cat_file(self._blob(digest), start=start, end=end)

    def open(self, digest: str) -> BinaryIO:
        with self.errors():
            return self.fs.open(self._blob(digest), "rb")

    def write(self, digest: str, chunks: Iterable[bytes]) -> None:
        self._put(self._blob(digest), chunks, digest)

    def delete(self, digest: str) -> None:
        with self.errors(), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._blob(digest))

    def blobs(self) -> list[BlobInfo]:
        with self.errors():
            try:
                entries = self.fs.ls(f"{self.root}/blobs", detail=True)
            except FileNotFoundError:
                return []
        return [BlobInfo(e["name"].rsplit("/", 1)[-1], int(e["size"])) for e in entries if e["type"] == "file"]

    def put_manifest(self, manifest: Manifest) -> None:
        self._put(self._manifest(manifest.model_id, manifest.version), [manifest.to_json()], None)

    def manifests(self, model_id: str | None = None) -> list[Manifest]:
        pattern = f"{self.root}/manifests/{model_key(model_id) if model_id else '*'}/*.json"
        with self.errors():
            self.fs.invalidate_cache()
            paths = self.fs.glob(pattern)
            return [Manifest.from_json(self.fs.cat_file(p)) for p in sorted(paths)]

    def get_manifest(self, model_id: str, version: str) -> Manifest | None:
        """One GET of the manifest's object, no listing (a lookup by key, as artefacts are found)."""
        with self.errors():
            try:
                return Manifest.from_json(self.fs.cat_file(self._manifest(model_id, version)))
            except FileNotFoundError:
                return None

    def delete_manifest(self, model_id: str, version: str) -> None:
        with self.errors(), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._manifest(model_id, version))

    def _put(self, path: str, chunks: Iterable[bytes], digest: str | None) -> None:
        h = hashlib.sha256()
        target = f"{path}.{uuid.uuid4().hex}.tmp" if self._local else path
        with self.errors():
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            f = self.fs.open(target, "wb")
            try:
                for chunk in chunks:
                    f.write(chunk)
                    h.update(chunk)
                if digest:
                    _check_digest(h, digest, self.describe())
            except BaseException:
                if self._local:
                    f.close()
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(target)
                else:
                    _discard(f)
                raise
            f.close()
            if self._local:
                os.replace(target, path)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn fsspec/botocore failures into one RemoteUnavailable that says what to fix."""
        try:
            yield
        except (FileNotFoundError, CorruptBlob):
            raise
        except PermissionError as exc:
            raise RemoteUnavailable(f"remote tier {self.url}: access denied ({exc})") from exc
        except Exception as exc:  # botocore's errors do not share a base we can import cheaply
            name = type(exc).__name__
            if name in ("NoCredentialsError", "PartialCredentialsError"):
                raise RemoteUnavailable(
                    f"remote tier {self.url}: no credentials (set storage_options key/secret or AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY)"
                ) from exc
            if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"):
                raise RemoteUnavailable(f"remote tier {self.url}: cannot connect ({exc})") from exc
            if isinstance(exc, OSError) and not isinstance(exc, (TimeoutError, ConnectionError)):
                raise RemoteUnavailable(f"remote tier {self.url}: {exc}") from exc
            raise


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _discard(f: Any) -> None:
    """Abandon a half-written remote file so it is never published."""
    discard = getattr(f, "discard", None)
    if discard is not None:
        with contextlib.suppress(Exception):
            discard()
    f.closed = True  # fsspec files commit on close; this one must not
