"""What a run whose steps run in parallel tells an operator once it waits for one, and
what a concurrency key may not be put on."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Fail, Gate, Job, Ledger, fast, permanent, small_saga, until_status
from tests.conftest import ClientFactory, OrchestratorFactory

Ctx = saga.Context[Any]


async def test_a_key_on_a_saga_that_starts_child_sagas_is_refused_naming_it(
    open_client: ClientFactory,
) -> None:
    """README, One at a time per key: "Limit: not on sagas whose steps run in parallel
    (`after=`) or that start child sagas (`children()`; a `DefinitionError` names it)".
    A linear parent with a children step and a concurrency key is refused when a
    client opens with it, and the message names child sagas (not only `after=`)."""
    child = small_saga("keyed_kids_child", ["w"])
    parent = saga.Saga("keyed_kids", input=Job, concurrency_key=lambda job: "acct")

    @parent.step()
    async def split(ctx: Ctx) -> int:
        return 2

    parent.children("kids", child, lambda ctx: [Job(n=i) for i in range(ctx.result(split))])
    with pytest.raises(saga.DefinitionError, match=r"child sagas \(children\(\)\)"):
        await open_client(parent, child)


async def test_a_failed_graph_run_names_the_compensation_that_gave_up_as_its_step(
    orchestrator: OrchestratorFactory,
) -> None:
    """README: a compensation that gives up: "once the running ones finish the run is
    `failed`, and `retry()` resumes the rollback there"; `saga retry RUN` "resume[s] a
    `failed` run at the compensation that gave up"; RunInfo (Operator API): "status,
    step, attempt, errors, worker, times", shown as STEP by `saga runs`/`saga attention`
    and as `step:` by `saga show`.

    In a graph, b's and c's compensations run at once; b's gives up while c's still
    runs; c's then completes and the run ends failed. RunInfo.step should be b (where
    the run waits for an operator, as for a linear run, and as a stopped graph run
    already does: RunInfo.step is the step that gave up, not the branch that ended
    last), so the operator views name the compensation that needs them."""
    gate = Gate("c", compensation=True)
    s = small_saga(
        "failinfo", ["a", "b", "c", "j"],
        after={"b": ["a"], "c": ["a"], "j": ["b", "c"]}, compensate=True,
        gate=gate, fail={"j": permanent()},
        fail_undo={"b": permanent("undo b")}, undo_retry=fast(1),
    )  # fmt: skip
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with anyio.fail_after(15):
        await gate.entered.wait()
        while "compensation_failed" not in [e.kind for e in await run.history()]:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    gate.release.set()
    info = await until_status(run, saga.RunStatus.FAILED)
    assert info.compensation_error is not None
    assert info.compensation_error.step == "b"
    assert info.step == "b", info.step


async def test_a_resolved_child_whose_key_was_freed_lets_its_parent_roll_back(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Child sagas: "A child stopped for an operator is not over: the step waits
    until the operator retries it (the step goes on), cancels it, or resolves it (either
    then fails the step; a resolved child is cancelled with its siblings' undoing, unless
    resolving freed its key)." and "A child that cannot be undone (it gave up
    compensating, or passed its own pivot) fails that compensation for an operator".

    A keyed child (no pivot) stops; the operator resolves it, which frees its key. The
    README says the step then fails and the resolved child is left alone (not cancelled);
    the parent rolls back (its sibling reverted, split undone) and ends compensated:
    the resolved child is not one that "cannot be undone"."""
    ledger = Ledger()
    child = small_saga(
        "rkchild", ["w", "x"], compensate={"w"}, ledger=ledger,
        fail={"x": Fail(RuntimeError, "x breaks", None, lambda ctx: ctx.input.n == 1)},
        retry=saga.Retry(max_attempts=1, on_give_up="stop"),
        traffic={"concurrency_key": lambda i: f"acct{i.n}", "concurrency_limit": 1},
    )  # fmt: skip
    parent = small_saga("rkparent", ["split"], compensate=True, ledger=ledger)
    parent.children("kids", child, lambda ctx: [Job(n=0), Job(n=1)], after=["split"])
    orch = await orchestrator(parent, child)
    run = await orch.start(parent, Job())
    with anyio.fail_after(20):
        while True:
            kids = (await saga.list_runs(orch, saga="rkchild")).runs
            stopped = [k for k in kids if k.status is saga.RunStatus.STOPPED]
            if stopped:
                break
            await anyio.sleep(0.05)
    await orch.get_run(stopped[0].id).resolve(note="sorted out by phone")
    with pytest.raises(saga.RunError) as exc:
        await run.result(timeout=20)
    assert isinstance(exc.value, saga.RunCompensatedError), (
        exc.value,
        exc.value.compensation_error,
    )
    assert "split" in ledger.steps("compensation")
