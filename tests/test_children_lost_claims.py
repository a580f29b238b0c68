"""A children step whose claims are lost (its worker crashed on every attempt, or its
lease expired and another worker took the step over) leaves no child run that nothing
will undo: the lost attempts' children are undone before the step fails (also when a
cancel or a rollback drops the step meanwhile), and a claim that lost its lease starts
no child, without stalling heartbeats or deadlocking an operator's resolve()."""

# Polling the database: there is no event to wait on.
# ruff: noqa: ASYNC110

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


def _slow_undo_child(name: str, log: list[str], gate: anyio.Event) -> saga.Saga[Job]:
    """A child: load completes at once; its compensation waits for ``gate``."""
    child: saga.Saga[Job] = saga.Saga(name, input=Job, output=int)

    @child.step()
    async def load(ctx: saga.Context[Job]) -> int:
        log.append(f"load{ctx.input.n}")
        return ctx.input.n

    @load.compensate
    async def unload(ctx: saga.Context[Job], r: int) -> None:
        log.append(f"unload{ctx.input.n}")
        await gate.wait()

    return child


async def _parked_lost(db: asyncpg.Connection, run_id: object, seconds: float = 20) -> None:
    """Wait until the children step is parked undoing its children (last attempt lost)."""
    with anyio.fail_after(seconds):
        while True:
            row = await db.fetchrow(
                "SELECT parked, released, lease_owner FROM saga.items "
                "WHERE run_id = $1 AND step = 'kids'",
                run_id,
            )
            undoing = await db.fetchval(
                "SELECT count(*) FROM saga.runs WHERE parent_id = $1 AND status = 'compensating'",
                run_id,
            )
            if row is not None and row["parked"] and row["released"] and undoing == 2:
                return
            await anyio.sleep(0.05)


def _lost_parent(
    name: str, child: saga.Saga[Job], log: list[str]
) -> tuple[saga.Saga[Job], saga.Step[Job, int], saga.Step[Job, list[int]]]:
    parent: saga.Saga[Job] = saga.Saga(name, input=Job)

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

    return parent, split, kids


@pytest.mark.timeout(60)
async def test_cancel_while_lost_children_step_undoes_its_children(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README "Child sagas": "A step whose last attempt's worker died
    (`saga.AttemptLost`) fails once the children its attempts started are undone, as
    any failure of the step", and "Compensating the step (a later failure, a cancel),
    or dropping it in a rollback, cancels its running and stopped children and rolls
    back the completed ones ...; it completes when they all ended"; "A run is
    `compensated` only when every compensation succeeded" and a cancel ends `cancelled`.

    The children step's worker dies on each of its 3 attempts (after its two children
    completed). Its lost attempt parks undoing them (their compensations are slow). An
    operator cancels the parent meanwhile: the parent waits for its children to end
    undone, then ends `cancelled`. Before, the cancel's claim of the parked step
    (dropping it) failed it at once with the lost attempt's error as a compensation
    error: the parent ended `failed` while its children were still rolling back."""
    log: list[str] = []
    gate = anyio.Event()
    child = _slow_undo_child("lc_kid", log, gate)
    parent, _, kids = _lost_parent("lc_parent", child, log)
    faults = Faults()
    faults.crash_after(kids, times=3)
    orch = await orchestrator(parent, child, lease_seconds=0.5, poll_interval=0.05)
    faults.attach(orch)
    run = await parent.start(Job(n=1))
    await _parked_lost(db, run.id)
    await orch.cancel(run.id)
    await anyio.sleep(1.5)  # the cancel's claim of the parked step
    status = await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run.id)
    gate.set()
    with anyio.fail_after(20):
        while (await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run.id)) in (
            "running",
            "compensating",
        ):
            await anyio.sleep(0.05)
    row = await db.fetchrow(
        "SELECT status, compensation_error::text AS ce FROM saga.runs WHERE id = $1", run.id
    )
    kid_rows = await db.fetch("SELECT status FROM saga.runs WHERE parent_id = $1", run.id)
    assert status in ("running", "compensating"), (
        f"the parent ended {status} while its children were still being undone "
        f"(calls {log}); compensation_error {row['ce']}"
    )
    assert row["status"] in ("cancelled", "compensated"), (row["status"], row["ce"])
    assert row["ce"] is None
    assert sorted(r["status"] for r in kid_rows) == ["cancelled", "cancelled"]


@pytest.mark.timeout(60)
async def test_rollback_while_lost_children_step_undoes_its_children(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README "Child sagas": "A step whose last attempt's worker died
    (`saga.AttemptLost`) fails once the children its attempts started are undone", and
    dropping a children step "in a rollback, cancels its running and stopped children
    and rolls back the completed ones ...; it completes when they all ended"; a run
    whose compensations all succeed ends `compensated` ("A run is `compensated` only
    when every compensation succeeded", and only a compensation that gave up makes it
    `failed`).

    As above, the lost children step parks while its two children roll back (slow
    compensations). A parallel branch then fails for good: the run rolls back, which
    claims the parked step at once (dropping it); the run ends `compensated` once the
    children ended. Before, that claim failed the step with saga.AttemptLost as a
    compensation that gave up: the run ended `failed` while its children rolled back
    fine."""
    log: list[str] = []
    gate = anyio.Event()
    boom = anyio.Event()
    child = _slow_undo_child("lr_kid", log, gate)
    parent, split, kids = _lost_parent("lr_parent", child, log)

    @parent.step(retry=saga.Retry(max_attempts=1), after=[split])
    async def other(ctx: saga.Context[Job]) -> None:
        await boom.wait()
        raise RuntimeError("other branch failed")

    faults = Faults()
    faults.crash_after(kids, times=3)
    orch = await orchestrator(parent, child, lease_seconds=0.5, poll_interval=0.05)
    faults.attach(orch)
    run = await parent.start(Job(n=1))
    await _parked_lost(db, run.id)
    boom.set()
    await anyio.sleep(1.5)  # the rollback's claim of the parked step
    status = await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run.id)
    gate.set()
    with anyio.fail_after(20):
        while (await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run.id)) in (
            "running",
            "compensating",
        ):
            await anyio.sleep(0.05)
    row = await db.fetchrow(
        "SELECT status, compensation_error::text AS ce FROM saga.runs WHERE id = $1", run.id
    )
    kid_rows = await db.fetch("SELECT status FROM saga.runs WHERE parent_id = $1", run.id)
    assert status in ("running", "compensating"), (
        f"the parent ended {status} while its children were still being undone "
        f"(calls {log}); compensation_error {row['ce']}"
    )
    assert row["status"] == "compensated", (row["status"], row["ce"])
    assert sorted(r["status"] for r in kid_rows) == ["cancelled", "cancelled"]


@pytest.mark.timeout(60)
async def test_child_start_waiting_for_its_key_does_not_stall_the_workers_heartbeats(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README "In your transaction": `start()` accepts `conn=`, and a caller's
    transaction holding a row makes only that run's writes wait: "No other run's do
    ...; the worker's heartbeats renew its other leases meanwhile". DESIGN/README
    "Leasing": a lease is renewed by heartbeats every third of `lease_seconds`.

    A caller starts a keyed run of saga `acct_kid` (concurrency key "acct") in its own
    transaction, which holds the key until it commits (3 s). Meanwhile a children step
    starts a child of that saga with the same key: the start waits for the key. The
    worker's heartbeats go on meanwhile: an unrelated run's step on the same worker
    (lease 1 s, step 4 s) completes with one attempt. A first version of the fence on
    child starts locked the children step's item while the start waited for the key;
    the worker's heartbeat (which locks all its items) waited for it, and the unrelated
    run's step was taken over 3 times and the run ended `compensated`."""
    calls: list[int] = []
    started = anyio.Event()
    kid: saga.Saga[Job] = saga.Saga(
        "acct_kid", input=Job, output=int, concurrency_key=lambda j: "acct"
    )

    @kid.step()
    async def book(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    parent: saga.Saga[Job] = saga.Saga("acct_parent", input=Job)

    @parent.step()
    async def prepare(ctx: saga.Context[Job]) -> int:
        return 1

    parent.children("kids", kid, lambda ctx: [Job(n=1)], after=[prepare])

    other: saga.Saga[Job] = saga.Saga("acct_other", input=Job)

    @other.step()
    async def slow(ctx: saga.Context[Job]) -> None:
        calls.append(ctx.attempt)
        started.set()
        await anyio.sleep(4)

    orch = await orchestrator(parent, kid, other, lease_seconds=1, poll_interval=0.05)
    slow_run = await orch.start(other, Job(n=0))
    with anyio.fail_after(10):
        await started.wait()
    async with db.transaction():  # a caller's transaction holding key "acct"
        await orch.start(kid, Job(n=99), conn=db)
        await orch.start(parent, Job(n=1))
        await anyio.sleep(3)
    ended = "completed"
    try:
        await slow_run.result(timeout=20)
    except saga.RunCompensatedError as exc:
        ended = f"compensated: {exc}"
    kinds = [e.kind for e in await slow_run.history()]
    assert (ended, calls) == ("completed", [1]), (
        f"the unrelated run ended {ended}; its step ran as attempts {calls}; history {kinds}"
    )


@pytest.mark.timeout(60)
async def test_resolving_a_keyed_child_while_its_sibling_starts_does_not_deadlock(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README "Child sagas": "A child stopped for an operator is not over: the step
    waits until the operator retries it (the step goes on), cancels it, or resolves it
    (either then fails the step ...)", and each child is started by key "so a retried
    step (a crash, an expired lease) never starts a second child"; "Stopping for an
    operator": `resolve()` marks a stopped run resolved (a keyed run's slot goes to the
    next in line).

    A children step starts two children of a keyed saga (key "acct"). Its attempt 1
    started child 0 and lost its connection starting child 1; child 0 stops for an
    operator (on_give_up="stop"). Attempt 2 starts the missing child 1, and its start is
    still on its way (held at its idempotency-key lock, as a slow start is) when the
    operator resolves child 0: resolve() succeeds, and the step goes on. A first
    version of the fence on child starts locked the parent's item before the key's
    slot, while resolve() locks the slot, then the item: PostgreSQL found a deadlock
    and the operator's resolve() failed with a DatabaseError."""
    kid: saga.Saga[Job] = saga.Saga(
        "dl_kid", input=Job, output=int, concurrency_key=lambda j: "acct"
    )

    @kid.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def book(ctx: saga.Context[Job]) -> int:
        if ctx.input.n == 0:
            raise RuntimeError("needs a human")
        return ctx.input.n

    go = anyio.Event()
    parent: saga.Saga[Job] = saga.Saga("dl_parent", input=Job)

    @parent.step()
    async def prepare(ctx: saga.Context[Job]) -> int:
        await go.wait()
        return 1

    parent.children("kids", kid, lambda ctx: [Job(n=0), Job(n=1)], after=[prepare])

    orch = await orchestrator(parent, kid, lease_seconds=2, poll_interval=0.05)
    run = await parent.start(Job(n=1))
    lock = "SELECT pg_advisory_lock(hashtext($2), hashtext($1))"
    unlock = "SELECT pg_advisory_unlock(hashtext($2), hashtext($1))"
    key1, space = f"{run.id}:child:kids:2:1", '"saga" dl_kid'
    waiting_start = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event = 'advisory'"
    )
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute(lock, key1, space)
        go.set()
        with anyio.fail_after(15):  # attempt 1: child 1's start waits at its key
            while (pid := await db.fetchval(waiting_start)) is None:
                await anyio.sleep(0.02)
        await db.execute("SELECT pg_terminate_backend($1)", pid)  # its connection is lost
        with anyio.fail_after(15):  # child 0 stops; attempt 2 starts child 1, held again
            while (
                await db.fetchval(
                    "SELECT count(*) FROM saga.runs WHERE parent_id = $1 AND status = 'stopped'",
                    run.id,
                )
                != 1
                or await db.fetchval(waiting_start) is None
            ):
                await anyio.sleep(0.02)
        child0 = await db.fetchval("SELECT id FROM saga.runs WHERE parent_id = $1", run.id)
        outcome: list[object] = []

        async def resolve() -> None:
            try:
                await orch.resolve(child0, note="handled by hand")
                outcome.append("ok")
            except Exception as exc:  # what the operator sees
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(resolve)
            await anyio.sleep(1)  # (the first fence had resolve wait for the item here)
            await holder.execute(unlock, key1, space)
    finally:
        await holder.close()
    assert outcome == ["ok"], f"resolve() raised {outcome!r}"
