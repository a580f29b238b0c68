"""A shutdown gives back every lease of its worker, even those a write cancelled in flight
committed without its runner learning of them (the next step leased along, a due run
claimed along): none stays leased to a closed worker, and no run fails for it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from saga.testing import Faults
from tests._sagas import ONCE, Job, small_saga
from tests.conftest import OrchestratorFactory

# -- shutdown: leases given back, interrupted attempts not counted ------------------------


async def _close_mid_flight(dsn: str, s: saga.Saga[Any], lease_seconds: float) -> str:
    """Open an executing orchestrator on a backlog of ``s``'s runs, let it work for a
    moment, close it with shutdown_timeout=0 (a shutdown that does not wait: documented
    as accepted); return its worker id."""
    orch = saga.Orchestrator(
        dsn,
        sagas=[s],
        concurrency=8,
        shutdown_timeout=0,
        lease_seconds=lease_seconds,
        poll_interval=0.2,
    )
    await orch.__aenter__()
    await anyio.sleep(0.2)
    await orch.aclose()
    return orch.worker_id


@pytest.mark.timeout(60)
async def test_shutdown_gives_back_every_lease_even_when_cancelling_a_write(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README, Runtime: "Leaving stops claiming, lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest and releases their leases so another
    process takes them at once."

    A cancellation landing while a runner's write is in flight (the group-committed
    write that records a step and leases the run's next step to the same worker, or
    claims the next due run along with it) lets the write commit, but the runner never
    learns its new lease. Releasing the leases known to the runners then missed it: after
    ``aclose()`` returned, runs stayed leased to the closed worker for the whole
    ``lease_seconds`` (60 s here), on most closes with shutdown_timeout=0. The shutdown
    now releases whatever is leased to its worker.
    """
    s = small_saga("backlog", 3, delay=0.002)
    async with saga.Client(dsn, sagas=[s]) as client:
        await asyncio.gather(*[client.start(s, Job(n=i)) for i in range(300)])
    stuck: list[Any] = []
    for _ in range(3):  # each close reproduces it about 5 times in 6
        worker = await _close_mid_flight(dsn, s, lease_seconds=60)
        stuck = await db.fetch(
            "SELECT id, step_name, lease_token, due_at - now() AS left FROM saga.runs "
            "WHERE lease_owner = $1",
            worker,
        )
        if stuck:
            break
    assert stuck == [], f"{len(stuck)} run(s) still leased to the closed worker: {stuck[:2]}"


@pytest.mark.timeout(60)
async def test_a_graceful_shutdown_never_fails_a_run(dsn: str, db: asyncpg.Connection) -> None:
    """README, Retries: "A worker shutting down gives its leases back without counting
    the interrupted attempts, once". DESIGN: "A crash, a deploy ... loses nothing".

    Leases a close failed to give back (see the previous test) expired, and the next
    claim counted the interrupted attempt as lost: with `Retry(max_attempts=1)` one
    graceful shutdown turned 8-12 of 300 runs whose steps never failed into
    `compensated` runs (`saga.AttemptLost`). Each trial uses its own saga, so every run
    goes through exactly one shutdown; all 900 complete.
    """
    sagas = [small_saga(f"deploy{k}", 3, delay=0.002, retry=ONCE) for k in range(3)]
    async with saga.Client(dsn, sagas=sagas) as client:
        for s in sagas:
            await asyncio.gather(*[client.start(s, Job(n=i)) for i in range(300)])
    for s in sagas:
        worker = await _close_mid_flight(dsn, s, lease_seconds=1)
        if await db.fetchval("SELECT count(*) FROM saga.runs WHERE lease_owner = $1", worker):
            break
    async with saga.Orchestrator(dsn, sagas=sagas, lease_seconds=1, poll_interval=0.2):
        with anyio.fail_after(40):
            while await db.fetchval(NOT_ENDED):  # noqa: ASYNC110 - polling the database
                await anyio.sleep(0.1)
    rows = await db.fetch("SELECT status, count(*) FROM saga.runs GROUP BY 1")
    ended = {r["status"]: r["count"] for r in rows}
    error = await db.fetchval("SELECT error::text FROM saga.runs WHERE status <> 'completed'")
    assert ended == {"completed": 900}, (ended, error)


NOT_ENDED = "SELECT count(*) FROM saga.runs WHERE due_at IS NOT NULL"


# -- a crash between two shutdowns ------------------------------------------------------


#: Two attempts, 10-20 ms apart.
TWO_ATTEMPTS = saga.Retry(max_attempts=2, initial_delay=0.01, max_delay=0.02)


def _shutdown_crash_saga(
    name: str, calls: list[str], *, graph: bool, compensation: bool
) -> saga.Saga[Any]:
    """``first`` then ``x`` (a graph saga when ``graph``). The function under test (``x``,
    or ``first``'s compensation once ``x`` fails for good) follows a script, call by
    call: the 1st and 3rd calls block until their worker shuts down, the 2nd and 4th
    return at once. Its policy allows two attempts."""
    s = saga.Saga(name, input=Job)
    script = ["hold", "ok", "hold", "ok"]

    async def act() -> None:
        what = script[len(calls)] if len(calls) < len(script) else "ok"
        calls.append(what)
        if what == "hold":
            await anyio.sleep(100)  # until its worker shuts down and cancels it

    @s.step(after=[] if graph else None)
    async def first(ctx: saga.Context[Job]) -> int:
        return 0

    if compensation:

        @first.compensate(retry=TWO_ATTEMPTS)
        async def undo_first(ctx: saga.Context[Job], value: int) -> None:
            await act()

        @s.step(after=[first] if graph else None, retry=ONCE)
        async def x(ctx: saga.Context[Job]) -> int:
            raise saga.PermanentError("roll back")

    else:

        @s.step(after=[first] if graph else None, retry=TWO_ATTEMPTS)
        async def x(ctx: saga.Context[Job]) -> int:
            await act()
            return 1

    return s


@pytest.mark.parametrize("graph", [False, True], ids=["linear", "graph"])
@pytest.mark.parametrize("compensation", [False, True], ids=["step", "compensation"])
async def test_a_crash_between_two_shutdowns_does_not_make_the_next_give_back_count(
    orchestrator: OrchestratorFactory, graph: bool, compensation: bool
) -> None:
    """README ("Retries"): "A crash mid-step counts as an attempt" and "A worker shutting
    down gives its leases back without counting the interrupted attempts, once: an
    attempt given back a second time before any outcome (...) counts".

    Attempt 1 is given back by a shutdown (not counted), then its worker crashes: the
    expired lease counts attempt 1, and attempt 2 runs. Attempt 2 is then given back by
    a shutdown, its first give-back: not counted, so the function's second attempt runs
    and the run completes (the compensation under test: ends compensated). Before, the
    claim taking over the expired lease kept the earlier attempt's "given back" mark,
    and that give-back counted: AttemptLost, one crash and two shutdowns using up both
    attempts (steps and compensations, linear and graph)."""
    calls: list[str] = []
    s = _shutdown_crash_saga("crash_between", calls, graph=graph, compensation=compensation)

    async def until_calls(n: int) -> None:
        with anyio.fail_after(10):
            while len(calls) < n:  # noqa: ASYNC110 - counting the calls of a script
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)  # the call is under way

    first = await orchestrator(s, shutdown_timeout=0.2, lease_seconds=0.5)
    run = await s.start(Job(n=1))
    await until_calls(1)  # attempt 1 holds
    await first.aclose()  # ... and is given back, uncounted
    faults = Faults()
    faults.crash_after("first" if compensation else "x", compensation=compensation)
    second = await orchestrator(s, shutdown_timeout=0.2, lease_seconds=0.5)
    faults.attach(second)
    await until_calls(3)  # attempt 1 returned, its worker "crashed"; attempt 2 holds
    assert faults.fired["crash_after"] == 1
    await second.aclose()  # attempt 2's first give-back
    third = await orchestrator(s, lease_seconds=0.5)
    handle = third.get_run(run.id)
    released = [
        (e.attempt, e.data.get("counted"))
        for e in await handle.history()
        if e.kind == "lease_released"
    ]
    if compensation:
        with pytest.raises(saga.RunCompensatedError):
            await handle.result(timeout=10)
    else:
        assert await handle.result(timeout=10) == 1
    assert released == [(1, False), (2, False)]


@pytest.mark.timeout(90)
async def test_close_is_not_held_by_a_claim_waiting_for_a_lock(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README, Orchestrator: "Leaving stops claiming, lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest ... A step that swallows its cancellation
    cannot hold the close: 15 s past `shutdown_timeout` ... the close returns".

    An idle orchestrator (shutdown_timeout=1) whose claim waits for a lock another
    transaction holds on the runs table (a migration's ALTER, an operator's LOCK
    TABLE): the close waits for that claim 5 s at most, and returns well within 15 s
    past shutdown_timeout. Before (a claim made uncancellable so that a shutdown never
    gives leases back under a claim still committing), it took about 26 s."""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick, shutdown_timeout=1, poll_interval=0.2)
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE saga.runs IN ACCESS EXCLUSIVE MODE")
        with anyio.fail_after(10):
            while True:  # until the claim waits for the lock
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
                if waiting:
                    break
                await anyio.sleep(0.05)
        took = None
        start = anyio.current_time()
        with anyio.move_on_after(50):
            await orch.aclose()
            took = anyio.current_time() - start
        await tx.rollback()
    finally:
        await holder.close()
    assert took is not None
    assert took < 16


# -- a leasing write the shutdown's cancel came too late for ------------------------------

#: Leasing updates of saga's rows (the owner stays: a heartbeat, or a transition leasing
#: the next step to its worker) hold their rows 1.5 s longer while ``slow_writes`` has a
#: row, and go on when cancelled: a statement the server finishes although its client
#: gave up on it.
SLOW_LEASING_WRITES = """
CREATE TABLE public.slow_writes (x int);
CREATE FUNCTION public.slow_leasing_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.lease_owner IS NOT NULL AND NEW.lease_owner = OLD.lease_owner
       AND EXISTS (SELECT 1 FROM public.slow_writes) THEN
        BEGIN
            PERFORM pg_sleep(1.5);
        EXCEPTION WHEN query_canceled THEN
            -- as if the cancel had come too late: the statement commits all the same
            PERFORM pg_sleep(1.5);
        END;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER slow_leasing_write AFTER UPDATE ON saga.runs
    FOR EACH ROW EXECUTE FUNCTION public.slow_leasing_write();
CREATE TRIGGER slow_leasing_write AFTER UPDATE ON saga.items
    FOR EACH ROW EXECUTE FUNCTION public.slow_leasing_write();
"""


def _held_saga(name: str, graph: bool, started: anyio.Event, go: anyio.Event) -> saga.Saga[Any]:
    """``first`` (announces its call on ``started``, returns once ``go`` is set), then
    ``second``; a graph saga when ``graph``. One attempt each."""
    s = saga.Saga(name, input=Job)

    @s.step(after=[] if graph else None, retry=ONCE)
    async def first(ctx: saga.Context[Job]) -> int:
        started.set()
        await go.wait()
        return 1

    @s.step(after=[first] if graph else None, retry=ONCE)
    async def second(ctx: saga.Context[Job]) -> int:
        return 2

    return s


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("graph", "write"),
    [(False, "heartbeat"), (True, "heartbeat"), (False, "transition")],
    ids=["linear-heartbeat", "graph-heartbeat", "linear-transition"],
)
async def test_a_leasing_write_in_flight_at_shutdown_is_given_back_too(
    dsn: str, db: asyncpg.Connection, graph: bool, write: str
) -> None:
    """README, Orchestrator: "Leaving stops claiming, lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest and releases their leases so another
    process takes them at once"; Retries: "A worker shutting down gives its leases back
    without counting the interrupted attempts, once".

    A heartbeat, or a transition leasing the next step to the same worker, is in flight
    when ``aclose()`` (shutdown_timeout=0) begins, and the server finishes it although
    its client cancelled it (here the cancel is made to come too late, every time).
    Before, the give-back skipped the row that statement held locked, and the statement
    then committed: the run stayed leased to the closed worker (1 close in 16 to 50 of
    the graceful-shutdown test above, about 4 runs in 900 in one CI run, each failing
    with AttemptLost once the lease expired). The shutdown now waits for such writes
    before it gives the leases back: the run is given back, uncounted, and completes."""
    await db.execute(SLOW_LEASING_WRITES)
    started, go = anyio.Event(), anyio.Event()
    s = _held_saga(f"inflight_{write}", graph, started, go)
    orch = saga.Orchestrator(dsn, sagas=[s], shutdown_timeout=0, lease_seconds=3)
    await orch.__aenter__()
    try:
        run = await orch.start(s, Job(n=1))
        with anyio.fail_after(10):
            await started.wait()
        await db.execute("INSERT INTO public.slow_writes VALUES (1)")
        if write == "transition":
            go.set()  # first returns: its write leases second to the same worker
        with anyio.fail_after(10):
            while not await db.fetchval(  # noqa: ASYNC110 - polling the database
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            ):
                await anyio.sleep(0.01)
    finally:
        await orch.aclose()
    owner = await db.fetchval("SELECT lease_owner FROM saga.runs WHERE id = $1", run.id)
    items = await db.fetchval(
        "SELECT count(*) FROM saga.items WHERE run_id = $1 AND lease_owner IS NOT NULL", run.id
    )
    assert (owner, items) == (None, 0), "a lease stayed with the closed worker"
    await db.execute("DELETE FROM public.slow_writes")
    go.set()
    async with saga.Orchestrator(dsn, sagas=[s], lease_seconds=3) as again:
        assert await again.get_run(run.id).result(timeout=10) == 2


@pytest.mark.timeout(90)
async def test_abandoned_close_with_a_flight_held_up_returns_15s_past_shutdown_timeout(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README, Orchestrator: "A step that swallows its cancellation cannot hold the
    close: 15 s past `shutdown_timeout` its lease is given back anyway,
    `orchestrator_close_abandoned` is logged, and the close returns".

    A step swallows its cancellation, and the database holds statements up (a migration
    or an operator's `LOCK TABLE saga.runs`): a heartbeat is in flight when the close
    begins. Before, past the 15 s the abandoned close first waited 5 s more for the
    flights, then up to 5 s for the give-back: aclose() returned 25 s after it was
    called. Now it makes one try at the give-back (a second at most) and returns."""
    from tests._sagas import ignore_cancellation_for

    s = saga.Saga("h38_hostile", input=Job)
    running = anyio.Event()

    @s.step()
    async def hostile(ctx: saga.Context[Job]) -> str:
        running.set()
        return await ignore_cancellation_for(60)

    orch = saga.Orchestrator(dsn, sagas=[s], poll_interval=0.2, shutdown_timeout=0, lease_seconds=3)
    await orch.__aenter__()
    tx = db.transaction()
    try:
        await orch.start(s, Job())
        with anyio.fail_after(10):
            await running.wait()
        await tx.start()
        await db.execute("LOCK TABLE saga.runs IN ACCESS EXCLUSIVE MODE")
        await anyio.sleep(2.5)  # a heartbeat (every lease_seconds / 3) is in flight
        started = time.monotonic()
        with anyio.fail_after(60):
            await orch.aclose()
        took = time.monotonic() - started
    finally:
        await tx.rollback()
        await orch.aclose()
    assert took < 16.5, f"aclose() returned {took:.1f}s after it was called (shutdown_timeout=0)"
