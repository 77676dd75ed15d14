"""Circuit breakers (a fake clock), and the router core reporting answers to them (a fake engine)."""

from __future__ import annotations

import asyncio
import json

import pytest

from helios.engine.http import REPLICA_HEADER, EngineHTTPRequest, EngineHTTPResponse
from helios.errors import EngineUnavailable, ServiceUnavailable
from helios.router.breaker import Breakers, CircuitBreaker, breakers_for
from helios.router.core import ModelRoute, RetryPolicy, RouterCore
from tests.router.fakes import FakeClock
from tests.router.test_core import JSON, FakeEngine


def test_opens_after_consecutive_failures_then_one_probe_closes_it() -> None:
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    breaker.failure()
    breaker.success()  # not consecutive
    breaker.failure()
    breaker.failure()
    assert breaker.available()
    breaker.failure()
    assert breaker.state == "open" and not breaker.available()
    clock.now = 9.9
    assert not breaker.available()
    clock.now = 10.0
    assert breaker.available() and breaker.state == "half_open"
    breaker.routed()  # the probe
    assert not breaker.available()  # one probe at a time
    breaker.success()
    assert breaker.state == "closed" and breaker.available()


def test_a_failed_probe_opens_it_again_and_a_lost_probe_is_given_up() -> None:
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    breaker.failure()
    clock.now = 5
    assert breaker.available()
    breaker.routed()
    breaker.failure()
    assert breaker.state == "open" and breaker.opened_at == 5
    clock.now = 10
    assert breaker.available()
    breaker.routed()
    clock.now = 15  # the probe's answer never came: another probe may go
    assert breaker.available()


def test_breakers_track_live_replicas_and_say_when_all_are_open() -> None:
    clock = FakeClock(0.0)
    breakers = Breakers(failures=1, cooldown_s=4, clock=clock)
    breakers.track(["a", "b"])
    breakers.report("a", ok=False)
    assert breakers.available(["a", "b"]) == ["b"] and breakers.all_open() is None
    breakers.report("b", ok=False)
    clock.now = 1
    assert breakers.all_open() == pytest.approx(3)
    breakers.track(["b", "c"])  # a is gone, c is new
    assert set(breakers.replicas) == {"b", "c"} and breakers.all_open() is None


class FailingFakeEngine(FakeEngine):
    """A fake engine of two replicas, taking turns while both are available: `bad`, whose engine
    has died (it answers nothing), and `good`."""

    key = "app/failing"

    def __init__(self) -> None:
        super().__init__()
        self.turn = 0

    async def call(self, req: EngineHTTPRequest) -> EngineHTTPResponse:
        self.seen.append(req)
        self.turn += 1
        breakers = breakers_for(self.key)
        replica = "bad" if "bad" in breakers.available(["bad"]) and self.turn % 2 else "good"
        breakers.routed(replica)
        if replica == "bad":
            raise EngineUnavailable("the replica's engine has died", replica="bad", dead=True)
        return EngineHTTPResponse(200, [*JSON, (REPLICA_HEADER, replica)], b'{"r": "good"}')


def test_a_dead_engine_is_retried_elsewhere_and_its_breaker_opens_at_once() -> None:
    engine = FailingFakeEngine()
    breakers_for(engine.key).track(["bad", "good"])
    core = RouterCore({"m": ModelRoute(engine)}, retry=RetryPolicy(deadline_s=5, first_backoff_s=0.001),
                      breaker={"failures": 2, "cooldown_s": 60})
    answers = [asyncio.run(core.forward("/v1/completions", {}, b'{"model": "m"}', str(i))) for i in range(6)]
    assert all(a.status == 200 and json.loads(a.body) == {"r": "good"} for a in answers)
    assert all(a.headers[REPLICA_HEADER] == "good" for a in answers)
    assert breakers_for(engine.key).replicas["bad"].state == "open"
    assert len(engine.seen) == 7  # one dead-engine answer was retried, then `bad` got no more requests


def test_a_5xx_answer_counts_against_the_breaker_but_is_not_retried() -> None:
    engine = FakeEngine(status=500, body=b'{"error": {"message": "boom"}}')
    engine.key = "app/five-hundred"

    async def call(req: EngineHTTPRequest) -> EngineHTTPResponse:
        engine.seen.append(req)
        return EngineHTTPResponse(500, [*JSON, (REPLICA_HEADER, "r1")], b"{}")

    engine.call = call  # type: ignore[method-assign]
    core = RouterCore({"m": ModelRoute(engine)}, breaker={"failures": 2, "cooldown_s": 60})
    assert asyncio.run(core.forward("/v1/completions", {}, b'{"model": "m"}', "a")).status == 500
    assert len(engine.seen) == 1 and breakers_for(engine.key).replicas["r1"].consecutive == 1


def test_a_dead_engine_opens_its_breaker_below_the_failure_count() -> None:
    breakers = Breakers(failures=3, cooldown_s=10, clock=FakeClock(0.0))
    breakers.report("a", ok=False)
    assert breakers.of("a").state == "closed"
    breakers.report("a", ok=False, dead=True)
    assert breakers.of("a").state == "open" and breakers.available(["a", "b"]) == ["b"]


def test_only_an_engine_known_dead_trips_the_breaker_and_the_flag_crosses_ray() -> None:
    import pickle

    dead = pickle.loads(pickle.dumps(EngineUnavailable("gone", replica="r", dead=True)))
    unreachable = pickle.loads(pickle.dumps(EngineUnavailable("unreachable for now", replica="r")))
    assert (dead.replica, dead.dead, unreachable.dead) == ("r", True, False)
    breakers = Breakers(failures=3, cooldown_s=10, clock=FakeClock(0.0))
    breakers.report("r", ok=False, dead=unreachable.dead)
    assert breakers.of("r").state == "closed"
    breakers.report("r", ok=False, dead=dead.dead)
    assert breakers.of("r").state == "open"


def test_every_replica_open_is_503_at_once() -> None:
    engine = FakeEngine()
    engine.key = "app/all-open"
    breakers = breakers_for(engine.key, failures=1, cooldown_s=30)
    breakers.track(["x"])
    breakers.report("x", ok=False)
    core = RouterCore({"m": ModelRoute(engine)})
    with pytest.raises(ServiceUnavailable) as err:
        asyncio.run(core.forward("/v1/completions", {}, b'{"model": "m"}', "r"))
    assert 1 <= int(err.value.headers["Retry-After"]) <= 30 and engine.seen == []
