"""A sleep until a time: it ends at that time by the database's clock, whatever the
worker's clock says; until() past its time limit fails, even a sync one that blocks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job
from tests.conftest import OrchestratorFactory


@pytest.fixture
def worker_clock(monkeypatch: pytest.MonkeyPatch) -> list[timedelta]:
    """The worker's wall clock, off the database's by the skew the test sets (a host
    whose NTP drifted, a container with a wrong clock): ``datetime.now`` in
    saga._parked, where a sleep's length was computed with the worker's clock."""
    import saga._parked as parked

    skew = [timedelta(0)]

    class Skewed(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:  # type: ignore[override]
            return datetime.now(tz) + skew[0]

    monkeypatch.setattr(parked, "datetime", Skewed)
    return skew


def sleep_until_saga(name: str, target: datetime) -> saga.Saga[Job]:
    """a -> sleep until ``target`` (a fixed, timezone-aware time) -> b."""
    s = saga.Saga(name, input=Job)

    @s.step()
    async def a(ctx: saga.Context[Job]) -> int:
        return 1

    s.sleep(until=lambda ctx: target)

    @s.step()
    async def b(ctx: saga.Context[Job]) -> int:
        return 2

    return s


@pytest.mark.timeout(60)
async def test_a_sleep_until_a_time_already_past_wakes_at_once_whatever_the_workers_clock(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, worker_clock: list[timedelta]
) -> None:
    """README, Waits ("Declaring"): "`saga.sleep(until=fn)` (a function ... returning a
    timezone-aware `datetime`; a time already past wakes at once)"; ("Timeouts"): timers
    count "in the database's clock: it does not restart when workers do"; DESIGN
    (Leasing): times are "computed by the database clock (never a worker's clock)".

    until() returns a time one minute in the past by the database's clock, on a worker
    whose clock is an hour behind the database's: the run wakes at once and completes.
    Before, the worker turned the time into "seconds from now" with its own clock, 59
    minutes, which the database added to its clock: the run slept about an hour more."""
    worker_clock[0] = timedelta(hours=-1)
    db_now: datetime = await db.fetchval("SELECT now()")
    s = sleep_until_saga("skew_past", db_now - timedelta(minutes=1))
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    try:
        got = await run.result(timeout=10)
    except saga.RunTimeoutError:
        info = await run.info()
        pytest.fail(
            f"a sleep until {db_now - timedelta(minutes=1)} (already past in the database) "
            f"did not wake at once: the run is {info.status}, due at {info.due_at}"
        )
    assert got == 2


@pytest.mark.timeout(60)
async def test_a_sleep_until_a_time_ends_at_that_time_whatever_the_workers_clock(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, worker_clock: list[timedelta]
) -> None:
    """README, Waits ("Declaring"): "`saga.sleep(until=fn)` (a function of the context
    returning a timezone-aware `datetime` ...)": the run sleeps until that time
    (RunInfo.due_at: "when it ends"); ("Timeouts") timers count "in the database's
    clock".

    until() returns the database's now + 30 minutes, on a worker whose clock is an hour
    ahead: the sleep lasts about 30 minutes (its `sleep_started` records the seconds).
    Before, the worker computed the length with its own clock: "already past", 0
    seconds, and the run woke at once, half an hour early (a trial converted early, a
    reminder sent before its time)."""
    worker_clock[0] = timedelta(hours=1)
    db_now: datetime = await db.fetchval("SELECT now()")
    target = db_now + timedelta(minutes=30)
    s = sleep_until_saga("skew_ahead", target)
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(15):
        while True:
            started = [e for e in await run.history() if e.kind == "sleep_started"]
            if started:
                break
            await anyio.sleep(0.05)
    seconds = started[0].data["seconds"]
    status = (await run.info()).status
    assert abs(seconds - 1800) < 60, (
        f"a sleep until {target} (30 minutes ahead in the database) was recorded as "
        f"{seconds} s; the run is now {status}"
    )


@pytest.mark.timeout(60)
async def test_a_sync_until_that_returns_past_its_time_limit_fails_with_timeout_error(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, Waits ("Declaring"): `saga.sleep(until=fn)` takes "a function, sync or
    async"; ("Timeouts"): "A sleep's `until()` and an `on_timeout` function have 60 s to
    return: past that they fail with `TimeoutError`, as if they had raised".

    The limit is shortened to 0.3 s here, as tests/test_wait_functions.py does
    (``saga._parked.CALLBACK_SECONDS``); a sync until() takes 1 s (a blocking call to a
    calendar service) and then returns a time a day ahead. Past its limit it fails with
    TimeoutError: the step before the sleep is undone and the run ends compensated.
    Before, the late value was taken and the run slept: the limit is a cancel scope,
    which a sync function never reaches a checkpoint of, and the elapsed time was not
    checked once it returned."""
    monkeypatch.setattr("saga._parked.CALLBACK_SECONDS", 0.3)
    undone: list[int] = []
    s = saga.Saga("slow_sync_until", input=Job)

    @s.step()
    async def hold(ctx: saga.Context[Job]) -> int:
        return 1

    @hold.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        undone.append(n)

    def until(ctx: saga.Context[Job]) -> datetime:
        time.sleep(1.0)  # the user's blocking call, 1 s against a 0.3 s limit
        return datetime.now(UTC) + timedelta(days=1)

    s.sleep(until=until)

    @s.step()
    async def after(ctx: saga.Context[Job]) -> int:
        return 2

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(15):
        while (info := await run.info()).status not in (  # noqa: ASYNC110 - the database
            saga.RunStatus.SLEEPING,
            saga.RunStatus.COMPENSATED,
            saga.RunStatus.COMPLETED,
        ):
            await anyio.sleep(0.05)
    assert info.status is saga.RunStatus.COMPENSATED, (
        f"until() returned after 1 s against its 0.3 s limit and was taken: the run is "
        f"{info.status}, due at {info.due_at}, nothing undone ({undone})"
    )
    assert info.error is not None
    assert info.error.type == "TimeoutError"
