"""Circuit breakers per engine replica, shared by the router core and the request router in one process.

A replica that fails `failures` requests in a row (5xx answers) is opened: the request
router stops choosing it. After `cooldown_s` one request is let through as a probe
(half-open); its success closes the breaker, its failure opens it again. A replica whose
engine has died (it says so: `EngineUnavailable` naming it, `dead`) is opened at once: it
cannot recover, and every request sent there until Serve's health check replaces it would
pay a retry. The request router tells the breakers whenever the replica set changes, so a
replacement is available at once, not after the dead one's cooldown. When every
replica of a model is open the router answers 503 with Retry-After at once instead of
queueing requests for replicas that fail them. A dead replica needs no breaker: Serve
drops it from routing and the router retries its requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    """One replica's breaker."""

    failures: int = 3
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    state: State = "closed"
    consecutive: int = 0
    opened_at: float = 0.0
    probe_sent: float | None = None  # when the half-open probe was routed (None: none out)

    def available(self) -> bool:
        """May a request go to this replica now? An open breaker past its cooldown admits one probe
        (a probe whose outcome never comes back is given up after another cooldown)."""
        now = self.clock()
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            self.state, self.probe_sent = "half_open", None
        if self.state == "half_open" and self.probe_sent is not None and now - self.probe_sent >= self.cooldown_s:
            self.probe_sent = None
        return self.state == "closed" or (self.state == "half_open" and self.probe_sent is None)

    def routed(self) -> None:
        """A request went to this replica: in half-open state it is the probe."""
        if self.state == "half_open" and self.probe_sent is None:
            self.probe_sent = self.clock()

    def success(self) -> None:
        self.state, self.consecutive, self.probe_sent = "closed", 0, None

    def failure(self) -> None:
        self.consecutive += 1
        if self.state == "half_open" or self.consecutive >= self.failures:
            self.state, self.opened_at, self.probe_sent = "open", self.clock(), None

    def trip(self) -> None:
        """Open now, whatever the count: the replica's engine is dead, not failing now and then."""
        self.consecutive += 1
        self.state, self.opened_at, self.probe_sent = "open", self.clock(), None

    def retry_after_s(self) -> float:
        return max(self.cooldown_s - (self.clock() - self.opened_at), 0.0)


@dataclass
class Breakers:
    """The breakers of one engine deployment's replicas (by replica id)."""

    failures: int = 3
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    replicas: dict[str, CircuitBreaker] = field(default_factory=dict)

    def of(self, replica: str) -> CircuitBreaker:
        breaker = self.replicas.get(replica)
        if breaker is None:
            breaker = self.replicas[replica] = CircuitBreaker(self.failures, self.cooldown_s, self.clock)
        return breaker

    def track(self, replicas: Iterable[str]) -> None:
        """The deployment's live replicas (from the request router): gone ones are dropped, new ones closed."""
        live = set(replicas)
        for gone in [r for r in self.replicas if r not in live]:
            del self.replicas[gone]
        for replica in live:
            self.of(replica)

    def available(self, replicas: Iterable[str]) -> list[str]:
        return [r for r in replicas if self.of(r).available()]

    def routed(self, replica: str) -> None:
        self.of(replica).routed()

    def report(self, replica: str, ok: bool, dead: bool = False) -> None:
        """One answer of `replica`: ok, failed, or failed because its engine is dead (opens at once)."""
        breaker = self.of(replica)
        if dead:
            breaker.trip()
        elif ok:
            breaker.success()
        else:
            breaker.failure()

    def all_open(self) -> float | None:
        """Seconds until the first breaker may probe when every known replica is open; None otherwise."""
        if not self.replicas or any(b.available() or b.state != "open" for b in self.replicas.values()):
            return None
        return min(b.retry_after_s() for b in self.replicas.values())


_BREAKERS: dict[str, Breakers] = {}


def breakers_for(deployment: str, failures: int | None = None, cooldown_s: float | None = None) -> Breakers:
    """This process's breakers of `deployment` ("app/deployment"), shared by everyone who asks.

    The router core passes the configured settings; the request router, created by Serve
    maybe earlier, passes none and gets whatever was (or will be) configured."""
    breakers = _BREAKERS.get(deployment)
    if breakers is None:
        breakers = _BREAKERS[deployment] = Breakers()
    if failures is not None:
        breakers.failures = failures
    if cooldown_s is not None:
        breakers.cooldown_s = cooldown_s
    for breaker in breakers.replicas.values():
        breaker.failures, breaker.cooldown_s = breakers.failures, breakers.cooldown_s
    return breakers
