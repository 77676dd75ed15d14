"""Which engine replica should take a request: prefix affinity, then load, then power of two choices.

vLLM keeps the KV of prompts it has seen (prefix caching); a request whose prompt starts
like an earlier one is cheaper on the replica that served that one. The router cuts the
prompt text into fixed blocks and hashes them as a chain (block i's hash covers blocks
0..i), so two prompts share hash i exactly when their first i+1 blocks are equal. The
policy remembers which replica last took each hash and sends a new request to the replica
with its longest such prefix, unless that replica is busier than the least-loaded one by
more than `imbalance` requests: one hot system prompt must not pile every user onto one
replica. Without a usable match it picks the less loaded of two random replicas.

Plain Python with no Ray: `helios.router.replica_router` adapts it to Ray Serve's
request router extension point, and unit tests drive it directly.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KV_WEIGHT = 4.0  # a full KV cache weighs as much as four more requests in flight
PREFIX_BLOCK_CHARS = 256  # about 64 tokens of English per block
MAX_PREFIX_BLOCKS = 64  # hash at most the first 16 KiB of a prompt


@dataclass(frozen=True, slots=True)
class RoutingHints:
    """What the router knows about a request that helps choose its replica (computed once, at the router)."""

    prefix_hashes: tuple[int, ...] = ()
    session: str | None = None


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text a request's prompt starts with: a completion's prompt, or a chat's messages in order."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch (of texts or of token-id lists): route by its first prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # token ids
        return " ".join(str(t) for t in prompt[: MAX_PREFIX_BLOCKS * PREFIX_BLOCK_CHARS // 4])
    parts: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{message.get('role')}>{content if isinstance(content, str) else ''}")
        if sum(map(len, parts)) >= MAX_PREFIX_BLOCKS * PREFIX_BLOCK_CHARS:
            break
    return "".join(parts)


def prefix_hashes(text: str, block: int = PREFIX_BLOCK_CHARS, max_blocks: int = MAX_PREFIX_BLOCKS) -> tuple[int, ...]:
    """Chained hashes of the text's whole blocks (a partial last block is left out: it is not shared yet)."""
    out: list[int] = []
    h = 0
    for i in range(min(len(text) // block, max_blocks)):
        h = hash((h, text[i * block:(i + 1) * block]))
        out.append(h)
    return tuple(out)


def replica_load(in_flight: int, queued: int | None, stats: Mapping[str, Any], finished_since_report: int) -> float:
    """One replica's load: the larger of what this handle has in flight there, Serve's cached queue
    length, and what the replica last reported (unfinished, or the scheduler's running plus
    waiting), plus `KV_WEIGHT` times its KV-cache use.

    A report is up to a stats period old: the requests of this handle it counted (routed before it
    was taken) that have finished since (`finished_since_report`) are gone, so they come off it, and a
    report left with nothing running says nothing of the KV cache either (an idle engine's is free).
    Without this, one snapshot taken mid-request kept a replica looking busy for the whole period,
    and every short request in that window went to the other one."""
    reported = max(stats.get("unfinished", 0), stats.get("running", 0) + stats.get("waiting", 0))
    reported = max(reported - finished_since_report, 0)
    busy = max(in_flight, queued or 0, reported)
    kv = float(stats.get("kv_cache_usage", 0.0)) if busy else 0.0
    return busy + KV_WEIGHT * kv


def hints_for(body: Mapping[str, Any], session_header: str | None, session_affinity: bool) -> RoutingHints:
    session = None
    if session_affinity:
        user = body.get("user")
        session = session_header or (user if isinstance(user, str) and user else None)
    return RoutingHints(prefix_hashes(prompt_text(body)), session)


@dataclass
class PrefixAffinityPolicy:
    """Ranks replicas for a request; remembers where each prefix (and session) went."""

    imbalance: float = 8.0  # most extra requests an affine replica may carry over the least-loaded one
    max_entries: int = 200_000  # prefix hashes remembered, least recently used dropped first
    rng: random.Random = field(default_factory=random.Random)
    owners: OrderedDict[int, str] = field(default_factory=OrderedDict)
    sessions: OrderedDict[str, str] = field(default_factory=OrderedDict)
    matched: int = 0  # requests sent by affinity (prefix or session)
    balanced: int = 0  # requests sent by load

    def preferred(self, loads: Mapping[str, float], hints: RoutingHints) -> str | None:
        """The replica holding this request's session or longest prefix, if it is not overloaded."""
        if not loads:
            return None
        least = min(loads.values())
        candidates: list[str] = []
        if hints.session is not None and hints.session in self.sessions:
            candidates.append(self.sessions[hints.session])
        for h in reversed(hints.prefix_hashes):
            owner = self.owners.get(h)
            if owner in loads:
                candidates.append(owner)
                break
        for replica in candidates:
            if replica in loads and loads[replica] - least <= self.imbalance:
                return replica
        return None

    def rank(self, loads: Mapping[str, float], hints: RoutingHints) -> list[list[str]]:
        """Ranks of replica ids, most preferred first: the affine replica, then two random ones by load, then the rest."""
        ids = list(loads)
        if not ids:
            return []
        ranks: list[list[str]] = []
        preferred = self.preferred(loads, hints)
        if preferred is not None:
            ranks.append([preferred])
            self.matched += 1
        else:
            self.balanced += 1
        rest = [r for r in ids if r != preferred]
        pair = self.rng.sample(rest, min(2, len(rest)))
        if pair:
            ranks.append(sorted(pair, key=lambda r: loads[r]))
        others = sorted((r for r in rest if r not in pair), key=lambda r: loads[r])
        if others:
            ranks.append(others)
        return ranks

    def record(self, hints: RoutingHints, replica: str) -> None:
        """The request went to `replica`: its prefixes (and session) now live there."""
        for h in hints.prefix_hashes:
            self.owners[h] = replica
            self.owners.move_to_end(h)
        while len(self.owners) > self.max_entries:
            self.owners.popitem(last=False)
        if hints.session is not None:
            self.sessions[hints.session] = replica
            self.sessions.move_to_end(hints.session)
            while len(self.sessions) > self.max_entries:
                self.sessions.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica is gone: what it held is lost with it."""
        for table in (self.owners, self.sessions):
            for key in [k for k, v in table.items() if v == replica]:
                del table[key]
