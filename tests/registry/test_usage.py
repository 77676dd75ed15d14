"""Usage statistics and their Parquet log, without Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helios.errors import InvalidRequest
from helios.registry.usage import BASE_NAME, UsageBook, UsageLog

NOW = 1_700_000_000.0


def test_rate_counts_the_last_minute_and_gaps_are_between_requests() -> None:
    book = UsageBook(window_s=60)
    book.record({"m": [NOW - 90, NOW - 50, NOW - 20, NOW - 5]})
    s = book.summary("m", now=NOW)
    assert s["rpm"] == 3.0 and s["last_used"] == NOW - 5 and s["requests_total"] == 4
    assert book.detail("m", now=NOW)["inter_arrival_s"] == [40.0, 30.0, 15.0]
    assert s["inter_arrival"] == {"count": 3, "mean_s": 85 / 3, "p50_s": 30.0, "p90_s": 40.0}
    assert book.summary("m", now=NOW + 120)["rpm"] == 0.0


def test_a_longer_window_reports_per_minute() -> None:
    book = UsageBook(window_s=300)
    book.record({"m": [NOW - 250, NOW - 200, NOW - 10]})
    assert book.summary("m", now=NOW)["rpm"] == 0.6


def test_out_of_order_batches_are_merged_and_history_is_bounded() -> None:
    book = UsageBook(history=3)
    book.record({"m": [NOW - 1, NOW - 9]})
    book.record({"m": [NOW - 5, NOW - 7]})
    assert book.models["m"].times == [NOW - 7, NOW - 5, NOW - 1]
    assert book.summary("m", now=NOW)["requests_total"] == 4  # totals keep what history dropped


def test_unknown_model_has_no_usage() -> None:
    s = UsageBook().summary("nobody", now=NOW)
    assert (s["rpm"], s["last_used"], s["requests_total"], s["inter_arrival"]["count"]) == (0.0, None, 0, 0)


def test_log_round_trips_through_parts(tmp_path: Path) -> None:
    book = UsageBook()
    log = UsageLog(tmp_path)
    book.record({"a": [NOW - 3, NOW - 2], "b": [NOW - 1]})
    assert log.flush(book) == 3 and book.pending == []
    book.record({"a": [NOW]})
    log.flush(book)
    assert [p.name for _, p in log.parts()] == ["part-00000001.parquet", "part-00000002.parquet"]
    table = pq.read_table(tmp_path / "part-00000001.parquet")
    assert table.column_names == ["model_id", "time"] and table.num_rows == 3

    again = UsageBook()
    assert UsageLog(tmp_path).load(again) == 4
    assert again.models["a"].times == [NOW - 3, NOW - 2, NOW] and again.models["a"].total == 3
    assert again.summary("b", now=NOW)["last_used"] == NOW - 1


def test_compaction_keeps_totals_beyond_the_history(tmp_path: Path) -> None:
    book = UsageBook(history=2)
    log = UsageLog(tmp_path, compact_after=3)
    for i in range(5):
        book.record({"a": [NOW + i]})
        log.flush(book)
    assert (tmp_path / BASE_NAME).exists() and len(log.parts()) < 3

    again = UsageBook(history=2)
    UsageLog(tmp_path).load(again)
    assert again.models["a"].total == 5 and again.models["a"].times == [NOW + 3, NOW + 4]
    # and further parts add to the compacted totals
    log2 = UsageLog(tmp_path, compact_after=100)
    book2 = UsageBook(history=2)
    log2.load(book2)
    book2.record({"a": [NOW + 10]})
    log2.flush(book2)
    third = UsageBook(history=2)
    UsageLog(tmp_path).load(third)
    assert third.models["a"].total == 6 and third.models["a"].last_used == NOW + 10


def test_parts_already_in_the_base_are_not_counted_twice(tmp_path: Path) -> None:
    """A crash after writing the base but before deleting the parts it folded in."""
    book = UsageBook()
    log = UsageLog(tmp_path, compact_after=100)
    book.record({"a": [NOW, NOW + 1]})
    log.flush(book)
    kept = (tmp_path / "part-00000001.parquet").read_bytes()
    log.compact(book)
    (tmp_path / "part-00000001.parquet").write_bytes(kept)  # as if the unlink never happened

    again = UsageBook()
    UsageLog(tmp_path).load(again)
    assert again.models["a"].total == 2 and again.models["a"].times == [NOW, NOW + 1]


def test_a_forgotten_model_leaves_the_files_at_the_next_compaction(tmp_path: Path) -> None:
    book = UsageBook()
    log = UsageLog(tmp_path)
    book.record({"a": [NOW], "b": [NOW]})
    log.flush(book)
    book.forget("a")
    log.compact(book)
    again = UsageBook()
    UsageLog(tmp_path).load(again)
    assert set(again.models) == {"b"}


def test_an_unreadable_part_loses_only_its_events(tmp_path: Path) -> None:
    book = UsageBook()
    log = UsageLog(tmp_path)
    book.record({"a": [NOW]})
    log.flush(book)
    (tmp_path / "part-00000002.parquet").write_bytes(b"not parquet")
    again = UsageBook()
    assert UsageLog(tmp_path).load(again) == 1
    log3 = UsageLog(tmp_path)
    log3.load(UsageBook())
    assert log3.next_seq == 3  # never overwrites the bad file's number


def test_bad_timestamps_are_refused_whole() -> None:
    book = UsageBook()
    with pytest.raises(InvalidRequest, match="'b'"):
        book.record({"a": [NOW], "b": ["soon"]})
    with pytest.raises(InvalidRequest, match="finite"):
        book.record({"a": [float("nan")]})
    assert book.models == {} and book.pending == []
