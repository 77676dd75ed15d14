"""Admission: a bounded queue per model, load shedding with Retry-After, and per-key rate limits.

A model runs as many requests at once as its replicas take (`capacity`); up to
`max_queued` more wait, first come first served, for at most `queue_timeout_s`. Past
that bound a request is shed at once with 429, and one that waited too long gets 503:
both carry Retry-After from the rate at which the model has been finishing requests,
so well-behaved clients come back when there is room instead of all at once. Nothing
waits without limit. Plain asyncio, no Ray: the router core owns one gate per model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from helios.errors import RateLimited, ServiceUnavailable

MAX_RETRY_AFTER_S = 60


class DrainRate:
    """Requests finished per second, over the last `window` completions."""

    def __init__(self, window: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.done: deque[float] = deque(maxlen=window)
        self.clock = clock

    def tick(self) -> None:
        self.done.append(self.clock())

    def per_second(self) -> float | None:
        """None until two completions were seen; a rate that decays once completions stop."""
        if len(self.done) < 2:
            return None
        span = max(self.clock(), self.done[-1]) - self.done[0]
        return (len(self.done) - 1) / span if span > 0 else None

    def seconds_for(self, requests: int) -> int:
        """Whole seconds until `requests` more have finished at the current rate (1 s..MAX_RETRY_AFTER_S)."""
        rate = self.per_second()
        if rate is None:
            return 1
        return min(max(math.ceil(requests / rate), 1), MAX_RETRY_AFTER_S)


class AdmissionGate:
    """One model's admission: at most `capacity()` requests run, `max_queued` more wait (FIFO)."""

    def __init__(self, model: str, capacity: Callable[[], int], max_queued: int, queue_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic, on_depth: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.on_depth = on_depth or (lambda depth: None)  # told the queue depth whenever it changes (a gauge)
        self.capacity = capacity
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.drain = DrainRate(clock=clock)
        self.shed = 0  # 429s
        self.timed_out = 0  # 503s after waiting
        self.on_depth(0)

    @property
    def queued(self) -> int:
        return sum(1 for w in self.waiters if not w.done())

    async def acquire(self) -> None:
        """Wait for a slot: 429 when the queue is full, 503 after `queue_timeout_s` in it."""
        if self.running < max(self.capacity(), 1) and not self.queued:
            self.running += 1
            return
        queued = self.queued
        if queued >= self.max_queued:
            self.shed += 1
            raise RateLimited(
                f"The model `{self.model}` is at capacity ({self.running} running, {queued} waiting); retry later.",
                retry_after_s=self.drain.seconds_for(queued + 1), code="model_overloaded")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.on_depth(self.queued)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(finished=False)  # a slot was granted as we gave up: hand it on
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                self.timed_out += 1
                raise ServiceUnavailable(
                    f"The model `{self.model}` did not have room within {self.queue_timeout_s:g} s; retry later.",
                    retry_after_s=self.drain.seconds_for(self.queued + 1)) from None
            raise
        finally:
            self.on_depth(self.queued)  # granted, timed out or cancelled: one waiter fewer

    def release(self, finished: bool = True) -> None:
        """Give a slot back (when the request's answer, or its stream, has ended) and wake the next waiter."""
        if finished:
            self.drain.tick()
        self.running -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to waiters in order (also after capacity grew)."""
        while self.waiters and self.running < max(self.capacity(), 1):
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)


class TokenBucket:
    """`per_minute` units a minute, refilled continuously, with a burst of one minute's worth."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.tokens = per_minute
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until `cost` units are there (0: now)."""
        self._refill()
        missing = min(cost, self.capacity) - self.tokens
        return max(missing, 0.0) / self.rate

    def take(self, cost: float) -> None:
        self._refill()
        self.tokens -= min(cost, self.capacity)


class KeyLimits:
    """Per-API-key request and token rates (token buckets); 429 `rate_limit_exceeded` past either.

    Tokens are counted as OpenAI does when it admits a request: what the prompt may hold
    (a quarter of its body's bytes) plus the output the request reserves (`max_tokens`)."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm, self.clock = requests_per_minute, tokens_per_minute, clock
        self.buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def check(self, key: str, tokens: int) -> None:
        """Charge one request of `tokens` to `key`, or raise 429 with when to come back."""
        if key not in self.buckets:
            self.buckets[key] = (TokenBucket(self.rpm, self.clock) if self.rpm else None,
                                 TokenBucket(self.tpm, self.clock) if self.tpm else None)
        reqs, toks = self.buckets[key]
        waits = [reqs.wait_s(1) if reqs else 0.0, toks.wait_s(tokens) if toks else 0.0]
        if max(waits) > 0:
            what = "requests" if waits[0] >= waits[1] else "tokens"
            raise RateLimited(f"Rate limit reached for {what} per minute on this API key; retry later.",
                              retry_after_s=min(max(math.ceil(max(waits)), 1), MAX_RETRY_AFTER_S),
                              code="rate_limit_exceeded")
        if reqs:
            reqs.take(1)
        if toks:
            toks.take(tokens)


def estimated_tokens(raw: bytes, body: dict) -> int:
    """A request's token charge: its body's bytes / 4 (the prompt) plus the output it reserves."""
    reserved = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    reserved = reserved if isinstance(reserved, int) and reserved > 0 else 16
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 0) > 0 else 1
    return len(raw) // 4 + reserved * n
