"""Child sagas under failure: a child that ends failed, or cannot be reverted, does not
let its parent move on before its siblings are undone, nor end `compensated` as if
everything had been undone; an operator who fixes the child resumes the parent."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest

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
