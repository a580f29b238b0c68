"""Rate limits shared by every worker on the database: a token bucket per name.

A step that names a :class:`RateLimit` takes one token before each attempt. The bucket
is one row, refilled at ``per_second`` up to ``burst``; taking a token is one short
statement that may leave the bucket in debt: the caller then waits until its token
would have been there (a reservation, first come first served). Attempts beyond the
limit are therefore delayed, never failed, and the delay is recorded in the run's
history (``rate_limited``, with the limit's name and the seconds waited).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from saga import _checks
from saga._checks import validate_name
from saga._errors import DefinitionError

#: The slowest, the fastest and the largest limits accepted. An attempt waits for its
#: token holding its lease and worker slot, so a token takes at most an hour to come.
MIN_RATE = 1 / 3600
MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``per_second`` attempts per second, in bursts of at most ``burst``
    (default: one second's worth, at least 1), across every worker sharing the database,
    of every step that names the limit ``name``."""

    name: str
    per_second: float
    burst: int | None = None

    def __post_init__(self) -> None:
        validate_name(self.name, "rate limit")
        rate = _checks.seconds(
            f"rate limit {self.name!r}: per_second", self.per_second, DefinitionError,
            minimum=MIN_RATE, maximum=MAX_RATE, unit="calls per second (one an hour at least)",
        )  # fmt: skip
        object.__setattr__(self, "per_second", rate)
        burst = max(1, math.floor(rate)) if self.burst is None else self.burst
        _checks.integer(
            f"rate limit {self.name!r}: burst", burst, DefinitionError, minimum=1,
            maximum=MAX_BURST,
        )  # fmt: skip
        object.__setattr__(self, "burst", burst)


def check_consistent(limits: list[RateLimit]) -> None:
    """Steps naming the same limit must agree on it (one bucket, one rate)."""
    seen: dict[str, RateLimit] = {}
    for limit in limits:
        other = seen.setdefault(limit.name, limit)
        if other != limit:
            raise DefinitionError(
                f"rate limit {limit.name!r} is declared twice with different settings: "
                f"{other} and {limit}; declare it once and share the object"
            )
