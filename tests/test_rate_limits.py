"""Rate limits shared by every worker on the database: attempts beyond the limit are
delayed (never failed), the delay is in the run's history, and bad limits are refused
at definition time."""

from __future__ import annotations

import bisect
import math
from datetime import datetime

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job, small_saga
from tests._traffic_sagas import PROVIDER, limited
from tests.conftest import Children, ClientFactory, OrchestratorFactory


@pytest.mark.timeout(120)
async def test_500_calls_at_50_per_second_across_two_processes(
    children: Children, open_client: ClientFactory, dsn: str, db: asyncpg.Connection
) -> None:
    """Two `saga worker` processes (64 slots each) run 500 runs whose one step names a
    limit of 50/s with a burst of 10: all complete, none failed, the whole takes at least
    (500 - 10) / 50 = 9.8 s, the delays are in the history, and the tokens they waited
    for (the database's clock) never put more than 50 in any second."""
    for n in range(2):
        children.saga_worker(dsn, "tests._traffic_sagas:limited", "--concurrency", "64",
                             name=f"worker{n}")  # fmt: skip
    for child in children.started:
        await child.wait_ready()
    client = await open_client(limited)
    runs = [await client.start(limited, Job(n=n)) for n in range(500)]
    with anyio.fail_after(90):
        for run in runs:
            await run.result()
    starts: list[datetime] = [
        r[0]
        for r in await db.fetch(
            "SELECT at FROM saga.events WHERE kind = 'step_completed' ORDER BY at"
        )
    ]
    assert len(starts) == 500
    span = (starts[-1] - starts[0]).total_seconds()
    assert span >= (500 - 10) / 50 * 0.95
    # When each delayed attempt got its token: the time it took one plus its delay (the
    # database's clock); reservations are 1/50 s apart, so no second holds more than 50.
    tokens = [
        r[0]
        for r in await db.fetch(
            "SELECT extract(epoch FROM at) + (data->>'delay')::float8 FROM saga.events"
            " WHERE kind = 'rate_limited' ORDER BY 1"
        )
    ]
    assert len(tokens) >= 400
    busiest = max(bisect.bisect_left(tokens, t + 1.0) - i for i, t in enumerate(tokens))
    assert busiest <= 50 + 2  # + 2: the window's two ends
    limits = await db.fetch("SELECT DISTINCT data->>'limit' FROM saga.events WHERE data ? 'limit'")
    assert [r[0] for r in limits] == ["provider"]
    assert await db.fetchval("SELECT count(*) FROM saga.events WHERE kind = 'step_failed'") == 0


async def test_the_delay_is_recorded_with_the_attempt(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A limit of 2/s with a burst of 1: the second and third runs' attempts wait about
    0.5 s and 1 s; each wait is a rate_limited event (limit, delay) before the step
    completes, in its run's history."""
    slow = saga.RateLimit("slow", per_second=2, burst=1)
    s = saga.Saga("paced", input=Job)

    @s.step(rate_limit=slow)
    async def call(ctx: saga.Context[Job]) -> int:
        return 1

    orch = await orchestrator(s)
    runs = [await orch.start(s, Job(n=n)) for n in range(3)]
    with anyio.fail_after(10):
        for run in runs:
            await run.result()
    waited = []
    for run in runs:
        events = await run.history()
        limited_events = [e for e in events if e.kind == "rate_limited"]
        waited += [e.data["delay"] for e in limited_events]
        for e in limited_events:
            assert e.data["limit"] == "slow"
            kinds = [x.kind for x in events]
            assert kinds.index("rate_limited") < kinds.index("step_completed")
    assert len(waited) == 2
    assert sorted(round(w * 2) / 2 for w in waited) == [0.5, 1.0]


@pytest.mark.parametrize("graph", [False, True], ids=["linear", "parallel steps"])
async def test_a_cancel_while_waiting_for_a_token_starts_no_step(
    orchestrator: OrchestratorFactory, graph: bool
) -> None:
    """A run cancelled while its step waits for a rate-limit token (here 20 s away) does
    not wait for it: a heartbeat sees the cancel, the step never runs (no side effect
    after the cancel), the completed step before it is compensated, and the run ends
    cancelled within seconds, on the linear path and with parallel steps alike."""
    slow = saga.RateLimit("slow", per_second=0.05, burst=1)
    calls: list[int] = []
    undone: list[int] = []
    s = saga.Saga("paced_undo", input=Job)

    @s.step()
    async def book(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    @book.compensate
    async def unbook(ctx: saga.Context[Job], n: int) -> None:
        undone.append(n)

    @s.step(rate_limit=slow, after=[book] if graph else None)
    async def call(ctx: saga.Context[Job]) -> int:
        calls.append(ctx.input.n)
        return 1

    if graph:  # a fork after book: the steps really run in parallel (the graph path)

        @s.step(after=[book])
        async def side(ctx: saga.Context[Job]) -> int:
            return 2

    orch = await orchestrator(s, lease_seconds=0.6)  # a heartbeat every 0.2 s
    assert (s.graph is not None) is graph  # (known once registered)
    first = await orch.start(s, Job(n=1))  # takes the only token
    await first.result(timeout=10)
    second = await orch.start(s, Job(n=2))
    with anyio.fail_after(10):
        while not [e for e in await second.history() if e.kind == "rate_limited"]:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    await second.cancel()
    with anyio.fail_after(5), pytest.raises(saga.RunCancelledError):
        await second.result()
    assert calls == [1]
    assert undone == [2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"per_second": 0}, "per_second"),
        ({"per_second": -5}, "per_second"),
        ({"per_second": math.nan}, "per_second"),
        ({"per_second": math.inf}, "per_second"),
        ({"per_second": 10, "burst": 0}, "burst"),
        ({"per_second": 10, "burst": 2.5}, "burst"),
        ({"per_second": 10**7}, "per_second"),
        ({"per_second": 1e-300}, "one an hour at least"),
        ({"per_second": 1 / 3601}, "one an hour at least"),
    ],
)
def test_bad_limits_are_refused(args: dict[str, float], message: str) -> None:
    """A rate of zero, negative, NaN, infinite, absurd or below one call an hour (an
    attempt waits for its token holding its lease), a burst below 1 or not an int:
    DefinitionError naming the setting, at definition time; one an hour is accepted."""
    assert saga.RateLimit("hourly", per_second=1 / 3600).burst == 1
    with pytest.raises(saga.DefinitionError, match=message):
        saga.RateLimit("api", **args)  # type: ignore[arg-type]
    with pytest.raises(saga.DefinitionError, match="rate limit name"):
        saga.RateLimit("bad name", per_second=1)


def test_one_name_one_limit() -> None:
    """Two steps naming the limit "api" with different rates is a DefinitionError when
    an orchestrator is built with them; a step's rate_limit must be a RateLimit."""
    a = small_saga("a", 1)
    b = saga.Saga("b", input=Job)

    @b.step(rate_limit=saga.RateLimit("api", per_second=5))
    async def one(ctx: saga.Context[Job]) -> int:
        return 1

    c = saga.Saga("c", input=Job)

    @c.step(rate_limit=saga.RateLimit("api", per_second=6))
    async def two(ctx: saga.Context[Job]) -> int:
        return 2

    with pytest.raises(saga.DefinitionError, match="declared twice"):
        saga.Orchestrator("postgresql://x", sagas=[a, b, c])
    declare = saga.Saga("a2", input=Job).step(rate_limit=50)  # type: ignore[arg-type]
    with pytest.raises(saga.DefinitionError, match=r"rate_limit must be a saga\.RateLimit"):
        declare(one.fn)
    assert PROVIDER.burst == 10
