"""Child sagas: a step that starts one run of another saga per item of a list, started
once, woken by their ends, failed by a child's failure, and undone with its children."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from saga.testing import Faults
from tests._sagas import Gate, Job, Ledger, permanent, small_saga, until_status
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]
#: The workers' fallback poll: far longer than any test here, so that only the wake-up a
#: child's end sends can move its parent on in time.
NO_POLLING = 30.0


def chunk_saga(ledger: Ledger, **options: Any) -> saga.Saga[Job]:
    """A child: load (compensated) returns 10 x its input's n."""
    return small_saga(
        "chunk", ["load"], compensate=True, ledger=ledger,
        result=lambda ctx: ctx.input.n * 10, **options,
    )  # fmt: skip


def import_saga(
    child: saga.Saga[Job], ledger: Ledger, bound: int = 10, hold: Gate | None = None
) -> saga.Saga[Job]:
    """split, then one chunk run per item (input.n items), then done (held by ``hold``):
    the parent's output is the children's outputs, in order."""
    s = small_saga("import", ["split"], compensate=True, ledger=ledger)
    split = s.get_step("split")

    def inputs(ctx: Ctx) -> list[Job]:
        return [Job(n=i) for i in range(ctx.input.n)]

    chunks = s.children("chunks", child, inputs, max_children=bound, after=[split])

    @s.step(after=[chunks])
    async def done(ctx: Ctx) -> list[int]:
        if hold is not None:
            await hold.pass_through(ctx)
        return list(ctx.result(chunks))

    return s


async def test_a_step_runs_one_child_per_item_and_completes_with_their_outputs(
    orchestrator: OrchestratorFactory,
) -> None:
    """Three items start three child runs (once each, with their inputs); the step
    completes with their outputs in input order, woken by their ends (the fallback poll
    is 30 s: the run ends in a few)."""
    ledger = Ledger()
    child = chunk_saga(ledger)
    parent = import_saga(child, ledger)
    orch = await orchestrator(parent, child, poll_interval=NO_POLLING)
    run = await orch.start(parent, Job(n=3))
    with anyio.fail_after(10):
        assert await run.result() == [0, 10, 20]
    assert ledger.steps().count("load") == 3
    kinds = [e.kind for e in await run.history()]
    assert "children_waiting" in kinds


async def test_an_empty_list_completes_the_step_with_an_empty_result(
    orchestrator: OrchestratorFactory,
) -> None:
    """No items: no child starts, the step completes with []."""
    ledger = Ledger()
    child = chunk_saga(ledger)
    parent = import_saga(child, ledger)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job(n=0))
    assert await run.result(timeout=10) == []
    assert "load" not in ledger.steps()


async def test_a_list_over_the_bound_fails_the_step_for_good_with_the_count(
    orchestrator: OrchestratorFactory,
) -> None:
    """Five items for max_children=4: the step fails permanently (no retry), naming 5
    and the bound; no child starts; what completed is compensated."""
    ledger = Ledger()
    child = chunk_saga(ledger)
    parent = import_saga(child, ledger, bound=4)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job(n=5))
    with pytest.raises(saga.RunCompensatedError, match=r"5 child runs.*max_children=4"):
        await run.result(timeout=10)
    assert "load" not in ledger.steps()
    assert ledger.steps("compensation") == ["split"]


async def test_a_child_saga_that_is_not_registered_is_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """Registering a parent without its child saga fails with a message naming both."""
    ledger = Ledger()
    parent = import_saga(chunk_saga(ledger), ledger)
    with pytest.raises(saga.DefinitionError, match=r"starts runs of saga 'chunk'.*not registered"):
        await orchestrator(parent)


async def test_a_retried_step_never_starts_a_second_child(
    orchestrator: OrchestratorFactory,
) -> None:
    """The worker running the children step dies after starting them (before recording
    anything): the next attempt finds them and starts none again."""
    ledger, faults = Ledger(), Faults()
    faults.crash_after("chunks")
    child = chunk_saga(ledger)
    parent = import_saga(child, ledger)
    orch = await orchestrator(parent, child, lease_seconds=0.5)
    faults.attach(orch)
    run = await orch.start(parent, Job(n=3))
    assert await run.result(timeout=15) == [0, 10, 20]
    assert faults.fired["crash_after"] == 1
    assert ledger.steps().count("load") == 3
    runs = await saga.list_runs(orch, saga="chunk")
    assert len(runs.runs) == 3


async def test_a_failed_child_fails_the_step_and_its_siblings_are_undone(
    orchestrator: OrchestratorFactory,
) -> None:
    """Child 1 of 3 fails for good: the others are cancelled or reverted (their loads
    compensated), the step fails with the child's error, and the parent compensates what
    completed before it."""
    ledger = Ledger()
    child = chunk_saga(
        ledger, fail={"load": permanent("bad chunk", when=lambda ctx: ctx.input.n == 1)}
    )
    parent = import_saga(child, ledger)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job(n=3))
    with pytest.raises(saga.RunCompensatedError, match="bad chunk"):
        await run.result(timeout=15)
    undone = [c for c in ledger.of("compensation") if c.step == "load"]
    loaded = [c for c in ledger.of("step") if c.step == "load" and c.run_id]
    assert len(undone) == len({c.run_id for c in loaded}) - 1  # every child but the failed
    assert ledger.steps("compensation")[-1] == "split"
    assert "done" not in ledger.steps()


async def test_compensating_the_step_reverts_its_completed_children(
    orchestrator: OrchestratorFactory,
) -> None:
    """The parent is cancelled after its children completed (while a later step runs):
    compensating the children step rolls each completed child back (its load is
    compensated, the child ends cancelled) before split is compensated."""
    ledger, gate = Ledger(), Gate("done")
    child = chunk_saga(ledger)
    parent = import_saga(child, ledger, hold=gate)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job(n=2))
    with anyio.fail_after(10):
        await gate.entered.wait()
        await run.cancel()
        gate.release.set()
        with pytest.raises(saga.RunCancelledError):
            await run.result()
    trace = ledger.trace()
    assert trace.count("undo load") == 2
    assert trace[-1] == "undo split"
    for info in (await saga.list_runs(orch, saga="chunk")).runs:
        assert info.status is saga.RunStatus.CANCELLED


async def test_cancelling_the_parent_while_children_run_cancels_them(
    orchestrator: OrchestratorFactory,
) -> None:
    """Cancel while the children run: each child is cancelled (what it completed is
    compensated), then the parent's completed steps; nothing is left running."""
    ledger, gate = Ledger(), Gate("load")
    child = chunk_saga(ledger, gate=gate)
    parent = import_saga(child, ledger)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job(n=2))
    with anyio.fail_after(10):
        await gate.entered.wait()
        await run.cancel()
        gate.release.set()
        with pytest.raises(saga.RunCancelledError):
            await run.result()
    kids = (await saga.list_runs(orch, saga="chunk")).runs
    assert kids
    for info in kids:
        final = await until_status(orch.get_run(info.id), *saga.RunStatus.terminal())
        assert final.status is saga.RunStatus.CANCELLED
    assert ledger.steps("compensation")[-1] == "split"


async def test_a_cancelled_parent_waits_for_its_children_parked_not_polling(
    orchestrator: OrchestratorFactory,
) -> None:
    """Cancelled while its children run and stay running for a second: the parent's step,
    having asked them to cancel, parks until one ends (a handful of children_waiting
    events, no claim in between), then ends cancelled. Were it due again after every
    look, as a forward look that a cancel overtook must be, it would spin, counting
    attempts, until it ended failed with saga.AttemptLost."""
    ledger, gate = Ledger(), Gate("load")
    child = chunk_saga(ledger, gate=gate)
    parent = import_saga(child, ledger)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job(n=2))
    with anyio.fail_after(15):
        await gate.entered.wait()
        await run.cancel()
        await anyio.sleep(1.0)  # the children hold on; the parent must not spin
        gate.release.set()
        with pytest.raises(saga.RunCancelledError):
            await run.result()
    looks = [e for e in await run.history() if e.kind == "children_waiting"]
    assert len(looks) < 10, len(looks)


async def test_a_child_past_its_pivot_fails_the_parents_rollback_for_an_operator(
    orchestrator: OrchestratorFactory,
) -> None:
    """The parent is cancelled while a child runs past its own pivot: the child cannot
    be cancelled nor, once completed, reverted, so undoing the parent's step gives up
    like a compensation would: the parent ends failed with the reason, for an operator,
    rather than ending cancelled with the child's effects silently in place."""
    ledger, gate = Ledger(), Gate("ship")
    child = small_saga("paid", ["pay", "ship"], ledger=ledger, gate=gate)
    child.get_step("pay").pivot = True
    s = small_saga("order", ["split"], compensate=True, ledger=ledger)
    s.children("pay_all", child, lambda ctx: [Job(n=0)], after=["split"])
    orch = await orchestrator(s, child)
    run = await orch.start(s, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
        await run.cancel()
        gate.release.set()
        with pytest.raises(saga.RunFailedError, match="passed its pivot step"):
            await run.result()
    assert "split" not in ledger.steps("compensation")  # nothing undone past the failure
    kinds = [e.kind for e in await run.history()]
    assert "compensation_failed" in kinds
    assert kinds[-1] == "run_failed"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (lambda ctx: Job(n=1), "must return a list"),
        (lambda ctx: [{"n": "not a number"}], "invalid input for saga 'chunk'"),
        (lambda ctx: 1 / 0, "division by zero"),
    ],
    ids=["not a list", "an input the child refuses", "inputs raises"],
)
async def test_bad_inputs_fail_the_step_with_the_reason(
    orchestrator: OrchestratorFactory, inputs: Any, message: str
) -> None:
    """inputs() returning something other than a list, an item the child saga's model
    refuses, or inputs() raising: the step fails (the last after its retries) with the
    reason in the run's error, and what completed before it is compensated."""
    ledger = Ledger()
    child = chunk_saga(ledger)
    s = small_saga("bad", ["split"], compensate=True, ledger=ledger)
    s.children("chunks", child, inputs, after=["split"])
    orch = await orchestrator(s, child)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunCompensatedError, match=message):
        await run.result(timeout=15)
    assert ledger.steps("compensation") == ["split"]
    assert "load" not in ledger.steps()


async def test_sagas_starting_each_other_as_children_are_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """A saga cannot start itself as a child (refused when declared), nor through other
    sagas: ping starting pong starting ping is a DefinitionError naming the chain when
    the client opens. Such runs used to nest without end (1,215 running 20 s after the
    root was cancelled). A refused open leaves the sagas editable, to fix them."""
    ping: saga.Saga[Job] = saga.Saga("ping", input=Job)
    pong: saga.Saga[Job] = saga.Saga("pong", input=Job)
    tail: saga.Saga[Job] = saga.Saga("tail", input=Job)

    @tail.step()
    async def last(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    ping.children("to_pong", pong, lambda ctx: [Job(n=ctx.input.n + 1)])
    pong.children("to_ping", ping, lambda ctx: [Job(n=ctx.input.n + 1)])
    pong.children("to_tail", tail, lambda ctx: [Job(n=1)])
    with pytest.raises(saga.DefinitionError, match="'ping' -> 'pong' -> 'ping'"):
        await orchestrator(ping, pong, tail)

    @ping.step()
    async def still_editable(ctx: saga.Context[Job]) -> int:
        return 0


async def test_children_inputs_reading_a_result_they_do_not_run_after_are_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """A children step's inputs(ctx) is its code: reading the result of a step it does
    not run after (here a sibling branch) is a DefinitionError naming the fix when the
    client opens, as for a step's own function. It used to be accepted, and to fail
    each run's step at run time."""
    kid = small_saga("kid", ["work"])
    s: saga.Saga[Job] = saga.Saga("fan_kids", input=Job)

    @s.step()
    async def a(ctx: saga.Context[Job]) -> int:
        return 1

    @s.step(after=[])
    async def b(ctx: saga.Context[Job]) -> int:
        return 2

    s.children("kids", kid, lambda ctx: [Job(n=ctx.result(b))], after=[a])
    with pytest.raises(saga.DefinitionError, match="add 'b' to after= of 'kids'"):
        await orchestrator(s, kid)


def _stopping_child(ledger: Ledger, stops: int) -> saga.Saga[Job]:
    """load (compensated) then ship, whose first ``stops`` calls fail and stop the run
    for an operator (its policy: one attempt, then stop)."""
    calls = iter(range(stops))
    return small_saga(
        "shipment",
        ["load", "ship"],
        ledger=ledger,
        compensate={"load"},
        fail={"ship": permanent("carrier down", when=lambda ctx: next(calls, None) is not None)},
        retry={"ship": saga.Retry(max_attempts=1, on_give_up="stop")},
    )


def _parent(child: saga.Saga[Job], ledger: Ledger) -> saga.Saga[Job]:
    parent = small_saga("orders", ["split"], compensate=True, ledger=ledger)
    parent.children("ship_all", child, lambda ctx: [Job(n=1)], after=["split"])
    return parent


async def _run_with_a_stopped_child(
    orchestrator: OrchestratorFactory,
) -> tuple[Ledger, saga.RunHandle, saga.RunHandle]:
    """A parent run whose one child has stopped for an operator: (ledger, parent, child)."""
    ledger = Ledger()
    child = _stopping_child(ledger, stops=1)
    parent = _parent(child, ledger)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(10):
        while True:
            kids = (await saga.list_runs(orch, saga="shipment")).runs
            if kids and kids[0].status is saga.RunStatus.STOPPED:
                return ledger, run, orch.get_run(kids[0].id)
            await anyio.sleep(0.02)


@pytest.mark.parametrize("operator", ["retry", "cancel", "resolve"])
async def test_a_stopped_child_is_not_over_its_parent_waits_for_the_operator(
    orchestrator: OrchestratorFactory, operator: str
) -> None:
    """A child that stops for an operator is not over: the parent's step goes on
    waiting (the parent stays running). The operator's retry() of the child completes
    it, and then the parent; a cancel() of the child compensates it, and then the
    parent's step fails for good and the parent rolls back; a resolve() of the child
    does the same (the resolved child is cancelled as its step is undone), where the
    parent used to wait on it for ever. The parent used to end compensated at once,
    leaving the stopped child's load never undone."""
    ledger, run, kid = await _run_with_a_stopped_child(orchestrator)
    await anyio.sleep(0.3)
    assert (await run.info()).status is saga.RunStatus.RUNNING
    if operator == "retry":
        await kid.retry()
        assert await run.result(timeout=10) == ["ship"]
        assert ledger.steps("compensation") == []
    else:
        if operator == "cancel":
            await kid.cancel()
        else:
            await kid.resolve(note="carrier sorted out by phone")
        with pytest.raises(saga.RunCompensatedError, match="ChildFailed"):
            await run.result(timeout=10)
        assert (await kid.info()).status is saga.RunStatus.COMPENSATED
        assert ledger.steps("compensation") == ["load", "split"]


async def test_cancelling_a_parent_cancels_its_stopped_child(
    orchestrator: OrchestratorFactory,
) -> None:
    """A parent cancelled while its step waits on a stopped child cancels that child
    too, as its running ones: the child rolls back (its load undone; a run stopped at a
    step ends compensated when cancelled), and the parent ends cancelled. Its rollback
    used to fail for an operator, as if the child could not be undone."""
    ledger, run, kid = await _run_with_a_stopped_child(orchestrator)
    await run.cancel()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    assert (await kid.info()).status is saga.RunStatus.COMPENSATED
    assert ledger.steps("compensation") == ["load", "split"]


async def test_a_parent_cancelled_while_it_looks_at_a_stopped_child_is_not_left_parked(
    orchestrator: OrchestratorFactory, db: Any
) -> None:
    """The child's stop wakes its parent's step, whose worker claims it (the claim is
    held 1 s by a trigger) and looks at the children; the parent's cancel commits
    meanwhile (its step is leased: the cancel cannot make it due). The attempt, seeing
    the child stopped, would park the step until a child ends, which a stopped child
    never does by itself: the parent hung running. It is due again at once instead, and
    its next claim cancels the child: the parent ends cancelled."""
    await db.execute(
        """
        CREATE FUNCTION saga.slow_parent_claim() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM saga.runs
                       WHERE saga_name = 'shipment' AND status = 'stopped') THEN
                PERFORM pg_sleep(1);
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER slow_parent_claim AFTER UPDATE ON saga.items
            FOR EACH ROW WHEN (NEW.step = 'ship_all' AND OLD.lease_owner IS NULL
                               AND NEW.lease_owner IS NOT NULL)
            EXECUTE FUNCTION saga.slow_parent_claim();
        """
    )
    ledger = Ledger()
    child = _stopping_child(ledger, stops=1)
    parent = _parent(child, ledger)
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(10):
        while not await db.fetchval(  # noqa: ASYNC110 - polling the database
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
        ):
            await anyio.sleep(0.01)
    await run.cancel()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    assert ledger.steps("compensation") == ["load", "split"]


async def test_a_child_cancelled_by_an_operator_is_the_one_its_parents_error_names(
    orchestrator: OrchestratorFactory,
) -> None:
    """README (Child sagas): "A child that ends compensated, cancelled or failed fails
    the step for good (a saga.ChildFailed error with that child's), once its siblings
    are undone." Of three children, two complete and an operator cancels the third: the
    parent's error names the cancelled child, not a sibling the parent reverted since."""
    ledger = Ledger()
    gate = Gate("load", when=lambda ctx: ctx.input.n == 1)
    child = small_saga(
        "chunk", ["load"], compensate=True, ledger=ledger, gate=gate,
        result=lambda ctx: ctx.input.n * 10,
    )  # fmt: skip
    parent = small_saga("imp", ["split"], compensate=True, ledger=ledger)
    parent.children("chunks", child, lambda ctx: [Job(n=i) for i in range(3)], after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(10):
        await gate.entered.wait()
        while True:
            kids = (await saga.list_runs(orch, saga="chunk")).runs
            if len(kids) == 3 and sum(k.status is saga.RunStatus.COMPLETED for k in kids) == 2:
                break
            await anyio.sleep(0.02)
    (held,) = [k for k in kids if k.status is saga.RunStatus.RUNNING]
    await orch.get_run(held.id).cancel(by="ops", note="bad chunk")
    gate.release.set()
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=15)
    assert (await orch.get_run(held.id).info()).status is saga.RunStatus.CANCELLED
    error = raised.value.error
    assert error is not None
    assert error.type == "saga.ChildFailed"
    assert f"child run {held.id} ended cancelled" in error.message
