"""A cancel is refused from the moment a run reaches its pivot: an attempt of the pivot
began. A run whose next step is its pivot but that has not started it (queued behind
its key, a child queued so, not claimed yet) is cancelled as any other, and a keyed run
whose key resolving freed says so when cancelled."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import FAST, Ledger, until_status
from tests.conftest import OrchestratorFactory

_ENDED = [status for status in saga.RunStatus if status.is_terminal]


class Pay(BaseModel):
    n: int = 0


class Acct(BaseModel):
    account: str = "a"
    n: int = 0


def _keyed_pivot_stop(ledger: Ledger, name: str = "kpivot") -> saga.Saga[Any]:
    s = saga.Saga(name, input=Acct, concurrency_key=lambda a: a.account)

    @s.step(retry=FAST)
    async def book(ctx: saga.Context[Acct]) -> int:
        ledger.record(ctx)
        return 1

    @book.compensate
    async def unbook(ctx: saga.Context[Acct], n: int) -> None:
        ledger.record(ctx, n)

    @s.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"), pivot=True)
    async def pay(ctx: saga.Context[Acct]) -> int:
        ledger.record(ctx)
        if ctx.input.n == 0:
            raise RuntimeError("bank down")
        return 2

    return s


@pytest.mark.timeout(30)
async def test_cancel_of_a_resolved_keyed_run_stopped_at_its_pivot_says_the_key_was_freed(
    orchestrator: OrchestratorFactory,
) -> None:
    """README (RunHandle, resolve): "a later retry() or cancel() makes it unresolved
    again, except on a run with a concurrency key: resolving it freed the key for the
    next run, so its retry(), cancel() and skip_compensation() raise
    InvalidRunStateError (saying so)". And Pivot steps: a cancel is refused past the
    pivot "except when the pivot itself gave up and stopped the run ... cancel() undoes
    the steps before it".

    A keyed run whose pivot gave up with on_give_up="stop", then resolved: cancel()
    raises, saying that resolving freed its key. Before, its message said the run
    "reached its pivot step 'pay': it only goes forward now (a run stopped after it is
    retried, not cancelled)": the wrong reason (the pivot never completed) and advice
    to retry(), which is refused too."""
    ledger = Ledger()
    s = _keyed_pivot_stop(ledger)
    orch = await orchestrator(s)
    run = await orch.start(s, Acct())
    info = await until_status(run, saga.RunStatus.STOPPED)
    assert info.step == "pay"
    assert info.concurrency_key == "a"
    await run.resolve(note="handled by phone", by="ana")
    with pytest.raises(saga.InvalidRunStateError) as retried:
        await run.retry()
    assert "freed its concurrency key" in str(retried.value)  # holds
    with pytest.raises(saga.InvalidRunStateError) as cancelled:
        await run.cancel()
    message = str(cancelled.value)
    assert "freed its concurrency key" in message, message
    assert "is retried" not in message, message


def _pivot_first(calls: list[int]) -> saga.Saga[Any]:
    """A keyed payment saga whose first step is the pivot (capture), then ship; the
    capture of input n=0 gives up and stops the run for an operator (keeping the key)."""
    s = saga.Saga("capture_first", input=Acct, concurrency_key=lambda a: a.account)

    @s.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"), pivot=True)
    async def capture(ctx: saga.Context[Acct]) -> int:
        calls.append(ctx.input.n)
        if ctx.input.n == 0:
            raise RuntimeError("bank down")
        return ctx.input.n

    @s.step(retry=FAST)
    async def ship(ctx: saga.Context[Acct]) -> int:
        return ctx.input.n

    return s


@pytest.mark.timeout(30)
async def test_a_run_queued_for_its_key_whose_first_step_is_the_pivot_can_be_cancelled(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Traffic control: runs queued behind their concurrency key are pending
    until admitted, and "A cancelled waiting run never runs"; Pivot steps: "before it, a
    failure compensates as always ... A cancel is refused (InvalidRunStateError) from
    the moment the run reaches its pivot".

    A second payment for an account waits behind the first (stopped for an operator,
    holding the key). It has not started its pivot: cancel() is accepted and it never
    runs. Before, cancel() raised "reached its pivot step 'capture'": a run whose
    current step was the pivot counted as past it, and a run not started has its first
    step as current; it captured the payment once the key freed."""
    calls: list[int] = []
    s = _pivot_first(calls)
    orch = await orchestrator(s)
    holder = await orch.start(s, Acct(n=0))
    await until_status(holder, saga.RunStatus.STOPPED)
    queued = await orch.start(s, Acct(n=1))
    await anyio.sleep(0.3)
    info = await queued.info()
    assert info.status is saga.RunStatus.PENDING
    assert info.waiting_for_key
    assert calls == [0]
    await queued.cancel(by="ana", note="customer withdrew the order")
    await holder.cancel(by="ana", note="bank down: undo")  # frees the key
    with pytest.raises(saga.RunCancelledError):
        await queued.result(timeout=10)
    assert calls == [0], "the cancelled queued run captured the payment"


@pytest.mark.timeout(40)
async def test_cancelling_a_parent_whose_queued_child_starts_with_its_pivot_never_runs_the_child(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: compensating the step (a cancel) "cancels its running and
    stopped children ... it completes when they all ended"; "child sagas may have keys";
    Traffic control: "A cancelled waiting run never runs"; Pivot steps: a cancel is
    refused only "from the moment the run reaches its pivot".

    The child saga's first step is its pivot (capture a payment). Its run waits queued
    behind its key (another run holds it, stopped for an operator). The parent is
    cancelled: the child, which never started, is cancelled with it and never runs; the
    parent ends ``cancelled``. Before, the child was refused its cancel as if it had
    reached its pivot, captured the payment once the key freed, and the parent ended
    ``failed``."""
    calls: list[int] = []
    child = _pivot_first(calls)
    parent = saga.Saga("order", input=Acct)

    @parent.step()
    async def reserve(ctx: saga.Context[Acct]) -> int:
        return 1

    @reserve.compensate
    async def release(ctx: saga.Context[Acct], n: int) -> None:
        pass

    parent.children("captures", child, lambda ctx: [Acct(n=5)], after=[reserve])
    orch = await orchestrator(parent, child)
    holder = await orch.start(child, Acct(n=0))
    await until_status(holder, saga.RunStatus.STOPPED)
    run = await orch.start(parent, Acct())
    with anyio.fail_after(15):
        while True:
            kids = [
                r for r in (await saga.list_runs(orch, saga=child.name)).runs if r.id != holder.id
            ]
            if kids and kids[0].waiting_for_key:
                break
            await anyio.sleep(0.05)
    kid = orch.get_run(kids[0].id)
    await run.cancel(by="ana", note="order withdrawn")
    await anyio.sleep(0.5)
    await holder.cancel(by="ana", note="bank down: undo")  # frees the key
    with anyio.fail_after(10):
        parent_status = (await until_status(run, *_ENDED)).status
    await anyio.sleep(0.5)
    assert calls == [0], f"the queued child of a cancelled parent captured: {calls}"
    assert parent_status is saga.RunStatus.CANCELLED, parent_status
    assert (await kid.info()).status is saga.RunStatus.CANCELLED


@pytest.mark.timeout(40)
async def test_cancel_after_retry_of_a_run_stopped_at_its_pivot_is_refused(dsn: str) -> None:
    """README, Pivot steps: "A cancel is refused (`InvalidRunStateError`) from the
    moment the run reaches its pivot (an attempt of the pivot began ...), except when the
    pivot itself gave up and stopped the run"; and "`retry()` runs that step again with
    fresh attempts, and the run goes on".

    The pivot `capture` began (its attempt failed and, `on_give_up="stop"`, stopped the
    run); the operator chose `retry()`. Until a worker claims it again, `cancel()` is
    refused: an attempt of the pivot began. A first version of the rule read the run's
    attempt counter, which `retry()` resets to 0, and accepted the cancel."""
    calls: list[str] = []
    s: saga.Saga[Pay] = saga.Saga("h19_retry_pivot", input=Pay)

    @s.step(retry=FAST)
    async def book(ctx: saga.Context[Pay]) -> int:
        calls.append("book")
        return 1

    @book.compensate
    async def release(ctx: saga.Context[Pay], n: int) -> None:
        calls.append("release")

    @s.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"), pivot=True)
    async def capture(ctx: saga.Context[Pay]) -> int:
        calls.append("capture")
        if calls.count("capture") == 1:
            raise RuntimeError("bank timed out")
        return 2

    async with saga.Orchestrator(dsn, sagas=[s], poll_interval=0.2, shutdown_timeout=2.0) as orch:
        run = await orch.start(s, Pay())
        info = await until_status(run, saga.RunStatus.STOPPED)
        assert info.step == "capture"
    # No worker now: the retried run waits to be claimed.
    async with saga.Client(dsn, sagas=[s], poll_interval=0.2) as client:
        await client.retry(run.id, by="ana", note="bank is back")
        with pytest.raises(saga.InvalidRunStateError):
            await client.cancel(run.id, by="bob")
        info = await client.info(run.id)
        assert not info.cancel_requested, info


@pytest.mark.timeout(40)
async def test_a_run_stopped_at_its_pivot_by_a_failing_until_cannot_be_cancelled(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Pivot steps: "once it completed, nothing before it is ever compensated";
    "a sleep's `until()` that raises stops it at the step before the sleep, whose
    `retry()` runs that step again, then `until()`"; "A cancel is refused
    (`InvalidRunStateError`) from the moment the run reaches its pivot (an attempt of
    the pivot began ...), except when the pivot itself gave up and stopped the run
    (`on_give_up="stop"` on the pivot)".

    The pivot `capture` ran and returned; the sleep after it computes its end with
    `until()`, which raises: the run stops at `capture` (not recorded completed). Its
    pivot did not give up: `cancel()` is refused, nothing before it is undone. A first
    version of the rule read the run's attempt counter, which the stop sets to 0, and
    the run rolled back around a captured payment."""
    calls: list[str] = []
    s: saga.Saga[Pay] = saga.Saga("h19_until_pivot", input=Pay)

    @s.step(retry=FAST)
    async def book(ctx: saga.Context[Pay]) -> int:
        calls.append("book")
        return 1

    @book.compensate
    async def release(ctx: saga.Context[Pay], n: int) -> None:
        calls.append("release")

    @s.step(retry=FAST, pivot=True)
    async def capture(ctx: saga.Context[Pay]) -> int:
        calls.append("capture")
        return 2

    def broken(ctx: saga.Context[Pay]) -> Any:
        raise RuntimeError("calendar service down")

    s.sleep(until=broken)

    @s.step(retry=FAST)
    async def ship(ctx: saga.Context[Pay]) -> int:
        return 3

    orch = await orchestrator(s)
    run = await orch.start(s, Pay())
    info = await until_status(run, saga.RunStatus.STOPPED)
    assert info.step == "capture"
    assert calls == ["book", "capture"]
    with pytest.raises(saga.InvalidRunStateError, match="pivot"):
        await run.cancel(by="bob")
    await anyio.sleep(0.5)
    assert (await run.info()).status is saga.RunStatus.STOPPED
    assert calls == ["book", "capture"]
