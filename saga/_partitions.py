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

from saga._db import quote_ident
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
# Partition DDL waits at most this long for a lock (statements on the runs queue behind
# it meanwhile); a day that cannot be locked is tried again later.
_LOCK_TIMEOUT = "500ms"
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


async def days(conn: Conn | asyncpg.Pool, schema: str) -> set[date]:
    """The days that have partitions (those of ``runs``: the four tables go together)."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass",
        f"{quote_ident(schema)}.runs",
    )
    found = set()
    for row in rows:
        name: str = row["relname"]
        if name.startswith("runs_p") and len(name) == 14 and name[6:].isdigit():
            found.add(datetime.strptime(name[6:], "%Y%m%d").date())
    return found


async def ensure(pool: asyncpg.Pool, schema: str, ahead: int = DAYS_AHEAD) -> list[date]:
    """Create the partitions of today (UTC) and of the ``ahead`` next days that are
    missing; returns the days created. Safe from several processes at once."""
    partitioned = await pool.fetchval(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = $1::regclass",
        f"{quote_ident(schema)}.runs",
    )
    if not partitioned:
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
    s = quote_ident(schema)
    lo, hi = _bounds(day)
    async with pool.acquire() as conn, conn.transaction():
        await _serialize(conn, schema)
        if day in await days(conn, schema):
            return False  # another process created it meanwhile
        for table, key in TABLES:
            part = f"{s}.{quote_ident(partition(table, day))}"
            default = f"{s}.{quote_ident(table + '_default')}"
            # Attaching next to a DEFAULT partition locks it exclusively (and checks that
            # none of its rows belongs to the new day): taken first, not upgraded to.
            await conn.execute(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE")
            await _create_like(conn, schema, table, part)
            await conn.execute(
                f"WITH moved AS (DELETE FROM {default} WHERE {key} >= '{lo}' AND {key} < '{hi}' "
                f"RETURNING *) INSERT INTO {part} SELECT * FROM moved"
            )
            if table == "runs":
                await conn.execute(_key_index(schema, day))
            await _attach(conn, schema, table, part, day)
    return True


async def _create_like(conn: Conn, schema: str, table: str, part: str) -> None:
    """A table shaped as ``table`` (columns, defaults, checks: what attaching needs),
    without indexes: attaching builds the parent's on it."""
    await conn.execute(
        f"CREATE TABLE {part} (LIKE {quote_ident(schema)}.{table} "
        "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)"
    )


def _bounds(day: date) -> tuple[UUID, UUID]:
    """The ids of ``day``'s partition: from its first, up to the next day's first."""
    return day_start(day), day_start(day + timedelta(days=1))


async def _attach(conn: Conn, schema: str, table: str, part: str, day: date) -> None:
    lo, hi = _bounds(day)
    await conn.execute(
        f"ALTER TABLE {quote_ident(schema)}.{table} ATTACH PARTITION {part} "
        f"FOR VALUES FROM ('{lo}') TO ('{hi}')"
    )


def _key_index(schema: str, day: date, suffix: str = "") -> str:
    """Idempotency keys are unique within a partition too (across partitions: see
    ``lock_key`` in queries.sql)."""
    name = partition("runs", day) + suffix
    return (
        f"CREATE UNIQUE INDEX {quote_ident(name + '_idempotency_key')} "
        f"ON {quote_ident(schema)}.{quote_ident(name)} (saga_name, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL"
    )


async def _serialize(conn: Conn, schema: str) -> None:
    """One partition change of the schema at a time: the advisory lock is waited for as
    long as another's change lasts (migrate and prune from several processes at once);
    the tables' locks then wait at most ``_LOCK_TIMEOUT``."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"saga.partitions:{schema}")
    await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")


@dataclass(frozen=True, slots=True)
class DaysPruned:
    """What :func:`prune_days` removed: runs and events, in ``days`` whole days."""

    runs: int = 0
    events: int = 0
    days: int = 0


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
    for day in sorted(await days(pool, schema)):
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
        if end > cutoff:
            break
        if dry_run:
            done = await _count_day(pool, schema, day, cutoff, list(statuses))
        else:
            done = await _prune_day(pool, schema, day, cutoff, list(statuses), release)
        if done is not None:
            total = DaysPruned(total.runs + done[0], total.events + done[1], total.days + 1)
    return total


async def _count_day(
    pool: asyncpg.Pool, schema: str, day: date, cutoff: datetime, statuses: list[str]
) -> tuple[int, int] | None:
    """What ``_prune_day`` would remove of the day now: its runs and their events."""
    runs = f"{quote_ident(schema)}.{quote_ident(partition('runs', day))}"
    events = f"{quote_ident(schema)}.{quote_ident(partition('events', day))}"
    counts = await _counts(pool, schema, runs, cutoff, statuses)
    if counts is None:
        return None
    gone = await pool.fetchval(
        f"SELECT count(*) FROM {events} e JOIN {runs} r ON r.id = e.run_id "
        f"WHERE {_prunable(schema)}",
        cutoff,
        statuses,
    )
    return counts[0], gone


async def _counts(
    pool: asyncpg.Pool, schema: str, runs: str, cutoff: datetime, statuses: list[str]
) -> tuple[int, int] | None:
    """The day's runs that would go and stay, or None when the day is not worth it
    (nothing goes, or less than half: prune's row-by-row pass takes those)."""
    prunable = _prunable(schema)
    row = await pool.fetchrow(
        f"SELECT count(*) FILTER (WHERE {prunable}) AS gone, "
        f"count(*) FILTER (WHERE NOT {prunable}) AS kept FROM {runs} r",
        cutoff,
        statuses,
    )
    assert row is not None
    if row["gone"] == 0 or row["kept"] > row["gone"]:
        return None
    return row["gone"], row["kept"]


def _prunable(schema: str) -> str:
    """Whether the runs row ``r`` goes ($1 the cutoff, $2 the statuses): it finished
    before the cutoff in one of the statuses, and it is not the child of a run that
    stays (a parent still running, or failed and retryable, reads its children)."""
    own = "({a}.due_at IS NULL AND coalesce({a}.finished_at < $1, false) "
    own += "AND {a}.status = ANY($2::text[]))"
    return (
        f"({own.format(a='r')} AND (r.parent_id IS NULL OR NOT EXISTS ("
        f"SELECT 1 FROM {quote_ident(schema)}.runs p "
        f"WHERE p.id = r.parent_id AND NOT {own.format(a='p')})))"
    )


_TERMINAL = ("completed", "compensated", "failed", "cancelled", "stopped")


async def _any_kept(
    conn: Conn, schema: str, runs: str, cutoff: datetime, statuses: list[str]
) -> bool:
    """Whether a run of the (locked) day must stay, read through the partial indexes of
    active runs, of finished runs by end time, and of failed and stopped runs, rather
    than the whole partition: the day is locked meanwhile, and claims wait for it."""
    checks = [
        f"EXISTS (SELECT 1 FROM {runs} WHERE due_at IS NOT NULL)",
        f"EXISTS (SELECT 1 FROM {runs} WHERE due_at IS NULL "
        "AND (finished_at >= $1 OR finished_at IS NULL))",
        # A child whose parent stays (through the partial index of children).
        f"EXISTS (SELECT 1 FROM {runs} r WHERE r.parent_id IS NOT NULL "
        f"AND NOT {_prunable(schema)})",
    ]
    # Terminal statuses not pruned (validated RunStatus values, safe as literals: a
    # literal lets the planner use the partial index of that status).
    checks += [
        f"EXISTS (SELECT 1 FROM {runs} WHERE status = '{status}')"
        for status in _TERMINAL
        if status not in statuses
    ]
    return bool(await conn.fetchval("SELECT " + " OR ".join(checks), cutoff, statuses))


async def _prune_day(
    pool: asyncpg.Pool,
    schema: str,
    day: date,
    cutoff: datetime,
    statuses: list[str],
    release: ReleaseKey,
) -> tuple[int, int] | None:
    s = quote_ident(schema)
    parts = {t: f"{s}.{quote_ident(partition(t, day))}" for t, _ in TABLES}
    # Whether the day is worth it, read before it is locked; what goes is counted under
    # the lock (a kept run, or a refused signal to a finished one, may add events).
    counts = await _counts(pool, schema, parts["runs"], cutoff, statuses)
    if counts is None:
        return None
    kept_runs = counts[1]
    for attempt in range(_LOCK_ATTEMPTS):
        try:
            async with pool.acquire() as conn, conn.transaction():
                await _serialize(conn, schema)
                if day not in await days(conn, schema):
                    return None  # another prune took it
                await conn.execute(
                    f"LOCK TABLE {', '.join(parts.values())} IN ACCESS EXCLUSIVE MODE"
                )
                runs = await conn.fetchval(f"SELECT count(*) FROM {parts['runs']}")
                events = await conn.fetchval(f"SELECT count(*) FROM {parts['events']}")
                kept = 0
                drop = kept_runs == 0 and not await _any_kept(
                    conn, schema, parts["runs"], cutoff, statuses
                )
                if not drop:
                    kept = await conn.fetchval(
                        f"SELECT count(*) FROM {parts['runs']} r WHERE NOT {_prunable(schema)}",
                        cutoff,
                        statuses,
                    )
                    if kept > runs - kept:
                        return None
                await _release_keys(conn, schema, parts["runs"], cutoff, statuses, release)
                if drop:
                    for part in parts.values():
                        await conn.execute(f"DROP TABLE {part}")
                    return runs, events
                kept_events = await _compact(conn, schema, day, cutoff, statuses)
            return runs - kept, events - kept_events
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            if attempt == _LOCK_ATTEMPTS - 1:  # left for the next prune; the rest goes on
                logger.warning("prune_day_skipped", day=str(day), error_type=type(exc).__name__)
                return None
            await anyio.sleep(0.5 * (attempt + 1))
    return None


async def _release_keys(
    conn: Conn, schema: str, runs: str, cutoff: datetime, statuses: list[str], release: ReleaseKey
) -> None:
    """The day's runs that go and still hold their key free it first, in the day's
    transaction: the oldest run queued for it goes on once the day is gone."""
    for row in await conn.fetch(
        f"SELECT r.id FROM {runs} r WHERE r.key_state = 'held' AND {_prunable(schema)}",
        cutoff,
        statuses,
    ):
        await release(conn, row["id"])


async def _compact(
    conn: Conn, schema: str, day: date, cutoff: datetime, statuses: list[str]
) -> int:
    """Replace the day's partitions with copies holding only its kept runs and their
    rows; returns the kept runs' events."""
    s = quote_ident(schema)
    fresh = {t: f"{s}.{quote_ident(partition(t, day) + '_new')}" for t, _ in TABLES}
    old = {t: f"{s}.{quote_ident(partition(t, day))}" for t, _ in TABLES}
    kept_events = 0
    for table, key in TABLES:
        await _create_like(conn, schema, table, fresh[table])
        if table == "runs":
            status = await conn.execute(
                f"INSERT INTO {fresh[table]} SELECT r.* FROM {old[table]} r "
                f"WHERE NOT {_prunable(schema)}",
                cutoff,
                statuses,
            )
        else:
            status = await conn.execute(
                f"INSERT INTO {fresh[table]} SELECT x.* FROM {old[table]} x "
                f"WHERE x.{key} IN (SELECT id FROM {fresh['runs']})"
            )
        if table == "events":
            kept_events = int(status.split()[-1])
    await conn.execute(_key_index(schema, day, "_new"))
    for table, _ in TABLES:
        name = quote_ident(partition(table, day))
        await conn.execute(f"DROP TABLE {old[table]}")
        if table == "runs":
            key_index = partition(table, day) + "_idempotency_key"
            await conn.execute(
                f"ALTER INDEX {s}.{quote_ident(partition(table, day) + '_new_idempotency_key')} "
                f"RENAME TO {quote_ident(key_index)}"
            )
        await conn.execute(f"ALTER TABLE {fresh[table]} RENAME TO {name}")
        await _attach(conn, schema, table, f"{s}.{name}", day)
    return kept_events
