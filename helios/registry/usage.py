"""How each model is used: request rate, last use and inter-arrival times, kept across restarts.

Eviction, prefetch and predictive scaling all ask the same questions (is this model hot,
when was it last used, how bursty are its arrivals), so the registry keeps one bounded
history of request timestamps per model. It is persisted as Parquet so it can also be
read by any analysis tool: each flush appends the new events as one numbered part file,
and once parts pile up they are compacted into a base file holding the bounded history
and every model's running total.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from helios.errors import InvalidRequest
from helios.observability.logs import get_logger, log_event

logger = get_logger("registry.usage")

SCHEMA = pa.schema([("model_id", pa.string()), ("time", pa.float64())])  # time: unix seconds
BASE_NAME = "base.parquet"
_PART = re.compile(r"^part-(\d{8})\.parquet$")
_META_KEY = b"helios"
RECENT_GAPS = 1024  # inter-arrival times usage(model) returns


@dataclass
class ModelUsage:
    """One model's retained timestamps (sorted, at most `history`) and running totals."""

    times: list[float] = field(default_factory=list)
    total: int = 0

    @property
    def last_used(self) -> float | None:
        return self.times[-1] if self.times else None

    def add(self, stamps: list[float], history: int) -> None:
        self.times.extend(stamps)
        self.times.sort()  # router replicas report out of order; timsort is linear on runs
        del self.times[:-history]
        self.total += len(stamps)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


class UsageBook:
    """Every model's usage in memory; the events not yet persisted wait in `pending`."""

    def __init__(self, window_s: float = 60.0, history: int = 4096) -> None:
        self.window_s = window_s
        self.history = history
        self.models: dict[str, ModelUsage] = {}
        self.pending: list[tuple[str, float]] = []

    def record(self, counts: dict[str, list[float]]) -> int:
        """Add request timestamps (unix seconds) per model; returns how many."""
        checked = {m: _timestamps(m, stamps) for m, stamps in counts.items()}  # all or nothing
        added = 0
        for model_id, stamps in checked.items():
            if not stamps:
                continue
            self.models.setdefault(model_id, ModelUsage()).add(stamps, self.history)
            self.pending.extend((model_id, t) for t in stamps)
            added += len(stamps)
        return added

    def forget(self, model_id: str) -> None:
        self.models.pop(model_id, None)
        self.pending = [e for e in self.pending if e[0] != model_id]

    def summary(self, model_id: str, now: float | None = None) -> dict:
        """{rpm, last_used, requests_total, inter_arrival: {count, mean_s, p50_s, p90_s}}."""
        now = time.time() if now is None else now
        u = self.models.get(model_id, ModelUsage())
        since = now - self.window_s
        recent = len(u.times) - _first_after(u.times, since)
        gaps = sorted(u.gaps())
        return {
            "rpm": round(recent * 60.0 / self.window_s, 3),
            "last_used": u.last_used,
            "requests_total": u.total,
            "inter_arrival": {
                "count": len(gaps),
                "mean_s": sum(gaps) / len(gaps) if gaps else None,
                "p50_s": _quantile(gaps, 0.5),
                "p90_s": _quantile(gaps, 0.9),
            },
        }

    def detail(self, model_id: str, now: float | None = None) -> dict:
        """The summary plus the most recent inter-arrival times, oldest first."""
        u = self.models.get(model_id, ModelUsage())
        return {**self.summary(model_id, now), "inter_arrival_s": u.gaps()[-RECENT_GAPS:]}


def _timestamps(model_id: str, stamps: list[float]) -> list[float]:
    try:
        out = [float(t) for t in stamps]
    except (TypeError, ValueError):
        raise InvalidRequest(f"usage of {model_id!r}: timestamps must be numbers", param=model_id) from None
    if not all(math.isfinite(t) for t in out):
        raise InvalidRequest(f"usage of {model_id!r}: timestamps must be finite", param=model_id)
    return out


def _first_after(times: list[float], since: float) -> int:
    """Index of the first timestamp after `since` in a sorted list."""
    return bisect.bisect_right(times, since)


def _quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


class UsageLog:
    """A UsageBook's Parquet files in one directory: `base.parquet` plus `part-NNNNNNNN.parquet`.

    The base file's metadata names the last part folded into it and every model's total,
    so a crash between writing a new base and deleting the old parts counts nothing twice."""

    def __init__(self, root: Path, compact_after: int = 64) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.compact_after = compact_after
        self.next_seq = 1
        self._base_through = 0

    def parts(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _PART.match(p.name))]
        return sorted(found)

    def load(self, book: UsageBook) -> int:
        """Fill an empty book from disk; returns the events read."""
        totals: dict[str, int] = {}
        retained_base: dict[str, int] = {}
        tables = []
        base = self.root / BASE_NAME
        if base.exists():
            table = _read(base)
            if table is not None:
                meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
                self._base_through = int(meta.get("through", 0))
                totals = {k: int(v) for k, v in meta.get("totals", {}).items()}
                retained_base = _counts(table)
                tables.append(table.replace_schema_metadata(None))
        for seq, path in self.parts():
            self.next_seq = max(self.next_seq, seq + 1)
            if seq <= self._base_through:
                continue  # already folded into the base (a crash interrupted the cleanup)
            table = _read(path)
            if table is not None:
                tables.append(table.replace_schema_metadata(None))
        self.next_seq = max(self.next_seq, self._base_through + 1)
        events = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        by_model: dict[str, list[float]] = {}
        for model_id, t in zip(events.column("model_id").to_pylist(), events.column("time").to_pylist()):
            by_model.setdefault(model_id, []).append(t)
        for model_id, stamps in by_model.items():
            u = book.models.setdefault(model_id, ModelUsage())
            u.add(stamps, book.history)
            # totals in the base count events it no longer keeps; parts add theirs
            u.total += totals.get(model_id, 0) - retained_base.get(model_id, 0)
        for model_id, total in totals.items():
            if model_id not in by_model:
                book.models[model_id] = ModelUsage(total=total)
        return events.num_rows

    def flush(self, book: UsageBook) -> int:
        """Append the book's pending events as one part (compacting when parts pile up); returns them."""
        added = self._append(book)
        if added and len(self.parts()) >= self.compact_after:
            self.compact(book)
        return added

    def compact(self, book: UsageBook) -> None:
        """Rewrite the whole log as one base file from the book, which holds everything persisted."""
        self._append(book)
        through = self.next_seq - 1
        rows = [(m, t) for m, u in sorted(book.models.items()) for t in u.times]
        meta = {"through": through, "totals": {m: u.total for m, u in book.models.items()}}
        table = _table(rows).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
        _write(table, self.root / BASE_NAME)
        self._base_through = through
        for seq, path in self.parts():
            if seq <= through:
                path.unlink(missing_ok=True)
        log_event(logger, "usage_compacted", through=through, events=table.num_rows, models=len(book.models))

    def _append(self, book: UsageBook) -> int:
        events, book.pending = book.pending, []
        if not events:
            return 0
        try:
            _write(_table(events), self.root / f"part-{self.next_seq:08d}.parquet")
        except BaseException:
            book.pending = events + book.pending  # kept for the next flush
            raise
        self.next_seq += 1
        return len(events)


def _table(rows: list[tuple[str, float]]) -> pa.Table:
    return pa.table({"model_id": [r[0] for r in rows], "time": [r[1] for r in rows]}, schema=SCHEMA)


def _counts(table: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for model_id in table.column("model_id").to_pylist():
        out[model_id] = out.get(model_id, 0) + 1
    return out


def _write(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name and rename it, so readers never see half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read(path: Path) -> pa.Table | None:
    """A usage file, or None (logged) when it cannot be read: a bad file loses its events, not the registry."""
    try:
        table = pq.read_table(path)
        if table.schema.remove_metadata() != SCHEMA:
            raise ValueError(f"schema {table.schema.remove_metadata()} is not {SCHEMA}")
        return table
    except (OSError, pa.ArrowInvalid, ValueError) as exc:
        log_event(logger, "usage_file_unreadable", path=str(path), error=str(exc))
        return None
