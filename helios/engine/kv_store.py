"""The node-local KV block store: a RAM tier in shared memory that spills to NVMe.

vLLM's KV connector (helios/engine/kv_connector.py) saves and loads KV blocks here. A
block is content-addressed: its key chains the key of the block before it with the
block's token ids, under a namespace naming the model and the KV layout, so two prompts
that share a block-aligned prefix share the same blocks and a prefix is stored once.

One file holds one block for all layers (a 64-byte header, then each layer's K/V for the
block back to back), so a block moves with one `writev`/`preadv` straight from and into
vLLM's paged cache; there are no per-layer or per-request files. Files are written under a
temporary name and renamed, so a reader sees a whole block or none, and several engines
on the node (prefill and decode replicas) can share one root without a lock on the hot
path. The RAM tier is a directory in /dev/shm; over its byte budget the least recently
used blocks move to the NVMe directory, and over the NVMe budget they are deleted.

When the node has a node cache (`KVStoreConfig.node_tiers`, filled in by the engine
replica), the two tiers are the model cache's own RAM and NVMe tiers (`<tier root>/kv/`):
the store writes and reads there as before, but reports every insert, hit and removal to the
node cache (over its local socket: vLLM's engine processes are not Ray workers), whose one
policy per tier weighs KV blocks against model blobs and evicts, spilling KV from RAM to
NVMe. While the node cache cannot be reached, the store keeps the tiers' budgets itself.

Counters (hits per tier, misses, bytes, spills, evictions, plus whatever the connector
adds) are kept per process and sent to the node cache with each flush, or, without one (or
while it is away), written to `<root>/stats/<name>.json`; any process on the node (a Serve
replica exporting metrics, a test) reads them with `store_stats`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from helios.config import KVStoreConfig
from helios.config import default_kv_root as default_root
from helios.storage import report_socket
from helios.storage.report_socket import ReportClient
from helios.storage.tiers import KV_DIR, KV_PREFIX, scan_blobs, scan_blocks

MAGIC = b"HELIOSKV"
VERSION = 1
HEADER = struct.Struct("<8sIIQ16s")  # magic, version, reserved, payload bytes, key
HEADER_SIZE = 64  # the header padded, so the payload starts 64-byte aligned
KEY_BYTES = 16
TIERS = ("ram", "nvme")


# --------------------------------------------------------------------------- keys


def namespace(**identity: Any) -> bytes:
    """The root of every key chain: what must match for two engines' blocks to be
    interchangeable (model, dtype, block size, layer shapes, ...)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()


def block_keys(ns: bytes, token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[str]:
    """Keys of the full blocks of `token_ids` (at most `limit`): key_i = H(key_{i-1}, tokens of block i)."""
    n = len(token_ids) // block_size if limit is None else min(limit, len(token_ids) // block_size)
    keys, parent = [], ns
    fmt = f"<{block_size}i"
    for i in range(n):
        h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
        h.update(struct.pack(fmt, *token_ids[i * block_size : (i + 1) * block_size]))
        parent = h.digest()
        keys.append(parent.hex())
    return keys


def _header(key: str, payload: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, payload, bytes.fromhex(key)).ljust(HEADER_SIZE, b"\0")


def _check_header(raw: bytes | bytearray | memoryview, key: str, payload: int | None) -> int:
    magic, version, _, size, kbytes = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or kbytes.hex() != key or (payload is not None and size != payload):
        raise OSError(f"KV block {key[:12]}: bad header (magic={magic!r} version={version} bytes={size})")
    return size


# --------------------------------------------------------------------------- store


class KVStore:
    """One process's handle on a node's KV store; many handles may share a root."""

    def __init__(self, config: KVStoreConfig, stats_name: str | None = None) -> None:
        self.config = config
        self.reports: ReportClient | None = None
        self.kinds: dict[str, str] = {}  # this store's tier -> the node cache tier kind it lives in
        if config.node_tiers is not None:
            shared = config.node_tiers
            kinds = list(shared.tiers)[: len(TIERS)]
            self.kinds = dict(zip(TIERS, kinds))
            self.dirs = {t: Path(shared.tiers[k]).expanduser() / KV_DIR for t, k in self.kinds.items()}
            self.budget = {t: int(shared.capacity.get(k, 0)) for t, k in self.kinds.items()}
            self.reports = ReportClient(shared.socket, f"{socket.gethostname()}:{os.getpid()}:{stats_name or 'kv'}")
        else:
            self.dirs = {"ram": Path(config.root).expanduser()}
            if config.nvme_path is not None:
                self.dirs["nvme"] = Path(config.nvme_path).expanduser()
            self.budget = {"ram": int(config.ram_bytes), "nvme": int(config.nvme_bytes)}
        for d in self.dirs.values():
            (d / "blocks").mkdir(parents=True, exist_ok=True)
            (d / "tmp").mkdir(parents=True, exist_ok=True)
        (self.dirs["ram"] / "stats").mkdir(exist_ok=True)
        self.stats_name = stats_name or f"pid{os.getpid()}"
        self.counters: dict[str, float] = {}
        self._lock = threading.Lock()
        self._used = {t: 0 for t in self.dirs}  # from the last scan plus what this handle wrote since
        self._scanned_at = 0.0

    # --- paths
    def path(self, tier: str, key: str) -> Path:
        return self.dirs[tier] / "blocks" / key[:2] / key

    def _tmp(self, tier: str, key: str) -> Path:
        return self.dirs[tier] / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def locate(self, key: str) -> str | None:
        """The tier holding a block, RAM first; None if no tier does."""
        for tier in self.dirs:
            if os.path.exists(self.path(tier, key)):
                return tier
        return None

    def count_present(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first, are stored without a gap (a usable prefix)."""
        for i, key in enumerate(keys):
            if self.locate(key) is None:
                return i
        return len(keys)

    def touch(self, keys: Iterable[str]) -> None:
        """Mark blocks as just used, so this store's own eviction keeps them (LRU by mtime). The node
        cache is not told: the worker's read of the block is the hit it counts, once per use."""
        for key in keys:
            for tier in self.dirs:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.path(tier, key))
                    break

    # --- the node cache
    def _report(self, op: str, tier: str, key: str, size: int | None = None) -> None:
        if self.reports is None:
            return
        kind, name = self.kinds[tier], KV_PREFIX + key
        if op == "insert":
            self.reports.add(("insert", kind, name, size, time.time()))
            if not self.reports.connected:
                self.reports.flush()  # learn now whether the keeper is there, before relying on it for room
        elif op == "hit":
            self.reports.add(("hit", kind, name, time.time()))
        else:
            self.reports.add(("remove", kind, name))

    @property
    def keeps_own_budget(self) -> bool:
        """True without a node cache, or while it cannot be reached."""
        return self.reports is None or not self.reports.reachable

    # --- counters
    def count(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counters[k] = self.counters.get(k, 0) + v

    def flush_stats(self) -> None:
        """Send the node cache what this handle did since the last flush and its counters; without
        a node cache (or while it is away), write the counters where `read_stats` finds them."""
        if self.reports is not None:
            with self._lock:
                self.reports.set_counters(self.stats_name, self.counters)
            if self.reports.flush():
                return
        with self._lock:
            data = json.dumps({"name": self.stats_name, "pid": os.getpid(), "updated": time.time(), "counters": self.counters})
        path = self.dirs["ram"] / "stats" / f"{self.stats_name}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # a block server thread flushes too
        tmp.write_text(data)
        os.replace(tmp, path)

    # --- writing
    def put(self, key: str, buffers: Sequence[Any], payload: int) -> int:
        """Store one block from `buffers` (bytes-like, written back to back in one `writev`).

        Returns the bytes written, 0 when the block was already stored (by anyone)."""
        if self.locate(key) is not None:
            return 0
        self._write("ram", key, [_header(key, payload), *buffers])
        self.count(put_blocks=1, put_bytes=payload)
        self._report("insert", "ram", key, payload + HEADER_SIZE)
        self._account("ram", payload + HEADER_SIZE)
        return payload

    def put_raw(self, key: str, data: bytes | bytearray | memoryview) -> int:
        """Store a whole block file as another store served it (header included, checked)."""
        payload = _check_header(data, key, len(data) - HEADER_SIZE)
        if self.locate(key) is not None:
            return 0
        self._write("ram", key, [data])
        self.count(put_blocks=1, put_bytes=payload)
        self._report("insert", "ram", key, len(data))
        self._account("ram", len(data))
        return payload

    def _write(self, tier: str, key: str, buffers: Sequence[Any]) -> None:
        final = self.path(tier, key)
        final.parent.mkdir(exist_ok=True)
        tmp = self._tmp(tier, key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            total = sum(memoryview(b).nbytes for b in buffers)
            written = os.writev(fd, buffers)
            if written != total:  # short write (rare, e.g. signal): finish the rest
                rest = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[written:]
                while rest:
                    n = os.write(fd, rest)
                    rest = rest[n:]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, final)

    # --- reading
    def read_into(self, key: str, buffers: Sequence[Any], payload: int) -> str | None:
        """Read a block straight into `buffers` (one `preadv`); returns the tier it came from, or None if absent."""
        head = bytearray(HEADER_SIZE)
        for tier in self.dirs:
            try:
                fd = os.open(self.path(tier, key), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                got = os.preadv(fd, [head, *buffers], 0)
                if got != HEADER_SIZE + payload:
                    raise OSError(f"KV block {key[:12]}: read {got} of {HEADER_SIZE + payload} bytes")
                _check_header(head, key, payload)
                with contextlib.suppress(OSError):
                    os.utime(fd)
            finally:
                os.close(fd)
            self.count(**{f"hits_{tier}": 1, "get_bytes": payload})
            self._report("hit", tier, key)
            if tier != "ram" and self.config.promote_on_hit:
                self._promote(key, [head, *buffers], payload)
            return tier
        self.count(misses=1)
        return None

    def _promote(self, key: str, buffers: Sequence[Any], payload: int) -> None:
        """Write a block just read from a slower tier into RAM from the buffers it was read into
        (one `writev`, no second read). The slower copy stays, so evicting it from RAM again
        costs a delete, not a copy; a full disk or a race with another promoter is harmless."""
        if os.path.exists(self.path("ram", key)):
            return
        try:
            self._write("ram", key, buffers)
        except OSError:
            return
        self.count(promoted_blocks=1, promoted_bytes=payload)
        self._report("insert", "ram", key, payload + HEADER_SIZE)
        self._account("ram", payload + HEADER_SIZE)

    def read_raw(self, key: str) -> bytes | None:
        """A whole block file (header included), for serving it to another node."""
        for tier in self.dirs:
            try:
                data = self.path(tier, key).read_bytes()
            except FileNotFoundError:
                continue
            _check_header(data, key, len(data) - HEADER_SIZE)
            self.count(**{f"served_{tier}": 1, "served_bytes": len(data) - HEADER_SIZE})
            return data
        return None

    # --- budgets
    def _account(self, tier: str, nbytes: int) -> None:
        if not self.keeps_own_budget:
            return  # the node cache evicts from the reports
        with self._lock:
            self._used[tier] += nbytes
            over = self._used[tier] > self._budget(tier) or time.monotonic() - self._scanned_at > 5.0
        if over:
            self.make_room()

    def _budget(self, tier: str) -> int:
        """Bytes of blocks this store lets a tier hold while it keeps the budget itself. In the node
        cache's tiers (its keeper away) that is the tier's capacity less the model blobs held there
        now: the blobs are not this store's to evict, and the tier's budget is for both."""
        if self.config.node_tiers is None:
            return self.budget[tier]
        held = 0
        with contextlib.suppress(FileNotFoundError):
            held = sum(st.st_size for _, st in scan_blobs(self.dirs[tier].parent / "blobs"))
        return max(self.budget[tier] - held, 0)

    def _scan(self, tier: str) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every block in a tier, oldest first."""
        return sorted((st.st_mtime, st.st_size, Path(path)) for path, st in scan_blocks(self.dirs[tier] / "blocks"))

    def usage(self) -> dict[str, dict[str, int]]:
        """Blocks and bytes per tier, as on disk now."""
        result = {}
        for tier in self.dirs:
            blocks = self._scan(tier)
            result[tier] = {"blocks": len(blocks), "bytes": sum(b[1] for b in blocks), "budget": self._budget(tier)}
        return result

    def make_room(self) -> None:
        """Bring each tier under its budget: RAM's oldest blocks spill to NVMe (or go), NVMe's oldest go.

        One process at a time does it (a file lock); a process that finds it taken skips,
        since the holder is already making room."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.dirs["ram"] / "evict.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return
        try:
            for tier in self.dirs:
                blocks = self._scan(tier)
                used = sum(b[1] for b in blocks)
                budget = self._budget(tier)
                for _, size, path in blocks:
                    if used <= budget:
                        break
                    if tier == "ram" and "nvme" in self.dirs:
                        self._spill(path, size)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                            self.count(evicted_blocks=1, evicted_bytes=size - HEADER_SIZE)
                    used -= size
                with self._lock:
                    self._used[tier] = used
            self._scanned_at = time.monotonic()
        finally:
            lock.release()

    def _spill(self, path: Path, size: int) -> None:
        """Move one block RAM → NVMe: copied and renamed in first, so it is always in some tier."""
        key = path.name
        final = self.path("nvme", key)
        if not final.exists():
            final.parent.mkdir(exist_ok=True)
            tmp = self._tmp("nvme", key)
            try:
                shutil.copyfile(path, tmp)
            except FileNotFoundError:  # someone else spilled or evicted it meanwhile
                return
            os.rename(tmp, final)
            with self._lock:
                self._used["nvme"] += size
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.count(spilled_blocks=1, spilled_bytes=size - HEADER_SIZE)

    def drop(self, keys: Iterable[str]) -> int:
        """Delete blocks from every tier; returns how many files went."""
        n = 0
        for key in keys:
            for tier in self.dirs:
                with contextlib.suppress(FileNotFoundError):
                    self.path(tier, key).unlink()
                    self._report("remove", tier, key)
                    n += 1
        return n

    def clean_tmp(self, older_than_s: float = 3600.0) -> None:
        """Remove temporaries a crashed writer left behind."""
        cutoff = time.time() - older_than_s
        for d in self.dirs.values():
            for entry in os.scandir(d / "tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)


def ram_dir(config: KVStoreConfig) -> Path:
    """The directory of a store's first tier, where its stats files are (the node cache's RAM
    tier's `kv/` when the store lives there)."""
    if config.node_tiers is not None:
        return Path(next(iter(config.node_tiers.tiers.values()))).expanduser() / KV_DIR
    return Path(config.root).expanduser()


def read_stats(root: str | os.PathLike | None = None, prefix: str = "") -> dict[str, float]:
    """Counters summed over every stats file under `root` whose name starts with `prefix`
    (one engine's instance name gives that engine's scheduler and workers)."""
    return _sum(_file_stats(Path(root) if root else default_root(), prefix))


def store_stats(config: KVStoreConfig, prefix: str = "") -> dict[str, float]:
    """Counters of the store handles named `prefix...` of a store: from its node cache, which its
    handles report to, and from the files of handles that could not reach it (each handle's
    counters only grow, so the larger of its two copies is the newer)."""
    per_name = _file_stats(ram_dir(config), prefix)
    if config.node_tiers is not None:
        try:
            kept = report_socket.query(config.node_tiers.socket, {"query": "kv_stats", "prefix": prefix}) or {}
        except OSError:
            kept = {}
        for name, values in kept.items():
            mine = per_name.setdefault(name, {})
            for k, v in values.items():
                mine[k] = max(mine.get(k, 0), v)
    return _sum(per_name)


def _sum(per_name: dict[str, dict[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for values in per_name.values():
        for k, v in values.items():
            totals[k] = totals.get(k, 0) + v
    return totals


def _file_stats(root: Path, prefix: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for path in _stats_files(root, prefix):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            out[path.name.removesuffix(".json")] = dict(json.loads(path.read_text())["counters"])
    return out


def _stats_files(root: Path, prefix: str) -> Iterator[Path]:
    d = root / "stats"
    if d.is_dir():
        yield from (p for p in sorted(d.glob("*.json")) if p.name.startswith(prefix))
