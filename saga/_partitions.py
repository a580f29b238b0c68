"""Day partitions of runs and their history (see ``sql/migrations/0009_partitions.sql``).

Run ids are UUIDv7 (their first 48 bits: the start's Unix time in ms), so a UTC day's
runs are one range of ids. ``runs``, ``events``, ``watches`` and ``signals`` are
partitioned by it (``runs_pYYYYMMDD``, ...), each parent with a DEFAULT partition for
runs from before migration 0009 (random ids) and any run whose day had no partition.

:func:`ensure` creates today's and the next ``DAYS_AHEAD`` days' partitions (run by
orchestrators, ``migrate`` and ``prune``), moving their days' rows out of DEFAULT.

:func:`prune_days` drops whole days: a day whose runs all finished long enough ago (in
a pruned status) is four ``DROP TABLE``\\ s; a day where at least half of them did is
compacted: the others are copied into fresh tables that replace the day's. No row is
deleted one by one, so nothing is left for autovacuum to clean. Each day is one short
transaction holding its four partitions (and briefly the parents) exclusively, with a
lock timeout (a day that cannot be locked now is left for the next prune); the keys of
its runs that go are freed in it.

Part of the store: its SQL is in ``sql/queries.sql`` (the queries ``partition_*`` and
``day_*``), where each table that depends on the day is a placeholder this module fills
with a quoted name it builds (see :func:`_sql`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import anyio
import asyncpg

from saga._db import query, quote_ident
from saga._log import logger

#: The tables partitioned by run id, with their run id column.
TABLES: tuple[tuple[str, str], ...] = (
    ("runs", "id"),
    ("events", "run_id"),
    ("watches", "run_id"),
    ("signals", "run_id"),
)
#: Days of partitions created ahead of today.
DAYS_AHEAD = 2
_DAY_MS = 86_400_000
_EPOCH = date(1970, 1, 1)
# Tries of a day that cannot be locked (its DDL waits at most 500 ms for a lock: see the
# query partition_lock_timeout) or that loses a deadlock; then it is left for later.
_LOCK_ATTEMPTS = 3

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def uuid7() -> UUID:
    """A new run id: UUIDv7 (RFC 9562), the current Unix time in ms then 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 62 & 0xFFF) << 64
        | 0b10 << 62
        | rand & 0x3FFF_FFFF_FFFF_FFFF
    )
    return UUID(int=value)


def day_start(day: date) -> UUID:
    """The lowest run id of ``day`` (UTC): the partition bound."""
    return UUID(int=((day - _EPOCH).days * _DAY_MS) << 80)


def day_of(run_id: UUID) -> date:
    """The UTC day a run id's partition covers (for UUIDv7 ids: the day it started)."""
    return _EPOCH + timedelta(days=(run_id.int >> 80) // _DAY_MS)


def partition(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def _literal(value: UUID) -> str:
    """A partition bound as an SQL literal (DDL takes no parameters); only UUIDs."""
    return f"'{UUID(str(value))}'"


def _table(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def _day_tables(schema: str, day: date, suffix: str = "") -> dict[str, str]:
    """The day's four partitions (``runs=...``, ...), quoted and schema-qualified."""
    return {table: _table(schema, partition(table, day) + suffix) for table, _ in TABLES}


async def days(conn: Conn | asyncpg.Pool, schema: str) -> set[date]:
    """The days that have partitions (those of ``runs``: the four tables go together)."""
    rows = await conn.fetch(query("partition_days", schema))
    found = set()
    for row in rows:
        name: str = row["relname"]
        if name.startswith("runs_p") and len(name) == 14 and name[6:].isdigit():
            found.add(datetime.strptime(name[6:], "%Y%m%d").date())
    return found


async def ensure(pool: asyncpg.Pool, schema: str, ahead: int = DAYS_AHEAD) -> list[date]:
    """Create the partitions of today (UTC) and of the ``ahead`` next days that are
    missing; returns the days created. Safe from several processes at once."""
    if not await pool.fetchval(query("partitioned", schema)):
        return []  # a schema not migrated that far (a migration test stops early)
    today = datetime.now(UTC).date()
    wanted = [today + timedelta(days=k) for k in range(ahead + 1)]
    have = await days(pool, schema)
    created = []
    for day in wanted:
        if day not in have and await _create_day(pool, schema, day):
            created.append(day)
    return created


async def _create_day(pool: asyncpg.Pool, schema: str, day: date) -> bool:
    lo, hi = _bounds(day)
    async with pool.acquire() as conn, conn.transaction():
        await _serialize(conn, schema)
        if day in await days(conn, schema):
            return False  # another process created it meanwhile
        for (table, key), part in zip(TABLES, _day_tables(schema, day).values(), strict=True):
            tables = {"part": part, "parent": _table(schema, table)}
            default = _table(schema, table + "_default")
            await conn.execute(query("partition_lock_default", schema, default=default))
            await conn.execute(query("partition_create", schema, **tables))
            fill = query("partition_fill", schema, default=default, key=quote_ident(key), part=part)
            await conn.execute(fill, lo, hi)
            if table == "runs":
                await conn.execute(_key_index(schema, day))
            await _attach(conn, schema, day, **tables)
    return True


def _bounds(day: date) -> tuple[UUID, UUID]:
    """The ids of ``day``'s partition: from its first, up to the next day's first."""
    return day_start(day), day_start(day + timedelta(days=1))


async def _attach(conn: Conn, schema: str, day: date, *, part: str, parent: str) -> None:
    lo, hi = (_literal(bound) for bound in _bounds(day))
    await conn.execute(query("partition_attach", schema, parent=parent, part=part, lo=lo, hi=hi))


def _key_index(schema: str, day: date, suffix: str = "") -> str:
    name = partition("runs", day) + suffix
    index = quote_ident(name + "_idempotency_key")
    return query("partition_key_index", schema, index=index, part=_table(schema, name))


async def _serialize(conn: Conn, schema: str) -> None:
    """One partition change of the schema at a time: the advisory lock is waited for as
    long as another's change lasts (migrate and prune from several processes at once);
    the tables' locks then wait at most 500 ms."""
    await conn.execute(query("partition_lock", schema), f"saga.partitions:{schema}")
    await conn.execute(query("partition_lock_timeout", schema))


@dataclass(frozen=True, slots=True)
class DaysPruned:
    """What :func:`prune_days` removed: runs and events, in ``days`` whole days."""

    runs: int = 0
    events: int = 0
    days: int = 0


#: The runs a prune that removes rows counts as gone beyond those absent: none (a dry
#: run, which removes nothing, passes the parents of the days it counted).
_NONE_GONE: list[UUID] = []

#: Frees the concurrency key of a run about to be deleted (in the caller's transaction).
ReleaseKey = Callable[[Conn, UUID], Awaitable[None]]


async def prune_days(
    pool: asyncpg.Pool,
    schema: str,
    cutoff: datetime,
    statuses: Sequence[str],
    release: ReleaseKey,
    dry_run: bool = False,
) -> DaysPruned:
    """Drop or compact every day whose runs all started before ``cutoff``, when at least
    half of its runs finished before it in one of ``statuses`` (those go, freeing their
    keys with ``release``; the others are kept). Oldest day first. ``dry_run``: only
    count what would go."""
    total = DaysPruned()
    gone: list[UUID] = []  # a dry run's parents that the days it counted remove
    for day in sorted(await days(pool, schema)):
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
        if end > cutoff:
            break
        if dry_run:
            done = await _count_day(pool, schema, day, cutoff, list(statuses), gone)
        else:
            done = await _prune_day(pool, schema, day, cutoff, list(statuses), release)
        if done is not None:
            total = DaysPruned(total.runs + done[0], total.events + done[1], total.days + 1)
    return total


async def _count_day(
    pool: asyncpg.Pool,
    schema: str,
    day: date,
    cutoff: datetime,
    statuses: list[str],
    gone: list[UUID],
) -> tuple[int, int] | None:
    """What ``_prune_day`` would remove of the day, the earlier days counted gone (their
    parents in ``gone``, to which the day's own that go are added): its runs and their
    events."""
    tables = _day_tables(schema, day)
    gone_events = query("day_events_gone", schema, events=tables["events"], runs=tables["runs"])
    parents = query("day_parents_gone", schema, runs=tables["runs"])
    try:
        counts = await _counts(pool, schema, tables["runs"], cutoff, statuses, gone)
        if counts is None:
            return None
        events = await pool.fetchval(gone_events, cutoff, statuses, gone)
        gone += [r["id"] for r in await pool.fetch(parents, cutoff, statuses, gone)]
        return counts[0], events
    except asyncpg.UndefinedTableError:
        return None  # another prune dropped the day meanwhile


async def _counts(
    pool: asyncpg.Pool,
    schema: str,
    runs: str,
    cutoff: datetime,
    statuses: list[str],
    gone: list[UUID] = _NONE_GONE,
) -> tuple[int, int] | None:
    """The day's runs that would go and stay, or None when the day is not worth it
    (less than half goes: prune's row-by-row pass takes those). A day with no run at
    all (created ahead on a quiet day, or emptied row by row) goes too."""
    row = await pool.fetchrow(query("day_counts", schema, runs=runs), cutoff, statuses, gone)
    assert row is not None
    if row["kept"] > row["gone"]:
        return None
    return row["gone"], row["kept"]


async def _prune_day(
    pool: asyncpg.Pool,
    schema: str,
    day: date,
    cutoff: datetime,
    statuses: list[str],
    release: ReleaseKey,
) -> tuple[int, int] | None:
    parts = _day_tables(schema, day)
    # Whether the day is worth it, read before it is locked; what goes is counted under
    # the lock (a kept run, or a refused signal to a finished one, may add events).
    try:
        counts = await _counts(pool, schema, parts["runs"], cutoff, statuses)
    except asyncpg.UndefinedTableError:
        return None  # another prune dropped the day since it was listed
    if counts is None:
        return None
    for attempt in range(_LOCK_ATTEMPTS):
        try:
            async with pool.acquire() as conn, conn.transaction():
                await _serialize(conn, schema)
                if day not in await days(conn, schema):
                    return None  # another prune took it
                return await _prune_locked(
                    conn, schema, day, counts[1] > 0, cutoff, statuses, release
                )
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            if attempt == _LOCK_ATTEMPTS - 1:  # left for the next prune; the rest goes on
                logger.warning("prune_day_skipped", day=str(day), error_type=type(exc).__name__)
                return None
            await anyio.sleep(0.5 * (attempt + 1))
    return None


async def _prune_locked(
    conn: Conn,
    schema: str,
    day: date,
    kept_before: bool,
    cutoff: datetime,
    statuses: list[str],
    release: ReleaseKey,
) -> tuple[int, int] | None:
    """In the day's transaction (see _prune_day): drop the day, or compact it, or leave
    it (None: more runs stay than go now). ``kept_before``: whether runs were seen to
    stay before the lock (then the day is compacted, never dropped)."""
    parts = _day_tables(schema, day)
    await conn.execute(query("day_lock", schema, **parts))
    row = await conn.fetchrow(query("day_rows", schema, runs=parts["runs"], events=parts["events"]))
    assert row is not None
    runs, events = row["runs"], row["events"]
    any_kept = query("day_any_kept", schema, runs=parts["runs"])
    drop = not kept_before and not await conn.fetchval(any_kept, cutoff, statuses, _NONE_GONE)
    kept = 0
    if not drop:
        kept_query = query("day_kept", schema, runs=parts["runs"])
        kept = await conn.fetchval(kept_query, cutoff, statuses, _NONE_GONE)
        if kept > runs - kept:
            return None
    holders = query("day_key_holders", schema, runs=parts["runs"])
    for holder in await conn.fetch(holders, cutoff, statuses, _NONE_GONE):
        # The oldest run queued for the key goes on once the day is gone.
        await release(conn, holder["id"])
    if drop:
        await conn.execute(query("day_drop", schema, **parts))
        return runs, events
    kept_events = await _compact(conn, schema, day, cutoff, statuses)
    return runs - kept, events - kept_events


async def _compact(
    conn: Conn, schema: str, day: date, cutoff: datetime, statuses: list[str]
) -> int:
    """Replace the day's partitions with copies holding only its kept runs and their
    rows; returns the kept runs' events."""
    fresh, old = _day_tables(schema, day, "_new"), _day_tables(schema, day)
    kept_events = 0
    for table, key in TABLES:
        parent = _table(schema, table)
        await conn.execute(query("partition_create", schema, part=fresh[table], parent=parent))
        if table == "runs":
            copy = query("day_copy_kept_runs", schema, fresh=fresh[table], runs=old[table])
            status = await conn.execute(copy, cutoff, statuses, _NONE_GONE)
        else:
            copy = query(
                "day_copy_kept_rows",
                schema,
                fresh=fresh[table],
                old=old[table],
                key=quote_ident(key),
                fresh_runs=fresh["runs"],
            )
            status = await conn.execute(copy)
        if table == "events":
            kept_events = int(status.split()[-1])
    await conn.execute(_key_index(schema, day, "_new"))
    for table, _ in TABLES:
        name = partition(table, day)
        await conn.execute(query("partition_drop", schema, part=old[table]))
        if table == "runs":
            index = _table(schema, name + "_new_idempotency_key")
            new_name = quote_ident(name + "_idempotency_key")
            rename = query("partition_rename_index", schema, index=index, name=new_name)
            await conn.execute(rename)
        rename = query("partition_rename", schema, part=fresh[table], name=quote_ident(name))
        await conn.execute(rename)
        await _attach(conn, schema, day, part=old[table], parent=_table(schema, table))
    return kept_events
