"""The warm view: replicas, tier reports and load hit counts, without Ray."""

from __future__ import annotations

from pathlib import Path

from helios.registry.warm import WarmView


def test_replicas_come_and_go_and_tier_reports_replace_the_node() -> None:
    w = WarmView()
    w.set_replica("m", "r1", "n1", True, "v1")
    w.set_replica("m", "r2", "n2", True, "v1")
    w.set_replica("m", "r1", "n1", False, None)
    w.set_tiers("n1", {"m": {"ram": 10, "nvme": 0}, "x": {"ram": 0}})
    w.set_tiers("n2", {"m": {"nvme": 5}})
    w.set_tiers("n2", {"x": {"nvme": 7}})
    view = w.of("m")
    assert [(r["replica_id"], r["node_id"]) for r in view["replicas"]] == [("r2", "n2")]
    assert view["tiers"] == {"n1": {"ram": 10}}


def test_replica_loads_count_hits_and_misses_per_tier(tmp_path: Path) -> None:
    w = WarmView()
    w.record_load("n1", "ram", {"ram": 100})  # all from RAM: a RAM hit
    w.record_load("n1", "ram", {"nvme": 60, "remote": 40})  # a RAM miss served by NVMe and the remote
    w.record_load("n1", "ram", {"ram": 0, "remote": 100})
    assert w.state.loads["n1"] == {
        "ram": {"hits": 1, "misses": 2, "bytes_served": 100},
        "nvme": {"hits": 1, "misses": 0, "bytes_served": 60},
        "remote": {"hits": 2, "misses": 0, "bytes_served": 140},
    }
    w.save(tmp_path / "warm.json")
    assert WarmView.load(tmp_path / "warm.json").state == w.state
