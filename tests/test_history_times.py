"""A run's history is dated when each event was written, in its order (DESIGN: "Every
transition is appended to a per-run history (... a total order per run): what ran,
when"), also for what a caller writes in their own transaction."""

from __future__ import annotations

from datetime import timedelta

import anyio
import asyncpg
from pydantic import BaseModel

import saga
from tests._sagas import FAST, Job, until_status
from tests.conftest import ClientFactory, OrchestratorFactory


class Approval(BaseModel):
    ok: bool


async def test_a_signal_sent_in_a_transaction_is_dated_after_the_wait_it_answers(
    orchestrator: OrchestratorFactory, pool: asyncpg.Pool
) -> None:
    """A signal written in a caller's transaction that began before the run reached its
    wait is dated after wait_started, and the whole history's times follow its order."""
    go = anyio.Event()
    s = saga.Saga("signal_when", input=Job)

    @s.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        await go.wait()
        return 1

    decision = s.wait_for("decision", Approval, timeout=timedelta(hours=1))

    @s.step(retry=FAST)
    async def second(ctx: saga.Context[Job]) -> bool:
        return ctx.result(decision).ok

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1")  # the caller's transaction is under way
        await anyio.sleep(0.3)
        go.set()
        await until_status(run, saga.RunStatus.WAITING)
        assert await orch.signal(run.id, decision, Approval(ok=True), conn=conn)
    assert await run.result(timeout=10) is True
    history = await run.history()
    at = {e.kind: e.at for e in history}
    assert at["signal_received"] >= at["wait_started"]
    times = [e.at for e in history]
    assert times == sorted(times)


async def test_a_start_in_a_transaction_is_dated_when_it_ran(
    open_client: ClientFactory, pool: asyncpg.Pool
) -> None:
    """README (Storage): a run's created_at "is when this statement ran, not when the
    caller's transaction began (start(conn=))"; its run_started event is not dated
    before it either."""
    s = saga.Saga("dated_start", input=Job)

    @s.step(retry=FAST)
    async def one(ctx: saga.Context[Job]) -> int:
        return 1

    client = await open_client(s)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1")
        await anyio.sleep(0.3)
        run = await client.start(s, Job(), conn=conn)
    info = await run.info()
    started = next(e for e in await run.history() if e.kind == "run_started")
    assert started.at >= info.created_at
