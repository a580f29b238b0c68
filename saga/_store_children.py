"""The store's statements on child runs, as their parent's children step sees them:
the fence of a child's start, the children a step started, the failure it parked with,
and rolling a completed child back.

A part of :class:`~saga._store.Store` (a mixin).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from saga._db import Executor, translate_errors
from saga._model import RunStatus
from saga._transition import value


class ClaimLost(Exception):
    """A children step's attempt that lost its claim (another worker holds the item)
    tried to start a child run: nothing was written."""


@value
class ParentClaim:
    """The children step starting a child run, and the claim it runs under: the start
    commits only while that claim holds the item (a lost one starts no child)."""

    run_id: UUID
    step: str
    token: int
    worker: str


@dataclass(frozen=True, slots=True)
class Child:
    """A child run, as its parent's step sees it."""

    id: UUID
    count: int  # how many children the step starts
    index: int  # its place in the step's list of inputs
    status: RunStatus
    output: str | None  # JSON text, once completed
    error: str | None  # JSON text of the failure (or the compensation's), if any
    cancel_requested: bool
    resolved: bool = False  # stopped (or failed) and closed by an operator: over
    finished_at: datetime | None = None  # when it ended (again, once reverted)


class ChildQueries:
    """Needs ``pool``, ``_q`` and ``work_channel`` from the store."""

    pool: asyncpg.Pool
    _q: dict[str, str]
    work_channel: str

    async def fence_child(self, parent: ParentClaim, conn: Executor) -> None:
        """Last in a child's start transaction: ``ClaimLost`` unless the parent's claim
        still holds its item; the parent's run row stays locked (shared) until the start
        commits, so the run cannot roll back or end without seeing the child."""
        args = (parent.run_id, parent.step, parent.token, parent.worker)
        if await conn.fetchval(self._q["fence_child"], *args) is None:
            raise ClaimLost(
                f"step {parent.step!r} of run {parent.run_id} lost its claim: no child started"
            )

    async def children_failing(self, run_id: UUID, step: str) -> dict[str, Any] | None:
        """The failure ``step`` decided while its children were being undone (it parked
        with it), if any since the run's last operator retry."""
        async with translate_errors("reading child runs"):
            text = await self.pool.fetchval(self._q["children_failing"], run_id, step)
        return None if text is None else dict(json.loads(text))

    async def children_of(self, run_id: UUID, step: str) -> list[Child]:
        """The child runs ``step`` of run ``run_id`` started."""
        async with translate_errors("reading child runs"):
            rows = await self.pool.fetch(self._q["children_of"], run_id, step)
        return [
            Child(
                id=r["id"],
                count=int(r["idempotency_key"].rsplit(":", 2)[1]),
                index=int(r["idempotency_key"].rsplit(":", 2)[2]),
                status=RunStatus(r["status"]),
                output=r["output"],
                error=r["error"] or r["compensation_error"],
                cancel_requested=r["cancel_requested"],
                resolved=r["resolved"],
                finished_at=r["finished_at"],
            )
            for r in rows
        ]

    async def revert_run(self, run_id: UUID, key_limit: int) -> bool:
        """Roll a completed run back (its compensations run; it ends cancelled); a keyed
        one first waits for its key again (``key_limit``: its saga's limit)."""
        async with (
            translate_errors("reverting a run"),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            row = await conn.fetchrow(self._q["revert_run"], run_id, self.work_channel, key_limit)
            if row is not None and row["key"] is not None:
                key = (row["saga_name"], row["key"], self.work_channel)
                await conn.fetchrow(self._q["key_fill"], *key)
        return row is not None
