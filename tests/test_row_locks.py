"""One run's row held by another transaction holds up that run alone.

README, "In your transaction": a signal sent with ``conn=`` locks the run's row until the
caller's transaction ends; the workers' writes of that run wait for it. The other runs of
the same worker (whose transitions, heartbeats and signals share statements with it) go
on: their batches skip the held row and its writer writes it alone, and their leases are
renewed, so none of their steps runs twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from uuid import UUID

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import FAST, ONCE, Gate, Job, Ledger, small_saga, until_status
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(90)

STEP_SECONDS = 1.5
HOLD_SECONDS = 6.0


class Go(BaseModel):
    ok: bool = True


def _linear(name: str, calls: Counter[tuple[UUID, str]]) -> saga.Saga[Job]:
    """``first`` (takes STEP_SECONDS) -> wait ``go`` -> ``second``."""
    s = saga.Saga(name, input=Job)

    @s.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        calls[(ctx.run_id, "first")] += 1
        await anyio.sleep(STEP_SECONDS)
        return 1

    s.wait_for("go", Go, timeout=timedelta(hours=1), on_timeout="compensate")

    @s.step(retry=FAST)
    async def second(ctx: saga.Context[Job]) -> int:
        calls[(ctx.run_id, "second")] += 1
        return 2

    return s


def _graph(name: str, calls: Counter[tuple[UUID, str]]) -> saga.Saga[Job]:
    """``left`` and ``right`` at once (each STEP_SECONDS), then ``join``."""
    s = saga.Saga(name, input=Job)

    async def branch(ctx: saga.Context[Job]) -> int:
        calls[(ctx.run_id, ctx.step)] += 1
        await anyio.sleep(STEP_SECONDS)
        return 1

    left = s.step(name="left", retry=FAST, after=[])(branch)
    right = s.step(name="right", retry=FAST, after=[])(branch)

    @s.step(retry=FAST, after=[left, right])
    async def join(ctx: saga.Context[Job]) -> int:
        calls[(ctx.run_id, "join")] += 1
        return 2

    return s


@asynccontextmanager
async def row_held(dsn: str, run_id: UUID) -> AsyncIterator[None]:
    """Hold run ``run_id``'s row locked in another transaction for the block."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run_id)
            yield
    finally:
        await conn.close()


async def _lost_leases(runs: list[saga.RunHandle]) -> dict[UUID, int]:
    lost = {}
    for run in runs:
        n = sum(e.kind == "lease_expired" for e in await run.history())
        if n:
            lost[run.id] = n
    return lost


def held_then_wait(gate: Gate) -> saga.Saga[Job]:
    """``hold`` (passes ``gate``) -> wait ``go`` (no timeout) -> ``done``."""
    s = saga.Saga("held", input=Job)

    @s.step()
    async def hold(ctx: saga.Context[Job]) -> int:
        await gate.pass_through(ctx)
        return ctx.input.n

    s.wait_for("go", Go)

    @s.step()
    async def done(ctx: saga.Context[Job]) -> str:
        return "done"

    return s


async def test_a_worker_with_peers_writes_other_runs_while_one_run_is_held(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """Run A's step ends while a caller's open transaction (``signal(conn=)``) holds A's
    row, so A's write waits. With another executing orchestrator on the schema the
    worker keeps one write in flight; A's waiting write is not that one: 20 other
    3-step runs started meanwhile complete while the caller's transaction stays open."""
    gate = Gate("hold")
    held = held_then_wait(gate)
    quick = small_saga("quick", ["a", "b", "c"])
    orch = await orchestrator(held, quick, concurrency=16, lease_seconds=30)
    await orchestrator(small_saga("other", ["x"]), concurrency=4)  # a peer
    await anyio.sleep(0.5)
    a = await held.start(Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    caller = await asyncpg.connect(dsn)
    completed = 0
    try:
        async with caller.transaction():
            assert await orch.signal(a.id, "go", Go(), conn=caller)
            gate.release.set()
            await anyio.sleep(0.5)  # A's parking write now waits for the caller's lock
            runs = [await quick.start(Job(n=i)) for i in range(20)]
            with anyio.move_on_after(5):
                for r in runs:
                    await r.result(timeout=10)
                    completed += 1
            assert await a.status() is saga.RunStatus.RUNNING
    finally:
        await caller.close()
    assert await a.result(timeout=10) == "done"
    assert completed == 20, f"{completed} of 20 runs completed while run A's row was held"


async def test_one_held_run_costs_no_other_run_its_lease(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """8 runs are each in a 4.5 s step (one attempt allowed) on the worker of run A,
    whose row a caller's signal transaction holds for 4 s (lease 3 s). The worker's
    heartbeat renews their leases all the same (it does not wait for A's row), and all
    8 complete; A, whose write waited for the caller, completes too."""
    gate = Gate("hold")
    held = held_then_wait(gate)
    ledger = Ledger()
    work = small_saga("work", ["w"], delay=4.5, retry=ONCE, ledger=ledger)
    orch = await orchestrator(held, work, concurrency=16, lease_seconds=3)
    a = await held.start(Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    runs = [await work.start(Job(n=i)) for i in range(8)]
    with anyio.fail_after(10):
        while len(ledger.calls) < 8:  # noqa: ASYNC110 - every step is running
            await anyio.sleep(0.02)
    await anyio.sleep(0.3)
    caller = await asyncpg.connect(dsn)
    try:
        async with caller.transaction():
            assert await orch.signal(a.id, "go", Go(), conn=caller)
            await anyio.sleep(4.0)
    finally:
        await caller.close()
    gate.release.set()
    outcomes: list[str] = []
    for r in runs:
        try:
            outcomes.append(await r.result(timeout=20))
        except saga.RunError as exc:
            outcomes.append(f"{type(exc).__name__}({exc.error.type if exc.error else None})")
    assert await a.result(timeout=10) == "done"
    assert outcomes == ["w"] * 8
    assert await _lost_leases(runs) == {}


async def test_parallel_steps_of_other_runs_go_on_while_one_run_is_held(
    orchestrator, dsn: str
) -> None:
    """Graph runs' items that finish together share a transaction: while another
    transaction holds run A's row, the other graph runs still complete (their items'
    writes skip A's row), and A completes once the row is released, every step once."""
    calls: Counter[tuple[UUID, str]] = Counter()
    s = _graph("held_graph", calls)
    orch = await orchestrator(s, concurrency=64)
    a = await orch.start(s, Job(n=0))
    others = [await orch.start(s, Job(n=i)) for i in range(1, 13)]
    await anyio.sleep(0.5)
    async with row_held(dsn, a.id):
        with anyio.fail_after(HOLD_SECONDS + 10):
            for run in others:
                assert await run.result(timeout=STEP_SECONDS + 5) == 2
        assert await a.status() is not saga.RunStatus.COMPLETED
    assert await a.result(timeout=20) == 2
    twice = {k: n for k, n in calls.items() if n != 1}
    assert not twice, f"steps run more than once: {twice}"


async def test_signals_sent_together_are_not_held_up_by_one_runs_lock(
    orchestrator, open_client, dsn: str
) -> None:
    """Signals a client sends at about the same time share a transaction; one of them
    to a run whose row another transaction holds waits alone: the others are answered
    (and their runs go on) while it waits, and it is answered once the row is free."""
    calls: Counter[tuple[UUID, str]] = Counter()
    s = _linear("held_signals", calls)
    orch = await orchestrator(s)
    client = await open_client(s)
    runs = [await orch.start(s, Job(n=i)) for i in range(8)]
    for run in runs:
        await until_status(run, saga.RunStatus.WAITING)
    a, others = runs[0], runs[1:]
    answered: dict[UUID, float] = {}

    async def send(run_id: UUID) -> None:
        await client.signal(run_id, "go", Go())
        answered[run_id] = time.monotonic()

    async with anyio.create_task_group() as tg, row_held(dsn, a.id):
        for run in runs:  # a first: in the batch of the others
            tg.start_soon(send, run.id)
        with anyio.fail_after(10):
            for run in others:
                assert await run.result(timeout=10) == 2
        assert a.id not in answered, "the held run's signal was answered while held"
        released = time.monotonic()
    assert answered[a.id] >= released
    assert await a.result(timeout=10) == 2


async def test_closing_a_worker_waits_for_no_callers_transaction(orchestrator, dsn: str) -> None:
    """An orchestrator closes within its shutdown timeout while another transaction
    holds the row of a run it leases: giving its leases back skips that row (its lease
    expires instead), and the run completes on a worker opened later."""
    calls: Counter[tuple[UUID, str]] = Counter()
    s = _linear("held_shutdown", calls)
    async with saga.Orchestrator(dsn, sagas=[s], shutdown_timeout=0.5, lease_seconds=2) as orch:
        a = await orch.start(s, Job(n=0))
        await until_status(a, saga.RunStatus.RUNNING)
        held = row_held(dsn, a.id)
        await held.__aenter__()
        began = time.monotonic()
    try:
        closed_in = time.monotonic() - began
    finally:
        await held.__aexit__(None, None, None)
    assert closed_in < 5, f"closing took {closed_in:.1f} s while a run's row was held"
    worker = await orchestrator(s)
    await worker.signal(a.id, "go", Go())
    assert await worker.get_run(a.id).result(timeout=20) == 2


async def test_five_held_runs_cost_no_other_run_its_lease(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """A worker of concurrency 8 (10 connections for its writes and heartbeats) runs 3
    long steps (one attempt allowed, lease 3 s) beside 5 runs whose rows 5 callers'
    signal transactions hold for 6 s, and a peer would take over any lease left to
    expire. The held runs' writes and renewals wait on a quarter of the connections at
    most, so the 3 other runs' leases are renewed meanwhile: none expires, each step runs
    once, and every run completes."""
    gate = Gate("hold")
    held = held_then_wait(gate)
    ledger = Ledger()
    work = small_saga("work", ["w"], delay=9.0, retry=ONCE, ledger=ledger)
    orch = await orchestrator(held, work, concurrency=8, lease_seconds=3)
    heldruns = [await held.start(Job(n=i)) for i in range(5)]
    with anyio.fail_after(10):
        while gate.held < 5:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    runs = [await work.start(Job(n=i)) for i in range(3)]
    with anyio.fail_after(10):
        while len(ledger.calls) < 3:  # noqa: ASYNC110
            await anyio.sleep(0.02)
    # A peer that would take over any lease left to expire.
    await orchestrator(work, concurrency=4, lease_seconds=3)
    callers = [await asyncpg.connect(dsn) for _ in heldruns]
    expired: set[UUID] = set()
    try:
        txs = [c.transaction() for c in callers]
        for c, tx, r in zip(callers, txs, heldruns, strict=True):
            await tx.start()
            assert await orch.signal(r.id, "go", Go(), conn=c)
        gate.release.set()  # the held runs' steps end: their writes wait for the callers
        probe = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:
                rows = await probe.fetch(
                    "SELECT id FROM saga.runs WHERE id = ANY($1::uuid[]) AND due_at < now()",
                    [r.id for r in runs],
                )
                expired.update(row["id"] for row in rows)
                await anyio.sleep(0.2)
        finally:
            await probe.close()
        for tx in txs:
            await tx.commit()
    finally:
        for c in callers:
            await c.close()
    outcomes: list[str] = []
    for r in runs:
        try:
            outcomes.append(await r.result(timeout=30))
        except saga.RunError as exc:
            outcomes.append(f"{type(exc).__name__}")
    for r in heldruns:
        assert await r.result(timeout=20) == "done"
    lost = await _lost_leases(runs)
    calls = Counter(c.run_id for c in ledger.calls)
    assert not expired
    assert lost == {}
    assert outcomes == ["w"] * 3
    assert sorted(calls.values()) == [1, 1, 1]


async def test_runs_due_beside_a_held_runs_write_are_not_held_up(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """Worker W (concurrency 1) runs A; 4 quick runs are due. A caller's signal
    transaction holds A's row when A's step ends: A's write (which would claim a run for
    the slot it frees) gives up on the row after a moment, having claimed nothing, and
    waits alone; the quick runs are claimed and completed (by W's claim loop or by a
    peer with free slots) while the caller's transaction is open."""
    gate = Gate("hold")
    held = held_then_wait(gate)
    quick = small_saga("quick", ["q"])
    w = await orchestrator(held, quick, concurrency=1)
    a = await held.start(Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    runs = [await quick.start(Job(n=i)) for i in range(4)]
    caller = await asyncpg.connect(dsn)
    stuck: list[tuple[str, bool]] = []
    try:
        async with caller.transaction():
            assert await w.signal(a.id, "go", Go(), conn=caller)
            gate.release.set()  # A's write now waits for the caller
            await anyio.sleep(1.0)
            await orchestrator(quick, concurrency=4)  # a peer with free slots
            ids = [r.id for r in runs]
            query = "SELECT status, lease_owner FROM saga.runs WHERE id = ANY($1::uuid[])"
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:
                rows = await caller.fetch(query, ids)
                stuck = [
                    (str(row["status"]), row["lease_owner"] == w.worker_id)
                    for row in rows
                    if row["status"] != "completed"
                ]
                if not stuck:
                    break
                await anyio.sleep(0.1)
    finally:
        await caller.close()
    assert await a.result(timeout=10) == "done"
    for r in runs:
        assert await r.result(timeout=10) == "q"
    assert not stuck, f"not completed while A's row was held: (status, leased to W) {stuck}"


async def test_a_clients_other_signals_and_starts_go_on_while_two_runs_are_held(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, dsn: str
) -> None:
    """Eight runs wait for `go`. Two callers' open transactions hold the rows of runs 0
    and 1 (each sent its run a signal with `conn=`). A Client (its pool of 2
    connections) sends `go` to runs 0 and 1 too (those wait, holding no connection),
    then to run 2, and starts a new run: both are answered while the two callers'
    transactions are open."""
    s = saga.Saga("two_held", input=Job)

    @s.step()
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    s.wait_for("go", Go)

    @s.step()
    async def second(ctx: saga.Context[Job]) -> int:
        return 2

    orch = await orchestrator(s)
    client = await open_client(s)
    runs = [await orch.start(s, Job(n=i)) for i in range(8)]
    for run in runs:
        await until_status(run, saga.RunStatus.WAITING)
    callers = [await asyncpg.connect(dsn) for _ in range(2)]
    answered: dict[str, float] = {}
    try:
        txs = [c.transaction() for c in callers]
        for c, tx, run in zip(callers, txs, runs[:2], strict=True):
            await tx.start()
            await orch.signal(run.id, "go", Go(), conn=c)
        async with anyio.create_task_group() as tg:

            async def second_go(run_id: UUID) -> None:
                with contextlib.suppress(saga.InvalidRunStateError):
                    await client.signal(run_id, "go", Go())  # (ended since: refused)

            for run in runs[:2]:
                tg.start_soon(second_go, run.id)
            await anyio.sleep(0.5)
            began = time.monotonic()
            with anyio.move_on_after(5):
                await client.signal(runs[2].id, "go", Go())
                answered["signal"] = time.monotonic() - began
                await client.start(s, Job(n=99))
                answered["start"] = time.monotonic() - began
            for tx in txs:
                await tx.commit()
    finally:
        for c in callers:
            await c.close()
    assert "signal" in answered, answered
    assert "start" in answered, answered


# -- leases written by writes that waited for a caller's transaction --------------------


class _Proceed(BaseModel):
    ok: bool


#: The lease of the tests of a caller's transaction holding a run's row, and how long
#: that transaction holds it: longer than the lease.
SHORT_LEASE, HOLD = 1.2, 2.5


async def test_a_lease_renewed_when_a_callers_transaction_ends_is_not_taken_over(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """README ("In your transaction"): a signal locks the run's row until your
    transaction ends; "the worker's heartbeats renew its other leases meanwhile, and
    that run's lease as soon as the lock is released".

    A step runs (lease 1.2 s, a second orchestrator polling every 20 ms) while a caller's
    transaction that signalled the run holds its row for 2.5 s. The renewal that waited
    for the lock renews the lease from the moment it is written: one attempt, no
    `lease_expired`. Before, the renewal computed the lease's end before its wait for
    the lock (an UPDATE computes the new row first), so it wrote a lease already expired
    and the peer took the run over: the step ran twice."""
    calls: list[int] = []
    s = saga.Saga("held_lease", input=Job)

    started = anyio.Event()

    @s.step()
    async def slow(ctx: saga.Context[Job]) -> int:
        calls.append(ctx.attempt)
        started.set()
        await anyio.sleep(HOLD + 1)
        return 1

    go = s.wait_for("go", _Proceed)

    @s.step()
    async def done(ctx: saga.Context[Job]) -> int:
        return 2

    first = await orchestrator(s, lease_seconds=SHORT_LEASE)
    # a peer that would take an expired lease (it looks for due work often)
    await orchestrator(s, lease_seconds=SHORT_LEASE, poll_interval=0.02)
    run = await first.start(s, Job(n=1))
    with anyio.fail_after(5):
        await started.wait()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            assert await first.signal(run.id, go, _Proceed(ok=True), conn=conn)
            await anyio.sleep(HOLD)  # the run's row is held meanwhile
    finally:
        await conn.close()
    assert await run.result(timeout=10) == 2
    kinds = [e.kind for e in await run.history()]
    assert "lease_expired" not in kinds
    assert calls == [1]


async def test_a_write_that_waited_for_a_callers_transaction_leases_the_next_step_from_then(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """README ("In your transaction"): the workers' writes of a run whose row a caller's
    transaction holds wait for it ("the held run's write goes again alone, waiting for
    the lock by itself"); a linear saga's completion leases the next step to its worker
    in the same write.

    Step `quick` returns while a caller's transaction that signalled the run holds its
    row for 2.5 s (lease 1.2 s, a second orchestrator polling every 20 ms). The write
    waits, records `quick` and leases `slow` from the moment it is written: one attempt
    of `slow`, no `lease_expired`. Before, the next lease counted from the statement's
    start, before the wait: written expired, taken over by the peer, `slow` ran twice."""
    calls: list[tuple[str, int]] = []
    returned = anyio.Event()
    s = saga.Saga("held_transition", input=Job)

    started = anyio.Event()

    @s.step()
    async def quick(ctx: saga.Context[Job]) -> int:
        calls.append(("quick", ctx.attempt))
        started.set()
        await returned.wait()
        return 1

    @s.step()
    async def slow(ctx: saga.Context[Job]) -> int:
        calls.append(("slow", ctx.attempt))
        await anyio.sleep(1)
        return 1

    go = s.wait_for("go", _Proceed)

    @s.step()
    async def done(ctx: saga.Context[Job]) -> int:
        return 2

    first = await orchestrator(s, lease_seconds=SHORT_LEASE)
    # a peer that would take an expired lease (it looks for due work often)
    await orchestrator(s, lease_seconds=SHORT_LEASE, poll_interval=0.02)
    run = await first.start(s, Job(n=1))
    with anyio.fail_after(5):
        await started.wait()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            assert await first.signal(run.id, go, _Proceed(ok=True), conn=conn)
            returned.set()  # quick returns; its completion waits for the row
            await anyio.sleep(HOLD)
    finally:
        await conn.close()
    assert await run.result(timeout=10) == 2
    kinds = [e.kind for e in await run.history()]
    assert "lease_expired" not in kinds
    assert calls == [("quick", 1), ("slow", 1)]


@asynccontextmanager
async def _frozen_waiters(conn: asyncpg.Connection) -> AsyncIterator[list[int]]:
    """Stop (SIGSTOP) every backend of ``conn``'s database waiting for a lock, as a
    scheduler that does not wake them for a while would; resumed on exit."""
    pids: list[int] = [
        r["pid"]
        for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    ]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("returned_first", [True, False], ids=["write", "renewal"])
async def test_no_claim_takes_a_lease_whose_worker_waits_to_write_it(
    orchestrator: OrchestratorFactory, dsn: str, returned_first: bool
) -> None:
    """README ("In your transaction"): the held run's write waits for the lock, and the
    heartbeats renew "that run's lease as soon as the lock is released". Here the lease
    (1.2 s) expires while a caller's transaction holds the run's row (2 s), and the
    worker's waiting statements are slow to wake up when it commits (their backends are
    stopped for 1 s): the write of `quick`, which returned (and its lease's renewal), or
    the renewal alone, `quick` still running. A peer polling every 20 ms does not take
    the run over meanwhile: `quick` runs once and is recorded, `slow` runs once.
    Before, the caller's commit left a new row version free at once, and the peer's
    claim took the expired lease before the woken statements reached it (`slow` ran on
    the peer, `quick`'s write was refused as stale)."""
    calls: list[tuple[str, int]] = []
    returned, started = anyio.Event(), anyio.Event()
    s = saga.Saga("held_frozen", input=Job)

    @s.step()
    async def quick(ctx: saga.Context[Job]) -> int:
        calls.append(("quick", ctx.attempt))
        started.set()
        await returned.wait()
        return 1

    @s.step()
    async def slow(ctx: saga.Context[Job]) -> int:
        calls.append(("slow", ctx.attempt))
        return 1

    go = s.wait_for("go", _Proceed)

    @s.step()
    async def done(ctx: saga.Context[Job]) -> int:
        return 2

    first = await orchestrator(s, lease_seconds=SHORT_LEASE)
    await orchestrator(s, lease_seconds=SHORT_LEASE, poll_interval=0.02)
    run = await first.start(s, Job(n=1))
    with anyio.fail_after(5):
        await started.wait()
    conn, watcher = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        async with contextlib.AsyncExitStack() as stack:
            transaction = conn.transaction()
            await transaction.start()
            assert await first.signal(run.id, go, _Proceed(ok=True), conn=conn)
            if returned_first:
                returned.set()  # quick returns; its write waits for the row
            await anyio.sleep(2.0)  # (the lease expires; the heartbeat's renewal waits)
            frozen = await stack.enter_async_context(_frozen_waiters(watcher))
            assert frozen  # (a statement of the worker waited for the row)
            await transaction.commit()
            await anyio.sleep(1.0)  # the peer looks for due work 50 times meanwhile
        returned.set()
    finally:
        await conn.close()
        await watcher.close()
    assert await run.result(timeout=10) == 2
    kinds = [e.kind for e in await run.history()]
    assert "lease_expired" not in kinds
    assert calls == [("quick", 1), ("slow", 1)]


class _Approval(BaseModel):
    """The signal of the rewait_held saga's wait."""

    ok: bool


async def test_a_retried_wait_gets_a_fresh_timeout_when_the_retry_waited_for_the_row(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README: `retry()` of a run stopped at a timed-out wait "waits again for its
    signal, with a fresh timeout"; every wait timeout counts from the write.

    A run stops at its timed-out wait (2 s, on_timeout="stop"). While another
    transaction holds its row for 3 s, an operator retries it: 1 s after the retry the
    run still waits. Before, the fresh timeout counted from the statement's start,
    before its wait for the row: already passed, so the run timed out again at once."""
    s = saga.Saga("rewait_held", input=Job)

    @s.step()
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    s.wait_for("approval", _Approval, timeout=2.0, on_timeout="stop")

    @s.step()
    async def after(ctx: saga.Context[Job]) -> int:
        return 2

    orch = await orchestrator(s, poll_interval=0.1)
    run = await orch.start(s, Job(n=1))
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=15)
    assert (await run.info()).wait == "approval"
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tr = db.transaction()
            await tr.start()
            await db.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id)
            tg.start_soon(run.retry)
            await anyio.sleep(3.0)
            await tr.commit()
    await anyio.sleep(1.0)  # half the fresh timeout
    info = await run.info()
    timed_out = [e for e in await run.history() if e.kind == "wait_timed_out"]
    assert info.status is saga.RunStatus.WAITING, (
        f"1 s after the retry, the run is {info.status} (its wait timed out "
        f"{len(timed_out)} times): the fresh 2 s timeout was counted from before the "
        "retry's wait for the row"
    )
