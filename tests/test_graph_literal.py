"""Steps in parallel and child sagas, read literally: a children step that fails for good
midway through its inputs undoes the children it started, a worker never runs more
branches than its concurrency (a write leasing ready steps and a claim in flight share
the free slots), and a step may name its own step object."""

# Polling the database: there is no event to wait on.

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Job, Ledger, small_saga
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]


@pytest.mark.timeout(60)
async def test_a_children_step_failing_on_a_later_input_undoes_the_children_it_started(
    orchestrator: OrchestratorFactory, db: Any
) -> None:
    """README, Child sagas: "A step whose last attempt's worker died (`saga.AttemptLost`)
    fails once the children its attempts started are undone, as any failure of the
    step", and "Undone with the step. ... cancels its running and stopped children and
    rolls back the completed ones".

    inputs() returns two valid items, then one the child saga's model refuses. The
    children step starts the first two (keys ...:child:chunks:3:0 and :1), then fails
    for good with saga.InvalidInputError once they are undone (both end `cancelled`),
    and the parent ends `compensated`. Before, the two children it started were never
    cancelled nor reverted: they completed under a parent that reported its rollback
    complete."""
    ledger = Ledger()
    child = small_saga("chunk", ["load"], compensate=True, ledger=ledger)
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    parent.children(
        "chunks", child, lambda ctx: [{"n": 1}, {"n": 2}, {"n": "bad"}], after=["split"]
    )
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with pytest.raises(saga.RunCompensatedError, match="invalid input"):
        await run.result(timeout=20)
    with anyio.fail_after(20):
        while True:
            rows = await db.fetch(
                "SELECT status FROM saga.runs WHERE idempotency_key LIKE $1",
                f"{run.id}:child:%",
            )
            active = ("pending", "running", "compensating")
            if rows and all(r["status"] not in active for r in rows):
                break
            await anyio.sleep(0.1)
    statuses = sorted(r["status"] for r in rows)
    assert statuses == ["cancelled", "cancelled"], statuses


@pytest.mark.timeout(60)
async def test_a_worker_never_runs_more_branches_than_its_concurrency(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, Steps in parallel: "The worker that completes a step leases the steps it
    made ready to itself while it has free slots (no extra commit); the others are
    claimed by any worker." (and `Orchestrator(..., concurrency=32)`: how many it runs at
    once).

    One orchestrator of concurrency=2; root, then six branches after it. The claim
    statement is made slow (0.4 s before it runs: a busy database or pool), so the
    claim loop's claim of its one free slot is in flight when root completes. Never
    more than two steps run at once. Before, root's write leased two branches to this
    worker (its own slot + the free one) and the claim in flight took a third: three
    ran at once (without the slow claim too, in about half the runs)."""
    from saga._store import Store

    real = Store.claim

    async def slow_claim(self: Any, *args: Any, **kwargs: Any) -> Any:
        await anyio.sleep(0.4)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "claim", slow_claim)
    live = {"now": 0, "max": 0}

    async def body(ctx: Ctx) -> int:
        live["now"] += 1
        live["max"] = max(live["max"], live["now"])
        await anyio.sleep(0.3 if ctx.step == "root" else 1.5)
        live["now"] -= 1
        return 1

    s: saga.Saga[Job] = saga.Saga("fan", input=Job)
    root = s.step(name="root")(body)
    for i in range(6):
        s.step(name=f"b{i}", after=[root])(body)
    orch = await orchestrator(s, concurrency=2, poll_interval=0.05)
    run = await orch.start(s, Job())
    assert len(await run.result(timeout=30)) == 6
    assert live["max"] <= 2, f"{live['max']} steps ran at once on a worker of concurrency 2"


@pytest.mark.timeout(30)
async def test_a_branch_that_names_its_own_step_is_not_refused_with_an_impossible_fix(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Steps in parallel: "Checked when registered. ... a step ... whose code
    reads the result of a step it does not run after fail with `DefinitionError` naming
    the fix."

    Branch `b` reads no result at all: it only names its own step object (here to read
    its retry policy); it registers and runs, as in a linear saga. Before, registration
    refused it: "the step 'b' reads the result of step 'b', which it does not run after;
    add 'b' to after= of 'b'", a fix that is itself refused."""
    s: saga.Saga[Job] = saga.Saga("selfref", input=Job)

    @s.step()
    async def a(ctx: Ctx) -> int:
        return 1

    @s.step(after=[])
    async def b(ctx: Ctx) -> int:
        assert b.retry.max_attempts >= 1  # names itself; reads no result
        return 2

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    assert await run.result(timeout=10) == {"a": 1, "b": 2}
