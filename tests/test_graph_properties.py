"""Property-based tests of graph sagas on a real PostgreSQL: random graphs of up to 8
steps, random dependencies, random permanent failures and random worker crashes.

Which branches complete before a failure stops the run depends on timing, so nothing is
predicted step by step; what must hold whatever the timing is checked instead: the run
ends terminal; the compensated steps are exactly the completed steps that have a
compensation; for every edge a -> b, b started after a completed, and b's compensation
completed before a's started; a step after the failing one never ran; and an external
effects ledger keyed by idempotency key nets to 1 per step for completed runs and to 0
per compensated step for compensated ones.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import anyio
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import saga
from saga.testing import Faults

_names = itertools.count()


class Job(BaseModel):
    n: int


@dataclass(frozen=True)
class Shape:
    deps: dict[str, list[str]]  # step -> the steps it runs after
    undo: set[str]  # the steps that have a compensation
    failing: str | None  # the step that fails for good
    crash: str | None  # the step whose first attempt crashes its worker after the effect
    slow: set[str]  # steps that take a little longer (varies which branch ends last)

    @property
    def steps(self) -> list[str]:
        return list(self.deps)


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    count = draw(st.integers(2, 8))
    names = [f"s{i}" for i in range(count)]
    deps: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        earlier = names[:i]
        deps[name] = sorted(draw(st.sets(st.sampled_from(earlier), max_size=3))) if earlier else []
    undo = draw(st.sets(st.sampled_from(names)))
    failing = draw(st.one_of(st.none(), st.sampled_from(names)))
    crash = draw(st.one_of(st.none(), st.none(), st.sampled_from(names)))
    slow = draw(st.sets(st.sampled_from(names), max_size=3))
    return Shape(deps, undo, failing, crash, slow)


def ancestors(shape: Shape, step: str) -> set[str]:
    found: set[str] = set()
    todo = list(shape.deps[step])
    while todo:
        dep = todo.pop()
        if dep not in found:
            found.add(dep)
            todo += shape.deps[dep]
    return found


def build(shape: Shape, ledger: dict[str, int]) -> saga.Saga[Job]:
    s: saga.Saga[Job] = saga.Saga(f"graph_{next(_names)}", input=Job)
    retry = saga.Retry(max_attempts=3, initial_delay=0.001, max_delay=0.005)
    for name in shape.steps:

        async def forward(ctx: saga.Context[Job], name: str = name) -> str:
            ledger[ctx.idempotency_key.replace(":compensation:", ":step:")] = 1
            if name in shape.slow:
                await anyio.sleep(0.05)
            if name == shape.failing:
                raise saga.PermanentError(f"{name} fails for good")
            return name

        step = s.step(name=name, after=shape.deps[name], retry=retry)(forward)
        if name in shape.undo:

            async def undo(ctx: saga.Context[Job], result: str) -> None:
                ledger[ctx.idempotency_key.replace(":compensation:", ":step:")] = 0

            step.compensate(retry=retry)(undo)
    return s


@pytest.mark.timeout(240)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    print_blob=True,
)
@given(shape=shapes())
async def test_random_graphs_end_terminal_and_undo_in_reverse_dependency_order(
    dsn: str, shape: Shape
) -> None:
    """For any graph, failure point and crash: the run ends completed (no failure) or
    compensated; the compensated steps are exactly the completed ones with a
    compensation; every edge's order holds forward and backward; nothing after the
    failing step ran; the effects ledger nets as the outcome says."""
    note(f"shape: {shape}")
    ledger: dict[str, int] = {}
    definition = build(shape, ledger)
    faults = Faults()
    if shape.crash is not None:
        faults.crash_after(shape.crash)
    async with saga.Orchestrator(
        dsn, sagas=[definition], poll_interval=0.05, shutdown_timeout=1, lease_seconds=0.5
    ) as orch:
        if definition.graph is None:
            event("linear")
        faults.attach(orch)
        run = await orch.start(definition, Job(n=1))
        with contextlib.suppress(saga.RunError):
            await run.result(timeout=60)
        info = await run.info()
        history = await run.history()
    note("history:\n" + "\n".join(e.describe() for e in history))
    event(f"status: {info.status}")
    completed = set(info.completed_steps)
    compensated = [e.step for e in history if e.kind == "compensation_completed"]

    if shape.failing is None:
        assert info.status == saga.RunStatus.COMPLETED
        assert completed == set(shape.steps)
        assert compensated == []
        assert all(ledger[f"{run.id}:step:{name}"] == 1 for name in shape.steps)
    else:
        assert info.status == saga.RunStatus.COMPENSATED
        assert shape.failing not in completed
        assert sorted(compensated) == sorted(completed & shape.undo)
        for name in completed & shape.undo:
            assert ledger[f"{run.id}:step:{name}"] == 0
        after_failing = {n for n in shape.steps if shape.failing in ancestors(shape, n)}
        assert not after_failing & {e.step for e in history if e.kind == "step_started"}

    def first(kind: str, step: str) -> int:
        return next(i for i, e in enumerate(history) if e.kind == kind and e.step == step)

    for b, parents in shape.deps.items():
        for a in parents:
            if b in completed:  # forward: b started only after a completed
                assert first("step_completed", a) < first("step_started", b)
            if a in compensated and b in compensated:  # backward: b undone before a
                assert first("compensation_completed", b) < first("compensation_started", a)
    assert history[-1].kind == f"run_{info.status}"
