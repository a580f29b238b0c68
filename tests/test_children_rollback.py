"""Child sagas under failure: a child that ends failed, or cannot be reverted, does not
let its parent move on before its siblings are undone, nor end `compensated` as if
everything had been undone; an operator who fixes the child resumes the parent."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import Gate, Job, Ledger, permanent, small_saga
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]


async def _kids(db: asyncpg.Connection, parent: Any) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, status, idempotency_key FROM saga.runs WHERE parent_id = $1"
        " ORDER BY idempotency_key",
        parent,
    )


async def test_a_child_ending_failed_fails_the_step_only_once_its_siblings_are_undone(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Child sagas, Outcome): "A child that ends compensated, cancelled or
    failed fails the step for good (a saga.ChildFailed error with that child's), once
    its siblings are undone." and (Steps in parallel) compensations run in reverse
    dependency order: split (which the children step runs after) is undone last.

    Three children of load then check: n=1's check fails for good and its own
    compensation of load gives up (the child ends failed); n=0 and n=2 completed, and
    their reverts are held. The parent's
    step must fail only after the siblings are undone, so split's compensation comes
    after the siblings' loads are compensated, and the parent ends with no child still
    active."""
    ledger = Ledger()
    undo_gate = Gate("load", compensation=True, when=lambda ctx: ctx.input.n != 1)
    child = small_saga(
        "chunk",
        ["load", "check"],
        compensate={"load"},
        ledger=ledger,
        gate=undo_gate,
        fail={"check": permanent("bad chunk", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={"load": permanent("undo broken", when=lambda ctx: ctx.input.n == 1)},
        delay={"check": 0.3},
        result=lambda ctx: ctx.input.n,
    )
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    parent.children("chunks", child, lambda ctx: [Job(n=i) for i in range(3)], after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(15):
        await undo_gate.entered.wait()  # a sibling's revert has begun
        await anyio.sleep(1.0)
        early = (await run.info()).status
        split_undone_early = "split" in ledger.steps("compensation", run.id)
        undo_gate.release.set()
        with pytest.raises(saga.RunError):
            await run.result()
    kids = await _kids(db, run.id)
    why = f"{ledger.trace()}; kids {[dict(k) for k in kids]}"
    assert not split_undone_early, f"split undone while the siblings' reverts ran: {why}"
    assert early is not saga.RunStatus.COMPENSATED, f"parent compensated too early: {why}"


async def test_a_sibling_that_cannot_be_reverted_does_not_let_the_parent_end_compensated(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Child sagas): "A child that cannot be undone (it gave up compensating, or
    passed its own pivot) fails that compensation for an operator." and (What you can
    rely on, Compensation): "A run is `compensated` only when every compensation
    succeeded; if one gives up the run is `failed`".

    Child n=1's check fails for good (it ends compensated), so its completed sibling
    n=0 is reverted; n=0's compensation gives up (it ends failed). The parent's children step
    could not undo its children: the parent must not end `compensated` as if everything
    had been undone."""
    ledger = Ledger()
    child = small_saga(
        "chunk",
        ["load", "check"],
        compensate={"load"},
        ledger=ledger,
        fail={"check": permanent("bad chunk", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={"load": permanent("undo broken", when=lambda ctx: ctx.input.n == 0)},
        delay={"check": 0.3},
        result=lambda ctx: ctx.input.n,
    )
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    parent.children("chunks", child, lambda ctx: [Job(n=i) for i in range(2)], after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(15), pytest.raises(saga.RunError):
        await run.result()
    kids = await _kids(db, run.id)
    status = (await run.info()).status
    assert status is not saga.RunStatus.COMPENSATED, (
        f"the parent ended compensated while its child {kids[0]['id']} ended"
        f" {kids[0]['status']} (its load never undone): {ledger.trace()}"
    )


async def test_a_parent_is_not_failed_while_a_child_it_reverts_still_rolls_back(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Child sagas): compensating the step "cancels its running and stopped
    children and rolls back the completed ones ...; it completes when they all ended. A
    child that cannot be undone (it gave up compensating ...) fails that compensation
    for an operator."; (Steps in parallel) "A compensation that gives up stops new ones;
    once the running ones finish the run is `failed`".

    The parent fails after its two children completed: child n=0's revert gives up at
    once, child n=1's revert is still running (held). The parent must not be `failed`
    (an operator's skip_compensation would then undo split) while child n=1 still rolls
    back."""
    ledger = Ledger()
    gate = Gate("load", compensation=True, when=lambda ctx: ctx.input.n == 1)
    child = small_saga(
        "chunk", ["load"], compensate=True, ledger=ledger, gate=gate,
        result=lambda c: c.input.n,
        fail_undo={"load": permanent("undo broken", when=lambda ctx: ctx.input.n == 0)},
    )  # fmt: skip
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    chunks = parent.children(
        "chunks", child, lambda ctx: [Job(n=i) for i in range(2)], after=["split"]
    )

    @parent.step(after=[chunks])
    async def boom(ctx: Ctx) -> None:
        raise saga.PermanentError("boom")

    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(15):
        await gate.entered.wait()  # child n=1's revert runs, held
        while True:
            kids = await _kids(db, run.id)
            if kids[0]["status"] == "failed":
                break
            await anyio.sleep(0.02)
        await anyio.sleep(1.0)
        early = await run.info()
        kids = await _kids(db, run.id)
        gate.release.set()
        with pytest.raises(saga.RunFailedError):
            await run.result()
    assert early.status is not saga.RunStatus.FAILED, (
        f"the parent ended failed while its child {kids[1]['id']} was still"
        f" {kids[1]['status']} (rolling back): {[dict(k) for k in kids]}"
    )


async def test_a_parent_failed_by_a_child_it_could_not_revert_resumes_once_it_is_fixed(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Child sagas): a child that cannot be undone fails that compensation for
    an operator. Child n=1 fails for good; reverting its sibling n=0 gives up. The parent
    ends failed: its error is n=1's (the child that failed), its compensation error
    n=0's. Once n=0's compensation works again, the operator retries n=0 (reverted, it
    ends cancelled), then the parent: it undoes its children step and split, and ends
    compensated."""
    ledger = Ledger()
    broken = {"undo": True}
    child = small_saga(
        "chunk",
        ["load", "check"],
        compensate={"load"},
        ledger=ledger,
        fail={"check": permanent("bad chunk", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={
            "load": permanent("undo broken", when=lambda ctx: ctx.input.n == 0 and broken["undo"])
        },
        delay={"check": 0.3},
        result=lambda ctx: ctx.input.n,
    )
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    parent.children("chunks", child, lambda ctx: [Job(n=i) for i in range(2)], after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(15), pytest.raises(saga.RunFailedError) as raised:
        await run.result()
    kids = await _kids(db, run.id)
    stuck = next(k for k in kids if k["status"] == "failed")
    culprit = next(k for k in kids if k["status"] == "compensated")
    assert raised.value.error is not None
    assert str(culprit["id"]) in raised.value.error.message
    assert raised.value.compensation_error is not None
    assert str(stuck["id"]) in raised.value.compensation_error.message
    broken["undo"] = False
    await orch.get_run(stuck["id"]).retry(by="ops", note="undo fixed")
    with anyio.fail_after(15), pytest.raises(saga.RunCancelledError):
        await orch.get_run(stuck["id"]).result()  # reverted: it ends cancelled
    await run.retry(by="ops", note="children undone")
    with anyio.fail_after(15), pytest.raises(saga.RunCompensatedError):
        await run.result()
    assert ledger.steps("compensation")[-1] == "split"


async def test_outputs_too_large_with_a_child_that_cannot_be_reverted_does_not_end_compensated(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Child sagas, Outcome): a list of outputs above `max_payload_bytes` fails
    the step for good ("a `PayloadTooLargeError`, once the children are undone"); (Undone
    with the step) "A child that cannot be undone (it gave up compensating ...) fails that
    compensation for an operator"; (What you can rely on) a run is `compensated` only when
    every compensation succeeded.

    Two children complete with outputs whose list is above the limit; reverting child
    n=0 gives up (it ends failed). The parent does not end `compensated` (split undone,
    as if everything had been undone): it ends `failed` with a compensation error, its
    error the PayloadTooLargeError."""
    ledger = Ledger()
    child = small_saga(
        "chunk",
        ["load"],
        compensate={"load"},
        ledger=ledger,
        fail_undo={"load": permanent("undo broken", when=lambda ctx: ctx.input.n == 0)},
        result=lambda ctx: "x" * 3000,
    )
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    parent.children("chunks", child, lambda ctx: [Job(n=i) for i in range(2)], after=["split"])
    orch = await orchestrator(parent, child, max_payload_bytes=5000)
    run = await orch.start(parent, Job())
    with anyio.fail_after(20), pytest.raises(saga.RunError) as raised:
        await run.result()
    kids = await db.fetch(
        "SELECT id, status FROM saga.runs WHERE parent_id = $1 ORDER BY idempotency_key", run.id
    )
    info = await run.info()
    why = f"{type(raised.value).__name__}; kids {[dict(k) for k in kids]}; {ledger.trace()}"
    assert kids[0]["status"] == "failed", f"premise: {why}"
    assert info.status is saga.RunStatus.FAILED, f"parent ended {info.status}: {why}"
    assert isinstance(raised.value, saga.RunFailedError)
    assert raised.value.compensation_error is not None, why
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.PayloadTooLargeError"


# -- a children step that parks while its run rolls back ------------------------------------


async def _until_event(run: Any, kind: str, step: str | None) -> None:
    with anyio.fail_after(10):
        while not any(e.kind == kind and e.step == step for e in await run.history()):  # noqa: ASYNC110 - polling the database
            await anyio.sleep(0.02)


class Piece(BaseModel):
    """The input of the child sagas below."""

    n: int


@pytest.mark.timeout(30)
async def test_a_cancel_while_a_children_step_starts_them_undoes_its_running_child(
    dsn: str,
) -> None:
    """README, Child sagas, "Undone with the step": "Compensating the step (a later
    failure, a cancel), or dropping it in a rollback, cancels its running and stopped
    children and rolls back the completed ones (...); it completes when they all ended."

    Two branches: ``kids`` starts one child run, ``other`` runs beside it. The run is
    cancelled while ``kids`` computes its inputs; ``kids`` then starts its child and
    parks. With 2 slots (``other`` and the child), nobody claims ``kids`` before
    ``other`` completes and its write starts the rollback. The rollback cancels the
    running child, whose work is undone, and the parent ends ``cancelled`` only after
    it; it is ``compensating`` meanwhile. Before, the park of a run being cancelled left
    the item unleased and due: the rollback dropped it as a step that never started, the
    parent ended at once, and the child completed, never undone."""
    child_gate = anyio.Event()
    other_gate = anyio.Event()
    cancelled = anyio.Event()
    child_running = anyio.Event()
    effects: list[str] = []

    child: saga.Saga[Piece] = saga.Saga("parked_child", input=Piece, output=int)

    @child.step()
    async def work(ctx: saga.Context[Piece]) -> int:
        child_running.set()
        await child_gate.wait()
        effects.append("work")
        return ctx.input.n

    @work.compensate
    async def unwork(ctx: saga.Context[Piece], result: int) -> None:
        effects.append("unwork")

    parent: saga.Saga[Job] = saga.Saga("parked_parent", input=Job)

    async def inputs(ctx: saga.Context[Job]) -> list[Piece]:
        await cancelled.wait()  # the cancel lands while this step starts its children
        return [Piece(n=0)]

    parent.children("kids", child, inputs, after=[])

    @parent.step(after=[])
    async def other(ctx: saga.Context[Job]) -> str:
        await other_gate.wait()
        return "x"

    @other.compensate
    async def undo_other(ctx: saga.Context[Job], result: str) -> None:
        effects.append("undo_other")

    async with saga.Orchestrator(
        dsn, sagas=[parent, child], poll_interval=0.05, concurrency=2
    ) as orch:
        run = await orch.start(parent, Job())
        await _until_event(run, "step_started", "other")
        await _until_event(run, "step_started", "kids")
        await run.cancel()
        cancelled.set()
        await _until_event(run, "children_waiting", "kids")
        with anyio.fail_after(10):
            await child_running.wait()  # the child runs, holding the 2nd slot
        other_gate.set()  # other completes: its write starts the cancel's rollback
        await anyio.sleep(0.5)
        while_child_runs = (await run.info()).status
        child_gate.set()
        with contextlib.suppress(saga.RunError):
            await run.result(timeout=10)
        with anyio.fail_after(10):
            while True:
                kids = (await saga.list_runs(orch, saga=child.name)).runs
                if kids and all(k.status.is_terminal for k in kids):
                    break
                await anyio.sleep(0.05)
        info = await run.info()
        history = [e.describe() for e in await run.history()]

    assert len(kids) == 1
    assert info.status == saga.RunStatus.CANCELLED
    # The parent may not end while its child still runs ("it completes when they all
    # ended"), and the child must end cancelled with its work undone.
    assert kids[0].status == saga.RunStatus.CANCELLED, (kids[0].status, effects, history)
    assert effects.count("unwork") == 1, effects
    assert while_child_runs == saga.RunStatus.COMPENSATING, (while_child_runs, history)


@pytest.mark.timeout(30)
async def test_a_children_step_that_parks_during_a_rollback_cancels_its_child_at_once(
    dsn: str,
) -> None:
    """README, Child sagas, "Undone with the step": dropping the step in a rollback
    "cancels its running and stopped children"; Steps in parallel: "When a step fails
    for good (or the run is cancelled), no new step starts".

    ``kids`` (one child of two steps, ``work`` then ``more``) and ``other`` run side by
    side; ``other`` fails for good while ``kids`` computes its inputs, so the rollback
    has begun when ``kids`` starts its child and parks. The child is cancelled at once,
    and ``more`` never runs. Before, the step parked until a child ended: the child ran
    ``more`` during its parent's rollback, and was cancelled and undone only then."""
    failed = anyio.Event()
    gate = anyio.Event()
    effects: list[str] = []
    child: saga.Saga[Piece] = saga.Saga("late_child", input=Piece, output=int)

    @child.step()
    async def work(ctx: saga.Context[Piece]) -> int:
        await gate.wait()
        effects.append("work")
        return 1

    @work.compensate
    async def unwork(ctx: saga.Context[Piece], result: int) -> None:
        effects.append("unwork")

    @child.step()
    async def more(ctx: saga.Context[Piece]) -> int:
        effects.append("more")
        return 2

    parent: saga.Saga[Job] = saga.Saga("late_parent", input=Job)

    async def inputs(ctx: saga.Context[Job]) -> list[Piece]:
        await failed.wait()  # the rollback has begun when this step starts its child
        return [Piece(n=0)]

    parent.children("kids", child, inputs, after=[])

    @parent.step(after=[])
    async def other(ctx: saga.Context[Job]) -> str:
        raise saga.PermanentError("other fails")

    async with saga.Orchestrator(dsn, sagas=[parent, child], poll_interval=0.05) as orch:
        run = await orch.start(parent, Job())
        await _until_event(run, "run_compensating", None)
        failed.set()
        await _until_event(run, "children_waiting", "kids")
        await anyio.sleep(0.5)
        kids = (await saga.list_runs(orch, saga=child.name)).runs
        while_rolling_back = [(k.status, k.cancel_requested) for k in kids]
        gate.set()
        with contextlib.suppress(saga.RunError):
            await run.result(timeout=10)
        info = await run.info()
        kids = (await saga.list_runs(orch, saga=child.name)).runs
        child_history = [e.describe() for e in await orch.get_run(kids[0].id).history()]

    assert info.status == saga.RunStatus.COMPENSATED
    assert [k.status for k in kids] == [saga.RunStatus.CANCELLED]
    # The child was running while its parent rolled back: it must have been cancelled.
    assert while_rolling_back == [(saga.RunStatus.RUNNING, True)], child_history
    assert "more" not in effects, (effects, child_history)


@pytest.mark.timeout(60)
async def test_a_sibling_that_completes_just_as_it_is_asked_to_cancel_is_reverted(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Child sagas): "A child that ends compensated, cancelled or failed fails
    the step for good ..., once its siblings are undone"; "Compensating the step ...
    rolls back the completed ones".

    Child n=1 fails for good and cannot be undone (it ends failed) while sibling n=0 is in
    its last step. The parent's step reads its children (n=0 running) and asks n=0 to
    cancel; n=0 completes that step in between (made certain here: the request lets it
    complete first). Before, the step looked again, found n=0 completed, neither reverted
    nor waited for it, and failed at once on n=1: the parent ended `failed` with n=0
    `completed` (seen once in CI). Now n=0 is reverted (its load compensated: the run
    ends `cancelled`) before the parent fails on n=1."""
    ledger = Ledger()
    gate = Gate("check", when=lambda ctx: ctx.input.n == 0)
    child = small_saga(
        "chunk", ["load", "check"], compensate={"load"}, ledger=ledger, gate=gate,
        fail={"check": permanent("bad chunk", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={"load": permanent("undo broken", when=lambda ctx: ctx.input.n == 1)},
    )  # fmt: skip
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    parent.children("chunks", child, lambda ctx: [Job(n=i) for i in range(2)], after=["split"])
    orch = await orchestrator(parent, child)
    store: Any = orch._store  # the parent's step asks through it
    ask = store.request_cancel
    raced: list[Any] = []

    async def status(run_id: Any) -> str:
        return str(await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run_id))

    async def completes_first(run_id: Any, data: str | None = None) -> bool:
        if (
            gate.entered.is_set()
            and not gate.release.is_set()
            and await status(run_id) == "running"
        ):
            gate.release.set()  # n=0 completes its last step before the request lands
            with anyio.fail_after(10):
                while await status(run_id) != "completed":  # noqa: ASYNC110 - the server
                    await anyio.sleep(0.01)
            raced.append(run_id)
        return bool(await ask(run_id, data))

    store.request_cancel = completes_first
    run = await orch.start(parent, Job())
    with anyio.fail_after(30):
        await gate.entered.wait()
        with pytest.raises(saga.RunError):
            await run.result()
        kids = {k["idempotency_key"][-1]: k["status"] for k in await _kids(db, run.id)}
    why = f"{ledger.trace()}; kids {kids}"
    assert raced, f"the race was not made: {why}"
    assert kids == {"0": "cancelled", "1": "failed"}, why
    assert (await run.info()).status is saga.RunStatus.FAILED, why
