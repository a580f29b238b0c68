"""The store's signal writes: one statement per signal, on the caller's connection inside
the caller's transaction, or else on the store's pool, where signals sent at about the
same time share a transaction and its commit (group commit, see ``saga._group``).

A part of :class:`~saga._store.Store` (a mixin). Every writer of a signal row (this
sender, the transition entering a wait, the claim deciding it) locks the run row first:
the order that makes a signal racing its wait impossible to lose.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from saga._db import Executor, translate_errors
from saga._group import BUSY, GroupCommit

#: One signal's arguments of the ``send_signal`` statement.
SignalArgs = tuple[Any, ...]


class Delivery(enum.Enum):
    """What became of a signal."""

    ACCEPTED = "accepted"  # recorded: its wait gets it, now or when the run gets there
    REPEATED = "repeated"  # a signal of that name was recorded first: nothing changed
    NOT_FOUND = "not_found"
    OTHER_SAGA = "other_saga"  # the run is not of the saga the payload was checked for
    ENDED = "ended"  # refused, recorded in the history: the run has ended
    RESOLVED = "resolved"  # refused, recorded: stopped, resolved, its concurrency key freed
    ROLLING_BACK = "rolling_back"  # refused, recorded: cancelled, or a step failed for good
    DECIDED = "decided"  # refused, recorded: the wait timed out (or the run was cancelled)


@dataclass(frozen=True, slots=True)
class RunDefinition:
    """The definition (name, version) a run belongs to."""

    run_id: UUID
    saga_name: str
    saga_version: int
    fingerprint: str | None  # None: started before fingerprints were recorded


class SignalQueries:
    """Needs ``hot``, ``_q`` and ``work_channel`` from the store it is part of."""

    hot: asyncpg.Pool
    _q: dict[str, str]
    work_channel: str
    _signals: GroupCommit[SignalArgs, Any]
    waiting: anyio.Semaphore | None

    def signal_group(self) -> GroupCommit[SignalArgs, Any]:
        """The group commit of signals sent on the store's pool."""
        return GroupCommit(
            self._try_signal,
            self._signal_many,
            _signal_id,
            wait=self._signal_one,
            waiting=self.waiting,
        )

    async def send_signal(
        self,
        run_id: UUID,
        name: str,
        payload_json: str,
        saga: tuple[str, int, str | None],
        conn: Executor | None = None,
        data: str | None = None,
        notify: bool = True,
    ) -> Delivery:
        """Record the signal ``name`` for the run, its payload checked for the
        definition ``saga`` (name, version, fingerprint; None: any), in one statement
        (in ``conn``'s open transaction if given); ``data``: who sent it and why (JSON),
        for the history. ``notify``: the statement wakes the workers itself when it
        wakes the run (else the caller NOTIFYs once it committed)."""
        channel = self.work_channel if notify else None
        args = (run_id, name, payload_json, saga[0], saga[1], channel, uuid.uuid4(), data, saga[2])
        async with translate_errors("sending a signal"):
            if conn is not None:
                row = await conn.fetchrow(self._q["send_signal"], *args)
            else:
                row = await self._signals.write(args)
        if row is None:
            return Delivery.NOT_FOUND
        if not row["same_saga"]:
            return Delivery.OTHER_SAGA
        if row["ended"]:
            return Delivery.ENDED
        if row["freed"]:
            return Delivery.RESOLVED
        if row["rolling_back"]:
            return Delivery.ROLLING_BACK
        if row["accepted"]:
            return Delivery.ACCEPTED
        return Delivery.REPEATED if row["repeated"] else Delivery.DECIDED

    async def _try_signal(self, args: SignalArgs) -> Any:
        """One signal, unless another transaction holds its run's row (``BUSY``)."""
        row = await self.hot.fetchrow(self._q["send_signal_skip"], *args)
        if row is None and await self.hot.fetchval(self._q["run_exists"], args[0]):
            return BUSY  # (no row and no run: no such run)
        return row

    async def _signal_one(self, args: SignalArgs) -> Any:
        return await self.hot.fetchrow(self._q["send_signal"], *args)

    async def _signal_many(self, batch: Sequence[SignalArgs]) -> dict[Hashable, Any]:
        """Several signals in one transaction, in run id order (concurrent batches lock
        runs in one order; one run's signals in the order they came), in one pipelined
        exchange: each statement sees the ones before it. Their rows by signal id;
        ``BUSY`` (sent again alone: see saga._group) for those whose run's row another
        transaction holds, or that found no run."""
        ordered = sorted(batch, key=lambda args: args[0])
        async with self.hot.acquire() as conn, conn.transaction():
            rows = await conn.fetchmany(self._q["send_signal_skip"], ordered)
        found: dict[Hashable, Any] = {_signal_id(args): BUSY for args in ordered}
        found.update((row["signal_id"], row) for row in rows)
        return found

    async def run_definition(self, run_id: UUID, conn: Executor | None) -> RunDefinition | None:
        """The definition of run ``run_id`` (None: no such run)."""
        async with translate_errors("reading a run"):
            row = await (conn or self.hot).fetchrow(self._q["run_definition"], run_id)
        return None if row is None else RunDefinition(run_id, row[0], row[1], row[2])

    async def run_by_key(
        self, saga_name: str, key: str, conn: Executor | None
    ) -> RunDefinition | None:
        """The run of ``saga_name`` started with ``key`` (None: there is none)."""
        async with translate_errors("finding a run by key"):
            row = await (conn or self.hot).fetchrow(self._q["find_run_for_signal"], saga_name, key)
        return None if row is None else RunDefinition(row[0], saga_name, row[1], row[2])


def _signal_id(args: SignalArgs) -> Hashable:
    """What tells a batch's signals apart: the new signal's id."""
    signal_id: UUID = args[6]
    return signal_id
