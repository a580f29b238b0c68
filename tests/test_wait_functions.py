"""A sleep's until() and a wait's on_timeout function cannot hold their run for ever.

README (Waits): they have 60 s to return; past that they failed with TimeoutError (the
run rolls back, as when they raise), even if they swallowed their cancellation. The
tests shorten the 60 s (``saga._parked.CALLBACK_SECONDS``) to keep them quick.
"""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import pytest

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
