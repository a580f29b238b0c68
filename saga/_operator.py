"""Operator actions as a Python API: list, count and prune runs, migrate.

The ``saga`` command line is a thin layer over these functions, so whatever an operator
does at a shell a script can do from Python with the same semantics. They take an open
:class:`~saga.Client` (an :class:`~saga.Orchestrator` is one too); cancelling and
retrying a run are :meth:`RunHandle.cancel` and :meth:`RunHandle.retry` on
``client.get_run(run_id)``, and a run's timeline is :func:`saga.timeline` of its history.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from saga import _checks
from saga._checks import show
from saga._client import Client, store_of
from saga._db import check_dsn_or_pool, close_pool, open_pool, validate_schema
from saga._errors import ConfigurationError, RunNotFoundError
from saga._migrate import migrate as _migrate
from saga._model import RunInfo, RunStatus
from saga._store_ops import Position

#: Largest page :func:`list_runs` returns.
MAX_PAGE_SIZE = 1000

#: What :func:`prune` deletes unless told otherwise: failed runs wait for an operator, so
#: they are kept until asked for explicitly.
PRUNABLE_BY_DEFAULT = (RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class RunPage:
    """One page of :func:`list_runs`, newest first.

    ``next_before`` is the cursor for the next (older) page, to pass as ``before=``;
    ``None`` when this page is the last.
    """

    runs: list[RunInfo]
    next_before: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What :func:`prune` deleted (or, with ``dry_run=True``, would delete)."""

    runs: int
    events: int
    batches: int  # row-by-row batches
    dry_run: bool
    days: int = 0  # whole days dropped (or compacted) at once, before the batches
    keys: int = 0  # concurrency keys no run holds or waits for any more, deleted last


def _seconds(name: str, value: timedelta | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, timedelta):
        raise ConfigurationError(f"{name} must be a datetime.timedelta, got {show(value)}")
    seconds = value.total_seconds()
    if seconds < 0:
        raise ConfigurationError(f"{name} must not be negative, got {value}")
    if seconds > _checks.MAX_AGE_SECONDS:
        raise ConfigurationError(f"{name} must be at most 1,000 years, got {value}")
    return seconds


#: A filter on a run's creation time: an age (by the database's clock) or a time.
Age = timedelta | datetime


def _bound(name: str, value: Age | None) -> float | datetime | None:
    """An age (seconds) or a time (UTC) for the store, from a filter argument."""
    if not isinstance(value, datetime):
        if value is not None and not isinstance(value, timedelta):
            raise ConfigurationError(
                f"{name} must be a datetime.timedelta (an age) or an aware datetime, "
                f"got {show(value)}"
            )
        return _seconds(name, value)
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigurationError(
            f"{name} must be a timezone-aware datetime (or a timedelta), got {value!r}"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:  # datetime(1, 1, 1, tzinfo=+01:00) is before the first day
        raise ConfigurationError(f"{name} is out of range, got {value!r}") from None


def _check_text(name: str, value: str | None) -> None:
    """A saga name or key to look up: a non-empty str the database can hold."""
    if value is not None and (
        not isinstance(value, str) or not value or "\x00" in value or not _encodable(value)
    ):
        raise ConfigurationError(f"{name} must be a non-empty str without NUL, got {show(value)}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # fails on lone surrogates (undecodable command-line bytes)
    except UnicodeEncodeError:
        return False
    return True


def _statuses(
    values: Iterable[RunStatus | str] | RunStatus | str | None,
    empty: str = "status filter is empty; pass None to list every status",
) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):  # RunStatus is a str too
        values = [values]
    if not isinstance(values, Iterable):
        raise ConfigurationError(
            f"status must be a run status or an iterable of them, got {show(values)}"
        )
    out: list[str] = []
    for value in values:
        try:
            out.append(RunStatus(value).value)
        except ValueError:
            known = ", ".join(s.value for s in RunStatus)
            raise ConfigurationError(f"unknown run status {value!r}; use one of: {known}") from None
    if not out:
        raise ConfigurationError(empty)
    return sorted(set(out))


async def list_runs(
    client: Client,
    *,
    saga: str | None = None,
    status: Iterable[RunStatus | str] | RunStatus | str | None = None,
    older_than: Age | None = None,
    newer_than: Age | None = None,
    before: uuid.UUID | str | None = None,
    limit: int = 50,
    key: str | None = None,
) -> RunPage:
    """List runs newest first (by creation time), with optional filters, one page at a time.

    ``saga`` filters by saga name; ``status`` by one or several states; ``older_than`` /
    ``newer_than`` by age (a timedelta: created at least / at most that long ago, by the
    database clock) or by time (an aware datetime: created at or before / at or after
    it); ``key`` by idempotency key (the business id given to ``start(key=...)``, an
    exact match: at most one run per saga, found through the unique index on (saga, key)
    with or without ``saga``). Pages are keyset-paged: pass the previous page's
    ``next_before`` as ``before`` to get the next one, which stays correct while runs are
    being added or pruned. The cost is bounded by the active runs plus the page, however
    many finished runs exist.

    Raises :class:`ConfigurationError` for a bad argument and :class:`RunNotFoundError`
    when ``before`` names no run.
    """
    return await runs_page(
        client,
        saga=saga,
        status=status,
        older_than=older_than,
        newer_than=newer_than,
        before=before,
        limit=limit,
        key=key,
    )


async def runs_page(
    client: Client,
    *,
    saga: str | None,
    status: Iterable[RunStatus | str] | RunStatus | str | None,
    older_than: Age | None,
    newer_than: Age | None,
    before: uuid.UUID | str | Position | None,
    limit: int,
    key: str | None,
) -> RunPage:
    """:func:`list_runs`, whose ``before`` may also be a :class:`Position`: the place of
    the last run of the page before, which need not exist any more (a prune may have
    deleted it since; a run id must name a run)."""
    store = store_of(client)
    _check_text("saga", saga)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise ConfigurationError(
            f"limit must be an int from 1 to {MAX_PAGE_SIZE}, got {show(limit)}"
        )
    _check_text("key", key)
    position = before if isinstance(before, Position) else None
    cursor = None
    if before is not None and position is None:
        cursor = _checks.run_id(before, ConfigurationError)
    statuses = _statuses(status)
    older = _bound("older_than", older_than)
    newer = _bound("newer_than", newer_than)
    if cursor is not None:
        position = await store.position(cursor)
        if position is None:
            raise RunNotFoundError(cursor)

    async def fetch(saga_name: str | None) -> list[RunInfo]:
        return await store.list_runs(
            saga_name=saga_name,
            statuses=statuses,
            older_than=older,
            newer_than=newer,
            before=position,
            limit=limit + 1,  # one more tells whether another page follows
            key=key,
        )

    if key is None:
        records = await fetch(saga)
    else:
        # Keys are unique per saga: find the sagas holding this one through the index,
        # then filter and page within each, one index probe apiece.
        records = []
        for name in sorted({name for _, name in await store.find_runs_by_key(key, saga)}):
            records += await fetch(name)
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    runs = records[:limit]
    return RunPage(runs=runs, next_before=runs[-1].id if len(records) > limit else None)


async def count_runs(
    client: Client,
    *,
    saga: str | None = None,
    older_than: Age | None = None,
    newer_than: Age | None = None,
) -> dict[RunStatus, int]:
    """How many runs are in each state: every :class:`RunStatus` is a key, 0 when none.

    ``saga`` counts one saga's runs only; ``older_than`` / ``newer_than`` only runs
    created at least / at most that long ago (by the database clock), or at or before /
    at or after a time, as in :func:`list_runs`. What it costs: one statement that reads
    every matching run, finished ones included, so its time grows with the table (prune
    keeps it small).
    For a frequent, cheap view of the active runs, use the orchestrators' metrics.

    Raises :class:`ConfigurationError` for a bad argument.
    """
    totals = dict.fromkeys(RunStatus, 0)
    counts = await count_runs_by_saga(
        client, saga=saga, older_than=older_than, newer_than=newer_than
    )
    for by_status in counts.values():
        for status, runs in by_status.items():
            totals[status] += runs
    return totals


async def count_runs_by_saga(
    client: Client,
    *,
    saga: str | None = None,
    older_than: Age | None = None,
    newer_than: Age | None = None,
) -> dict[str, dict[RunStatus, int]]:
    """:func:`count_runs` per saga name, in name order (what ``saga stats`` prints); a
    saga with no matching run is absent."""
    store = store_of(client)
    _check_text("saga", saga)
    rows = await store.count_runs(
        saga_name=saga,
        older_than=_bound("older_than", older_than),
        newer_than=_bound("newer_than", newer_than),
    )
    counts: dict[str, dict[RunStatus, int]] = {}
    for name, status, runs in rows:
        counts.setdefault(name, dict.fromkeys(RunStatus, 0))[RunStatus(status)] = runs
    return counts


async def prune(
    client: Client,
    *,
    older_than: timedelta,
    status: Iterable[RunStatus | str] | RunStatus | str = PRUNABLE_BY_DEFAULT,
    batch_size: int = 1000,
    dry_run: bool = False,
    whole_days: bool = False,
) -> PruneResult:
    """Delete finished runs that ended more than ``older_than`` ago, with their history.

    Only terminal states can be pruned; by default ``completed``, ``compensated`` and
    ``cancelled`` (add ``failed`` to ``status`` to prune runs that waited for an operator
    too); a child saga's run goes only with its parent, or once its parent is gone.
    Runs and their history are partitioned by the UTC day they started on. First,
    every day that ended more than ``older_than`` ago goes at once, oldest first: its
    partitions are dropped when all its runs go, or replaced by copies of the runs it
    keeps when at least half go (no row-by-row delete: nothing left for autovacuum).
    Then the remaining runs to prune go row by row, oldest first, ``batch_size`` per
    transaction, each batch one short statement that skips rows another transaction
    holds; ``whole_days=True`` skips that pass (a run then stays until its whole day
    goes). ``dry_run=True`` only counts (with ``whole_days``, the whole days only). Safe
    to run from several processes at once, and to interrupt: every day and every batch
    is complete or absent. A run pruned while it still holds its concurrency key (failed
    or stopped, never resolved) frees the key first, as ``resolve()`` does: the oldest
    run queued for the key goes on. Last, the concurrency keys no run holds or waits for
    any more go too (``keys``; a dry run counts those unused now).
    """
    store = store_of(client)
    seconds = _seconds("older_than", older_than)
    if seconds is None:
        raise ConfigurationError("older_than is required")
    named = (
        "status must name the final statuses prune deletes (default: completed, "
        "compensated, cancelled)"
    )
    if status is None:
        raise ConfigurationError(f"{named}, got None")
    statuses = _statuses(status, empty=f"{named}, got none")
    assert statuses is not None
    active = [s for s in statuses if not RunStatus(s).is_terminal]
    if active:
        raise ConfigurationError(
            f"only finished runs can be pruned; {', '.join(active)} is not a final status"
        )
    _check_prune_options(batch_size, whole_days=whole_days, dry_run=dry_run)
    cutoff = await store.prune_cutoff(seconds)  # one instant for every pass
    if dry_run and whole_days:
        days = await store.prune_days(cutoff, statuses, dry_run=True)
        keys = await store.count_unused_keys()
        return PruneResult(days.runs, days.events, 0, True, days.days, keys)
    if dry_run:  # both passes together take every prunable run
        runs, events = await store.count_prunable(cutoff, statuses)
        keys = await store.count_unused_keys()
        return PruneResult(runs=runs, events=events, batches=0, dry_run=True, keys=keys)
    held = (0, 0)
    if not whole_days:  # (a whole day frees its own runs' keys as it drops them)
        held = await store.prune_key_holders(cutoff, statuses)
    days = await store.prune_days(cutoff, statuses)
    total_runs, total_events, batches = days.runs + held[0], days.events + held[1], 0
    while not whole_days:
        # Until nothing is left: a child goes in a batch after its parent's, and one
        # still holding its key (freed by the key holders' pass) once its parent went.
        runs, events = await store.prune_runs(cutoff, statuses, batch_size)
        if runs:
            batches += 1
        else:
            runs, events = await store.prune_key_holders(cutoff, statuses)
            if not runs:
                break
        total_runs += runs
        total_events += events
    keys = await store.prune_keys(batch_size)  # (a run pruned holding its key freed it)
    return PruneResult(total_runs, total_events, batches, False, days.days, keys)


def _check_prune_options(batch_size: object, **flags: object) -> None:
    if (
        not isinstance(batch_size, int)
        or isinstance(batch_size, bool)
        or not 1 <= batch_size <= 100_000
    ):
        raise ConfigurationError(
            f"batch_size must be an int from 1 to 100000, got {show(batch_size)}"
        )
    for name, flag in flags.items():
        if not isinstance(flag, bool):  # "false", 0 or None must not turn deleting on
            raise ConfigurationError(f"{name} must be a bool, got {show(flag)}")


async def migrate(dsn_or_pool: str | asyncpg.Pool, *, schema: str = "saga") -> list[int]:
    """Apply the pending schema migrations; return the versions applied now.

    What ``Orchestrator(..., migrate=True)`` does on open, for deployments that migrate
    in a separate step (``saga migrate``) and open orchestrators with ``migrate=False``.
    Safe to run from several processes at once.
    """
    schema = validate_schema(schema)
    check_dsn_or_pool(dsn_or_pool, min_size=1)
    if isinstance(dsn_or_pool, asyncpg.Pool):
        return await _migrate(dsn_or_pool, schema)
    pool = await open_pool(dsn_or_pool, 1)
    try:
        return await _migrate(pool, schema)
    finally:
        await close_pool(pool)
