"""Steps in parallel and child sagas, read literally: a children step that fails for good
midway through its inputs undoes the children it started, a worker never runs more
branches than its concurrency (a write leasing ready steps and a claim in flight share
the free slots, and a write holds only those it may lease into), a step may name its
own step object, and a resolved child is the one a failed step names."""

# Polling the database: there is no event to wait on.
# ruff: noqa: ASYNC110

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import saga
import saga.testing
from tests._sagas import FAST, Job, Ledger, small_saga
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]


class Pay(BaseModel):
    n: int = 0


class Chunk(BaseModel):
    rows: int


class ImportJob(BaseModel):
    rows: int


def _stoppable_children() -> tuple[saga.Saga[Any], saga.Saga[Any]]:
    """The README's import fan-out, with a child that stops for an operator (chunk 2)."""
    chunk = saga.Saga("stc", input=Chunk, output=int)

    @chunk.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def load(ctx: saga.Context[Chunk]) -> int:
        if ctx.input.rows == 2:
            raise ValueError("stuck")
        return ctx.input.rows

    parent = saga.Saga("stp", input=ImportJob)

    @parent.step()
    async def split(ctx: saga.Context[ImportJob]) -> list[int]:
        return [1, 2, 3]

    loads = parent.children(
        "loads", chunk, lambda ctx: [Chunk(rows=r) for r in ctx.result(split)], after=[split]
    )

    @parent.step(after=[loads])
    async def report(ctx: saga.Context[ImportJob]) -> int:
        return sum(ctx.result(loads))

    return chunk, parent


async def _stopped_child(orch: saga.Client) -> saga.RunHandle[Any]:
    with anyio.fail_after(20):
        while True:
            page = await saga.list_runs(orch, saga="stc")
            for r in page.runs:
                if r.status is saga.RunStatus.STOPPED:
                    return orch.get_run(r.id)
            await anyio.sleep(0.1)


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


@pytest.mark.timeout(40)
async def test_a_children_step_failed_for_good_midway_starts_no_child_once_woken(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: "`inputs(ctx)` (sync or async) returns the children's
    inputs"; "the first input given for a key wins"; a step failing for good undoes the
    children it started first ("Undone with the step").

    `inputs()` first returns two valid inputs and one the child refuses, later only
    valid ones. The step fails for good on the refused input once the two children it
    started are undone; its wake-ups (as they end) start no child and keep that error.
    Before, a wake-up asked `inputs()` again, started a third child, and the step failed
    with a `saga.ChildFailed` naming a child it had cancelled itself."""
    log: list[str] = []
    child: saga.Saga[Pay] = saga.Saga("h19_kid", input=Pay, output=int)

    @child.step(retry=FAST)
    async def load(ctx: saga.Context[Pay]) -> int:
        log.append(f"load{ctx.input.n}")
        await anyio.sleep(0.5)
        return ctx.input.n

    @load.compensate
    async def unload(ctx: saga.Context[Pay], r: int) -> None:
        log.append(f"unload{ctx.input.n}")

    asked: list[int] = []

    async def inputs(ctx: saga.Context[Pay]) -> list[Any]:
        asked.append(1)
        if len(asked) == 1:  # the service's first answer has a bad row
            return [Pay(n=0), Pay(n=1), {"n": "not a number"}]
        return [Pay(n=0), Pay(n=1), Pay(n=2)]

    parent: saga.Saga[Pay] = saga.Saga("h19_fanout", input=Pay)
    kids = parent.children("kids", child, inputs)

    @parent.step(after=[kids])
    async def report(ctx: saga.Context[Pay]) -> int:
        return len(ctx.result(kids))

    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Pay())
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=20)
    info = await run.info()
    started = (await saga.list_runs(orch, saga="h19_kid")).runs
    error_type = info.error.type if info.error else None
    said = f"{len(started)} children started, the step's error {info.error}, log {log}"
    assert len(started) == 2, said
    assert error_type not in (None, "saga.ChildFailed"), said


@pytest.mark.timeout(40)
async def test_a_graph_write_retrying_a_dropped_connection_does_not_idle_the_worker(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Orchestrator: `concurrency=32`, the steps a worker runs at once: no more,
    and no fewer while work is due.

    A graph write whose connection drops (and that retries for seconds) reserves only
    the slots it may lease into (here the step's two dependents): a linear run started
    meanwhile is claimed into the worker's other free slot. A first version of the
    reservation took every free slot for the whole write, and the worker claimed
    nothing meanwhile."""
    g: saga.Saga[Pay] = saga.Saga("h19_graph_write", input=Pay)

    @g.step()
    async def a(ctx: saga.Context[Pay]) -> int:
        return 1

    @g.step(after=[a])
    async def b(ctx: saga.Context[Pay]) -> int:
        return 2

    @g.step(after=[a])
    async def c(ctx: saga.Context[Pay]) -> int:
        return 3

    lin: saga.Saga[Pay] = saga.Saga("h19_linear", input=Pay)
    ran = anyio.Event()

    @lin.step()
    async def only(ctx: saga.Context[Pay]) -> int:
        ran.set()
        return 3

    faults = saga.testing.Faults()
    faults.drop_connection_at_commit(a, committed=False, times=4)
    orch = await orchestrator(g, lin, concurrency=4)
    faults.attach(orch)
    graph_run = await orch.start(g, Pay())
    with anyio.fail_after(5):
        while faults.fired["drop_connection_at_commit"] < 2:
            await anyio.sleep(0.01)  # a ran; its write is retrying
    started = anyio.current_time()
    await orch.start(lin, Pay())
    with anyio.move_on_after(2.0):
        await ran.wait()
    took = anyio.current_time() - started
    assert ran.is_set(), (
        f"a worker with 3 free slots did not claim a due run for {took:.1f} s "
        "(a graph write retrying its dropped connection held them)"
    )
    await graph_run.result(timeout=15)


@pytest.mark.timeout(60)
async def test_resolving_a_stopped_child_fails_the_step_with_that_childs_error(dsn: str) -> None:
    """README, Child sagas: "A child that ends compensated, cancelled or failed fails the
    step for good (a `saga.ChildFailed` error with that child's) ... A child stopped for an
    operator is not over: the step waits until the operator retries it (the step goes
    on), cancels it, or resolves it (either then fails the step; a resolved child is
    cancelled with its siblings' undoing ...)".

    Chunk 2 stops for an operator, who resolves it: the step fails with a ChildFailed
    naming that child (chosen before the step cancels the others). Before, it named a
    sibling that completed fine and was cancelled by the step's own undoing (the
    resolved child, cancelled too, ended later)."""
    chunk, parent = _stoppable_children()
    async with saga.Orchestrator(dsn, sagas=[parent, chunk], poll_interval=0.2) as orch:
        run = await parent.start(ImportJob(rows=3))
        child = await _stopped_child(orch)
        await child.resolve(note="handled by hand")
        with pytest.raises(saga.RunCompensatedError) as exc:
            await run.result(timeout=20)
    error = exc.value.error
    assert error is not None
    assert error.type == "saga.ChildFailed", error
    assert str(child.id) in error.message, (
        f"the parent's error names another child than the resolved one {child.id}: {error}"
    )
