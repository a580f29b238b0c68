"""A sleep's until() and a wait's on_timeout function cannot hold their run for ever.

README (Waits): they have 60 s to return; past that they failed with TimeoutError (the
run rolls back, as when they raise), even if they swallowed their cancellation. The
tests shorten the 60 s (``saga._parked.CALLBACK_SECONDS``) to keep them quick.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio
import pytest
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, Ledger
from tests.conftest import OrchestratorFactory
from tests.test_waits import Decision, approval_saga, sleep_saga


@pytest.fixture(autouse=True)
def _short_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("saga._parked.CALLBACK_SECONDS", 0.3)


async def _never() -> None:
    await anyio.sleep_forever()


async def _swallowing() -> None:
    try:
        await anyio.sleep(30)
    except BaseException:  # the hostile code under test
        return


@pytest.mark.parametrize("hang", [_never, _swallowing])
async def test_an_until_function_that_never_returns_rolls_the_run_back(
    orchestrator: OrchestratorFactory, hang: object
) -> None:
    """until() that never returns (or swallows its cancellation and returns late):
    the step before the sleep is undone and the run ends compensated, with a
    TimeoutError naming the sleep, instead of holding its run and slot for ever."""
    ledger = Ledger()

    async def until(ctx: saga.Context[Job]) -> datetime:
        await hang()  # type: ignore[operator]
        return datetime.now(UTC)  # late: not used

    s = sleep_saga(ledger, until=until)
    await orchestrator(s)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10), pytest.raises(saga.RunCompensatedError) as raised:
        await run.result()
    assert raised.value.error is not None
    assert raised.value.error.type == "TimeoutError"
    assert "until() of sleep" in raised.value.error.message
    assert ledger.steps("compensation") == ["first"]


@pytest.mark.parametrize("hang", [_never, _swallowing])
async def test_an_on_timeout_function_that_never_returns_rolls_the_run_back(
    orchestrator: OrchestratorFactory, hang: object
) -> None:
    """A wait's on_timeout function that never returns: the run rolls back (compensated,
    TimeoutError naming the wait), as when the function raises."""
    ledger = Ledger()

    async def default(ctx: saga.Context[Job]) -> Decision:
        await hang()  # type: ignore[operator]
        return Decision(approved=True, by="late")  # late: not used

    s, _ = approval_saga(ledger, timeout=0.5, on_timeout=default)
    await orchestrator(s)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10), pytest.raises(saga.RunCompensatedError) as raised:
        await run.result()
    assert raised.value.error is not None
    assert raised.value.error.type == "TimeoutError"
    assert "on_timeout of wait 'decision'" in raised.value.error.message
    assert ledger.steps("compensation") == ["reserve"]


async def test_an_until_function_ignoring_its_cancellation_does_not_hold_its_run(
    orchestrator: OrchestratorFactory,
) -> None:
    """An until() that keeps running through its time limit's cancellation (12 s here)
    is given up as a step ignoring its timeout is (its lease's length later): other
    attempts take over, and once they are used up the run rolls back, well before the
    hostile function ends."""
    ledger = Ledger()

    async def until(ctx: saga.Context[Job]) -> datetime:
        end = time.monotonic() + 12
        while time.monotonic() < end:
            try:
                await anyio.sleep(0.05)
            except BaseException:  # the hostile code under test
                time.sleep(0.005)  # noqa: ASYNC251 - throttles the re-delivered cancellations
        return datetime.now(UTC)  # late: not used

    s = sleep_saga(ledger, until=until)
    with capture_logs():
        await orchestrator(s, lease_seconds=0.5)
        run = await s.start(Job(n=1))
        with anyio.fail_after(9), pytest.raises(saga.RunError):
            await run.result()
