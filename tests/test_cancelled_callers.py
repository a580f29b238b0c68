"""A caller cancelled once its start or signal was sent: what follows the write (the
workers' wake-up, the count) is not lost with it; and conn= must be in a transaction."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import Job, Ledger, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory


class Decision(BaseModel):
    approved: bool


def approval(ledger: Ledger | None = None) -> tuple[saga.Saga[Job], Any]:
    s = saga.Saga("approval", input=Job)

    @s.step()
    async def hold(ctx: saga.Context[Job]) -> str:
        if ledger is not None:
            ledger.record(ctx)
        return "held"

    decision = s.wait_for("decision", Decision)

    @s.step()
    async def pay(ctx: saga.Context[Job]) -> bool:
        if ledger is not None:
            ledger.record(ctx)
        return ctx.result(decision).approved

    return s, decision


# -- wake-ups of runs a cancelled caller wrote ---------------------------------------------


async def _slow_insert_of_key(db: asyncpg.Connection, key: str, seconds: float) -> None:
    """Make the INSERT of the run with idempotency key ``key`` take ``seconds`` in the
    database, so that its caller's cancellation lands while the INSERT executes."""
    await db.execute(
        f"""
        CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.idempotency_key = '{key}' THEN PERFORM pg_sleep({seconds}); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER slow_insert BEFORE INSERT ON saga.runs
            FOR EACH ROW EXECUTE FUNCTION public.slow_insert();
        """
    )


async def test_a_run_committed_by_a_cancelled_start_wakes_the_workers(
    orchestrator: OrchestratorFactory,
    open_client: ClientFactory,
    db: asyncpg.Connection,
) -> None:
    """README "What you can rely on", Durable start: "Cancelling the caller once the insert
    was sent, by any means (... `asyncio.timeout`, `asyncio.wait_for`, `Task.cancel()`
    ...), neither cancels nor loses the run: the insert completes, then the caller's
    cancellation proceeds." and How it works: "a NOTIFY wakes the workers (under load one
    per 5 ms per saga and process, and a trailing one after the others committed)".

    Two starts at the same instant from one client: the first NOTIFYs in its statement,
    the second relies on the trailing NOTIFY. The second's caller is cancelled
    (asyncio.timeout) while its INSERT executes; the insert commits, and its NOTIFY still
    wakes the workers (their poll is 10 s away)."""
    ledger = Ledger()
    s = small_saga("wake", 1, ledger=ledger)
    await orchestrator(s, poll_interval=10)
    client = await open_client(s, poll_interval=10)
    await _slow_insert_of_key(db, "second", 1.5)
    results: dict[str, Any] = {}

    async def first() -> None:
        results["first"] = await client.start(s, Job(n=1))

    async def second() -> None:
        try:
            async with asyncio.timeout(0.3):
                await client.start(s, Job(n=2), key="second")
        except TimeoutError:
            results["second"] = "timed out"

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
            # The first run is started, woken and done before the second commits.
            while "first" not in results:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            assert await results["first"].result() == "s1"
    assert results["second"] == "timed out"
    run_id = await db.fetchval("SELECT id FROM saga.runs WHERE idempotency_key = 'second'")
    assert run_id is not None, "the run whose insert was sent was lost"
    run = client.get_run(run_id)
    with anyio.fail_after(20):
        started = anyio.current_time()
        assert await run.result() == "s1"
        waited = anyio.current_time() - started
    assert waited < 3, (
        f"the run committed by a cancelled start() waited {waited:.1f} s for the "
        "workers' poll: no NOTIFY woke them"
    )


async def test_a_run_committed_by_a_cancelled_start_is_counted_as_started(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """README, Tracing and metrics: `saga.runs.started` counts "runs `start()`
    inserted"; Durable start: "Cancelling the caller once the insert was sent, by any
    means (..., `asyncio.timeout`, ...), neither cancels nor loses the run: the insert
    completes, then the caller's cancellation proceeds."

    A start whose caller is cancelled (asyncio.timeout) while its INSERT executes commits
    the run, and saga.runs.started counts it."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    s = small_saga("counted", 1)
    client = await open_client(s, meter_provider=MeterProvider(metric_readers=[reader]))
    await client.start(s, Job(n=1))  # one counted normally
    await _slow_insert_of_key(db, "k", 0.5)
    with anyio.fail_after(10), pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.start(s, Job(n=2), key="k")
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 2
    data = reader.get_metrics_data()
    started = 0
    for resource in data.resource_metrics if data is not None else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "saga.runs.started":
                    started += sum(p.value for p in metric.data.data_points)  # type: ignore[union-attr]
    assert started == 2, f"2 runs inserted by start(), saga.runs.started says {started}"


async def test_signal_cancelled_by_its_caller_still_wakes_the_waiting_run(
    orchestrator: OrchestratorFactory,
    open_client: ClientFactory,
    db: asyncpg.Connection,
) -> None:
    """README How it works: "A signal ... makes a run waiting for it due now, with a
    NOTIFY at commit (coalesced under load as a start's)", i.e. a trailing NOTIFY after
    the coalesced writes committed; DESIGN: "no wake-up is ever lost".

    A start and a signal of one saga at the same instant from one client: the start
    NOTIFYs in its statement, the signal is coalesced and counts on the trailing NOTIFY.
    The signal's caller is cancelled (asyncio.timeout) while its statement waits for the
    run's row; the signal is recorded (the write is shielded) and its NOTIFY still wakes
    the workers (their poll is 10 s away)."""
    s, decision = approval()
    await orchestrator(s, poll_interval=10)
    client = await open_client(s, poll_interval=10)
    waiting = await client.start(s, Job(n=1))
    with anyio.fail_after(10):
        while await waiting.status() != saga.RunStatus.WAITING:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    outcome: dict[str, Any] = {}
    tx = db.transaction()
    await tx.start()
    await db.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", waiting.id)

    async def start() -> None:
        outcome["start"] = await client.start(s, Job(n=2))

    async def signal() -> None:
        try:
            async with asyncio.timeout(0.3):
                await client.signal(waiting.id, decision, Decision(approved=True))
        except TimeoutError:
            outcome["signal"] = "timed out"

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(start)  # first in the 5 ms window: NOTIFYs itself
                tg.start_soon(signal)  # coalesced: relies on the trailing NOTIFY
                while "start" not in outcome:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                # The started run is woken by its own NOTIFY and parks at its wait
                # before the signal commits (nothing else claims afterwards).
                while await outcome["start"].status() != saga.RunStatus.WAITING:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
                await anyio.sleep(0.3)  # the signal's caller is cancelled meanwhile
                await tx.commit()  # the signal's statement goes on and commits
    finally:
        if db.is_in_transaction():  # never leave the row locked: the shielded write waits
            db.terminate()
    assert outcome["signal"] == "timed out"
    recorded = await db.fetchval("SELECT count(*) FROM saga.signals WHERE run_id = $1", waiting.id)
    assert recorded == 1, "the shielded signal was not recorded"
    with anyio.fail_after(20):
        started = anyio.current_time()
        assert await waiting.result() is True
        waited = anyio.current_time() - started
    assert waited < 3, (
        f"the run signalled by a cancelled signal() waited {waited:.1f} s for the "
        "workers' poll: no NOTIFY woke them"
    )


async def test_a_connection_outside_a_transaction_is_refused_and_nothing_is_written(
    orchestrator: OrchestratorFactory, dsn: str, db: asyncpg.Connection
) -> None:
    """README (In your transaction): conn= is "an asyncpg connection in an open
    transaction". One outside a transaction (each statement would commit alone: a start
    of several statements could be half-written) is refused with a ConfigurationError
    saying so, by start(), signal() and signal_key(), before anything is written."""
    s, decision = approval()
    orch = await orchestrator(s)
    waiting = await orch.start(s, Job(n=1), key="w")
    with anyio.fail_after(10):
        while await waiting.status() != saga.RunStatus.WAITING:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    signals = "SELECT count(*) FROM saga.signals WHERE payload IS NOT NULL"
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(saga.ConfigurationError, match="open transaction"):
            await orch.start(s, Job(n=2), key="order-1", conn=conn)
        with pytest.raises(saga.ConfigurationError, match="open transaction"):
            await orch.signal(waiting.id, decision, Decision(approved=True), conn=conn)
        with pytest.raises(saga.ConfigurationError, match="open transaction"):
            await orch.signal_key(s, "w", "decision", {"approved": True}, conn=conn)
    finally:
        await conn.close()
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 1
    assert await db.fetchval(signals) == 0
