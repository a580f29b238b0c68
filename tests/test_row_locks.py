"""One run's row held by another transaction holds up that run alone.

README, "In your transaction": a signal sent with ``conn=`` locks the run's row until the
caller's transaction ends; the workers' writes of that run wait for it. The other runs of
the same worker (whose transitions, heartbeats and signals share statements with it) go
on: their batches skip the held row and its writer writes it alone, and their leases are
renewed, so none of their steps runs twice.
"""

from __future__ import annotations

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
from tests.conftest import OrchestratorFactory

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
