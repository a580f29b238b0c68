"""What a run whose steps run in parallel tells an operator once it waits for one, and
what a concurrency key may not be put on."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Gate, Job, fast, permanent, small_saga, until_status
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
