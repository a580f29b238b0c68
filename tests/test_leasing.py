"""Leases, fencing, restarts and shutdown on a real PostgreSQL."""

from __future__ import annotations

import itertools
import uuid

import anyio
import asyncpg
import pytest

import saga
from saga._store import Store
from saga._transition import Transition
from saga.testing import Faults
from tests._harness import Children
from tests._relay import EFFECTS, relay
from tests._sagas import ONCE, Gate, Job, Ledger, parked_saga, small_saga, transient
from tests.conftest import ClientFactory, OrchestratorFactory


async def test_stale_fencing_token_write_changes_nothing(
    open_client: ClientFactory, store: Store, db: asyncpg.Connection
) -> None:
    """A transition written with an old lease token (or by another worker) is refused and
    leaves the run and its history untouched (private: the store's fenced write is what
    this checks)."""
    parked = parked_saga()
    client = await open_client(parked)
    run = await client.start(parked, Job(n=1))
    [item] = await store.claim("w1", 1, 30, [("parked", 1, parked.fingerprint)])
    before = await db.fetchrow("SELECT * FROM saga.runs WHERE id = $1", run.id)
    events_before = await db.fetchval("SELECT count(*) FROM saga.events")
    done = Transition(status=saga.RunStatus.COMPLETED, step=None, attempt=1, events=())
    assert await store.transition("w1", run.id, item.lease_token - 1, done) is None
    assert await store.transition("w2", run.id, item.lease_token, done) is None
    assert await db.fetchrow("SELECT * FROM saga.runs WHERE id = $1", run.id) == before
    assert await db.fetchval("SELECT count(*) FROM saga.events") == events_before
    # The holder's write goes through, exactly once.
    assert await store.transition("w1", run.id, item.lease_token, done) is not None
    assert await store.transition("w1", run.id, item.lease_token, done) is None


async def test_expired_lease_is_reclaimed_and_counts_as_an_attempt(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """A run whose worker vanished mid-step (its lease expired) is reclaimed by another
    orchestrator without help; the lost attempt counts, so a step that kills its worker on
    its last attempt fails for good and the completed steps are compensated."""
    ledger = Ledger()
    crashy = small_saga(
        "crashy",
        ["first", "kills_worker"],
        compensate={"first"},
        ledger=ledger,
        retry={"kills_worker": saga.Retry(max_attempts=2)},
        undo_retry=None,
    )
    client = await open_client(crashy)
    run = await client.start(crashy, Job(n=1))
    # Simulate: step 1 completed, and the worker running attempt 2 of step 2 died.
    await db.execute(
        """UPDATE saga.runs SET status = 'running', step_name = 'kills_worker', attempt = 2,
               results = '{"first": "\\"one\\""}', completed_steps = '{first}',
               lease_owner = 'dead-worker', lease_token = 7,
               due_at = now() - interval '1 second'
           WHERE id = $1""",
        run.id,
    )
    await orchestrator(crashy)
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=10)
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.AttemptLost"
    # No attempt of the step was left to run; the compensation got the stored result.
    assert [(c.phase, c.step, c.value) for c in ledger.calls] == [("compensation", "first", "one")]
    history = await run.history()
    expired = next(e for e in history if e.kind == "lease_expired")
    assert (expired.worker, expired.step, expired.attempt) == ("dead-worker", "kills_worker", 2)


async def test_lost_lease_cancels_the_running_step(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """When a heartbeat finds the lease taken over by another worker, this worker cancels
    the running step and writes nothing; the run is later reclaimed and completes."""
    cancelled = anyio.Event()
    entered = anyio.Event()
    attempts: list[int] = []
    longstep = saga.Saga("longstep", input=Job)

    @longstep.step()
    async def work(ctx: saga.Context[Job]) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            entered.set()
            try:
                await anyio.sleep(30)
            except BaseException:
                cancelled.set()
                raise
        return ctx.attempt

    await orchestrator(longstep, lease_seconds=0.6)
    run = await longstep.start(Job(n=1))
    with anyio.fail_after(5):
        await entered.wait()
    # Another worker takes the lease over, as its claim would: new owner, new token.
    await db.execute(
        "UPDATE saga.runs SET lease_token = lease_token + 1, lease_owner = 'thief',"
        " due_at = now() + interval '0.5 seconds' WHERE id = $1",
        run.id,
    )
    with anyio.fail_after(5):
        await cancelled.wait()
    assert await run.result(timeout=10) == 2
    assert attempts == [1, 2]


async def test_backoff_survives_an_orchestrator_restart(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A retry's wait lives in the database: after the orchestrator that scheduled it
    stops, a new one does not run the next attempt before the wait is over."""

    def patient(retry: saga.Retry) -> saga.Saga[Job]:
        return small_saga(
            "patient",
            ["call"],
            fail={"call": transient(1, ConnectionError, "try later")},
            retry=retry,
            result=lambda ctx: ctx.attempt,
        )

    scheduled = patient(saga.Retry(max_attempts=2, initial_delay=1.5, jitter=0))
    first = await orchestrator(scheduled)
    run = await scheduled.start(Job(n=1))
    failed_query = "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'step_failed'"
    with anyio.fail_after(5):
        while not await db.fetchval(failed_query, run.id):  # noqa: ASYNC110 - polling the DB
            await anyio.sleep(0.02)
    await first.aclose()

    second = await orchestrator(patient(saga.Retry(max_attempts=2)))
    assert await second.get_run(run.id).result(timeout=10) == 2
    gap = await db.fetchval(
        """SELECT extract(epoch FROM
               (SELECT at FROM saga.events WHERE run_id = $1 AND kind = 'step_started'
                ORDER BY id DESC LIMIT 1)
             - (SELECT at FROM saga.events WHERE run_id = $1 AND kind = 'step_failed'))""",
        run.id,
    )
    assert gap >= 1.5


async def test_shutdown_releases_leases_for_another_worker(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Closing an orchestrator whose step outlives shutdown_timeout cancels the step and
    releases its lease: another orchestrator takes the run at once, long before the lease
    would have expired, and the interrupted attempt is not counted."""
    gate = Gate("block", times=1)  # holds the first call for good; never released

    def sticky() -> saga.Saga[Job]:
        return small_saga("sticky", ["block"], gate=gate, retry=ONCE, result=lambda _: "done")

    held = sticky()
    first = await orchestrator(held, lease_seconds=60, shutdown_timeout=0.2)
    run = await held.start(Job(n=1))
    with anyio.fail_after(5):
        await gate.entered.wait()
    await first.aclose()
    row = await db.fetchrow("SELECT lease_owner, due_at <= now() AS due FROM saga.runs")
    assert row["lease_owner"] is None
    assert row["due"]
    second = await orchestrator(sticky(), lease_seconds=60)
    with anyio.fail_after(5):
        assert await second.get_run(run.id).result() == "done"
    history = await second.get_run(run.id).history()
    assert "lease_released" in [e.kind for e in history]
    assert [e.attempt for e in history if e.kind == "step_started"] == [1, 1]


async def test_lifecycle_errors(dsn: str) -> None:
    """Using an orchestrator before opening or after closing raises LifecycleError;
    closing twice is harmless; it cannot be reopened."""
    s = small_saga("life")
    orch = saga.Orchestrator(dsn, sagas=[s], concurrency=0)
    with pytest.raises(saga.LifecycleError):
        orch.get_run(uuid.uuid4())
    with pytest.raises(saga.DefinitionError, match="not registered with an open"):
        await s.start(Job(n=1))
    async with orch:
        with pytest.raises(saga.RunNotFoundError):
            await orch.get_run(uuid.uuid4()).status()
    await orch.aclose()
    with pytest.raises(saga.LifecycleError):
        await orch.start(s, Job(n=1))
    with pytest.raises(saga.LifecycleError):
        await orch.__aenter__()


async def test_unreachable_database_raises_database_error() -> None:
    """Opening an orchestrator on a database that does not answer raises DatabaseError
    with the driver's error as the cause."""
    s = small_saga("nowhere")
    dsn = "postgresql://postgres@/postgres?host=/nonexistent-socket-dir&port=5432"
    with pytest.raises(saga.DatabaseError) as raised:
        async with saga.Orchestrator(dsn, sagas=[s]):
            pass  # pragma: no cover
    assert raised.value.__cause__ is not None


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_orchestrator_processes_share_work_without_overlap(
    dsn: str, db: asyncpg.Connection, open_client: ClientFactory, children: Children
) -> None:
    """Two orchestrators in separate processes (`saga worker`) on one database both
    execute runs, every step of every run executes exactly once, no run ever has two step
    attempts executing at the same moment, and both shut down cleanly on SIGTERM."""
    await db.execute(EFFECTS)
    options = ["--concurrency", "4", "--poll-interval", "0.2"]
    workers = [
        children.saga_worker(
            dsn, "tests._relay:relay", "--worker-id", f"proc-{i}", *options, name=f"proc-{i}"
        )
        for i in range(2)
    ]
    for worker in workers:
        await worker.wait_ready()
    client = await open_client(relay)
    runs = [await client.start(relay, Job(n=i)) for i in range(40)]
    for run in runs:
        assert await run.result(timeout=60) == 3
    for worker in workers:
        assert await worker.stop() == 0, worker.output[-3000:]
    rows = await db.fetch("SELECT run_id, step, worker, started, finished FROM effects")
    assert len(rows) == 40 * 3
    assert len({(r["run_id"], r["step"]) for r in rows}) == 40 * 3
    assert {r["worker"] for r in rows} == {str(worker.pid) for worker in workers}
    by_run: dict[uuid.UUID, list[asyncpg.Record]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    for steps in by_run.values():
        steps.sort(key=lambda r: r["started"])
        for earlier, later in itertools.pairwise(steps):
            assert earlier["finished"] <= later["started"]


@pytest.mark.parametrize("committed", [True, False], ids=["lost-reply", "lost-request"])
async def test_connection_lost_during_a_write_is_resolved_by_rereading(
    orchestrator: OrchestratorFactory, committed: bool
) -> None:
    """When the connection breaks during a step's checkpoint, whether or not the commit
    went through, the worker retries, re-reads the run when the retry is refused, and the
    run completes with every step executed exactly once."""
    ledger = Ledger()
    shaky = small_saga("shaky", ["a", "b", "c"], ledger=ledger, retry=ONCE)
    faults = Faults()
    for step in ("a", "b"):
        faults.drop_connection_at_commit(step, committed=committed)
    faults.attach(await orchestrator(shaky))
    run = await shaky.start(Job(n=1))
    assert await run.result(timeout=10) == "c"
    assert faults.fired["drop_connection_at_commit"] == 2
    assert ledger.steps() == ["a", "b", "c"]
    assert [e.kind for e in await run.history()].count("step_completed") == 3


async def test_work_for_unknown_versions_waits_untouched_and_is_counted(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """During a deploy, runs of a saga version a worker does not know are neither claimed
    nor failed: they are counted, and a worker that has the version runs them."""

    def define(version: int) -> saga.Saga[Job]:
        return small_saga("deployed", version=version, result=lambda _: version)

    v2 = define(2)
    client = await open_client(v2)
    run = await client.start(v2, Job(n=1))
    old_worker = await orchestrator(define(1))
    old_worker.wake()
    await anyio.sleep(0.6)  # three poll intervals of the old worker
    row = await db.fetchrow("SELECT status, attempt, lease_owner FROM saga.runs")
    assert tuple(row) == ("pending", 0, None)
    assert await old_worker.unclaimable_runs() == {("deployed", 2, v2.fingerprint): 1}
    await orchestrator(define(2))
    assert await run.result(timeout=10) == 2
    assert await old_worker.unclaimable_runs() == {}


async def test_notifications_wake_workers_and_waiters_without_polling(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """With polling effectively off (30 s), a burst of starts is picked up by a worker in
    another orchestrator (coalesced start notifications, including the trailing one), and
    a result() waiter is woken by the end-of-run notification; runs nobody waits on do
    not notify when they end."""
    gate = Gate("one", when=lambda ctx: ctx.input.n == 0)

    def define() -> saga.Saga[Job]:
        return small_saga("prompt", ["one"], gate=gate, result=lambda ctx: ctx.input.n)

    saga_def = define()
    client = await open_client(saga_def, poll_interval=30)
    await orchestrator(define(), poll_interval=30)
    with anyio.fail_after(10):
        runs = [await client.start(saga_def, Job(n=i)) for i in range(25)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(runs[0].result)  # waits while the run is still active
            while not await db.fetchval(  # noqa: ASYNC110 - polling the database
                "SELECT count(*) FROM saga.watches WHERE run_id = $1", runs[0].id
            ):
                await anyio.sleep(0.01)
            gate.release.set()
        assert [await run.result() for run in runs] == list(range(25))
    unwatched = await client.start(saga_def, Job(n=99))
    with anyio.fail_after(10):
        while (  # noqa: ASYNC110 - polling the database
            await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", unwatched.id)
            != "completed"
        ):
            await anyio.sleep(0.01)
    # Each watch was closed by the run's final transition (which notified its waiter):
    # no watch is left open, and the run nobody waited on was never watched.
    assert await db.fetchval("SELECT count(*) FROM saga.watches WHERE NOT ended") == 0
    assert not await db.fetchval("SELECT watched FROM saga.watches WHERE run_id = $1", unwatched.id)


async def test_wait_stopped_reports_a_crashed_orchestrator(dsn: str) -> None:
    """If an orchestrator's loops die of an unexpected error, wait_stopped() raises it
    (so a worker process can exit instead of idling forever); after a normal close it
    returns. (Private: the claim loop's bug is injected through the store, since nothing
    public can make a loop fail.)"""
    s = small_saga("fragile_loop", ["one"])
    orch = saga.Orchestrator(dsn, sagas=[s], poll_interval=0.05)
    async with orch:
        assert orch._store is not None

        async def broken_claim(*args: object) -> list[object]:
            raise RuntimeError("bug in a loop")

        orch._store.claim = broken_claim  # type: ignore[method-assign,assignment]
        with anyio.fail_after(5), pytest.raises(RuntimeError, match="bug in a loop"):
            await orch.wait_stopped()
    healthy = small_saga("fine_loop", ["one"])
    other = saga.Orchestrator(dsn, sagas=[healthy])
    async with other:
        pass
    with anyio.fail_after(5):
        await other.wait_stopped()


async def test_heartbeat_racing_a_continuation_keeps_the_lease(
    open_client: ClientFactory, store: Store, db: asyncpg.Connection
) -> None:
    """A heartbeat that read the lease token just before this worker's own transition
    leased the run's next item (token + 1) still finds the lease held, so the run is not
    abandoned; a lease taken by another worker is reported lost (private: the store's
    heartbeat statement is what this checks)."""
    s = parked_saga("racy")
    client = await open_client(s)
    run = await client.start(s, Job(n=1))
    [item] = await store.claim("me", 1, 30, [("racy", 1, s.fingerprint)])
    # Our own continuation bumps the token before the heartbeat's write lands.
    await db.execute("UPDATE saga.runs SET lease_token = lease_token + 1 WHERE id = $1", run.id)
    assert set(await store.heartbeat("me", [(run.id, item.lease_token, 30.0)])) == {run.id}
    # Another worker's claim changes the owner: lost.
    await db.execute("UPDATE saga.runs SET lease_owner = 'other' WHERE id = $1", run.id)
    assert await store.heartbeat("me", [(run.id, item.lease_token, 30.0)]) == {}


async def test_waiting_for_a_run_never_hides_it_from_workers(
    open_client: ClientFactory, pool: asyncpg.Pool, store: Store
) -> None:
    """The watch that result() registers takes no lock on the run: while a watch's
    transaction is still open, a worker's SKIP LOCKED claim still gets the run (a lock
    there made claims pass runs by until the next notification). (Private: the store's
    watch and claim statements are what this checks.)"""
    s = parked_saga("single")
    client = await open_client(s)
    run = await client.start(s, Job(n=1))
    async with pool.acquire() as watcher, watcher.transaction():
        await watcher.execute(store._q["watch_run"], run.id)  # not committed yet
        claimed = await store.claim("w", 10, 30, [("single", 1, s.fingerprint)])
    assert [item.run_id for item in claimed] == [run.id]


async def test_a_heartbeat_that_races_the_leases_own_write_does_not_call_it_lost() -> None:
    """README, Leasing: a lease lost (another worker took the run) cancels the attempt
    and logs `lease_lost`. A heartbeat sent just before a run's end write committed
    comes back without that lease, while the step's task still holds it: that is the
    run moving on, not a loss. With the lease's outcome being written, the heartbeat
    leaves it to that fenced write: no `lease_lost`, the scope is not cancelled. Without
    a write in flight, the same answer still marks it lost (seen in a busy process:
    `lease_lost` logged for runs that completed with one attempt)."""
    from structlog.testing import capture_logs

    from saga._held import Lease
    from saga._lease import Leases
    from saga._log import Outage

    class _NoStatements:
        """No statement is sent: only a heartbeat's answer is read."""

        def claim_along(self, *args: object) -> None:
            return None

    leases = Leases(
        _NoStatements(),  # type: ignore[arg-type]
        worker_id="w",
        concurrency=2,
        lease_seconds=30.0,
        heartbeat_every=10.0,
        poll_interval=1.0,
        definitions=[],
        outage=Outage("w"),
    )
    writing, idle = Lease(uuid.uuid4(), 7, 30.0), Lease(uuid.uuid4(), 8, 30.0)
    writing.writing = True
    for lease in (writing, idle):
        leases.inflight[lease.key] = lease
    with capture_logs() as logs:
        leases._heard({writing.key: 7, idle.key: 8}, {})  # neither found any more
    assert not writing.lost
    assert not writing.scope.cancel_called
    assert idle.lost
    assert idle.scope.cancel_called
    assert [e["run_id"] for e in logs if e["event"] == "lease_lost"] == [str(idle.run_id)]
