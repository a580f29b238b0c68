"""The arguments of the transition statements: one run's, and a batch's (group commit)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from saga._db import Executor
from saga._group import BUSY
from saga._rows import claimed_item, json_or_none
from saga._store_ops import DefinitionKey, definition_args
from saga._transition import ClaimedItem, Transition

#: One run's arguments of the ``transition`` statement (see sql/queries.sql).
TransitionArgs = tuple[Any, ...]

# Where the batch statement's per-run arrays come from in a run's arguments: all but the
# done channel (one for the batch, its last argument).
_COLUMNS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16)


def transition_args(
    worker: str,
    run_id: UUID,
    lease_token: int,
    change: Transition,
    events: str,
    due_in: float | None,
    done_channel: str,
) -> TransitionArgs:
    return (
        run_id,
        lease_token,
        change.status,  # a str (StrEnum)
        change.step,
        change.attempt,
        change.completed_step,
        change.result_json,
        change.output_json,
        json_or_none(change.error),
        json_or_none(change.compensation_error),
        due_in,
        worker if change.leased else None,
        events,
        done_channel,
        worker,
        change.unless_cancelled,
        change.wait,
    )


def parks_at_wait(args: TransitionArgs) -> bool:
    """Whether the transition parks its run at a wait (only the batch statement marks
    the wait's signal row)."""
    return args[2] == "waiting" and args[16] is not None


def batch_args(runs: Sequence[TransitionArgs], briefly: bool) -> list[Any]:
    """The ``transition_batch`` statement's arguments: one array per column, the runs in
    id order (concurrent batches then lock their rows in one order), the channel, the
    first and last run id (the days the batch touches), and whether to wait at most
    50 ms for a row another transaction holds."""
    ordered = sorted(runs, key=lambda a: a[0])
    columns = [[a[i] for a in ordered] for i in _COLUMNS]
    return [*columns, ordered[0][13], ordered[0][0], ordered[-1][0], briefly]


@dataclass(frozen=True, slots=True, eq=False)
class ClaimAlong:
    """Claim due runs with a transition that frees a slot, in its statement and commit:
    ``limit`` of them (per transition) with the claim statement's arguments ``args``
    (worker, then the definitions and the claim table: see ``Store.claim``);
    ``deliver(items, asked)`` takes what was claimed for ``asked`` slots."""

    worker: str
    lease_seconds: float
    args: tuple[Any, ...]
    prioritized: bool
    deliver: Callable[[list[ClaimedItem], int], None]
    limit: int = 1


#: One write of the group: a run's transition, and the claim it carries (or None).
Write = tuple[TransitionArgs, ClaimAlong | None]


def write_key(write: Write) -> Hashable:
    """What tells a batch's rows apart: the run and the lease token its write holds."""
    args = write[0]
    return (args[0], args[1])


def alone(write: Write) -> Write:
    """A write of a batch the database refused, written again by itself: without its
    claim (the claim is no run's outcome; the claim loop claims instead)."""
    return (write[0], None)


class GroupWrites:
    """The store's statements of group commit (a mixin of ``Store``)."""

    if TYPE_CHECKING:
        pool: Any
        hot: Any
        _q: dict[str, str]
        _claim_table: tuple[Any, ...]

    async def _try_one(self, write: Write) -> Any:
        """One run's transition (and its claim), or ``BUSY`` when another transaction
        held its row for 50 ms (nothing was written)."""
        try:
            return await self._write_one(write, briefly=True)
        except asyncpg.LockNotAvailableError:
            return BUSY

    async def _write_one(self, write: Write, briefly: bool = False) -> Any:
        """One run's transition (and its claim), waiting for its row if another
        transaction holds it (``briefly``: 50 ms at most, see ``_write_many``)."""
        if write[1] is None and not parks_at_wait(write[0]):
            return await self.hot.fetchrow(self._q["transition"], *write[0], briefly)
        return (await self._write_many([write], briefly)).get(write_key(write))

    async def _write_many(
        self, writes: Sequence[Write], briefly: bool = True
    ) -> dict[Hashable, Any]:
        """Several runs' transitions in one statement, and the claims they carry: the
        transitions' rows by (run, token held); the claimed runs go to the claimer.
        ``briefly``: a row another transaction holds is waited for 50 ms at most, then
        the statement fails (``LockNotAvailableError``: nothing was written)."""
        batch = batch_args([args for args, _ in writes], briefly)
        claim = next((c for _, c in writes if c is not None), None)
        if claim is None:
            rows = await self.hot.fetch(self._q["transition_batch"], *batch)
            return {(r["id"], r["held"]): r for r in rows}
        asked = sum(c.limit for _, c in writes if c is not None and c.deliver == claim.deliver)
        query = "transition_claim_prioritized" if claim.prioritized else "transition_claim"
        rows = await self.hot.fetch(
            self._q[query], claim.worker, asked, claim.lease_seconds, *claim.args, *batch
        )
        claim.deliver([claimed_item(r) for r in rows if r["claim"]], asked)
        return {(r["id"], r["held"]): r for r in rows if not r["claim"]}

    def claim_along(
        self,
        worker: str,
        lease_seconds: float,
        definitions: Sequence[DefinitionKey],
        prioritized: bool,
        deliver: Callable[[list[ClaimedItem], int], None],
    ) -> ClaimAlong:
        """What a transition carries to claim a run for the slot it frees."""
        args = (*definition_args(definitions), *self._claim_table)
        return ClaimAlong(worker, lease_seconds, args, prioritized, deliver)

    async def _start_more(
        self,
        conn: Executor,
        args: tuple[Any, ...],
        roots: list[str] | None,
        admit: Callable[[Executor], Awaitable[None]] | None,
        fence: Callable[[Executor], Awaitable[None]] | None = None,
    ) -> Any:
        """A graph run and its first items, a keyed run and its admission, or a run with
        an idempotency key (after its lock), on ``conn`` (in a transaction); ``fence``
        last (a child run's: its parent's claim still holds)."""
        if args[3] is not None:
            await conn.execute(self._q["lock_key"], args[1], args[3])
        row = await conn.fetchrow(self._q["start_run"], *args)
        if row is not None and roots is not None:
            await conn.execute(self._q["start_items"], row["id"], roots)
        if row is not None and admit is not None:
            await admit(conn)
        if row is not None and fence is not None:
            await fence(conn)
        return row

    async def _start_one(self, args: tuple[Any, ...]) -> Any:
        return await self.hot.fetchrow(self._q["start_run"], *args)

    async def _start_many(self, starts: Sequence[tuple[Any, ...]]) -> dict[Hashable, Any]:
        """Several plain runs' starts in one statement: the inserted ones by run id."""
        rows = await self.hot.fetch(
            self._q["start_runs"],
            *[[a[i] for a in starts] for i in _START_COLUMNS],
            starts[0][6],
        )
        return {r["id"]: r for r in rows}


# Where the start_runs statement's arrays come from in start_run's arguments (its work
# channel, argument 7, goes once; graph, key: only plain runs are started in batches).
_START_COLUMNS = (0, 1, 2, 3, 4, 5, 7, 9, 11, 12, 13, 14, 8)


def start_key(args: tuple[Any, ...]) -> Hashable:
    """What tells a batch's starts apart: the new run's id."""
    run_id: UUID = args[0]
    return run_id
