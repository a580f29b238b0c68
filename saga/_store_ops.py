"""The store's operator queries: listing, counting, finding and pruning runs.

A part of :class:`~saga._store.Store` (a mixin), kept apart because these queries read
finished history at operator pace while the rest of the store serves the per-step path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import partial
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from saga import _partitions as partitions
from saga._db import Executor, query, quote_ident, translate_errors
from saga._model import Phase, RunInfo, RunStatus
from saga._partitions import DaysPruned
from saga._rows import run_info

#: A saga definition as the database knows it: (name, version, fingerprint).
DefinitionKey = tuple[str, int, str | None]
#: A bound on a run's creation time: an age in seconds (by the database's clock), or a time.
Bound = float | datetime | None


#: Stands for "no fingerprint recorded" (runs started before fingerprints existed).
_NO_FINGERPRINT = "-"
#: Tries of a prune's statement that a deadlock with partition creation may abort.
_DEADLOCK_ATTEMPTS = 3


def definition_args(
    definitions: Sequence[DefinitionKey],
) -> tuple[list[str], list[int], list[str]]:
    """The (names, versions, fingerprints) arrays of the definition filters. Each
    definition also matches its runs without a fingerprint (started before they were
    recorded), which the queries read as ``'-'``."""
    names: list[str] = []
    versions: list[int] = []
    fingerprints: list[str] = []
    for name, version, fingerprint in definitions:
        for fp in (fingerprint or _NO_FINGERPRINT, _NO_FINGERPRINT):
            names.append(name)
            versions.append(version)
            fingerprints.append(fp)
    return names, versions, fingerprints


def _age(bound: Bound) -> float | None:
    return bound if isinstance(bound, float) else None


def _time(bound: Bound) -> datetime | None:
    return bound if isinstance(bound, datetime) else None


def fingerprint_or_none(value: str) -> str | None:
    return None if value == _NO_FINGERPRINT else value


@dataclass(frozen=True, slots=True)
class Position:
    """A run's place in the newest-first order of ``list_runs``: a page cursor."""

    created_at: datetime
    id: UUID


@dataclass(frozen=True, slots=True)
class Skip:
    """An operator's skip of the compensation of ``step`` that gave up, as planned from
    the run's state (``undone``: how many steps the plan saw undone, the fence): a
    linear run goes on at ``next_step``, a graph run with the compensations ``items``,
    or the run ``ends`` at once when nothing is left to undo."""

    step: str
    next_step: str | None
    items: tuple[str, ...]
    ends: RunStatus | None
    events_json: str
    undone: int


@dataclass(frozen=True, slots=True)
class Census:
    """Runs per state (active ones, failed and stopped), oldest active age, scheduler
    lag and timer lag (s), the sleeping and waiting runs per (saga, status), and how
    late each schedule is."""

    runs_by_status: dict[str, int]
    oldest_active_age: float
    scheduler_lag: float
    timer_lag: float = 0.0
    parked: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Per schedule not paused: seconds since its next slot passed unhandled (0: none).
    schedules_late: dict[str, float] = field(default_factory=dict)
    #: Per (saga, priority): runs due and not taken, and the oldest one's wait (s).
    queues: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)
    #: Per saga: runs queued behind their concurrency key.
    keys_waiting: dict[str, int] = field(default_factory=dict)


class OperatorQueries:
    """Needs ``pool`` and ``_q`` (the named queries) from the store it is part of."""

    pool: asyncpg.Pool
    _q: dict[str, str]
    work_channel: str
    schema: str

    if TYPE_CHECKING:  # the traffic queries'

        async def release_key(
            self, conn: Executor, run_id: UUID, limit: int | None = None
        ) -> None: ...

        async def queue_rows(self) -> list[tuple[str, int, int, float, bool, int]]: ...

    async def list_runs(
        self,
        *,
        saga_name: str | None,
        statuses: Sequence[str] | None,
        older_than: Bound,
        newer_than: Bound,
        before: Position | None,
        limit: int,
        key: str | None = None,
    ) -> list[RunInfo]:
        """Runs newest first, filtered; ``before`` is the page cursor: the position of the
        last run of the page before (which may since have been pruned). A bound on the
        creation time is an age in seconds (by the database's clock) or a time."""
        async with translate_errors("listing runs"):
            rows = await self.pool.fetch(
                self._q["list_runs"],
                saga_name,
                None if statuses is None else list(statuses),
                _age(older_than),
                _age(newer_than),
                None if before is None else before.id,
                limit,
                key,
                None if before is None else before.created_at,
                _time(older_than),
                _time(newer_than),
            )
        return [run_info(r) for r in rows]

    async def run_exists(self, run_id: UUID) -> bool:
        async with translate_errors("reading a run"):
            return await self.pool.fetchrow(self._q["get_run"], run_id) is not None

    async def existing_runs(self, run_ids: Sequence[UUID]) -> set[UUID]:
        """The runs of ``run_ids`` that still exist."""
        async with translate_errors("reading runs"):
            rows = await self.pool.fetch(self._q["existing_runs"], list(run_ids))
        return {r["id"] for r in rows}

    async def position(self, run_id: UUID) -> Position | None:
        """Where a run is in the order of :meth:`list_runs` (None: no such run)."""
        async with translate_errors("reading a run"):
            row = await self.pool.fetchrow(self._q["get_run"], run_id)
        return None if row is None else Position(row["created_at"], run_id)

    async def prune_cutoff(self, older_than: float) -> datetime:
        """The instant a prune deletes runs finished before (one for all its passes)."""
        async with translate_errors("pruning runs"):
            cutoff: datetime = await self.pool.fetchval(self._q["prune_cutoff"], older_than)
        return cutoff

    async def prune_runs(
        self, cutoff: datetime, statuses: Sequence[str], batch_size: int
    ) -> tuple[int, int]:
        """Delete one batch of finished runs and their events; returns (runs, events). A
        batch chosen as the victim of a deadlock (a day's partitions being created at the
        same moment) changed nothing: it is tried again."""
        async with translate_errors("pruning runs"):
            for attempt in range(_DEADLOCK_ATTEMPTS):
                try:
                    row = await self.pool.fetchrow(
                        self._q["prune_runs"], cutoff, list(statuses), batch_size
                    )
                    break
                except asyncpg.DeadlockDetectedError:
                    if attempt == _DEADLOCK_ATTEMPTS - 1:
                        raise
        assert row is not None
        return row["runs"], row["events"]

    async def prune_key_holders(self, cutoff: datetime, statuses: Sequence[str]) -> tuple[int, int]:
        """Delete the runs prune would delete that still hold their key (failed or
        stopped, never resolved), each in one transaction with its key's release, as
        resolve() does (the oldest run queued for the key takes the slot). A run another
        transaction holds is skipped, key and all. Returns (runs, events) deleted."""
        runs = events = 0
        async with translate_errors("pruning runs"):
            rows = await self.pool.fetch(self._q["prunable_key_holders"], cutoff, list(statuses))
            for row in rows:
                for attempt in range(_DEADLOCK_ATTEMPTS):  # as prune_runs
                    try:
                        async with self.pool.acquire() as conn, conn.transaction():
                            gone = await self._prune_holder(conn, cutoff, statuses, row["id"])
                        break
                    except asyncpg.DeadlockDetectedError:
                        if attempt == _DEADLOCK_ATTEMPTS - 1:
                            raise
                runs, events = runs + gone[0], events + gone[1]
        return runs, events

    async def _prune_holder(
        self, conn: Executor, cutoff: datetime, statuses: Sequence[str], run_id: UUID
    ) -> tuple[int, int]:
        key = await conn.fetchrow(self._q["prune_key_holder"], cutoff, list(statuses), run_id)
        if key is None:
            return 0, 0  # held by another transaction, or changed meanwhile
        await conn.fetchrow(self._q["key_fill"], *key, self.work_channel)
        gone = await conn.fetchrow(self._q["prune_one"], run_id)
        assert gone is not None
        return gone["runs"], gone["events"]

    async def _release_for_prune(self, conn: Executor, run_id: UUID, statuses: Any) -> None:
        """In ``conn``'s transaction: the run lets go of its key, and the oldest run queued
        for it is admitted (no row: released already)."""
        key = await conn.fetchrow(self._q["prune_key_release"], run_id, list(statuses))
        if key is not None:
            await conn.fetchrow(self._q["key_fill"], *key, self.work_channel)

    async def prune_days(
        self, cutoff: datetime, statuses: Sequence[str], dry_run: bool = False
    ) -> DaysPruned:
        """Drop or compact the whole days that can go (see saga/_partitions.py), the keys
        of their runs that go freed in the same transaction; with ``dry_run``, only count
        them."""
        release = partial(self._release_for_prune, statuses=statuses)
        async with translate_errors("pruning whole days"):
            return await partitions.prune_days(
                self.pool, self.schema, cutoff, statuses, release, dry_run
            )

    async def count_prunable(self, cutoff: datetime, statuses: Sequence[str]) -> tuple[int, int]:
        """What :meth:`prune_runs` would delete: (runs, events)."""
        async with translate_errors("counting prunable runs"):
            row = await self.pool.fetchrow(self._q["count_prunable"], cutoff, list(statuses))
        assert row is not None
        return row["runs"], row["events"]

    async def find_runs_by_key(self, key: str, saga_name: str | None) -> list[tuple[UUID, str]]:
        """(run id, saga name) of the runs started with ``key``, one per saga at most."""
        async with translate_errors("finding runs by key"):
            rows = await self.pool.fetch(self._q["find_runs_by_key"], key, saga_name)
        return [(r["id"], r["saga_name"]) for r in rows]

    async def count_runs(
        self, *, saga_name: str | None, older_than: Bound, newer_than: Bound
    ) -> list[tuple[str, str, int]]:
        """(saga name, status, runs) for every pair that has runs, by saga name."""
        async with translate_errors("counting runs"):
            rows = await self.pool.fetch(
                self._q["count_runs"],
                saga_name,
                _age(older_than),
                _age(newer_than),
                _time(older_than),
                _time(newer_than),
            )
        return [(r["saga_name"], r["status"], r["runs"]) for r in rows]

    async def request_cancel(self, run_id: UUID, data: str | None = None) -> bool:
        """Whether the cancel was recorded. The run's row is locked by a first statement:
        the cancel then sees a pivot item written by the transaction it waited for."""
        statuses = [str(s) for s in (*RunStatus.active(), RunStatus.STOPPED)]
        async with (
            translate_errors("cancelling a run"),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            await conn.execute(self._q["lock_run_row"], run_id)
            row = await conn.fetchrow(
                self._q["request_cancel"], run_id, self.work_channel, statuses, data
            )
        return row is not None

    async def retry_run(
        self,
        run_id: UUID,
        stopped: RunStatus,
        resumed: RunStatus,
        phase: Phase,
        data: str | None = None,
    ) -> bool:
        async with translate_errors("retrying a run"):
            row = await self.pool.fetchrow(
                self._q["retry_run"],
                run_id,
                self.work_channel,
                str(stopped),
                str(resumed),
                str(phase),
                data,
            )
        return row is not None

    async def rewait_run(
        self, run_id: UUID, stopped: RunStatus, resumed: RunStatus, data: str | None = None
    ) -> bool:
        """Resume a run stopped at a timed-out wait: it waits again, a fresh timeout."""
        async with translate_errors("retrying a run"):
            row = await self.pool.fetchrow(
                self._q["rewait_run"], run_id, str(stopped), str(resumed), data
            )
        return row is not None

    async def resolve_run(
        self, run_id: UUID, data: str, limits: Mapping[str, int] | None = None
    ) -> bool:
        """Mark a failed or stopped run resolved (a keyed run's slot goes to the next in
        line, by its saga's limit in ``limits`` if there, else its key's); False when it
        is neither (or was)."""
        async with (
            translate_errors("resolving a run"),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            row = await conn.fetchrow(self._q["resolve_run"], run_id, data)
            if row is None:
                return False
            await self.release_key(conn, run_id, (limits or {}).get(row["saga_name"]))
            # A child run resolved is over for its parent's step, which waits for it.
            await conn.execute(self._q["wake_parent"], run_id, self.work_channel)
        return True

    async def rollback_state(self, run_id: UUID) -> asyncpg.Record | None:
        """Where a run's rollback stopped: see the query ``rollback_state``."""
        async with translate_errors("reading a run"):
            return await self.pool.fetchrow(self._q["rollback_state"], run_id)

    async def skip_compensation(self, run_id: UUID, skip: Skip, limit: int | None = None) -> bool:
        """Apply an operator's skip of the compensation that gave up; False when the run
        is no longer failed at it (or another step was undone since the plan read it).
        ``limit``: its saga's concurrency limit, for the key its end frees."""
        async with (
            translate_errors("skipping a compensation"),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            row = await conn.fetchrow(
                self._q["skip_compensation"],
                run_id,
                skip.step,
                skip.next_step,
                None if skip.ends is None else str(skip.ends),
                list(skip.items),
                skip.events_json,
                self.work_channel,
                skip.undone,
            )
            if row is not None and skip.ends is not None:
                await self.release_key(conn, run_id, limit)
        return row is not None

    async def needs_attention(self, limit: int, after: UUID | None) -> list[RunInfo]:
        """Failed and stopped runs not resolved, oldest first, after the cursor."""
        async with translate_errors("listing runs"):
            rows = await self.pool.fetch(self._q["needs_attention"], limit, after)
        return [run_info(r) for r in rows]

    async def ensure_partitions(self) -> list[date]:
        """Create today's and the coming days' partitions where missing (the days)."""
        async with translate_errors("creating partitions"):
            return await partitions.ensure(self.pool, self.schema)

    async def refresh_statistics(self) -> bool:
        """ANALYZE the runs table when its statistics are stale (see the census);
        whether it did."""
        async with translate_errors("refreshing statistics"):
            stale: list[str] = await self.pool.fetchval(self._q["statistics_stale"])
            if not stale:
                return False
            async with self.pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval(self._q["analyze_runs"]):
                    return False
                for name in stale:
                    table = f"{quote_ident(self.schema)}.{quote_ident(name)}"
                    await conn.execute(query("analyze_table", self.schema, table=table))
        return True

    async def census(self, definitions: Sequence[DefinitionKey]) -> Census:
        async with translate_errors("reading run statistics"):
            rows = await self.pool.fetch(self._q["census"], *definition_args(definitions))
            parked = await self.pool.fetch(self._q["census_parked"])
            schedules = await self.pool.fetch(self._q["census_schedules"])
            queues = await self.queue_rows()
        ages = [r["oldest_age"] for r in rows if r["oldest_age"] is not None]
        return Census(
            runs_by_status={r["status"]: r["runs"] for r in rows},
            oldest_active_age=max(ages, default=0.0),
            scheduler_lag=max((r["lag"] for r in rows), default=0.0),
            timer_lag=max((r["timer_lag"] for r in rows), default=0.0),
            parked={(r["saga_name"], r["status"]): r["runs"] for r in parked},
            schedules_late={r["name"]: r["late"] for r in schedules},
            queues={(q[0], q[1]): (q[2], q[3]) for q in queues if not q[4]},
            keys_waiting={q[0]: q[2] for q in queues if q[4]},
        )
