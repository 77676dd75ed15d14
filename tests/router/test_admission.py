"""The admission gate, drain rate and per-key limits (plain asyncio, a fake clock where time matters)."""

from __future__ import annotations

import asyncio
import json

import pytest

from helios.errors import RateLimited, ServiceUnavailable
from helios.router.admission import AdmissionGate, DrainRate, KeyLimits, TokenBucket, estimated_tokens
from helios.router.core import ModelRoute, RouterCore
from tests.router.fakes import FakeClock
from tests.router.test_core import FakeEngine


def test_drain_rate_and_retry_after() -> None:
    clock = FakeClock(1000.0)
    rate = DrainRate(clock=clock)
    assert rate.per_second() is None and rate.seconds_for(10) == 1
    for _ in range(11):
        rate.tick()
        clock.now += 0.5  # two a second
    assert rate.per_second() == pytest.approx(10 / 5.5)
    assert rate.seconds_for(20) == 11
    assert rate.seconds_for(10**6) == 60  # capped


def test_gate_runs_capacity_queues_the_next_and_sheds_past_the_queue() -> None:
    async def scenario() -> None:
        gate = AdmissionGate("m", lambda: 2, max_queued=2, queue_timeout_s=5)
        await gate.acquire()
        await gate.acquire()
        assert gate.running == 2
        waiting = [asyncio.create_task(gate.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert gate.queued == 2 and not any(w.done() for w in waiting)
        with pytest.raises(RateLimited) as shed:
            await gate.acquire()
        assert shed.value.status_code == 429 and shed.value.code == "model_overloaded"
        assert shed.value.headers["Retry-After"] == "1"
        gate.release()  # first in, first served
        await asyncio.sleep(0.01)
        assert waiting[0].done() and not waiting[1].done()
        gate.release()
        await asyncio.gather(*waiting)
        assert gate.running == 2 and gate.queued == 0 and gate.shed == 1

    asyncio.run(scenario())


def test_the_gate_reports_its_queue_depth_as_it_changes() -> None:
    """What the admission-queue gauge shows: 0 from the start, one per waiter, none once they leave."""
    async def scenario() -> None:
        depths: list[int] = []
        gate = AdmissionGate("m", lambda: 1, max_queued=2, queue_timeout_s=0.05, on_depth=depths.append)
        await gate.acquire()  # a free slot: nobody queues
        assert depths == [0]
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert depths == [0, 1]
        gate.release()
        await waiting
        assert depths == [0, 1, 0]
        with pytest.raises(ServiceUnavailable):
            await gate.acquire()  # waits, then times out
        assert depths == [0, 1, 0, 1, 0]

    asyncio.run(scenario())


def test_a_request_that_waits_past_the_timeout_gets_503_and_frees_its_place() -> None:
    async def scenario() -> None:
        gate = AdmissionGate("m", lambda: 1, max_queued=1, queue_timeout_s=0.05)
        await gate.acquire()
        with pytest.raises(ServiceUnavailable) as err:
            await gate.acquire()
        assert err.value.status_code == 503 and int(err.value.headers["Retry-After"]) >= 1
        assert gate.queued == 0 and gate.timed_out == 1
        late = asyncio.create_task(gate.acquire())  # the queue has room again
        await asyncio.sleep(0)
        gate.release()
        await late
        assert gate.running == 1

    asyncio.run(scenario())


def test_a_client_that_leaves_the_queue_gives_its_place_up() -> None:
    async def scenario() -> None:
        gate = AdmissionGate("m", lambda: 1, max_queued=1, queue_timeout_s=5)
        await gate.acquire()
        leaver = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        leaver.cancel()
        await asyncio.gather(leaver, return_exceptions=True)
        gate.release()
        assert gate.running == 0 and gate.queued == 0

    asyncio.run(scenario())


def test_more_capacity_wakes_waiters() -> None:
    async def scenario() -> None:
        capacity = [1]
        gate = AdmissionGate("m", lambda: capacity[0], max_queued=4, queue_timeout_s=5)
        await gate.acquire()
        waiting = [asyncio.create_task(gate.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        capacity[0] = 3  # a replica was added
        gate.wake()
        await asyncio.sleep(0.01)
        assert [w.done() for w in waiting] == [True, True, False]

    asyncio.run(scenario())


def test_token_bucket_and_key_limits() -> None:
    clock = FakeClock(1000.0)
    bucket = TokenBucket(60, clock)  # one a second, a burst of 60
    bucket.take(60)
    assert bucket.wait_s(1) == pytest.approx(1.0)
    clock.now += 2
    assert bucket.wait_s(2) == 0
    limits = KeyLimits(requests_per_minute=2, tokens_per_minute=None, clock=clock)
    limits.check("a", 10)
    limits.check("a", 10)
    with pytest.raises(RateLimited) as err:
        limits.check("a", 10)
    assert err.value.code == "rate_limit_exceeded" and err.value.headers["Retry-After"] == "30"
    limits.check("b", 10)  # another key has its own bucket
    tokens = KeyLimits(requests_per_minute=None, tokens_per_minute=100, clock=clock)
    tokens.check("a", 90)
    with pytest.raises(RateLimited, match="tokens"):
        tokens.check("a", 20)


def test_token_estimate_counts_the_reserved_output() -> None:
    raw = json.dumps({"prompt": "x" * 400, "max_tokens": 50, "n": 2}).encode()
    assert estimated_tokens(raw, json.loads(raw)) == len(raw) // 4 + 100
    assert estimated_tokens(b"{}", {}) == 16


def test_router_core_sheds_with_429_and_releases_slots() -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        class SlowFakeEngine(FakeEngine):
            async def call(self, req):
                await release.wait()
                return await super().call(req)

        core = RouterCore({"m": ModelRoute(SlowFakeEngine())},
                          admission=lambda m: AdmissionGate(m, lambda: 1, max_queued=1, queue_timeout_s=5))
        body = b'{"model": "m", "prompt": "x"}'
        first = asyncio.create_task(core.forward("/v1/completions", {}, body, "1"))
        second = asyncio.create_task(core.forward("/v1/completions", {}, body, "2"))
        await asyncio.sleep(0.01)
        with pytest.raises(RateLimited):
            await core.forward("/v1/completions", {}, body, "3")
        release.set()
        assert [r.status for r in await asyncio.gather(first, second)] == [200, 200]
        assert core.gates["m"].running == 0

    asyncio.run(scenario())


def test_router_core_rate_limits_per_key() -> None:
    core = RouterCore({"m": ModelRoute(FakeEngine())}, api_keys=[b"k1", b"k2"],
                      limits=KeyLimits(requests_per_minute=1, tokens_per_minute=None))
    body = b'{"model": "m", "prompt": "x"}'

    async def send(key: str):
        return await core.forward("/v1/completions", {"authorization": f"Bearer {key}"}, body, "r")

    assert asyncio.run(send("k1")).status == 200
    with pytest.raises(RateLimited):
        asyncio.run(send("k1"))
    assert asyncio.run(send("k2")).status == 200
