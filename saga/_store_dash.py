"""The store's dashboard queries: what ``saga.web`` reads besides the operator queries.

A part of :class:`~saga._store.Store` (a mixin). Each query is bounded by the active
runs and an index over recently finished ones, so a dashboard refreshing every second
costs the same whatever the size of the finished history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from saga._db import Executor, translate_errors

#: (saga name, version, fingerprint or None): a definition, as in ``_store_ops``.
Definition = tuple[str, int, str | None]


@dataclass(frozen=True, slots=True)
class FailureCount:
    """Failed attempts of one saga's steps (or compensations) with one error type."""

    saga: str
    compensation: bool
    error_type: str
    failures: int
    retried: int


@dataclass(frozen=True, slots=True)
class Overdue:
    """Runs (or graph items) of one definition due for a while and run by nobody."""

    runs: int
    oldest: float  # seconds since the oldest of them was due


@dataclass(frozen=True, slots=True)
class Payloads:
    """A run's payloads as JSON text (``results``: step name -> JSON text)."""

    input: str
    results: dict[str, str]
    output: str | None


@dataclass(frozen=True, slots=True)
class SignalState:
    """One signal of a run: sent or only awaited, and whether its wait is decided."""

    name: str
    received: bool
    received_at: datetime | None
    awaited_at: datetime | None
    timeout: float | None
    closed: bool


@dataclass(frozen=True, slots=True)
class Sequence:
    """The history's last event id, and the transactions running when it was read: those
    listed (``running``, all below ``xmax``), and any at ``xmax`` or above (not ended:
    ``xmax`` is the first transaction id that has not)."""

    seq: int | None
    xmax: int
    running: frozenset[int]


@dataclass(frozen=True, slots=True)
class ChildRun:
    """A child run, as its parent's page lists it."""

    id: UUID
    saga: str
    step: str
    status: str
    created_at: datetime


class DashboardQueries:
    """Needs ``pool`` and ``_q`` (the named queries) from the store it is part of."""

    pool: asyncpg.Pool
    _q: dict[str, str]

    async def finished_per_hour(self, hours: int) -> list[tuple[datetime, str, int]]:
        """(hour, final status, runs) of the runs finished in the last ``hours`` hours."""
        async with translate_errors("reading finished runs"):
            rows = await self.pool.fetch(self._q["dash_finished_per_hour"], hours)
        return [(r["hour"], r["status"], r["runs"]) for r in rows]

    async def outcomes(self, seconds: float) -> list[tuple[str, str, int]]:
        """(saga, final status, runs) of the runs finished in the last ``seconds``."""
        async with translate_errors("reading run outcomes"):
            rows = await self.pool.fetch(self._q["dash_outcomes"], seconds)
        return [(r["saga_name"], r["status"], r["runs"]) for r in rows]

    async def failures(self, seconds: float, limit: int = 100) -> list[FailureCount]:
        """Failed attempts in the last ``seconds``, most frequent first."""
        async with translate_errors("reading failed attempts"):
            rows = await self.pool.fetch(self._q["dash_failures"], seconds, limit)
        return [
            FailureCount(
                saga=r["saga_name"],
                compensation=r["kind"] == "compensation_failed",
                error_type=r["error_type"],
                failures=r["failures"],
                retried=r["retried"],
            )
            for r in rows
        ]

    async def overdue(self, seconds: float) -> dict[Definition, Overdue]:
        """Work due more than ``seconds`` ago that nobody runs, per definition."""
        async with translate_errors("reading overdue work"):
            rows = await self.pool.fetch(self._q["dash_overdue"], seconds)
        return {
            (
                r["saga_name"],
                r["saga_version"],
                None if r["fingerprint"] == "-" else r["fingerprint"],
            ): (Overdue(runs=r["runs"], oldest=r["oldest"]))
            for r in rows
        }

    async def payloads(self, run_id: UUID) -> Payloads | None:
        """The run's input, step results and output, or None for an unknown run."""
        async with translate_errors("reading a run's payloads"):
            row = await self.pool.fetchrow(self._q["dash_payloads"], run_id)
        if row is None:
            return None
        results: Any = json.loads(row["results"] or "{}")
        return Payloads(
            input=row["input"],
            results={str(k): v for k, v in results.items()} if isinstance(results, dict) else {},
            output=row["output"],
        )

    async def signals(self, run_id: UUID) -> list[SignalState]:
        """The run's signals, by name."""
        async with translate_errors("reading a run's signals"):
            rows = await self.pool.fetch(self._q["dash_signals"], run_id)
        return [
            SignalState(
                name=r["name"],
                received=r["received"],
                received_at=r["received_at"],
                awaited_at=r["awaited_at"],
                timeout=r["timeout_seconds"],
                closed=r["closed"],
            )
            for r in rows
        ]

    async def children(self, run_id: UUID, limit: int) -> list[ChildRun]:
        """The child runs the run's steps started, oldest first, at most ``limit``."""
        async with translate_errors("reading a run's child runs"):
            rows = await self.pool.fetch(self._q["dash_children"], run_id, limit)
        return [
            ChildRun(r["id"], r["saga_name"], r["parent_step"], r["status"], r["created_at"])
            for r in rows
        ]

    async def events_sequence(self, conn: Executor) -> Sequence:
        """The history's last event id (None before the first event), and which
        transactions are running, on ``conn``."""
        async with translate_errors("reading the history's sequence"):
            row = await conn.fetchrow(self._q["dash_events_sequence"])
        assert row is not None
        return Sequence(row["seq"], row["xmax"], frozenset(row["running"]))
