"""The operator API (saga.list_runs, saga.prune, saga.timeline, saga.migrate) on a real
PostgreSQL."""

from __future__ import annotations

import contextlib
import uuid
from datetime import timedelta

import asyncpg
import pytest

import saga
from tests._sagas import ONCE, Fail, Job, parked_saga, permanent, small_saga, transient
from tests.conftest import ClientFactory, OrchestratorFactory


def quick_saga(name: str = "quick") -> saga.Saga[Job]:
    """Two steps, the first with a compensation; ``fail`` names what fails: ``first-once``
    (a transient error), ``second`` (permanent), ``undo`` (the compensation gives up)."""
    return small_saga(
        name,
        ["first", "second"],
        compensate={"first"},
        fail={
            "first": transient(
                1, ConnectionError, "flaky network", when=lambda c: c.input.fail == "first-once"
            ),
            "second": permanent("second refused", when=lambda c: "second" in c.input.fail),
        },
        fail_undo={
            "first": Fail(RuntimeError, "undo broke", when=lambda c: "undo" in c.input.fail)
        },
        result={"first": lambda c: c.input.n, "second": lambda c: c.input.n * 2},
        undo_retry=ONCE,
    )


async def age(db: asyncpg.Connection, run_id: uuid.UUID, created: float, finished: float) -> None:
    """Pretend the run was created/finished that many seconds ago (finished only if so)."""
    await db.execute(
        "UPDATE saga.runs SET created_at = now() - make_interval(secs => $2),"
        " finished_at = CASE WHEN finished_at IS NULL THEN NULL"
        " ELSE now() - make_interval(secs => $3) END WHERE id = $1",
        run_id,
        created,
        finished,
    )


async def finished_runs(
    orchestrator: OrchestratorFactory, count: int, **job: object
) -> tuple[saga.Orchestrator, list[saga.RunHandle]]:
    quick = quick_saga()
    orch = await orchestrator(quick, concurrency=4)
    runs = [await orch.start(quick, Job(n=i, **job)) for i in range(count)]  # type: ignore[arg-type]
    for run in runs:
        with contextlib.suppress(saga.RunError):
            await run.result(timeout=20)
    return orch, runs


async def test_list_runs_pages_newest_first_over_active_and_finished_runs(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """Runs come newest first by creation time, active and finished ones interleaved;
    following next_before visits every run exactly once, and the last page says so."""
    orch, done = await finished_runs(orchestrator, 4)
    parked = parked_saga()
    client = await open_client(parked)
    pending = [await client.start(parked, Job(n=i)) for i in range(3)]
    # Interleave ages: finished and active runs alternate in creation order.
    ordered = [done[0], pending[0], done[1], pending[1], done[2], pending[2], done[3]]
    for rank, run in enumerate(ordered):  # rank 0 is the newest
        await age(db, run.id, created=10 + rank, finished=1)

    seen: list[uuid.UUID] = []
    before = None
    pages = 0
    while True:
        page = await saga.list_runs(client, limit=3, before=before)
        pages += 1
        seen += [r.id for r in page.runs]
        if page.next_before is None:
            break
        assert page.next_before == page.runs[-1].id
        before = page.next_before
    assert seen == [r.id for r in ordered]
    assert pages == 3
    everything = await saga.list_runs(orch, limit=1000)
    assert [r.id for r in everything.runs] == seen
    assert everything.next_before is None


async def test_list_runs_filters_by_saga_status_and_age(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """saga=, status= (one or several) and older_than/newer_than (by the database
    clock) select exactly the matching runs, and combine."""
    orch, done = await finished_runs(orchestrator, 3)
    parked = parked_saga()
    client = await open_client(parked)
    waiting = await client.start(parked, Job(n=1))
    await age(db, done[0].id, created=3 * 86400, finished=3 * 86400)
    await age(db, done[1].id, created=2 * 3600, finished=2 * 3600)

    async def ids(**filters: object) -> set[uuid.UUID]:
        page = await saga.list_runs(client, **filters)  # type: ignore[arg-type]
        return {r.id for r in page.runs}

    assert await ids(saga="parked") == {waiting.id}
    assert await ids(saga="quick") == {r.id for r in done}
    assert await ids(saga="nope") == set()
    assert await ids(status="pending") == {waiting.id}
    assert await ids(status=saga.RunStatus.COMPLETED) == {r.id for r in done}
    assert await ids(status=["pending", "completed"]) == {waiting.id, *(r.id for r in done)}
    assert await ids(older_than=timedelta(days=1)) == {done[0].id}
    assert await ids(older_than=timedelta(hours=1)) == {done[0].id, done[1].id}
    assert await ids(newer_than=timedelta(hours=1)) == {done[2].id, waiting.id}
    assert await ids(older_than=timedelta(hours=1), newer_than=timedelta(days=1)) == {done[1].id}
    assert await ids(saga="quick", newer_than=timedelta(minutes=5)) == {done[2].id}
    [info] = (await saga.list_runs(orch, status="pending")).runs
    assert info.saga == "parked"
    assert info.status is saga.RunStatus.PENDING


async def test_list_runs_rejects_bad_arguments_clearly(open_client: ClientFactory) -> None:
    """Unknown statuses, out-of-range limits, negative ages, malformed cursors raise
    ConfigurationError naming the problem; a cursor naming no run raises
    RunNotFoundError."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match="unknown run status 'done'"):
        await saga.list_runs(client, status="done")
    with pytest.raises(saga.ConfigurationError, match="limit"):
        await saga.list_runs(client, limit=0)
    with pytest.raises(saga.ConfigurationError, match="limit"):
        await saga.list_runs(client, limit=1001)
    with pytest.raises(saga.ConfigurationError, match="must not be negative"):
        await saga.list_runs(client, older_than=timedelta(seconds=-1))
    with pytest.raises(saga.ConfigurationError, match="not a run id"):
        await saga.list_runs(client, before="not-a-uuid")
    with pytest.raises(saga.RunNotFoundError):
        await saga.list_runs(client, before=uuid.uuid4())


async def test_prune_deletes_old_finished_runs_and_their_events_in_batches(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """prune() deletes the finished runs that ended before the cutoff, and all their
    events, in batches; recent finished runs, active runs and (by default) failed runs
    stay, with their histories intact; a dry run counts the same without deleting."""
    orch, old = await finished_runs(orchestrator, 5)
    _, recent = await finished_runs(orchestrator, 1)
    _, failed = await finished_runs(orchestrator, 1, fail="second,undo")  # undo fails: failed
    _, compensated = await finished_runs(orchestrator, 1, fail="second")
    assert await failed[0].status() is saga.RunStatus.FAILED
    parked = parked_saga()
    client = await open_client(parked)
    active = await client.start(parked, Job(n=1))
    for run in [*old, *failed, *compensated, active]:
        await age(db, run.id, created=40 * 86400, finished=31 * 86400)
    doomed = [r.id for r in [*old, *compensated]]
    doomed_events = await db.fetchval(
        "SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", doomed
    )
    total_events = await db.fetchval("SELECT count(*) FROM saga.events")

    dry = await saga.prune(client, older_than=timedelta(days=30), dry_run=True)
    assert (dry.runs, dry.events, dry.dry_run) == (6, doomed_events, True)
    assert await db.fetchval("SELECT count(*) FROM saga.events") == total_events

    result = await saga.prune(client, older_than=timedelta(days=30), batch_size=2)
    assert (result.runs, result.events, result.batches) == (6, doomed_events, 3)
    assert not result.dry_run
    left = {r["id"] for r in await db.fetch("SELECT id FROM saga.runs")}
    assert left == {recent[0].id, failed[0].id, active.id}
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", doomed) == 0
    assert await db.fetchval("SELECT count(*) FROM saga.events") == total_events - doomed_events
    for run in (recent[0], failed[0], active):  # histories of the survivors are whole
        assert (await orch.get_run(run.id).history())[0].kind == "run_started"

    again = await saga.prune(client, older_than=timedelta(days=30))
    assert (again.runs, again.events, again.batches) == (0, 0, 0)
    with_failed = await saga.prune(
        client, older_than=timedelta(days=30), status=["failed", "completed"]
    )
    assert with_failed.runs == 1
    assert {r["id"] for r in await db.fetch("SELECT id FROM saga.runs")} == {
        recent[0].id,
        active.id,
    }


async def test_prune_refuses_active_statuses_and_bad_arguments(open_client: ClientFactory) -> None:
    """Only final states can be pruned; a negative age or a bad batch size is refused
    before anything is deleted."""
    client = await open_client()
    with pytest.raises(saga.ConfigurationError, match="only finished runs"):
        await saga.prune(client, older_than=timedelta(days=1), status=["running"])
    with pytest.raises(saga.ConfigurationError, match="must not be negative"):
        await saga.prune(client, older_than=timedelta(days=-1))
    with pytest.raises(saga.ConfigurationError, match="batch_size"):
        await saga.prune(client, older_than=timedelta(days=1), batch_size=0)


async def test_timeline_lists_every_attempt_with_worker_outcome_and_error(
    orchestrator: OrchestratorFactory,
) -> None:
    """timeline() turns a history into attempts: a transient failure with its retry
    delay, the successful retry, the permanent failure, and the compensation, each with
    its worker, times and duration, in the order they started."""
    quick = quick_saga()
    orch = await orchestrator(quick, concurrency=2)

    run = await orch.start(quick, Job(n=1, fail="first-once"))
    await run.result(timeout=20)
    attempts = saga.timeline(await run.history())
    assert [(a.step, a.compensation, a.attempt, a.outcome) for a in attempts] == [
        ("first", False, 1, "failed"),
        ("first", False, 2, "completed"),
        ("second", False, 1, "completed"),
    ]
    flaky = attempts[0]
    assert flaky.error is not None
    assert flaky.error.type == "ConnectionError"
    assert flaky.retry_in is not None
    assert flaky.worker == orch.worker_id
    assert all(a.duration is not None and a.duration >= 0 for a in attempts)

    run = await orch.start(quick, Job(n=1, fail="second"))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=20)
    attempts = saga.timeline(await run.history())
    assert [(a.step, a.compensation, a.outcome) for a in attempts] == [
        ("first", False, "completed"),
        ("second", False, "failed"),
        ("first", True, "completed"),
    ]
    assert attempts[1].error is not None
    assert attempts[1].error.message == "second refused"
    assert attempts[1].retry_in is None


async def test_timeline_marks_expired_and_running_attempts() -> None:
    """An attempt whose lease expired ends 'lease_expired' (the compensation phase is
    told apart from the step phase), one with no outcome yet stays 'running'."""
    from datetime import UTC, datetime

    t = datetime(2024, 1, 1, tzinfo=UTC)

    def ev(seq: int, kind: str, step: str | None, attempt: int | None) -> saga.HistoryEvent:
        at = t + timedelta(seconds=seq)
        return saga.HistoryEvent(seq, at, kind, step, attempt, "w", {})

    history = [
        ev(1, "run_started", None, None),
        ev(2, "step_started", "a", 1),
        ev(3, "step_failed", "a", 1),
        ev(4, "run_compensating", None, None),
        ev(5, "compensation_started", "b", 1),
        ev(6, "lease_expired", "b", 1),
        ev(7, "compensation_started", "b", 2),
    ]
    attempts = saga.timeline(history)
    assert [(a.step, a.compensation, a.attempt, a.outcome) for a in attempts] == [
        ("a", False, 1, "failed"),
        ("b", True, 1, "lease_expired"),
        ("b", True, 2, "running"),
    ]
    assert attempts[1].duration == 1.0
    assert attempts[2].duration is None


async def test_migrate_applies_pending_migrations_once(dsn: str, db: asyncpg.Connection) -> None:
    """saga.migrate() creates a fresh schema (every migration, in order, the operator
    indexes included) and is a no-op the second time."""
    applied = await saga.migrate(dsn, schema="ops_schema")
    assert applied == sorted(applied)
    assert len(applied) >= 3
    assert await saga.migrate(dsn, schema="ops_schema") == []
    indexes = {
        r["indexname"]
        for r in await db.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'ops_schema'")
    }
    assert {"runs_finished_created", "runs_finished_at"} <= indexes
    with pytest.raises(saga.ConfigurationError):
        await saga.migrate(dsn, schema="Bad-Schema")
