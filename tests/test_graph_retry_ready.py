"""An operator's retry() of a graph run starts again everything its stop held back, at
once: independent steps (or compensations) ready while the run was stopped do not wait
for the retried one to complete."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import saga
from tests._sagas import Job, until_status
from tests.conftest import OrchestratorFactory

Ctx = saga.Context[Any]


async def _until_event(run: saga.RunHandle, kind: str, step: str) -> None:
    with anyio.fail_after(10):
        while True:
            if any(e.kind == kind and e.step == step for e in await run.history()):
                return
            await anyio.sleep(0.02)


@pytest.mark.timeout(60)
async def test_a_retried_stopped_run_starts_the_steps_its_stop_held_back_beside_the_retried_one(
    orchestrator: OrchestratorFactory,
) -> None:
    """a, then b and c at once, then d after c. b gives up (on_give_up="stop") while c
    runs; c completes while the run stops, so d is ready but held back. After retry(),
    d runs while the retried b is still running (README: "independent steps run at the
    same time"), and the run completes. Before, d started only once b completed."""
    s: saga.Saga[Job] = saga.Saga("held_steps", input=Job)
    c_running, c_go, b_again, b_go = anyio.Event(), anyio.Event(), anyio.Event(), anyio.Event()
    b_calls: list[int] = []

    @s.step()
    async def a(ctx: Ctx) -> str:
        return "a"

    @s.step(after=[a], retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def b(ctx: Ctx) -> str:
        b_calls.append(ctx.attempt)
        if len(b_calls) == 1:
            await c_running.wait()
            raise saga.PermanentError("bank said no")
        b_again.set()
        await b_go.wait()
        return "b"

    @s.step(after=[a])
    async def c(ctx: Ctx) -> str:
        c_running.set()
        await c_go.wait()
        return "c"

    @s.step(after=[c])
    async def d(ctx: Ctx) -> str:
        return "d"

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    await _until_event(run, "step_failed", "b")
    c_go.set()
    await until_status(run, saga.RunStatus.STOPPED)
    assert not any(e.step == "d" for e in await run.history())
    await run.retry()
    with anyio.fail_after(10):
        await b_again.wait()
    await _until_event(run, "step_completed", "d")
    history = await run.history()
    ready = [e for e in history if e.kind == "step_ready" and e.step == "d"]
    assert [e.data["after"] for e in ready] == [["c"]]
    b_go.set()
    assert await run.result(timeout=10) == {"b": "b", "d": "d"}


@pytest.mark.timeout(60)
async def test_a_retried_failed_rollback_starts_the_compensations_its_failure_held_back(
    orchestrator: OrchestratorFactory,
) -> None:
    """Roots a and x; b after a; e after b and x fails for good. b's and x's
    compensations run at once; x's gives up while b's runs, so a's compensation (ready
    once b is undone) is held back and the run ends failed. After retry(), a's
    compensation runs while the retried x's is still running ("independent compensations
    run concurrently"), and the run ends compensated. Before, a's waited for x's."""
    s: saga.Saga[Job] = saga.Saga("held_undo", input=Job)
    undone: list[str] = []
    x_undo_calls: list[int] = []
    x_gave_up, x_again, x_go = anyio.Event(), anyio.Event(), anyio.Event()
    fast = saga.Retry(max_attempts=1)

    @s.step()
    async def a(ctx: Ctx) -> str:
        return "a"

    @a.compensate(retry=fast)
    async def undo_a(ctx: Ctx, value: str) -> None:
        undone.append("a")

    @s.step(after=[])
    async def x(ctx: Ctx) -> str:
        return "x"

    @x.compensate(retry=fast)
    async def undo_x(ctx: Ctx, value: str) -> None:
        x_undo_calls.append(ctx.attempt)
        if len(x_undo_calls) == 1:
            raise RuntimeError("refund service down")
        x_again.set()
        await x_go.wait()
        undone.append("x")

    @s.step(after=[a])
    async def b(ctx: Ctx) -> str:
        return "b"

    @b.compensate(retry=fast)
    async def undo_b(ctx: Ctx, value: str) -> None:
        await x_gave_up.wait()
        undone.append("b")

    @s.step(after=[b, x])
    async def e(ctx: Ctx) -> str:
        raise saga.PermanentError("out of stock")

    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    await _until_event(run, "compensation_failed", "x")
    x_gave_up.set()
    await until_status(run, saga.RunStatus.FAILED)
    assert undone == ["b"]
    await run.retry()
    with anyio.fail_after(10):
        await x_again.wait()
    await _until_event(run, "compensation_completed", "a")
    assert undone == ["b", "a"]
    x_go.set()
    with pytest.raises(saga.RunCompensatedError, match="out of stock"):
        await run.result(timeout=10)
    assert undone == ["b", "a", "x"]
