"""Retention at its edges: keys freed only with the runs a prune deletes, exact counts
under races, a locked day left for the next prune, and `saga migrate` while another
process creates a day."""

from __future__ import annotations

import contextlib
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from saga import _partitions as partitions
from saga._partitions import partition
from tests._sagas import Fail, Job, parked_saga, permanent, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory
from tests.test_partitions import _backdate, _past_day

TABLES = [t for t, _ in partitions.TABLES]


def _today() -> date:
    return datetime.now(UTC).date()


async def _ended(run: saga.RunHandle) -> saga.RunStatus:
    with anyio.fail_after(20):
        with contextlib.suppress(saga.RunError):
            await run.result()
    return (await run.info()).status


def _undo_broken() -> Fail:
    return Fail(saga.PermanentError, "undo broken", None, lambda ctx: True)


async def test_a_whole_days_prune_frees_no_key_of_a_run_it_does_not_delete(
    orchestrator: OrchestratorFactory,
) -> None:
    """Promise (README, Operator API): "A failed or stopped run still holding its
    concurrency key frees it first" -- for a run prune deletes -- and `whole_days=True`
    deletes nothing row by row: "a run stays until its whole day has passed".

    A failed run of today holds its key; `prune(status=["failed"], whole_days=True)`
    cannot drop today's day, so it deletes nothing. Yet the run's key is released: the
    run stays failed and unresolved (in `needs_attention`), but can no longer be retried
    (InvalidRunStateError), and the run queued behind its key is admitted."""
    s = small_saga(
        "wholekey", ["debit", "credit"], compensate={"debit"},
        fail={"credit": permanent("no", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={"debit": _undo_broken()},
        undo_retry=saga.Retry(max_attempts=1), traffic={"concurrency_key": lambda job: "acct"},
    )  # fmt: skip
    orch = await orchestrator(s, concurrency=8)
    failing = await orch.start(s, Job(n=1))
    assert await _ended(failing) is saga.RunStatus.FAILED
    waiting = await orch.start(s, Job(n=2))
    await anyio.sleep(0.3)
    assert (await waiting.info()).waiting_for_key

    result = await saga.prune(orch, older_than=timedelta(0), status=["failed"], whole_days=True)

    assert (result.runs, result.days, result.batches) == (0, 0, 0)  # nothing deleted
    info = await failing.info()
    assert info.status is saga.RunStatus.FAILED
    # The run prune did not delete must be as it was: still holding its key, retryable.
    await anyio.sleep(0.3)
    problems = []
    if not (await waiting.info()).waiting_for_key:
        problems.append("the run queued behind the key was admitted")
    try:
        await failing.retry(note="bank is back")
    except saga.InvalidRunStateError as exc:
        problems.append(f"the failed run can no longer be retried: {exc}")
    assert not problems, problems


async def test_a_compacted_days_event_count_includes_events_written_before_its_lock(
    orchestrator: OrchestratorFactory,
    open_client: ClientFactory,
    db: asyncpg.Connection,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Promise: `PruneResult` says what prune deleted ("What :func:`prune` deleted";
    README: `prune(...) -> PruneResult (runs, events, ...)`), and the code's own comment:
    the kept runs' events "are counted under the lock, as they are copied".

    A day is compacted: 5 finished runs go, an active run stays. The active run writes 3
    events after prune counted the day's events but before it locks the day (simulated
    by a hook at the start of the day's transaction: a worker's step events). The 5
    runs' events are all deleted, but `result.events` is short by the 3 new events of
    the kept run (events are counted for the whole partition before the lock and the
    kept ones subtracted after it)."""
    quick = small_saga("quick", 2)
    orch = await orchestrator(quick)
    done = [await orch.start(quick, Job(n=i)) for i in range(5)]
    for run in done:
        await run.result(timeout=20)
    parked = parked_saga()
    client = await open_client(parked)
    active = await client.start(parked, Job(n=1))
    await _past_day(dsn, 40)
    gone = [await _backdate(db, r.id, 40) for r in done]
    active_id = await _backdate(db, active.id, 40)
    gone_events = await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", gone)

    original = partitions._serialize
    fired = []

    async def racing_serialize(conn: Any, schema: str) -> None:
        if not fired:
            fired.append(True)
            for _ in range(3):  # the active run goes on meanwhile
                await db.execute(
                    "INSERT INTO saga.events (run_id, kind, step) "
                    "VALUES ($1, 'step_started', 's1')",
                    active_id,
                )
        await original(conn, schema)

    monkeypatch.setattr(partitions, "_serialize", racing_serialize)
    with anyio.fail_after(30):
        result = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)

    assert fired
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", gone) == 0
    assert result.days == 1
    assert result.runs == 5
    assert result.events == gone_events, (result.events, gone_events)


async def test_a_dropped_days_event_count_includes_a_refused_signal_written_before_its_lock(
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Promise: `PruneResult.events` is what prune deleted; the code assumes "finished
    runs get no new events" (saga/_partitions.py:_prune_day). README says otherwise:
    signalling a run that ended records `signal_refused` in its history.

    A day of finished runs is dropped whole; an operator signals one of them after the
    prune counted the day's events and before it locked the day (hook at the start of
    the day's transaction). The refused signal's event is dropped with the day, but
    `result.events` does not count it."""
    quick = small_saga("quick", 2)
    orch = await orchestrator(quick)
    done = [await orch.start(quick, Job(n=i)) for i in range(3)]
    for run in done:
        await run.result(timeout=20)
    await _past_day(dsn, 40)
    gone = [await _backdate(db, r.id, 40) for r in done]

    original = partitions._serialize
    fired = []

    async def racing_serialize(conn: Any, schema: str) -> None:
        if not fired:
            fired.append(True)
            await db.execute(  # what a refused signal writes (signal_refused), in short
                "INSERT INTO saga.events (run_id, kind, data) VALUES ($1, 'signal_refused',"
                ' \'{"signal": "approve", "reason": "ended"}\')',
                gone[0],
            )
        await original(conn, schema)

    monkeypatch.setattr(partitions, "_serialize", racing_serialize)
    before = await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", gone)
    with anyio.fail_after(30):
        result = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)

    assert fired
    assert result.days == 1
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", gone) == 0
    assert result.events == before + 1, (result.events, before + 1)


async def test_a_locked_day_is_left_for_the_next_prune_and_the_rest_goes_on(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """Promise (saga/_partitions.py, module docstring): "Each day is one short
    transaction ... with a lock timeout: a day that cannot be locked now is left for the
    next prune"; README: the rest goes in row-by-row batches.

    An old day's runs all finished long ago; another session holds a plain read lock on
    that day's events partition for a few seconds (an open transaction that read them).
    Instead of leaving the day and pruning the rest row by row, prune raises after its
    three tries, and a prunable run of another (recent) day is not deleted either."""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick)
    runs = [await orch.start(quick, Job(n=i)) for i in range(3)]
    for run in runs:
        await run.result(timeout=20)
    day = await _past_day(dsn, 40)
    await _backdate(db, runs[0].id, 40)
    await _backdate(db, runs[1].id, 40)
    other = await _backdate(db, runs[2].id, 0)  # today's, finished: row by row with older_than=0
    await db.execute(
        "UPDATE saga.runs SET finished_at = now() - interval '1 hour' WHERE id = $1", other
    )

    reader = await asyncpg.connect(dsn)
    try:
        tx = reader.transaction()
        await tx.start()
        await reader.fetchval(f"SELECT count(*) FROM saga.{partition('events', day)}")
        with anyio.fail_after(30):
            result = await saga.prune(orch, older_than=timedelta(minutes=1))
        await tx.rollback()
    finally:
        await reader.close()
    assert result.runs >= 1
    assert await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = $1", other) == 0


async def test_migrate_waits_for_another_process_creating_a_day(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Promise: migrate() is "Safe to run from several processes at once"; README:
    migrations run "under a transaction-scoped advisory lock, so processes starting
    together migrate safely", and `saga migrate` creates the coming days' partitions.

    The day after tomorrow has no partitions yet (as every day, before the first
    process creates it). Another process is creating a day: it holds the partitions'
    advisory lock for 1.5 s (what creating a day does on an installation whose DEFAULT
    partitions hold the runs from before 0009: "0.3 s per million old runs", per table).
    `saga.migrate` run meanwhile -- nothing to migrate -- raises instead of waiting (or
    leaving the day to the other process)."""
    far = _today() + timedelta(days=partitions.DAYS_AHEAD)
    async with db.transaction():
        for table in TABLES:
            await db.execute(f"DROP TABLE saga.{partition(table, far)}")
    other = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "saga.partitions:saga")

        async def release_later() -> None:
            await anyio.sleep(1.5)
            await tx.commit()

        async with anyio.create_task_group() as tg:
            tg.start_soon(release_later)
            with anyio.fail_after(30):
                applied = await saga.migrate(dsn)
    finally:
        await other.close()
    assert applied == []
    assert far in await partitions.days(db, "saga")


async def test_prune_drops_a_past_day_that_holds_no_run(
    open_client: ClientFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README, Retention: "`saga prune` (and `saga.prune`) drops a day when all its runs
    finished more than `--older-than` ago in a pruned status", and orchestrators create
    the next days' partitions ahead whatever the traffic.

    A past day with no run in it (a quiet day whose partitions were created ahead, or
    one pruned row by row) is dropped too, and the dry run counts it. Before, a day
    where nothing "goes" was skipped: its four tables stayed for ever."""
    day = datetime.now(UTC).date() - timedelta(days=40)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        assert await partitions._create_day(pool, "saga", day)  # created ahead, back then
    finally:
        await pool.close()
    quick = small_saga("quick", 1)
    client = await open_client(quick)
    # Today's runs, pruned row by row the same day, leave today's partitions just as empty.
    assert await db.fetchval(f"SELECT count(*) FROM saga.{partitions.partition('runs', day)}") == 0

    dry = await saga.prune(client, older_than=timedelta(days=30), whole_days=True, dry_run=True)
    whole = await saga.prune(client, older_than=timedelta(days=30), whole_days=True)
    rows = await saga.prune(client, older_than=timedelta(days=30))

    left = day in await partitions.days(db, "saga")
    assert not left, (
        f"the empty day {day} (40 days ago) is still there after prune --older-than 30d "
        f"(dry run days={dry.days}, --whole-days days={whole.days}, default days={rows.days})"
    )


@pytest.mark.parametrize("status", [None, [], ()], ids=["none", "empty_list", "empty_tuple"])
async def test_prune_without_statuses_is_a_clear_configuration_error(
    open_client: ClientFactory, status: Any
) -> None:
    """README, Operator API: `prune(orch, *, older_than, status=(completed, compensated,
    cancelled), ...)`; DESIGN: "Bad input gets a clear error".

    `status=None` or an empty collection is a ConfigurationError saying that prune needs
    the final statuses it deletes, and nothing is deleted. Before, None raised a bare
    AssertionError, and an empty list advised passing None."""
    client = await open_client(small_saga("quick", 1))
    with pytest.raises(saga.ConfigurationError, match="final statuses prune deletes") as refused:
        await saga.prune(client, older_than=timedelta(days=1), status=status)
    assert "pass None" not in str(refused.value)
