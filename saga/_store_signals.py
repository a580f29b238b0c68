"""The store's signal writes: one statement (one commit) per signal, on the store's pool
or on the caller's connection inside the caller's transaction.

A part of :class:`~saga._store.Store` (a mixin). Every writer of a signal row (this
sender, the transition entering a wait, the claim deciding it) locks the run row first:
the order that makes a signal racing its wait impossible to lose.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from saga._db import Executor, translate_errors


class Delivery(enum.Enum):
    """What became of a signal."""

    ACCEPTED = "accepted"  # recorded: its wait gets it, now or when the run gets there
    REPEATED = "repeated"  # a signal of that name was recorded first: nothing changed
    NOT_FOUND = "not_found"
    OTHER_SAGA = "other_saga"  # the run is not of the saga the payload was checked for
    ENDED = "ended"  # refused, recorded in the history: the run has ended
    ROLLING_BACK = "rolling_back"  # refused, recorded: cancelled, or a step failed for good
    DECIDED = "decided"  # refused, recorded: the wait timed out (or the run was cancelled)


@dataclass(frozen=True, slots=True)
class RunDefinition:
    """The definition (name, version) a run belongs to."""

    run_id: UUID
    saga_name: str
    saga_version: int


class SignalQueries:
    """Needs ``hot``, ``_q`` and ``work_channel`` from the store it is part of."""

    hot: asyncpg.Pool
    _q: dict[str, str]
    work_channel: str

    async def send_signal(
        self,
        run_id: UUID,
        name: str,
        payload_json: str,
        saga: tuple[str, int],
        conn: Executor | None = None,
        data: str | None = None,
        notify: bool = True,
    ) -> Delivery:
        """Record the signal ``name`` for the run, its payload checked for the
        definition ``saga`` (name, version), in one statement (in ``conn``'s open
        transaction if given); ``data``: who sent it and why (JSON), for the history.
        ``notify``: the statement wakes the workers itself when it wakes the run (else
        the caller NOTIFYs once it committed)."""
        async with translate_errors("sending a signal"):
            row = await (conn or self.hot).fetchrow(
                self._q["send_signal"],
                run_id,
                name,
                payload_json,
                saga[0],
                saga[1],
                self.work_channel if notify else None,
                uuid.uuid4(),
                data,
            )
        if row is None:
            return Delivery.NOT_FOUND
        if not row["same_saga"]:
            return Delivery.OTHER_SAGA
        if row["ended"]:
            return Delivery.ENDED
        if row["rolling_back"]:
            return Delivery.ROLLING_BACK
        if row["accepted"]:
            return Delivery.ACCEPTED
        return Delivery.REPEATED if row["repeated"] else Delivery.DECIDED

    async def run_definition(self, run_id: UUID, conn: Executor | None) -> RunDefinition | None:
        """The definition of run ``run_id`` (None: no such run)."""
        async with translate_errors("reading a run"):
            row = await (conn or self.hot).fetchrow(self._q["run_definition"], run_id)
        return None if row is None else RunDefinition(run_id, row[0], row[1])

    async def run_by_key(
        self, saga_name: str, key: str, conn: Executor | None
    ) -> RunDefinition | None:
        """The run of ``saga_name`` started with ``key`` (None: there is none)."""
        async with translate_errors("finding a run by key"):
            row = await (conn or self.hot).fetchrow(self._q["find_run_for_signal"], saga_name, key)
        return None if row is None else RunDefinition(row[0], saga_name, row[1])
