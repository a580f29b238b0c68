"""The store's traffic queries: admitting keyed runs and releasing their keys; taking rate
limit tokens; registering schedules, locking the due ones, recording what fired,
listing, pausing and resuming.

A part of :class:`~saga._store.Store` (a mixin); see ``saga/_rate.py``,
``saga/_scheduler.py`` (how an orchestrator fires schedules) and ``saga/_schedules.py``
(the operator's side).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from uuid import UUID

import anyio
import asyncpg

from saga._db import Executor, translate_errors
from saga._group import or_busy, patiently
from saga._traffic import RunTraffic

#: How long a schedule's transaction may sit idle (a stalled process) before Postgres
#: ends it and frees the schedule's turn.
SCHEDULE_IDLE = "5s"


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as stored: what it starts, when it fires next and fired last, whether
    an operator paused it, how many late slots its missed policy skipped, and ``late``:
    seconds since its next slot passed unhandled (0 when on time or paused; an
    orchestrator that registered it handles a due slot within about a second)."""

    name: str
    saga: str
    version: int
    spec: str
    missed: str
    catch_up: int
    paused: bool
    next_fire: datetime
    last_fire: datetime | None
    last_run: UUID | None
    skipped: int
    late: float


@dataclass(frozen=True, slots=True)
class DueSchedule:
    name: str
    next_fire: datetime
    now: datetime  # the database's clock
    spec: str = ""  # the definition registered last: its schedule and missed policy
    missed: str = "skip"
    catch_up: int = 10


class ScheduleQueries:
    """Needs ``pool``, ``hot``, ``waiting``, ``_q`` (the named queries) and
    ``work_channel`` from the store it is part of."""

    pool: asyncpg.Pool
    hot: asyncpg.Pool
    waiting: anyio.Semaphore | None
    _q: dict[str, str]
    work_channel: str

    async def database_now(self) -> datetime:
        """The database's clock, now."""
        async with translate_errors("reading the database's clock"):
            now: datetime = await self.pool.fetchval(self._q["database_now"])
        return now

    async def register_schedule(
        self,
        name: str,
        saga: tuple[str, int],
        spec: str,
        missed: str,
        catch_up: int,
        next_fire: datetime,
    ) -> None:
        async with translate_errors("registering a schedule"):
            await self.pool.execute(
                self._q["schedule_register"], name, *saga, spec, missed, catch_up, next_fire
            )

    async def admit(self, saga_name: str, traffic: RunTraffic, conn: Executor) -> None:
        """Lock the run's key, then admit the oldest queued runs into its free slots (the
        new run, last in line, included if a slot is free)."""
        await conn.execute(self._q["key_lock"], saga_name, traffic.key, traffic.limit)
        await conn.fetchrow(self._q["key_fill"], saga_name, traffic.key, self.work_channel)

    async def release_key(self, conn: Executor, run_id: UUID, limit: int | None = None) -> None:
        """In ``conn``'s transaction: the run no longer holds (or waits for) its key; the
        oldest queued runs take the free slots, by ``limit`` (its saga's, as the worker
        ending it declares it) or (None: an operator's release) the key's."""
        key = await conn.fetchrow(self._q["key_release"], run_id, limit)
        if key is not None:
            await conn.fetchrow(self._q["key_fill"], key[0], key[1], self.work_channel)

    async def prune_keys(self, batch_size: int) -> int:
        """Delete the concurrency keys no run holds or waits for (their ``key_slots``
        rows), ``batch_size`` per transaction, in key order; a key another transaction
        holds is in use and stays. Returns how many went."""
        gone, after = 0, ("", "")
        async with translate_errors("pruning concurrency keys"):
            while True:
                async with self.pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(self._q["unused_keys_lock"], *after, batch_size)
                    if not rows:
                        return gone
                    names, keys = [r[0] for r in rows], [r[1] for r in rows]
                    gone += await conn.fetchval(self._q["prune_unused_keys"], names, keys)
                after = (names[-1], keys[-1])

    async def count_unused_keys(self) -> int:
        """How many concurrency keys :meth:`prune_keys` would delete now."""
        async with translate_errors("counting unused concurrency keys"):
            count: int = await self.pool.fetchval(self._q["count_unused_keys"])
        return count

    async def queue_rows(self) -> list[tuple[str, int, int, float, bool, int]]:
        """(saga, priority, runs, oldest wait, keyed, keys): see ``census_queues``."""
        async with translate_errors("reading queues"):
            rows = await self.pool.fetch(self._q["census_queues"])
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def rate_limit_rows(self) -> list[tuple[str, float, int, float]]:
        """(name, per second, burst, tokens now) of every rate limit."""
        async with translate_errors("reading rate limits"):
            rows = await self.pool.fetch(self._q["rate_limits"])
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def rate_take(self, name: str, per_second: float, burst: int) -> tuple[float, datetime]:
        """Take a token of a rate limit: the seconds to wait for it, and when it was
        taken (the bucket's lock alone is held, for one statement)."""
        async with translate_errors("taking a rate limit token"):
            row = await self.pool.fetchrow(self._q["rate_take"], name, per_second, burst)
        assert row is not None  # (an upsert returns its row)
        return row["delay"], row["taken"]

    async def rate_limited(
        self,
        name: str,
        delay: float,
        taken: datetime,
        attempt: tuple[UUID, str, int],
        worker: str,
        held: tuple[int, str | None],
    ) -> None:
        """Record in the run's history that ``attempt`` (run, step, number) waits
        ``delay`` seconds for a token of ``name`` taken at ``taken``, if ``worker``
        still holds the lease ``held`` (its token, and a graph item's phase). A caller's
        transaction may hold the run's row: waited for on at most the store's ``waiting``
        permits (see saga._group.patiently), so that the pool stays free for the other
        runs' tokens and writes."""
        record = partial(
            self.hot.execute, self._q["rate_limited"], name, delay, taken, *attempt, worker, *held
        )
        async with translate_errors("recording a rate limit's delay"):
            await patiently(self.waiting, partial(record, False), lambda: or_busy(record(True)))

    @asynccontextmanager
    async def schedule_transaction(self) -> AsyncIterator[Executor]:
        """A connection in a transaction for handling due schedules. Everything in it,
        taking the connection and committing included, raises driver and connection
        errors as ``DatabaseError`` (a database away is an outage the scheduler waits
        out, not a crash). It holds the schedule's row (and the keys of the keyed runs it
        starts): if this process stalls in it (a frozen VM), Postgres ends it after
        ``SCHEDULE_IDLE`` idle, and another orchestrator takes the schedule's turn (its
        statements run back to back: the inputs were computed before it began)."""
        async with (
            translate_errors("starting scheduled runs"),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            await conn.execute(self._q["schedule_idle"], SCHEDULE_IDLE)
            yield conn

    async def schedules_due(self, conn: Executor, names: Sequence[str]) -> list[DueSchedule]:
        """The due schedules among ``names``, locked in ``conn``'s transaction."""
        rows = await conn.fetch(self._q["schedules_due"], list(names))
        return [
            DueSchedule(r["name"], r["next_fire"], r["now"], r["spec"], r["missed"], r["catch_up"])
            for r in rows
        ]

    async def schedule_fired(
        self,
        conn: Executor,
        name: str,
        next_fire: datetime,
        last: tuple[datetime, UUID] | None,
        skipped: int,
    ) -> None:
        await conn.execute(
            self._q["schedule_fired"],
            name,
            next_fire,
            None if last is None else last[0],
            None if last is None else last[1],
            skipped,
        )

    async def schedules_next(self, names: Sequence[str]) -> tuple[float | None, set[str]]:
        """Seconds until the first of ``names`` is due (negative: overdue; None: none),
        and those of ``names`` that have a row."""
        async with translate_errors("reading schedules"):
            row = await self.pool.fetchrow(self._q["schedules_next"], list(names))
        assert row is not None
        return row["wait"], set(row["found"])

    async def remove_schedule(self, name: str) -> bool:
        """Whether a schedule of that name was there (and is gone)."""
        async with translate_errors("removing a schedule"):
            return await self.pool.fetchval(self._q["remove_schedule"], name) is not None

    async def list_schedules(self) -> list[ScheduleInfo]:
        async with translate_errors("listing schedules"):
            rows = await self.pool.fetch(self._q["list_schedules"])
        return [
            ScheduleInfo(
                name=r["name"],
                saga=r["saga_name"],
                version=r["saga_version"],
                spec=r["spec"],
                missed=r["missed"],
                catch_up=r["catch_up"],
                paused=r["paused"],
                next_fire=r["next_fire"],
                last_fire=r["last_fire"],
                last_run=r["last_run"],
                skipped=r["skipped"],
                late=r["late"],
            )
            for r in rows
        ]

    async def schedule_spec(self, name: str) -> tuple[str, datetime] | None:
        """The schedule's spec as registered last, and the database's now (None: no such
        schedule)."""
        async with translate_errors("reading a schedule"):
            row = await self.pool.fetchrow(self._q["schedule_spec"], name)
        return None if row is None else (row["spec"], row["now"])

    async def pause_schedule(
        self, name: str, paused: bool, following: datetime | None = None
    ) -> bool:
        """Pause or resume (next due at ``following`` if its slot passed meanwhile);
        False when there is no such schedule."""
        async with translate_errors("pausing a schedule"):
            row = await self.pool.fetchrow(self._q["pause_schedule"], name, paused, following)
        return row is not None
