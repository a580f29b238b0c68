"""Traffic control (lanes, rate limits) through deploys, restarts, dropped connections
and callers' transactions: lanes keep to their versions, and an attempt waiting for its
token is delayed, never failed, and holds up no other run."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import Job
from tests.conftest import ClientFactory, OrchestratorFactory


def _charge(
    name: str, limit: saga.RateLimit, calls: list[int], undone: list[int]
) -> saga.Saga[Job]:
    """``reserve`` (compensated: ``undone``) -> ``charge`` (one attempt, rate-limited
    by ``limit``: ``calls``)."""
    s = saga.Saga(name, input=Job)

    @s.step()
    async def reserve(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    @reserve.compensate
    async def unreserve(ctx: saga.Context[Job], n: int) -> None:
        undone.append(n)

    @s.step(rate_limit=limit, retry=saga.Retry(max_attempts=1))
    async def charge(ctx: saga.Context[Job]) -> int:
        calls.append(ctx.input.n)
        return ctx.input.n

    return s


@pytest.mark.timeout(60)
async def test_a_lane_orchestrator_does_not_run_an_older_version_of_another_lane(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """README, Traffic control, Lanes: "`Saga(lane="payments")` and
    `Orchestrator(lanes=["payments"])`: that orchestrator executes only the sagas of
    those lanes". A deploy moves saga `transfer` into the "payments" lane (version 2,
    `lane="payments"`) while version 1 (default lane) still has runs to drain, so both
    versions are registered. The payments-only orchestrator leaves version 1's runs to
    the default lane's workers."""
    ran: list[int] = []
    v1 = saga.Saga("transfer", input=Job, version=1)

    @v1.step()
    async def move_v1(ctx: saga.Context[Job]) -> int:
        ran.append(1)
        return 1

    v2 = saga.Saga("transfer", input=Job, version=2, lane="payments")

    @v2.step()
    async def move_v2(ctx: saga.Context[Job]) -> int:
        ran.append(2)
        return 2

    client = await open_client(v1, v2)
    old = await client.start(v1, Job(n=1))
    await orchestrator(v1, v2, lanes=["payments"])
    new = await client.start(v2, Job(n=2))
    assert await new.result(timeout=10) == 2
    await anyio.sleep(1.0)
    info = await old.info()
    assert 1 not in ran, (
        f"the payments-lane orchestrator executed a default-lane run (status {info.status})"
    )
    assert info.status is saga.RunStatus.PENDING


@pytest.mark.timeout(90)
async def test_an_attempt_waiting_for_its_token_is_not_failed_by_two_restarts(
    dsn: str, open_client: ClientFactory
) -> None:
    """README, Traffic control, Rate limits: "Attempts beyond the limit are delayed,
    never failed, holding their lease"; and a cancel while waiting means "its step does
    not start". A step (`max_attempts=1`, as a card charge may be) whose limit's next
    token is 20 s away waits for it; its worker shuts down gracefully (a deploy) while
    it waits, and the worker that takes the run over shuts down too while its attempt
    waits again (the abandoned token stays spent, so the wait is now 40 s). The step
    never started: neither give-back counts, and the run neither fails the step nor
    rolls back."""
    calls: list[int] = []
    undone: list[int] = []
    slow = saga.RateLimit("bank_traffic", per_second=0.05, burst=1)
    s = _charge("charge_traffic", slow, calls, undone)

    client = await open_client(s)
    first = await client.start(s, Job(n=1))  # takes the bucket's only token
    options: dict[str, Any] = {"sagas": [s], "poll_interval": 0.2, "shutdown_timeout": 0.5}
    async with saga.Orchestrator(dsn, **options):
        assert await first.result(timeout=10) == 1
    second = await client.start(s, Job(n=2))
    for restart in range(2):
        async with saga.Orchestrator(dsn, **options):
            with anyio.fail_after(15):
                while (  # noqa: ASYNC110
                    len([e for e in await second.history() if e.kind == "rate_limited"]) <= restart
                ):
                    await anyio.sleep(0.05)
            await anyio.sleep(0.3)
    async with saga.Orchestrator(dsn, **options):
        await anyio.sleep(2.0)
        info = await second.info()
        history = await second.history()
    failed = [e.data for e in history if e.kind == "step_failed"]
    assert calls == [1], calls  # the second run's charge never started
    assert (failed, undone) == ([], []), (
        f"a step that only waited for its rate-limit token was failed ({failed}) and the "
        f"run rolled back (status {info.status})"
    )


@pytest.mark.timeout(60)
async def test_a_connection_dropped_while_taking_a_token_does_not_fail_the_step(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """DESIGN: "A crash, a deploy, a dropped connection or a killed pod loses nothing:
    the run resumes from the step where it stopped"; README, Rate limits: "each attempt
    first takes a token of a bucket shared through the database (one short statement
    ...). Attempts beyond the limit are delayed, never failed"; and "A database outage
    does not [count an attempt]". A step (`max_attempts=1`) with a rate limit whose
    bucket has plenty of tokens: the worker's connection is dropped while its token
    statement runs (it waits on the bucket's row, held for a moment by another
    transaction, and its backend is terminated). The step never started: the token is
    taken again once the connection is back, and the run completes."""
    calls: list[int] = []
    undone: list[int] = []
    api = saga.RateLimit("api_traffic", per_second=100, burst=100)
    s = _charge("drop_traffic", api, calls, undone)

    orch = await orchestrator(s, lease_seconds=1)
    assert await (await orch.start(s, Job(n=1))).result(timeout=10) == 1  # the bucket exists
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM saga.rate_limits WHERE name = 'api_traffic' FOR UPDATE")
        run = await orch.start(s, Job(n=2))
        with anyio.fail_after(10):
            while True:
                pids = await db.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%rate_limits%'"
                )
                if pids:
                    break
                await anyio.sleep(0.02)
        await db.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
        await tx.rollback()
    finally:
        await holder.close()
    outcome: Any
    try:
        outcome = await run.result(timeout=20)
    except saga.RunError as exc:
        outcome = exc
    failed = [e.data for e in await run.history() if e.kind == "step_failed"]
    assert outcome == 2, (
        f"one dropped connection while taking a token (the step never ran: calls {calls}) "
        f"failed the step {failed} and rolled the run back (undone {undone}): {outcome}"
    )


class Approval(BaseModel):
    ok: bool


@pytest.mark.timeout(60)
async def test_a_callers_transaction_on_one_run_does_not_hold_other_runs_tokens(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README, In your transaction: "A signal locks the run's row until your transaction
    ends, so keep such transactions short: the workers' writes of that run wait for it.
    No other run's do" (the one exception named is a keyed run's end). README, Rate
    limits: taking a token is "one short statement". Run R's rate-limited step takes a
    token while the bucket is in debt, as a webhook handler's open transaction has just
    signalled R (`signal(conn=)`, R not yet at its wait: the signal is kept). R's
    `rate_limited` event waits for R's row, but the bucket's row is not held meanwhile:
    another run, whose token is a fraction of a second away, completes while the
    caller's transaction stays open."""
    api = saga.RateLimit("shared_traffic", per_second=20, burst=1)
    order_done: list[float] = []
    signed = saga.Saga("signed_traffic", input=Job)

    @signed.step(rate_limit=api)
    async def submit(ctx: saga.Context[Job]) -> int:
        return 1

    signed.wait_for("approve", Approval)

    @signed.step()
    async def finish(ctx: saga.Context[Job]) -> int:
        return 2

    other = saga.Saga("other_traffic", input=Job)

    @other.step(rate_limit=api)
    async def call(ctx: saga.Context[Job]) -> int:
        order_done.append(anyio.current_time())
        return 3

    orch = await orchestrator(signed, other, concurrency=8)
    assert await (await orch.start(other, Job(n=0))).result(timeout=10) == 3  # bucket exists
    order_done.clear()
    bucket = await asyncpg.connect(dsn)
    caller = await asyncpg.connect(dsn)
    try:
        hold = bucket.transaction()
        await hold.start()
        await bucket.execute(  # the bucket in debt: R's token is some way off
            "UPDATE saga.rate_limits SET tokens = -1, updated_at = clock_timestamp()"
            " WHERE name = 'shared_traffic'"
        )
        r = await orch.start(signed, Job(n=1))
        with anyio.fail_after(10):  # R is claimed and its token statement waits
            while not await db.fetchval(  # noqa: ASYNC110 - another process's lock wait
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%rate_limits%'"
            ):
                await anyio.sleep(0.02)
        tx = caller.transaction()
        await tx.start()
        await orch.signal(r.id, "approve", Approval(ok=True), conn=caller)
        await hold.commit()  # R's token statement goes on, the bucket in debt
        await anyio.sleep(0.2)
        started = anyio.current_time()
        other_run = await orch.start(other, Job(n=2))
        with anyio.move_on_after(3):
            await other_run.result()
        waited = anyio.current_time() - started
        await tx.commit()
        assert await other_run.result(timeout=10) == 3
        assert await r.result(timeout=10) == 2
    finally:
        await bucket.close()
        await caller.close()
    assert waited < 2.0, (
        f"another run's rate-limited step waited {waited:.1f} s for a caller's transaction "
        "holding run R's row (its token was a fraction of a second away)"
    )
