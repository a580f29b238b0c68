"""result() never misses the end of a run, waiting costs one poll per orchestrator, and
waiters are told when their orchestrator closes."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory


def quick_saga(name: str = "quick") -> saga.Saga[Job]:
    """One step of up to 4 ms (random) returning n."""
    return small_saga(
        name,
        ["work"],
        delay=lambda: random.uniform(0, 0.004),
        result=lambda ctx: ctx.input.n,
        retry=None,
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_poll", [0.05, 30.0], ids=["worker polls", "worker listens"])
async def test_waiters_registering_while_runs_finish_are_always_woken(
    orchestrator: OrchestratorFactory, worker_poll: float
) -> None:
    """With the waiters' polling effectively off (30 s), 300 waiters call result() at
    random moments around their run's end (before, during and after its final write):
    every one returns within 5 s, so none missed the end-of-run notification. With the
    worker's polling off too, no start notification is missed either (starts coalesce
    their NOTIFYs, and the trailing one must follow every start it covers)."""
    s = quick_saga()
    client = await orchestrator(s, concurrency=0, poll_interval=30)
    await orchestrator(s, concurrency=16, poll_interval=worker_poll)
    rng = random.Random(7)

    async def one(n: int) -> None:
        run = await client.start(s, Job(n=n))
        await anyio.sleep(rng.uniform(0, 0.01))
        with anyio.fail_after(5):
            assert await run.result() == n

    for batch in range(10):
        async with anyio.create_task_group() as tg:
            for n in range(batch * 30, batch * 30 + 30):
                tg.start_soon(one, n)


async def test_a_waiter_is_told_when_its_orchestrator_closes(
    orchestrator: OrchestratorFactory,
) -> None:
    """A result() still waiting when its orchestrator closes raises LifecycleError at
    once instead of hanging; a result() after the close raises it too."""
    s = quick_saga()
    client = await orchestrator(s, concurrency=0)  # nobody executes: the run waits
    run = await client.start(s, Job(n=1))
    raised: list[BaseException] = []

    async def wait() -> None:
        try:
            await run.result()
        except saga.LifecycleError as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.1)
            await client.aclose()
    assert len(raised) == 1
    assert "closed" in str(raised[0])
    with pytest.raises(saga.LifecycleError):
        await run.result(timeout=1)


@pytest.fixture
async def counted_pool(dsn: str) -> AsyncIterator[tuple[asyncpg.Pool, Counter[str]]]:
    """A user pool that counts the statements it runs (asyncpg's query loggers)."""
    seen: Counter[str] = Counter()

    def log(record: Any) -> None:
        seen[" ".join(record.query.split())[:60]] += 1

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(log)

    async with asyncpg.create_pool(dsn, min_size=2, max_size=6, init=init) as pool:
        yield pool, seen


async def test_the_fallback_poll_is_one_query_however_many_wait(
    counted_pool: tuple[asyncpg.Pool, Counter[str]],
) -> None:
    """1,000 concurrent result() waiters on runs nobody executes cost the database one
    query per poll interval in all (every 0.1 s here), not one per waiter."""
    pool, seen = counted_pool
    s = quick_saga()
    async with saga.Orchestrator(
        pool, sagas=[s], concurrency=0, poll_interval=0.1, census_interval=3600
    ) as client:
        runs = [await client.start(s, Job(n=n)) for n in range(1000)]
        async with anyio.create_task_group() as tg:
            for run in runs:
                tg.start_soon(run.result)
            with anyio.fail_after(60):  # every waiter registered (slow on a busy machine)
                while await pool.fetchval("SELECT count(*) FROM saga.watches") < 1000:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            await anyio.sleep(0.2)
            seen.clear()
            await anyio.sleep(1.0)
            queries = sum(seen.values())
            tg.cancel_scope.cancel()
    # ~10 polls in a second, and nothing else: the waiters themselves ask nothing.
    assert 5 <= queries <= 20, seen


async def test_a_waiter_arriving_during_the_final_write_is_woken(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """The exact race, made deterministic: the run's final write is held for 0.3 s inside
    its statement (a trigger sleeps after the statement took its snapshot), and result()
    registers its watch and reads the run meanwhile (it sees the run still running).
    The final write must still notify it: with waiter polling off (30 s) it returns
    within 5 s."""
    await db.execute(
        """
        CREATE FUNCTION public.hold_final_write() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
        CREATE TRIGGER hold_final_write BEFORE UPDATE ON saga.runs
            FOR EACH ROW WHEN (NEW.due_at IS NULL) EXECUTE FUNCTION public.hold_final_write();
        """
    )
    s = quick_saga()
    client = await orchestrator(s, concurrency=0, poll_interval=30)
    await orchestrator(s, poll_interval=0.05)
    run = await client.start(s, Job(n=5))
    with anyio.fail_after(5):
        while not await db.fetchval(  # noqa: ASYNC110 - polling the database
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
        ):
            await anyio.sleep(0.005)
        assert await run.result() == 5
