"""What waits, and why: work due and not taken per saga and priority, runs queued behind
their concurrency key, and the rate limits' buckets (the operator's view of traffic;
``saga queues`` prints it, the dashboard's traffic page shows it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from saga._client import store_of

if TYPE_CHECKING:
    from saga._client import Client


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Runs of ``saga`` at ``priority`` due and not taken by a worker, and how long the
    oldest of them has waited (seconds)."""

    saga: str
    priority: int
    runs: int
    oldest_wait: float


@dataclass(frozen=True, slots=True)
class KeyWait:
    """Runs of ``saga`` queued behind their concurrency key, over ``keys`` keys."""

    saga: str
    runs: int
    keys: int


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """A rate limit's bucket now: ``tokens`` available (negative: reserved ahead), and
    ``delay``, what an attempt taking a token now would wait (seconds): until a whole
    token is there, as ``rate_take`` counts it."""

    name: str
    per_second: float
    burst: int
    tokens: float

    @property
    def delay(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.per_second)


@dataclass(frozen=True, slots=True)
class Queues:
    """See :func:`queues`."""

    due: list[QueueDepth]
    waiting_for_key: list[KeyWait]
    rate_limits: list[RateLimitState]


async def queues(client: Client) -> Queues:
    """Work due and not taken per saga and priority (with the oldest wait), runs queued
    behind their concurrency key per saga, and every rate limit's bucket. Reads the
    active runs only (two partial indexes), whatever the finished history."""
    store = store_of(client)
    rows = await store.queue_rows()
    due = [QueueDepth(r[0], r[1], r[2], r[3]) for r in rows if not r[4]]
    keyed = [KeyWait(r[0], r[2], r[5]) for r in rows if r[4]]
    limits = [RateLimitState(*r) for r in await store.rate_limit_rows()]
    return Queues(due, keyed, limits)
