"""How the features combine, as README's sections describe each: waits with concurrency
keys, operator actions, retention, pivots, child sagas, schedules and rate limits."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga.testing import advance
from tests._sagas import FAST, Gate, Job, Ledger, until_status
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(90)


class Decision(BaseModel):
    approved: bool
    by: str = "manager"


def keyed_approval(
    ledger: Ledger,
    *,
    timeout: float | None = 60.0,
    on_timeout: Any = "stop",
    name: str = "keyed",
    undo_gate: Gate | None = None,
    key: Any = "acct",
) -> tuple[saga.Saga[Job], saga.Wait[Decision]]:
    """One at a time per account: reserve (compensated) -> wait "decision" -> finish."""
    key_fn = key if callable(key) else (lambda job: key)
    s = saga.Saga(name, input=Job, concurrency_key=key_fn, concurrency_limit=1)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @reserve.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)
        if undo_gate is not None:
            await undo_gate.pass_through(ctx)

    decision = s.wait_for("decision", Decision, timeout=timeout, on_timeout=on_timeout)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        got = ctx.result(decision)
        if not got.approved:
            raise saga.PermanentError(f"rejected by {got.by}")
        return got.by

    return s, decision


async def ended(run: saga.RunHandle, seconds: float = 20) -> saga.RunStatus:
    with anyio.fail_after(seconds):
        with contextlib.suppress(saga.RunError):
            await run.result()
    return (await run.info()).status


async def still_queued(run: saga.RunHandle, ledger: Ledger, seconds: float = 0.5) -> None:
    await anyio.sleep(seconds)
    info = await run.info()
    assert info.status is saga.RunStatus.PENDING, info.status
    assert info.waiting_for_key, (
        f"expected the second run to stay pending, queued for its key; got {info.status} "
        f"waiting_for_key={info.waiting_for_key}"
    )
    assert ledger.steps("step", run.id) == [], (
        f"a queued run executed steps: {ledger.steps('step', run.id)}"
    )


# -- a keyed run holds its key while parked, and hands it on when it ends -----------------


@pytest.mark.parametrize("how", ["signal", "cancel", "timeout_compensate", "cancel_sleeping"])
async def test_a_waiting_keyed_run_holds_its_key_until_it_ends(
    orchestrator: OrchestratorFactory, how: str
) -> None:
    """README, Traffic control: "at most that many runs with the same key ... are active
    at once ... for their whole life, compensation included. ... When a run with that key
    ends, the oldest waiting one ... is admitted". A waiting (or sleeping) run is active:
    the next run of its key stays queued through the wait and through the rollback, and
    is admitted once the first ends (signalled and completed, cancelled, or timed out
    and compensated)."""
    ledger = Ledger()
    undo_gate = Gate("reserve", compensation=True)
    if how == "cancel_sleeping":
        s = saga.Saga("keyed_nap", input=Job, concurrency_key=lambda job: "acct")

        @s.step(retry=FAST)
        async def reserve(ctx: saga.Context[Job]) -> int:
            ledger.record(ctx)
            return ctx.input.n

        @reserve.compensate
        async def release(ctx: saga.Context[Job], n: int) -> None:
            ledger.record(ctx, n)
            await undo_gate.pass_through(ctx)

        s.sleep(timedelta(days=3))

        @s.step(retry=FAST)
        async def finish(ctx: saga.Context[Job]) -> str:
            ledger.record(ctx)
            return "slept"

        decision = None
    else:
        on_timeout = "compensate" if how == "timeout_compensate" else "stop"
        s, decision = keyed_approval(ledger, on_timeout=on_timeout, undo_gate=undo_gate)
    orch = await orchestrator(s, concurrency=8)
    first = await orch.start(s, Job(n=1))
    await until_status(first, saga.RunStatus.WAITING, saga.RunStatus.SLEEPING)
    second = await orch.start(s, Job(n=2))
    await still_queued(second, ledger)
    if how == "signal":
        undo_gate.release.set()
        assert decision is not None
        assert await first.signal(decision, Decision(approved=True, by="ana")) is True
        assert await ended(first) is saga.RunStatus.COMPLETED
    else:
        if how == "timeout_compensate":
            await advance(orch, first, 60)
        else:
            await first.cancel()
        with anyio.fail_after(10):
            await undo_gate.entered.wait()
        await still_queued(second, ledger, 0.3)  # the rollback still holds the key
        undo_gate.release.set()
        expected = (
            saga.RunStatus.COMPENSATED if how == "timeout_compensate" else saga.RunStatus.CANCELLED
        )
        assert await ended(first) is expected
    info = await until_status(second, saga.RunStatus.WAITING, saga.RunStatus.SLEEPING)
    assert not info.waiting_for_key


@pytest.mark.parametrize("operator", ["retry", "cancel", "resolve", "prune"])
async def test_a_keyed_run_stopped_at_its_wait_keeps_the_key_until_an_operator_acts(
    orchestrator: OrchestratorFactory, operator: str
) -> None:
    """README: "A run that ends `failed` or `stopped` keeps its key (the account's state
    is uncertain) until an operator resolves it (`resolve()` frees the key ...), or
    retries or cancels it", and prune: "A failed or stopped run still holding its
    concurrency key frees it first, as `resolve()` does". Stopped at a timed-out wait:
    retry() waits again still holding the key (the queued run stays queued); cancel()
    compensates, then admits the next; resolve() and prune(status=["stopped"]) admit the
    next at once."""
    ledger = Ledger()
    s, decision = keyed_approval(ledger, timeout=60, on_timeout="stop")
    orch = await orchestrator(s, concurrency=8)
    first = await orch.start(s, Job(n=1), key="first")
    await until_status(first, saga.RunStatus.WAITING)
    second = await orch.start(s, Job(n=2), key="second")
    await advance(orch, first, 60)
    await until_status(first, saga.RunStatus.STOPPED)
    await still_queued(second, ledger)
    # A prune of the default statuses leaves the stopped holder (and the queue) alone.
    assert (await saga.prune(orch, older_than=timedelta(0))).runs == 0
    await still_queued(second, ledger, 0.1)
    if operator == "retry":
        await first.retry()
        info = await until_status(first, saga.RunStatus.WAITING)
        assert info.due_at is not None
        assert info.due_at > datetime.now(UTC) + timedelta(seconds=30)
        await still_queued(second, ledger)
        await advance(orch, first, 60)  # times out again: stopped again, key still held
        await until_status(first, saga.RunStatus.STOPPED)
        await still_queued(second, ledger)
        assert await first.signal(decision, Decision(approved=True, by="ops")) is True
        assert await first.result(timeout=10) == "ops"
    elif operator == "cancel":
        await first.cancel()
        assert await ended(first) is saga.RunStatus.CANCELLED
        assert ledger.steps("compensation", first.id) == ["reserve"]
    elif operator == "resolve":
        await first.resolve(note="refunded by hand")
        with pytest.raises(saga.InvalidRunStateError):
            await orch.signal_key(s, "first", decision, Decision(approved=True))
        refused = [
            e.data.get("reason") for e in await first.history() if e.kind == "signal_refused"
        ]
        assert refused == ["resolved"], f"expected one refusal 'resolved', got {refused}"
    else:
        pruned = await saga.prune(orch, older_than=timedelta(0), status=["stopped"])
        assert pruned.runs == 1
        with pytest.raises(saga.RunNotFoundError):
            await first.info()
    info = await until_status(second, saga.RunStatus.WAITING)
    assert not info.waiting_for_key
    assert await second.signal(decision, Decision(approved=True, by="ana")) is True
    assert await second.result(timeout=10) == "ana"


async def test_a_signal_to_a_run_queued_for_its_key_is_kept_for_its_wait(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Waits: "A signal sent before the run reaches its wait is kept, and
    consumed when it gets there." A run still queued behind its key has not reached its
    wait: the signal is accepted, and once the key's holder ends the queued run goes
    through its wait at once."""
    ledger = Ledger()
    s, decision = keyed_approval(ledger, timeout=None, on_timeout="compensate")
    orch = await orchestrator(s, concurrency=8)
    first = await orch.start(s, Job(n=1))
    await until_status(first, saga.RunStatus.WAITING)
    second = await orch.start(s, Job(n=2))
    await still_queued(second, ledger, 0.2)
    assert await second.signal(decision, Decision(approved=True, by="early")) is True
    assert await second.signal(decision, Decision(approved=True, by="repeat")) is False
    await still_queued(second, ledger, 0.2)
    assert await first.signal(decision, Decision(approved=True, by="ana")) is True
    assert await first.result(timeout=10) == "ana"
    assert await second.result(timeout=10) == "early"


async def test_advance_does_not_admit_a_run_queued_for_its_key(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Traffic control: queued runs are "`pending` with
    `RunInfo.waiting_for_key` ..., due never"; "the limit holds whatever the timing".
    saga.testing.advance moves "a sleep's end, a wait's timeout, a retry's backoff": a
    queued run has none of those, so advancing it changes nothing and it stays queued
    while the key's holder waits."""
    ledger = Ledger()
    s, _ = keyed_approval(ledger, timeout=None, on_timeout="compensate")
    orch = await orchestrator(s, concurrency=8)
    first = await orch.start(s, Job(n=1))
    await until_status(first, saga.RunStatus.WAITING)
    second = await orch.start(s, Job(n=2))
    await still_queued(second, ledger, 0.2)
    await advance(orch, second, timedelta(days=365))
    await still_queued(second, ledger)
    due = await db.fetchval("SELECT due_at = 'infinity' FROM saga.runs WHERE id = $1", second.id)
    assert due is True, "advance() made a run queued for its key due"


async def test_a_keyed_step_stopped_for_an_operator_then_cancelled_admits_the_next(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: on_give_up="stop": "The run ends `stopped` at that step ... The operator
    then retries the step (`retry()`, fresh attempts) or lets the run compensate
    (`cancel()`...)"; a stopped run "keeps its key ... until an operator ... retries or
    cancels it". The retry runs the step again while the key is still held (the queued
    run waits), and the cancel that follows compensates, then admits the queued run."""
    ledger = Ledger()
    broken = [True]
    s = saga.Saga("keyed_stop", input=Job, concurrency_key=lambda job: "acct")

    @s.step(retry=FAST)
    async def debit(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @debit.compensate
    async def undo(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    @s.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def credit(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        if ctx.input.n == 1 and broken[0]:
            raise RuntimeError("bank down")
        return 1

    orch = await orchestrator(s, concurrency=8)
    first = await orch.start(s, Job(n=1))
    second = await orch.start(s, Job(n=2))
    assert await ended(first) is saga.RunStatus.STOPPED
    await still_queued(second, ledger)
    await first.retry()
    assert await ended(first) is saga.RunStatus.STOPPED
    await still_queued(second, ledger)
    await first.cancel()
    assert await ended(first) is saga.RunStatus.COMPENSATED
    assert await ended(second) is saga.RunStatus.COMPLETED
    assert ledger.steps("compensation") == ["debit"]


# -- schedules x concurrency keys ----------------------------------------------------------


async def test_scheduled_runs_of_a_keyed_saga_queue_and_all_run_in_order(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "Each slot starts at most one run ... and exactly one while at least one
    is up"; keyed runs wait "in start order". A schedule firing every second a saga whose
    runs share one key: while the first run is held, each slot still starts its run, the
    later ones queue behind the key, and when released they all complete, one at a time,
    in slot order."""
    gate = Gate("work", times=1)
    running: list[int] = []
    overlap: list[int] = []
    order: list[str] = []
    s = saga.Saga("keyed_tick", input=Job, concurrency_key=lambda job: "one")

    @s.step(retry=FAST)
    async def work(ctx: saga.Context[Job]) -> int:
        running.append(1)
        if len(running) > 1:
            overlap.append(len(running))
        order.append(str(ctx.run_id))
        await gate.pass_through(ctx)
        await anyio.sleep(0.05)
        running.pop()
        return 1

    tick = saga.Scheduled("tick", s, saga.Schedule.every(timedelta(seconds=1)), Job())
    orch = await orchestrator(s, concurrency=8, schedules=[tick])
    with anyio.fail_after(15):
        await gate.entered.wait()
        while True:
            page = await saga.list_runs(orch, saga="keyed_tick", limit=100)
            if len(page.runs) >= 4:
                break
            await anyio.sleep(0.1)
    await saga.pause_schedule(orch, "tick")
    page = await saga.list_runs(orch, saga="keyed_tick", limit=100)
    runs = sorted(page.runs, key=lambda r: r.id)  # UUIDv7: start order
    queued = [r for r in runs if r.waiting_for_key]
    assert len(queued) >= len(runs) - 1, [(r.status, r.waiting_for_key) for r in runs]
    keys = [r.key for r in runs]
    assert len(set(keys)) == len(keys)
    gate.release.set()
    for info in runs:
        assert await ended(orch.get_run(info.id)) is saga.RunStatus.COMPLETED
    assert overlap == []
    assert order[: len(runs)] == [str(r.id) for r in runs]


# -- child sagas x waits -------------------------------------------------------------------


def _child_with_a_wait(
    ledger: Ledger, *, timeout: float | None = None, on_timeout: Any = "compensate", key: Any = None
) -> tuple[saga.Saga[Job], saga.Wait[Decision]]:
    traffic = {} if key is None else {"concurrency_key": key}
    kid = saga.Saga("kid", input=Job, **traffic)

    @kid.step(retry=FAST)
    async def hold(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @hold.compensate
    async def unhold(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    decision = kid.wait_for("decision", Decision, timeout=timeout, on_timeout=on_timeout)

    @kid.step(retry=FAST)
    async def use(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return ctx.result(decision).by

    return kid, decision


def _parent(kid: saga.Saga[Job], ledger: Ledger) -> saga.Saga[Job]:
    parent = saga.Saga("parent", input=Job)

    @parent.step(retry=FAST)
    async def prepare(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @prepare.compensate
    async def unprepare(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    kids = parent.children("kids", kid, lambda ctx: [Job(n=ctx.input.n)], after=[prepare])

    @parent.step(after=[kids])
    async def report(ctx: saga.Context[Job]) -> list[str]:
        ledger.record(ctx)
        return list(ctx.result(kids))

    return parent


async def _the_kid(orch: saga.Client, *statuses: saga.RunStatus) -> saga.RunHandle:
    with anyio.fail_after(15):
        while True:
            runs = (await saga.list_runs(orch, saga="kid")).runs
            if runs and (not statuses or runs[0].status in statuses):
                return orch.get_run(runs[0].id)
            await anyio.sleep(0.05)


async def test_cancelling_a_parent_cancels_its_waiting_child(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: "Compensating the step (a later failure, a cancel) ...
    cancels its running and stopped children and rolls back the completed ones ... it
    completes when they all ended." A child waiting for a signal is cancelled at once
    ("Cancelling a sleeping, waiting or stopped run compensates what completed at
    once"): its completed step is undone, it ends cancelled, the parent ends cancelled,
    and a late signal to the child is refused."""
    ledger = Ledger()
    kid, decision = _child_with_a_wait(ledger)
    parent = _parent(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job(n=1))
    child = await _the_kid(orch, saga.RunStatus.WAITING)
    await run.cancel()
    assert await ended(run) is saga.RunStatus.CANCELLED
    assert (await child.info()).status is saga.RunStatus.CANCELLED
    assert sorted(ledger.steps("compensation")) == ["hold", "prepare"]
    with pytest.raises(saga.InvalidRunStateError):
        await child.signal(decision, Decision(approved=True))


async def test_a_child_stopped_at_its_wait_resumed_by_a_signal_completes_its_parent(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "A child stopped for an operator is not over: the step waits until the
    operator retries it (the step goes on) ..."; and Waits: a stopped run "the one it is
    stopped at resumes it" (a signal). A child stopped at its timed-out wait, then
    signalled by the operator, completes, which wakes its parent: the parent
    completes with the child's output."""
    ledger = Ledger()
    kid, decision = _child_with_a_wait(ledger, timeout=60, on_timeout="stop")
    parent = _parent(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job(n=1))
    child = await _the_kid(orch, saga.RunStatus.WAITING)
    await advance(orch, child, 60)
    await until_status(child, saga.RunStatus.STOPPED)
    await anyio.sleep(0.3)
    assert (await run.info()).status is saga.RunStatus.RUNNING
    assert await child.signal(decision, Decision(approved=True, by="ops")) is True
    assert await child.result(timeout=10) == "ops"
    assert await run.result(timeout=15) == ["ops"]


async def test_a_child_stopped_at_its_wait_retried_waits_again_then_its_parent_goes_on(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "A child stopped for an operator is not over: the step waits until the
    operator retries it (the step goes on)"; retry() of "a `stopped` run at its
    timed-out wait ... waits again with a fresh timeout". The retried child waits again;
    signalled, it completes, and its parent completes."""
    ledger = Ledger()
    kid, decision = _child_with_a_wait(ledger, timeout=60, on_timeout="stop")
    parent = _parent(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job(n=1))
    child = await _the_kid(orch, saga.RunStatus.WAITING)
    await advance(orch, child, 60)
    await until_status(child, saga.RunStatus.STOPPED)
    await child.retry()
    await until_status(child, saga.RunStatus.WAITING)
    await anyio.sleep(0.3)
    assert (await run.info()).status is saga.RunStatus.RUNNING
    assert await child.signal(decision, Decision(approved=True, by="later")) is True
    assert await run.result(timeout=15) == ["later"]


async def test_cancelling_a_parent_whose_keyed_child_is_queued_ends_and_the_child_never_runs(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "child sagas may have keys"; "A cancelled waiting run never runs"; a
    parent's cancel "cancels its running and stopped children ... it completes when they
    all ended". A child queued behind its key (another run holds it, waiting for a
    signal) is cancelled with its parent: the parent ends cancelled, and when the key's
    holder ends later, the cancelled child never runs."""
    ledger = Ledger()
    kid, decision = _child_with_a_wait(ledger, key=lambda job: "acct")
    parent = _parent(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    holder = await orch.start(kid, Job(n=7))
    await until_status(holder, saga.RunStatus.WAITING)
    run = await orch.start(parent, Job(n=1))
    with anyio.fail_after(15):
        while True:
            kids = [r for r in (await saga.list_runs(orch, saga="kid")).runs if r.id != holder.id]
            if kids and kids[0].waiting_for_key:
                break
            await anyio.sleep(0.05)
    child = orch.get_run(kids[0].id)
    await run.cancel()
    assert await ended(run) is saga.RunStatus.CANCELLED
    assert (await child.info()).status is saga.RunStatus.CANCELLED
    assert await holder.signal(decision, Decision(approved=True, by="ana")) is True
    assert await holder.result(timeout=10) == "ana"
    await anyio.sleep(0.5)
    assert ledger.steps("step", child.id) == []
    assert (await child.info()).status is saga.RunStatus.CANCELLED


# -- pivots x waits ------------------------------------------------------------------------


async def test_past_the_pivot_an_on_timeout_value_that_does_not_validate_compensates_nothing(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Pivot steps: "once it completed, nothing before it is ever compensated";
    "At a wait, an `on_timeout` function that raises stops the run at the wait". Waits:
    an on_timeout value "that does not validate rolls the run back", which past the
    pivot it cannot: whatever happens, the step before the pivot is never undone and the
    run does not end compensated."""
    ledger = Ledger()
    s = saga.Saga("pivot_bad_default", input=Job)

    @s.step(retry=FAST)
    async def book(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @book.compensate
    async def unbook(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    @s.step(retry=FAST, pivot=True)
    async def pay(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    async def default(ctx: saga.Context[Job]) -> Any:
        return {"approved": "not a bool at all", "by": 3}

    decision = s.wait_for("decision", Decision, timeout=60, on_timeout=default)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return ctx.result(decision).by

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, 60)
    status = await ended(run)
    assert ledger.steps("compensation") == [], (
        f"a step before the pivot was compensated: {ledger.steps('compensation')}"
    )
    assert status is saga.RunStatus.STOPPED, f"expected stopped past the pivot, got {status}"


async def test_a_run_waiting_past_its_pivot_refuses_a_cancel_and_goes_on(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Pivot steps: "A cancel is refused (`InvalidRunStateError`) from the moment
    the run reaches its pivot." (Waits: cancelling a waiting run compensates at once,
    which past the pivot cannot happen.) The run stays waiting, nothing is undone, and
    the signal still resumes it."""
    ledger = Ledger()
    s = saga.Saga("pivot_then_wait", input=Job)

    @s.step(retry=FAST)
    async def book(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @book.compensate
    async def unbook(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    @s.step(retry=FAST, pivot=True)
    async def pay(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    decision = s.wait_for("decision", Decision)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        return ctx.result(decision).by

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    with pytest.raises(saga.InvalidRunStateError):
        await run.cancel()
    await anyio.sleep(0.3)
    assert (await run.info()).status is saga.RunStatus.WAITING
    assert await run.signal(decision, Decision(approved=True, by="ops")) is True
    assert await run.result(timeout=10) == "ops"
    assert ledger.steps("compensation") == []


# -- sleep(until=) from a result, with advance ----------------------------------------------


async def test_a_sleep_until_computed_from_a_result_is_advanced_by_the_testing_helper(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: `saga.sleep(until=fn)` ("a function ... of the context returning a
    timezone-aware `datetime`") and `saga.testing.advance(client, run, by)` "moves a
    run's timer (a sleep's end, ...) earlier by `by` ... It returns the new due time".
    A sleep until three days after a time a step returned sleeps; advancing it by three
    days returns a due time about now, and the run wakes and completes."""
    s = saga.Saga("until_result", input=Job)

    @s.step(retry=FAST)
    async def quote(ctx: saga.Context[Job]) -> datetime:
        return datetime.now(UTC)

    s.sleep(until=lambda ctx: ctx.result(quote) + timedelta(days=3))

    @s.step(retry=FAST)
    async def settle(ctx: saga.Context[Job]) -> str:
        return "settled"

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    info = await until_status(run, saga.RunStatus.SLEEPING)
    assert info.due_at is not None
    assert info.due_at > datetime.now(UTC) + timedelta(days=2)
    due = await advance(orch, run, timedelta(days=3))
    assert due is not None
    assert due < datetime.now(UTC) + timedelta(seconds=30), due
    assert await run.result(timeout=10) == "settled"


# -- batch 2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("operator", ["cancel_parent", "resolve_child"])
async def test_a_child_stopped_at_its_wait_is_undone_with_its_parent(
    orchestrator: OrchestratorFactory, operator: str
) -> None:
    """README, Child sagas: "Compensating the step (a later failure, a cancel) ...
    cancels its running and stopped children ...; it completes when they all ended";
    "resolves it (either then fails the step; a resolved child is cancelled with its
    siblings' undoing ...)". A child stopped at its timed-out wait: cancelling the parent
    cancels it (its completed step undone) and the parent ends cancelled; resolving the
    child fails the parent's step, the child is cancelled and undone, and the parent
    ends compensated."""
    ledger = Ledger()
    kid, _ = _child_with_a_wait(ledger, timeout=60, on_timeout="stop")
    parent = _parent(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job(n=1))
    child = await _the_kid(orch, saga.RunStatus.WAITING)
    await advance(orch, child, 60)
    await until_status(child, saga.RunStatus.STOPPED)
    if operator == "cancel_parent":
        await run.cancel()
        assert await ended(run) is saga.RunStatus.CANCELLED
    else:
        await child.resolve(note="sorted by phone")
        assert await ended(run) is saga.RunStatus.COMPENSATED
    kid_status = (await child.info()).status
    assert kid_status in (saga.RunStatus.CANCELLED, saga.RunStatus.COMPENSATED), kid_status
    assert sorted(ledger.steps("compensation")) == ["hold", "prepare"], ledger.trace()


async def test_a_parent_cancelled_while_its_child_waits_past_its_pivot_is_not_left_hanging(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: "A child that cannot be undone (it gave up compensating, or
    passed its own pivot) fails that compensation for an operator, once the other
    children ended". A child waiting for a signal past its pivot cannot be cancelled;
    once it is signalled and completes, the parent's rollback must end (failed, for an
    operator), not wait for ever."""
    ledger = Ledger()
    kid = saga.Saga("kid", input=Job)

    @kid.step(retry=FAST, pivot=True)
    async def pay(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    decision = kid.wait_for("decision", Decision)

    @kid.step(retry=FAST)
    async def use(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return ctx.result(decision).by

    parent = _parent(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job(n=1))
    child = await _the_kid(orch, saga.RunStatus.WAITING)
    await run.cancel()
    await anyio.sleep(0.5)
    assert await child.signal(decision, Decision(approved=True, by="ops")) is True
    assert await child.result(timeout=10) == "ops"
    status = await ended(run, 20)
    assert status is saga.RunStatus.FAILED, (
        f"expected the parent failed for an operator, got {status}"
    )
    assert "prepare" not in ledger.steps("compensation")


async def test_bulk_retry_makes_runs_stopped_at_their_wait_wait_again(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Operator API: `retry_runs(...)`: "act on every matching run, oldest first,
    one by one exactly as `RunHandle.retry()` ... would"; retry() of "a `stopped` run at
    its timed-out wait ... waits again with a fresh timeout". Stopped runs leave
    needs_attention once retried; a keyed one resolved (its key freed) is refused."""
    ledger = Ledger()
    s, _ = keyed_approval(ledger, timeout=60, on_timeout="stop", key=lambda job: f"acct-{job.n}")
    orch = await orchestrator(s, concurrency=8)
    runs = []
    for i in range(3):
        runs.append(await orch.start(s, Job(n=i), key=f"r{i}"))
        await until_status(runs[-1], saga.RunStatus.WAITING)
        await advance(orch, runs[-1], 60)
        await until_status(runs[-1], saga.RunStatus.STOPPED)
    await runs[0].resolve(note="by hand")
    attention = await saga.needs_attention(orch)
    assert {r.id for r in attention.runs} == {runs[1].id, runs[2].id}
    result = await saga.retry_runs(orch, saga="keyed", status="stopped", limit=10, expect=3)
    assert set(result.acted) == {runs[1].id, runs[2].id}, result
    assert runs[0].id in result.refused, result
    for run in runs[1:]:
        info = await until_status(run, saga.RunStatus.WAITING)
        assert info.due_at is not None
    assert (await saga.needs_attention(orch)).runs == []


# -- batch 3 -------------------------------------------------------------------------------


async def test_runs_queued_for_a_key_are_admitted_in_start_order_whatever_their_priority(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Traffic control: "When a run with that key ends, the oldest waiting one
    (start order ...) is admitted". A keyed saga with priorities: a low-priority run
    started before an urgent one of the same key is admitted first once the holder (a
    run waiting for a signal) ends."""
    ledger = Ledger()
    s = saga.Saga(
        "prio_keyed", input=Job, priority=lambda job: 0, concurrency_key=lambda job: "acct"
    )

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    decision = s.wait_for("decision", Decision)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return ctx.result(decision).by

    orch = await orchestrator(s, concurrency=8)
    holder = await orch.start(s, Job(n=1))
    await until_status(holder, saga.RunStatus.WAITING)
    low = await orch.start(s, Job(n=2), priority=0)
    urgent = await orch.start(s, Job(n=3), priority=100)
    await still_queued(low, ledger, 0.2)
    await still_queued(urgent, ledger, 0.1)
    await holder.signal(decision, Decision(approved=True))
    await holder.result(timeout=10)
    info = await until_status(low, saga.RunStatus.WAITING)
    assert not info.waiting_for_key
    assert (await urgent.info()).waiting_for_key, "the urgent run jumped the key's queue"


async def test_a_cancelled_keyed_wait_whose_undo_gives_up_frees_its_key_once_skipped(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: a run that ends `failed` keeps its key "until an operator resolves it ...,
    or retries or cancels it"; skip_compensation: "with none left the run ends
    `compensated` (`cancelled` for a cancel's rollback) at once". A keyed run cancelled
    at its wait, whose compensation gives up, holds the key (failed); skipping that
    compensation ends it cancelled and admits the queued run."""
    ledger = Ledger()
    s = saga.Saga("keyed_undo", input=Job, concurrency_key=lambda job: "acct")

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @reserve.compensate(retry=saga.Retry(max_attempts=1))
    async def release(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)
        raise saga.PermanentError("ledger locked")

    decision = s.wait_for("decision", Decision)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        return ctx.result(decision).by

    orch = await orchestrator(s, concurrency=8)
    first = await orch.start(s, Job(n=1))
    await until_status(first, saga.RunStatus.WAITING)
    second = await orch.start(s, Job(n=2))
    await first.cancel()
    assert await ended(first) is saga.RunStatus.FAILED
    await still_queued(second, ledger)
    await first.skip_compensation(note="undone by hand")
    assert (await first.info()).status is saga.RunStatus.CANCELLED
    info = await until_status(second, saga.RunStatus.WAITING)
    assert not info.waiting_for_key


async def test_a_step_after_a_wait_stopped_for_an_operator_still_reads_the_payload_on_retry(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "Later steps read a wait's payload with `ctx.result(wait)`"; a step whose
    policy stops the run for an operator is run again by `retry()` ("fresh attempts").
    The retried step after the wait still reads the signal's payload."""
    attempts: list[str] = []
    s = saga.Saga("wait_then_stop", input=Job)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    decision = s.wait_for("decision", Decision)

    @s.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def finish(ctx: saga.Context[Job]) -> str:
        by = ctx.result(decision).by
        attempts.append(by)
        if len(attempts) == 1:
            raise RuntimeError("bank down")
        return by

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    await run.signal(decision, Decision(approved=True, by="ana"))
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=10)
    await run.retry()
    assert await run.result(timeout=10) == "ana"
    assert attempts == ["ana", "ana"]


async def test_a_retried_wait_then_goes_on_to_a_later_wait_whose_signal_was_kept(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: "A `stopped` run is not over: it keeps signals for its later waits";
    retry() of a run stopped at its timed-out wait "waits again with a fresh timeout".
    Stopped at the first wait, it gets the second wait's signal; retried, then
    signalled at the first, it passes the second wait at once with the kept payload."""
    s = saga.Saga("two_waits", input=Job)

    @s.step(retry=FAST)
    async def a(ctx: saga.Context[Job]) -> int:
        return 1

    first = s.wait_for("first", Decision, timeout=60, on_timeout="stop")

    @s.step(retry=FAST)
    async def b(ctx: saga.Context[Job]) -> str:
        return ctx.result(first).by

    second = s.wait_for("second", Decision, timeout=3600, on_timeout="stop")

    @s.step(retry=FAST)
    async def c(ctx: saga.Context[Job]) -> str:
        return f"{ctx.result(b)}+{ctx.result(second).by}"

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, 60)
    await until_status(run, saga.RunStatus.STOPPED)
    assert await run.signal(second, Decision(approved=True, by="kept")) is True
    await run.retry()
    await until_status(run, saga.RunStatus.WAITING)
    assert await run.signal(first, Decision(approved=True, by="one")) is True
    assert await run.result(timeout=10) == "one+kept"


# -- batch 4 -------------------------------------------------------------------------------


async def test_a_rate_limited_branch_of_a_graph_stopped_then_cancelled_is_never_left_undone(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Stopping for an operator: "In a graph the running branches finish first
    and no new step starts"; Steps in parallel: on cancel "branches already running
    finish their attempt, and if they complete they are compensated too ... Nothing is
    skipped silently." A branch waiting for a rate-limit token while a sibling stops the
    run: whether it runs or not, once the operator cancels, every step that ran is
    compensated and the run ends compensated."""
    ledger = Ledger()
    slow = saga.RateLimit("slow_branch", per_second=0.5, burst=1)
    s = saga.Saga("graph_paced", input=Job)

    @s.step(retry=FAST)
    async def root(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 0

    @root.compensate
    async def unroot(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    @s.step(after=[root], rate_limit=slow, retry=FAST)
    async def paced_a(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 1

    @paced_a.compensate
    async def unpaced_a(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    @s.step(after=[root], rate_limit=slow, retry=FAST)
    async def paced_b(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 2

    @paced_b.compensate
    async def unpaced_b(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    @s.step(after=[root], retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def broken(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        await anyio.sleep(0.2)
        raise RuntimeError("down")

    orch = await orchestrator(s, concurrency=8, lease_seconds=0.9)
    run = await orch.start(s, Job())
    assert await ended(run) is saga.RunStatus.STOPPED
    ran = sorted(set(ledger.steps("step")) - {"root", "broken"})
    await run.cancel()
    status = await ended(run)
    await anyio.sleep(2.5)  # any token wait still pending would be over
    ran_after = sorted(set(ledger.steps("step")) - {"root", "broken"})
    undone = sorted(ledger.steps("compensation"))
    assert status is saga.RunStatus.COMPENSATED, status
    assert undone == sorted([*ran_after, "root"]), (
        f"steps that ran: {ran_after} (at the stop: {ran}), compensated: {undone}"
    )


async def test_a_child_can_be_signalled_by_its_documented_idempotency_key(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: "Each child is started with the key
    `<run>:child:<step>:<count>:<index>`"; Waits: `signal_key(saga, key, wait, payload)`
    signals a run "by the run's idempotency key". A child waiting for a signal is found
    by that key (one child: count 1, index 0), and its parent completes."""
    ledger = Ledger()
    kid, decision = _child_with_a_wait(ledger)
    parent = _parent(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job(n=1))
    child = await _the_kid(orch, saga.RunStatus.WAITING)
    key = (await child.info()).key
    assert key == f"{run.id}:child:kids:1:0", key
    assert await orch.signal_key(kid, key, decision, Decision(approved=True, by="k")) is True
    assert await run.result(timeout=15) == ["k"]


def _parent_of_two(kid: saga.Saga[Job], ledger: Ledger) -> saga.Saga[Job]:
    parent = saga.Saga("parent2", input=Job)

    @parent.step(retry=FAST)
    async def prepare(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @prepare.compensate
    async def unprepare(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    kids = parent.children("kids", kid, lambda ctx: [Job(n=1), Job(n=2)], after=[prepare])

    @parent.step(after=[kids])
    async def report(ctx: saga.Context[Job]) -> list[str]:
        return list(ctx.result(kids))

    return parent


async def test_cancelling_a_parent_of_keyed_waiting_children_undoes_both(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Traffic control: "child sagas may have keys (a completed child undone by
    its parent's rollback queues for its key again, and its compensations run holding
    it)"; Child sagas: cancelling the parent "cancels its running and stopped children
    and rolls back the completed ones ... it completes when they all ended". Two
    children of one key (limit 1), each waiting for a signal: the first completed, the
    second holds the key at its wait. Cancelling the parent cancels the second, reverts
    the first once the key is free, and the parent ends cancelled with every step undone."""
    ledger = Ledger()
    kid, decision = _child_with_a_wait(ledger, key=lambda job: "acct")
    parent = _parent_of_two(kid, ledger)
    orch = await orchestrator(parent, kid, concurrency=8)
    run = await orch.start(parent, Job(n=0))
    with anyio.fail_after(15):
        while True:
            kids = sorted((await saga.list_runs(orch, saga="kid")).runs, key=lambda r: r.key or "")
            if len(kids) == 2 and any(k.status is saga.RunStatus.WAITING for k in kids):
                break
            await anyio.sleep(0.05)
    first = orch.get_run(next(k.id for k in kids if k.status is saga.RunStatus.WAITING))
    second = orch.get_run(next(k.id for k in kids if k.id != first.id))
    assert (await second.info()).waiting_for_key
    await first.signal(decision, Decision(approved=True, by="one"))
    assert await first.result(timeout=10) == "one"
    await until_status(second, saga.RunStatus.WAITING)
    await run.cancel()
    status = await ended(run, 20)
    assert status is saga.RunStatus.CANCELLED, status
    assert (await first.info()).status is saga.RunStatus.CANCELLED
    assert (await second.info()).status is saga.RunStatus.CANCELLED
    undone = sorted((c.step, c.run_id) for c in ledger.of("compensation"))
    assert undone == sorted([("hold", first.id), ("hold", second.id), ("prepare", run.id)]), undone


async def test_bulk_cancel_of_waiting_runs_refuses_those_past_their_pivot_with_the_reason(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Operator API: `cancel_runs(...)` acts "one by one exactly as
    `RunHandle.cancel()` ... would"; `refused` maps a run "to the reason its state
    refused". Pivot steps: "A cancel is refused ... from the moment the run reaches its
    pivot". Waiting runs past their pivot are refused (listed with a reason naming the
    pivot) and stay waiting; the others are cancelled."""
    s = saga.Saga("maybe_pivot", input=Job)

    @s.step(retry=FAST)
    async def book(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    @s.step(retry=FAST, pivot=True)
    async def pay(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    decision = s.wait_for("decision", Decision)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        return ctx.result(decision).by

    plain = saga.Saga("plain_wait", input=Job)

    @plain.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        return 1

    plain_decision = plain.wait_for("decision", Decision)

    @plain.step(retry=FAST)
    async def last(ctx: saga.Context[Job]) -> str:
        return ctx.result(plain_decision).by

    orch = await orchestrator(s, plain)
    past = await orch.start(s, Job(n=1))
    before = await orch.start(plain, Job(n=2))
    for run in (past, before):
        await until_status(run, saga.RunStatus.WAITING)
    result = await saga.cancel_runs(orch, status="waiting", limit=10, expect=2)
    assert result.acted == [before.id] or list(result.acted) == [before.id], result
    assert past.id in result.refused, result
    assert "pivot" in str(result.refused[past.id]), result
    assert (await past.info()).status is saga.RunStatus.WAITING
    assert await ended(before) is saga.RunStatus.CANCELLED
