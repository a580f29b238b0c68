"""The store's reads of given runs: their rows, their histories, whether they ended.

A part of :class:`~saga._store.Store` (a mixin).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from saga._db import translate_errors
from saga._model import HistoryEvent, RunInfo
from saga._rows import history_event, run_info


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run as stored: what users see (``info``) and what only the runtime reads."""

    info: RunInfo
    output: str | None  # the last step's result, JSON text (completed runs)
    lease_token: int
    fingerprint: str | None
    pivot: str | None = None  # the definition's pivot step


class RunReads:
    """Needs ``pool``, ``hot`` and ``_q`` from the store it is part of."""

    pool: asyncpg.Pool
    hot: asyncpg.Pool
    _q: dict[str, str]

    async def attempt_began(self, run_id: UUID, step: str) -> bool:
        """Whether ``step``'s latest attempt began and recorded no outcome (see the
        query)."""
        async with translate_errors("reading a run's history"):
            began = await self.pool.fetchval(self._q["attempt_began"], run_id, step)
        return bool(began)

    async def has_event(
        self, run_id: UUID, kind: str, step: str | None, attempt: int | None, worker: str
    ) -> bool:
        async with translate_errors("reading a run's history"):
            found = await self.pool.fetchval(
                self._q["has_event"], run_id, kind, step, attempt, worker
            )
        return bool(found)

    async def get_run(self, run_id: UUID) -> RunRow | None:
        async with translate_errors("reading a run"):
            r = await self.hot.fetchrow(self._q["get_run"], run_id)
        if r is None:
            return None
        return RunRow(
            info=run_info(r),
            output=r["output"],
            lease_token=r["lease_token"],
            fingerprint=r["fingerprint"],
            pivot=r["pivot"],
        )

    async def get_events(self, run_id: UUID) -> list[HistoryEvent]:
        async with translate_errors("reading a run's history"):
            rows = await self.hot.fetch(self._q["get_events"], run_id)
        return [history_event(r) for r in rows]

    async def write_events(
        self, run_id: UUID, kind: str, step: str | None, attempt: int | None, worker: str
    ) -> list[HistoryEvent]:
        """The events of ``worker``'s write that began with this event (its latest such
        one), in order: what a write whose reply was lost recorded (see the query)."""
        async with translate_errors("reading a run's history"):
            rows = await self.pool.fetch(
                self._q["write_events"], run_id, kind, step, attempt, worker
            )
        return [history_event(r) for r in rows]

    async def dropped_write_events(self, run_id: UUID, worker: str) -> list[HistoryEvent]:
        """``write_events`` of a dropped item's write, which has no event of its own:
        those of the run's end, if such a write of ``worker`` ended it (see the query)."""
        async with translate_errors("reading a run's history"):
            rows = await self.pool.fetch(self._q["dropped_write_events"], run_id, worker)
        return [history_event(r) for r in rows]

    async def watch_run(self, run_id: UUID) -> bool:
        """Ask for a NOTIFY when the run ends; False when it has ended already (or does
        not exist), so that the waiter reads its state instead of waiting."""
        async with translate_errors("watching a run"):
            ended = await self.hot.fetchval(self._q["watch_run"], run_id)
        return ended is False

    async def ended_runs(self, run_ids: Sequence[UUID]) -> set[UUID]:
        """Which of these runs have ended."""
        async with translate_errors("polling runs"):
            rows = await self.pool.fetch(self._q["ended_runs"], list(run_ids))
        return {r["id"] for r in rows}
