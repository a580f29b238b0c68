"""A children step whose claims are lost (its worker crashed on every attempt, or its
lease expired and another worker took the step over) leaves no child run that nothing
will undo: the lost attempts' children are undone before the step fails, and a claim
that lost its lease starts no child."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

import saga
from saga.testing import Faults
from tests._sagas import Job
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


def _child_saga(name: str, log: list[str]) -> saga.Saga[Job]:
    """A child: load (compensated by unload) returns its input's n; every call logged."""
    child: saga.Saga[Job] = saga.Saga(name, input=Job, output=int)

    @child.step()
    async def load(ctx: saga.Context[Job]) -> int:
        log.append(f"load{ctx.input.n}")
        return ctx.input.n

    @load.compensate
    async def unload(ctx: saga.Context[Job], r: int) -> None:
        log.append(f"unload{ctx.input.n}")

    return child


@pytest.mark.timeout(40)
async def test_children_step_whose_attempts_are_lost_leaves_its_children_undone(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README "Child sagas": "Compensating the step (a later failure, a cancel), or
    dropping it in a rollback, cancels its running and stopped children and rolls back
    the completed ones ...; it completes when they all ended"; "What you can rely on":
    "A run is `compensated` only when every compensation succeeded"; DESIGN: "Nothing
    is ever silently skipped" and "A crash mid-step counts as an attempt".

    A children step starts its two child runs, then its worker dies before writing the
    outcome (saga.testing's crash_after), on each of its 3 attempts (the default
    policy). The step fails with saga.AttemptLost once its two children are undone
    (both end cancelled, each `unload` ran), and the history shows no fourth attempt.
    Before, the parent ended `compensated` at once: the children stayed `completed`
    and no `unload` ever ran (a worker OOM-killed while it fans out left work nothing
    would roll back, under a parent that reported a clean rollback)."""
    log: list[str] = []
    child = _child_saga("lost_kid", log)
    parent: saga.Saga[Job] = saga.Saga("lost_parent", input=Job)

    @parent.step()
    async def split(ctx: saga.Context[Job]) -> int:
        return 2

    @split.compensate
    async def unsplit(ctx: saga.Context[Job], r: int) -> None:
        log.append("unsplit")

    kids = parent.children("kids", child, lambda ctx: [Job(n=i) for i in range(2)], after=[split])

    @parent.step(after=[kids])
    async def done(ctx: saga.Context[Job]) -> list[int]:
        return list(ctx.result(kids))

    faults = Faults()
    faults.crash_after(kids, times=3)  # every attempt of the children step (3 by default)
    orch = await orchestrator(parent, child, lease_seconds=0.5)
    faults.attach(orch)
    run = await parent.start(Job(n=1))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=25)
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.AttemptLost"
    assert faults.fired["crash_after"] == 3
    await anyio.sleep(1.0)  # (room for any late undoing)
    rows = await db.fetch("SELECT status FROM saga.runs WHERE saga_name = 'lost_kid'")
    statuses = sorted(r["status"] for r in rows)
    assert len(rows) == 2  # the premise: the step did start its two children
    assert statuses == ["cancelled", "cancelled"], f"children {statuses}, calls {log}"
    assert {"unload0", "unload1"} <= set(log), f"children not undone: calls {log}"
    attempts = [a for a in saga.timeline(await run.history()) if a.step == "kids"]
    assert [(a.attempt, a.outcome) for a in attempts if a.outcome != "waiting"] == [
        (1, "lease_expired"),
        (2, "lease_expired"),
        (3, "failed"),
    ], attempts


@pytest.mark.timeout(40)
async def test_a_children_attempt_that_lost_its_lease_starts_no_children_for_an_ended_parent(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """DESIGN "Leasing": "every later write of that claim (heartbeat, result, failure) is
    conditional on the token, so a worker that lost its lease can never commit";
    README "Child sagas": dropping the step in a rollback "cancels its running and
    stopped children and rolls back the completed ones".

    Worker 1 (one slot) runs the children step's attempt 1; its ``inputs()`` is slow.
    Meanwhile the run is cancelled and attempt 1's lease expires by the database clock
    (as when its heartbeats do not get through); worker 2 takes the item over, drops
    the step (no child exists yet), compensates ``split`` and the parent ends
    `cancelled`. Then attempt 1's ``inputs()`` returns: its lease is gone, and it starts
    no child (a child's start commits only while the step's claim holds). Before, it
    started both child runs, which completed (their effects happened) under a parent
    that ended `cancelled`, and nothing ever undid them."""
    log: list[str] = []
    entered = anyio.Event()
    gate = anyio.Event()
    child = _child_saga("stale_kid", log)
    parent: saga.Saga[Job] = saga.Saga("stale_parent", input=Job)

    @parent.step()
    async def split(ctx: saga.Context[Job]) -> int:
        return 2

    @split.compensate
    async def unsplit(ctx: saga.Context[Job], r: int) -> None:
        log.append("unsplit")

    async def inputs(ctx: saga.Context[Job]) -> list[Job]:
        log.append(f"inputs{ctx.attempt}")
        if ctx.attempt == 1:
            entered.set()
            await gate.wait()  # slow: its lease expires meanwhile
        return [Job(n=i) for i in range(2)]

    kids = parent.children("kids", child, inputs, after=[split])

    @parent.step(after=[kids])
    async def done(ctx: saga.Context[Job]) -> list[int]:
        return list(ctx.result(kids))

    # Long leases: the first heartbeat of attempt 1 comes 10 s after its claim, long
    # after what follows.
    first = await orchestrator(parent, child, lease_seconds=30, poll_interval=0.05, concurrency=1)
    run = await parent.start(Job(n=1))
    with anyio.fail_after(10):
        await entered.wait()
    await orchestrator(parent, child, lease_seconds=30, poll_interval=0.05)  # worker 2
    await first.cancel(run.id)
    async with db.transaction():  # attempt 1's lease expires (database clock)
        await db.execute(
            "UPDATE saga.items SET due_at = now() - interval '1 second' "
            "WHERE run_id = $1 AND step = 'kids'",
            run.id,
        )
        await db.execute("SELECT pg_notify('saga_work', $1)", parent.name)
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    assert "unsplit" in log  # the premise: the parent's rollback is over
    gate.set()  # attempt 1, whose lease is gone, goes on
    await anyio.sleep(2)
    rows = await db.fetch("SELECT status FROM saga.runs WHERE saga_name = 'stale_kid'")
    statuses = sorted(r["status"] for r in rows)
    assert statuses == [], (
        f"the parent ended cancelled, then its stale attempt started child runs that are "
        f"now {statuses} (calls: {log}): effects of a cancelled run that nothing undoes"
    )
