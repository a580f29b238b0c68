"""The store's queries for saga.testing only: making a held lease look expired (and
seeing a claim take it over), and moving a run's timer earlier. A part of
:class:`~saga._store.Store` (a mixin); see ``saga/testing.py``.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from saga._db import translate_errors
from saga._rows import due_time


class FaultQueries:
    """Needs ``pool``, ``_q`` (the named queries) and ``work_channel`` from the store it
    is part of."""

    pool: asyncpg.Pool
    _q: dict[str, str]
    work_channel: str

    async def expire_lease(self, run_id: UUID, step: str | None) -> tuple[str | None, int] | None:
        """saga.testing: make the lease of ``run_id``'s graph item ``step`` (or, the run has
        none, of the run) look expired: which (the step, or None: the run's) and the
        token it had; None when not leased."""
        async with translate_errors("expiring a lease"):
            if step is not None:
                token = await self.pool.fetchval(self._q["expire_item_lease"], run_id, step)
                if token is not None:
                    return step, token
            token = await self.pool.fetchval(self._q["expire_lease"], run_id)
            return None if token is None else (None, token)

    async def lease_token_of(self, run_id: UUID, step: str | None) -> int | None:
        async with translate_errors("reading a lease"):
            token: int | None = await self.pool.fetchval(self._q["lease_token_of"], run_id, step)
            return token

    async def advance_timers(self, run_id: UUID, seconds: float) -> datetime | None:
        """saga.testing: the run's timer moved ``seconds`` earlier; its new due time."""
        async with translate_errors("advancing a timer"):
            row = await self.pool.fetchrow(
                self._q["advance_timers"], run_id, seconds, self.work_channel
            )
        return None if row is None else due_time(row["due_at"])
