"""The store's signal writes: one transaction (one commit) per signal, on the store's
pool or on the caller's connection inside the caller's transaction.

A part of :class:`~saga._store.Store` (a mixin). Every writer of a signal row (this
sender, the transition entering a wait, the claim deciding it) locks the run row first:
the order that makes a signal racing its wait impossible to lose.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from saga._db import Executor, translate_errors
from saga._model import EventKind, RunStatus


class Delivery(enum.Enum):
    """What became of a signal."""

    ACCEPTED = "accepted"  # recorded: its wait gets it, now or when the run gets there
    REPEATED = "repeated"  # a signal of that name was recorded first: nothing changed
    NOT_FOUND = "not_found"
    ENDED = "ended"  # refused, recorded in the history: the run has ended
    DECIDED = "decided"  # refused, recorded: the wait timed out (or the run was cancelled)


@dataclass(frozen=True, slots=True)
class SignalTarget:
    """The run a signal goes to, as read under its row lock."""

    saga_name: str
    saga_version: int
    status: RunStatus
    wait: str | None


class SignalQueries:
    """Needs ``pool``, ``_q`` and ``work_channel`` from the store it is part of."""

    pool: asyncpg.Pool
    _q: dict[str, str]
    work_channel: str

    async def send_signal(
        self,
        run_id: UUID,
        name: str,
        check: Callable[[SignalTarget], str],
        conn: Executor | None = None,
    ) -> Delivery:
        """Record the signal ``name`` for the run, in one transaction (a savepoint within
        ``conn``'s open transaction). ``check(target)`` validates it against the run's
        definition under the run's lock, before anything is written, and returns the
        payload's JSON (or raises)."""
        async with translate_errors("sending a signal"):
            if conn is not None:
                async with conn.transaction():
                    return await self._send(conn, run_id, name, check)
            async with self.pool.acquire() as own, own.transaction():
                return await self._send(own, run_id, name, check)

    async def find_run_id(self, saga_name: str, key: str, conn: Executor | None) -> UUID | None:
        """The id of the run of ``saga_name`` started with ``key``."""
        async with translate_errors("finding a run by key"):
            row = await (conn or self.pool).fetchrow(self._q["find_run_by_key"], saga_name, key)
        return None if row is None else row["id"]

    async def _send(
        self, conn: Executor, run_id: UUID, name: str, check: Callable[[SignalTarget], str]
    ) -> Delivery:
        row = await conn.fetchrow(self._q["signal_lock_run"], run_id)
        if row is None:
            return Delivery.NOT_FOUND
        target = SignalTarget(
            row["saga_name"], row["saga_version"], RunStatus(row["status"]), row["wait_name"]
        )
        payload_json = check(target)
        stopped_here = target.status is RunStatus.STOPPED and target.wait == name
        if target.status.is_terminal and not stopped_here:
            await self._event(conn, run_id, EventKind.SIGNAL_REFUSED, name, "ended")
            return Delivery.ENDED
        recorded = await conn.fetchval(
            self._q["signal_record"], run_id, name, payload_json, stopped_here
        )
        if recorded is None:
            if await conn.fetchval(self._q["signal_existing"], run_id, name):
                return Delivery.REPEATED
            await self._event(conn, run_id, EventKind.SIGNAL_REFUSED, name, "wait_decided")
            return Delivery.DECIDED
        await self._event(conn, run_id, EventKind.SIGNAL_RECEIVED, name, None)
        if target.wait == name:
            await conn.fetchrow(self._q["signal_wake"], run_id, name, self.work_channel)
        return Delivery.ACCEPTED

    async def _event(
        self, conn: Executor, run_id: UUID, kind: EventKind, name: str, refused: str | None
    ) -> None:
        data = {"signal": name} if refused is None else {"signal": name, "reason": refused}
        await conn.execute(self._q["signal_event"], run_id, str(kind), name, json.dumps(data))
