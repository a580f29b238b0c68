"""The store: the database operations of runs and leases; with its mixins (``_store_*``)
and ``_migrate``, the only code that runs SQL.

Queries are named blocks in ``sql/queries.sql``; every method returns typed values
(``RunRow``, ``HistoryEvent``, ``ClaimedItem`` ...), never driver records, so no column
name appears outside the store. The plan's decisions arrive as values (a Transition,
the claim table) and are applied here, fenced by the lease token and its owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from saga._claims import claim_table_args
from saga._db import Executor, channel, queries, translate_errors, validate_schema
from saga._errors import DatabaseError
from saga._group import GroupCommit, fly, or_busy, patiently
from saga._model import Phase, RunStatus
from saga._rows import claimed_item, events_json
from saga._store_batch import (
    ClaimAlong,
    GroupWrites,
    Write,
    alone,
    start_key,
    transition_args,
    write_key,
)
from saga._store_children import ChildQueries, ParentClaim
from saga._store_dash import DashboardQueries
from saga._store_graph import GraphQueries
from saga._store_ops import (
    DefinitionKey,
    OperatorQueries,
    definition_args,
    fingerprint_or_none,
)
from saga._store_peers import PresenceQueries
from saga._store_reads import RunReads
from saga._store_sched import ScheduleQueries
from saga._store_signals import SignalQueries
from saga._store_testing import FaultQueries
from saga._traffic import RunTraffic
from saga._transition import ClaimedItem, Event, Transition, value

_NO_TRAFFIC = RunTraffic()
#: The ends that free a keyed run's slot (failed and stopped runs keep it till resolved).
_RELEASING = frozenset({RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class StartResult:
    run_id: UUID
    created: bool
    existing_input: str | None  # the input JSON of the run a key matched
    #: The definition (version, fingerprint) of the run a key matched.
    existing_definition: tuple[int, str | None] | None = None


@value
class TransitionResult:
    lease_token: int
    cancel_requested: bool
    age: float = 0.0  # seconds since the run was created, by the database clock
    signalled: bool = False  # the wait just entered already has its signal: due now


class Store(
    GroupWrites,
    RunReads,
    OperatorQueries,
    SignalQueries,
    GraphQueries,
    ChildQueries,
    DashboardQueries,
    ScheduleQueries,
    PresenceQueries,
    FaultQueries,
):
    """Database operations on one schema through an asyncpg pool."""

    def __init__(
        self, pool: asyncpg.Pool, schema: str = "saga", hot: asyncpg.Pool | None = None
    ) -> None:
        self.pool = pool
        #: Statements on given runs (leases, starts, results, histories, signals): an
        #: executing orchestrator's own pool of generic plans (see ``open_pool``).
        self.hot = hot or pool
        self.schema = validate_schema(schema)
        self._q = queries(schema)
        self.work_channel = channel(self.schema, "work")
        self.done_channel = channel(self.schema, "done")
        self.peers_channel = channel(self.schema, "peers")
        self._claim_table = claim_table_args()
        #: Writes that wait for a row another transaction holds (a caller's transaction
        #: that sent the run a signal) each hold a connection of ``hot``: at most a
        #: quarter of it (the others try again from time to time: see saga._group).
        size = self.hot.get_max_size()
        self.waiting = anyio.Semaphore(size // 4) if size >= 4 else None
        #: The writes in flight that may lease work to their worker (see saga._group):
        #: a shutdown waits for them before it gives its worker's leases back.
        self.flights: set[asyncio.Future[Any]] = set()
        #: Plain transitions (and starts) made at about the same time share a statement.
        self._group: GroupCommit[Write, Any] = GroupCommit(
            self._try_one,
            self._write_many,
            write_key,
            wait=self._write_one,
            waiting=self.waiting,
            alone=alone,
            flights=self.flights,
        )
        self._starts: GroupCommit[tuple[Any, ...], Any] = GroupCommit(
            self._start_one, self._start_many, start_key
        )
        self._graphs = self.graph_group()  # graph items' writes
        self._signals = self.signal_group()  # signals sent on the store's pool

    def pace(self, concurrency: int, *, alone: bool) -> None:
        """How an executing orchestrator of ``concurrency`` writes its runs' transitions
        (and graph items): ``alone`` (no other executing orchestrator on the schema), in
        up to two statements at a time, each of at most half its runs; with peers, one
        at a time, of up to all of them.

        Alone, one batch of every run that finished a step left one Postgres backend
        working while the other, and the orchestrator, waited: two batches side by side
        drained 3,000 runs 19 % faster (at concurrency 64 and 128; three batches were
        slower than one). With peers, their writes fill those gaps, and a second write
        each only halves the batches: on 2 cores, 2, 4 and 8 processes x 64 drained
        6,000 runs 1.4-1.8 x faster with one write in flight each than with two."""
        leaders, max_batch = (2, max(1, -(-concurrency // 2))) if alone else (1, 256)
        self._group.resize(leaders, max_batch)
        self._graphs.resize(leaders, max_batch)

    # -- starting -------------------------------------------------------------------------

    async def start_run(
        self,
        run_id: UUID,
        saga_name: str,
        saga_version: int,
        key: str | None,
        input_json: str,
        first_step: str,
        trace_context: str | None,
        notify: bool,
        fingerprint: str,
        conn: Executor | None = None,
        *,
        roots: list[str] | None = None,
        pivot: str | None = None,
        parent: ParentClaim | None = None,
        traffic: RunTraffic = _NO_TRAFFIC,
    ) -> StartResult:
        """Insert a run (on ``conn``, in its transaction, if given); a key that already
        exists returns that run, with its input so the caller can tell a replay from a
        conflict. ``roots``: a graph run's first steps (None: a linear run); ``pivot``:
        the definition's pivot step; ``parent``: the claim of the step starting this child
        (the start commits only while it holds, else ``ClaimLost``);
        ``traffic``: its priority and concurrency key (a keyed run is admitted, or
        queued, in the same transaction)."""
        args = (
            run_id,
            saga_name,
            saga_version,
            key,
            input_json,
            first_step,
            self.work_channel,
            trace_context,
            notify,
            fingerprint,
            roots is not None,
            pivot,
            None if parent is None else parent.run_id,
            None if parent is None else parent.step,
            traffic.priority,
            traffic.key,
        )
        db = conn or self.hot
        extra = None if traffic.key is None else partial(self.admit, saga_name, traffic)
        fence = None if parent is None else partial(self.fence_child, parent)
        async with translate_errors("starting a run"):
            for _ in range(5):
                if conn is not None:  # the caller's transaction holds it all
                    row = await self._start_more(conn, args, roots, extra, fence)
                elif roots is None and extra is None and key is None and fence is None:
                    row = await self._starts.write(args)
                else:
                    async with self.hot.acquire() as own, own.transaction():
                        row = await self._start_more(own, args, roots, extra, fence)
                if row is not None:
                    return StartResult(_uuid(row["id"]), True, None)
                existing = await db.fetchrow(self._q["find_run_by_key"], saga_name, key)
                if existing is not None:
                    return StartResult(
                        _uuid(existing["id"]),
                        False,
                        existing["input"],
                        (existing["saga_version"], existing["fingerprint"]),
                    )
                # The conflicting run was deleted in between (pruned); try again.
        raise DatabaseError(f"could not start run with key {key!r}: it keeps conflicting")

    async def notify_work(self, saga_name: str) -> None:
        async with translate_errors("notifying workers"):
            await self.hot.execute(self._q["notify_work"], self.work_channel, saga_name)

    # -- leases -----------------------------------------------------------------------------

    async def claim(
        self,
        worker: str,
        limit: int,
        lease_seconds: float,
        definitions: Sequence[DefinitionKey],
        prioritized: bool = False,
    ) -> list[ClaimedItem]:
        with translate_errors("claiming work"):
            rows = await self.hot.fetch(
                self._q["claim_prioritized" if prioritized else "claim"],
                worker,
                limit,
                lease_seconds,
                *definition_args(definitions),
                *self._claim_table,
            )
        return [claimed_item(r) for r in rows]

    async def transition(
        self,
        worker: str,
        run_id: UUID,
        lease_token: int,
        change: Transition,
        child: bool = False,
        key_limit: int | None = None,
        claim: ClaimAlong | None = None,
    ) -> TransitionResult | None:
        """Apply a fenced transition; ``None`` means nothing changed: the lease was lost,
        or (``change.unless_cancelled``) a cancel was requested meanwhile. Parking the
        run at a wait first marks the wait awaited, in the same transaction (one commit):
        a signal already there makes the run due at once (``signalled``). The end of a
        child run wakes its parent's step, and a keyed run's end (``key_limit``: its saga's
        limit; None: not keyed) frees its key's slot for the next queued run, in the
        same transaction. ``claim``: claim due runs for the
        slot a plain transition frees, in its statement (delivered to ``claim.deliver``)."""
        events = events_json(worker, change.events)
        due_in = change.due_in
        with translate_errors("recording a transition"):
            if (child or key_limit is not None) and change.terminal:
                args = transition_args(
                    worker, run_id, lease_token, change, events, due_in, self.done_channel
                )
                releases = key_limit if change.status in _RELEASING else None
                end = partial(self._end, args, run_id, child, releases)
                row = await patiently(self.waiting, partial(end, False), lambda: or_busy(end(True)))
            else:  # (parking at a wait too: see transition_batch)
                args = transition_args(
                    worker, run_id, lease_token, change, events, due_in, self.done_channel
                )
                row = await self._group.write((args, claim))
        if row is None:
            return None
        return TransitionResult(
            row["lease_token"], row["cancel_requested"], row["age"], row["signalled"]
        )

    async def _end(
        self,
        args: tuple[Any, ...],
        run_id: UUID,
        child: bool,
        releases: int | None,
        briefly: bool,
    ) -> Any:
        """A child's or keyed run's end, and in the same transaction its parent's step
        woken or (``releases``: the key's limit) its key's next run admitted (whose row it
        waits for too); ``briefly``:
        a lock another transaction holds is waited for 50 ms at most, then
        ``LockNotAvailableError``, nothing written."""
        async with self.hot.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(self._q["transition"], *args, briefly)
            if row is not None and child:
                await conn.execute(self._q["wake_parent"], run_id, self.work_channel)
            if row is not None and releases is not None:
                await self.release_key(conn, run_id, releases)
        return row

    async def started(
        self, worker: str, run_id: UUID, token: int, event: Event, phase: Phase | None
    ) -> bool:
        """Log an attempt's start (see the query ``started``); whether the lease holds."""
        async with translate_errors("recording a start"):
            held: bool = await self.pool.fetchval(
                self._q["started"],
                run_id,
                token,
                worker,
                str(event.kind),
                event.step,
                event.attempt,
                None if phase is None else str(phase),
            )
        return held

    async def heartbeat(
        self, worker: str, leases: Sequence[tuple[UUID, int, float]], wait: bool = False
    ) -> dict[UUID, bool | None]:
        """Extend (run id, token, seconds) leases; returns {run id: cancel requested} for
        the leases still held (None: held, not renewed: another transaction held its row;
        ``wait`` for such locks instead)."""
        beat = self.hot.fetch(
            self._q["heartbeat_waiting" if wait else "heartbeat"],
            worker,
            [run_id for run_id, _, _ in leases],
            [token for _, token, _ in leases],
            [seconds for _, _, seconds in leases],
        )
        async with translate_errors("heartbeat"):
            # A flight (see saga._group): one cut short by a shutdown could renew a lease
            # after the shutdown gave it back. Not one waiting for a row another
            # transaction holds: a shutdown waits for no one's transaction.
            rows = await (beat if wait else fly(self.flights, beat))
        return {r["id"]: r["cancel_requested"] for r in rows}

    async def release(
        self, worker: str, keep: Sequence[tuple[UUID, int]] = (), unstarted: Sequence[UUID] = ()
    ) -> int:
        """Give back every lease of ``worker`` (its loops have ended) but ``keep`` (run,
        token), not counting the attempts of ``unstarted``; how many."""
        runs, tokens = [k[0] for k in keep], [k[1] for k in keep]
        async with translate_errors("releasing leases"):
            rows = await self.hot.fetch(
                self._q["release"], worker, self.work_channel, runs, tokens, list(unstarted)
            )
        return len(rows)

    # -- definitions and census -------------------------------------------------------------

    async def count_unclaimable(
        self, definitions: Sequence[DefinitionKey]
    ) -> dict[DefinitionKey, int]:
        """Active runs of definitions not in ``definitions``, by (name, version,
        fingerprint); the fingerprint is ``None`` for runs that recorded none."""
        async with translate_errors("counting unclaimable runs"):
            rows = await self.pool.fetch(
                self._q["count_unclaimable"], *definition_args(definitions)
            )
        return {
            (r["saga_name"], r["saga_version"], fingerprint_or_none(r["fingerprint"])): r["runs"]
            for r in rows
        }


def _uuid(value: Any) -> UUID:
    """A run id read on a caller's connection, whatever its ``uuid`` codec makes of it
    (README: your connection's type codecs do not matter)."""
    return value if isinstance(value, UUID) else UUID(str(value))
