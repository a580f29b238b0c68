"""Property-based tests: random saga shapes and failure schedules on a real PostgreSQL.

Each example draws a saga of 2 to 6 steps (each with or without a compensation, with its
own retry limit) and a failure schedule within those limits: per step, the number of
transient failures before it succeeds, or all its attempts failing transiently, or a
permanent failure at attempt k; per compensation, the number of transient failures
before it succeeds (or all its attempts failing). The outcome is then predictable, and
one run per example, in process, must match the prediction exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import saga

_names = itertools.count()


class Job(BaseModel):
    n: int


@dataclass(frozen=True)
class CompensationShape:
    max_attempts: int
    transient: int  # failures before success; == max_attempts: it gives up (run failed)

    @property
    def gives_up(self) -> bool:
        return self.transient >= self.max_attempts

    @property
    def calls(self) -> int:
        return min(self.transient + 1, self.max_attempts)


@dataclass(frozen=True)
class StepShape:
    max_attempts: int
    transient: int  # transient failures first; == max_attempts: retries exhausted
    permanent_at: int | None  # then a permanent failure at this attempt
    compensation: CompensationShape | None

    @property
    def fails(self) -> bool:
        return self.permanent_at is not None or self.transient >= self.max_attempts

    @property
    def calls(self) -> int:
        if self.permanent_at is not None:
            return self.permanent_at
        return min(self.transient + 1, self.max_attempts)


@st.composite
def compensation_shapes(draw: st.DrawFn) -> CompensationShape:
    max_attempts = draw(st.integers(1, 4))
    gives_up = draw(st.integers(0, 5)) == 0  # rarely: the run ends failed
    transient = max_attempts if gives_up else draw(st.integers(0, max_attempts - 1))
    return CompensationShape(max_attempts, transient)


@st.composite
def step_shapes(draw: st.DrawFn, fails: bool) -> StepShape:
    max_attempts = draw(st.integers(1, 4))
    permanent_at = None
    if not fails:
        transient = draw(st.integers(0, max_attempts - 1))
    elif draw(st.booleans()):
        permanent_at = draw(st.integers(1, max_attempts))
        transient = permanent_at - 1
    else:  # every attempt fails transiently: retries exhausted
        transient = max_attempts
    compensation = draw(st.one_of(*[compensation_shapes()] * 3, st.none()))
    return StepShape(max_attempts, transient, permanent_at, compensation)


@st.composite
def saga_shapes(draw: st.DrawFn) -> list[StepShape]:
    """2 to 6 steps; the first step that fails for good (if any) is drawn counting from
    the last, so that simple examples still leave completed steps to compensate."""
    count = draw(st.integers(2, 6))
    back = min(draw(st.integers(0, count - 1)), draw(st.integers(0, count - 1)))
    failing = None if draw(st.integers(0, 3)) == 0 else count - 1 - back
    return [draw(step_shapes(fails=i == failing)) for i in range(count)]


@dataclass(frozen=True)
class Prediction:
    status: str
    completed: list[str]  # forward steps that complete, in order
    compensated: list[str]  # compensations that complete, in order
    failing_step: str | None  # the step that failed for good
    failing_compensation: str | None  # the compensation that gave up


def predict(shapes: list[StepShape]) -> Prediction:
    names = [f"s{i}" for i in range(len(shapes))]
    failing = next((i for i, shape in enumerate(shapes) if shape.fails), None)
    if failing is None:
        return Prediction("completed", names, [], None, None)
    completed = names[:failing]
    compensated = []
    for i in reversed(range(failing)):
        comp = shapes[i].compensation
        if comp is None:
            continue
        if comp.gives_up:
            return Prediction("failed", completed, compensated, names[failing], names[i])
        compensated.append(names[i])
    return Prediction("compensated", completed, compensated, names[failing], None)


class Transient(Exception):
    pass


Call = tuple[str, str, int, str, str]  # (kind, step, attempt, idempotency key, outcome)


def build(shapes: list[StepShape], calls: list[Call]) -> saga.Saga[Job]:
    s = saga.Saga(f"prop_{next(_names)}", input=Job)
    for index, shape in enumerate(shapes):
        name = f"s{index}"
        previous = s.steps[-1] if s.steps else None

        async def forward(
            ctx: saga.Context[Job],
            shape: StepShape = shape,
            previous: saga.Step[Job, str] | None = previous,
        ) -> str:
            if previous is not None:  # the typed result of the step before, as it returned
                seen = ctx.result(previous)
                if seen != f"result of {ctx.run_id}:step:{previous.name}":
                    calls.append(("step", ctx.step, ctx.attempt, ctx.idempotency_key, seen))
            if shape.permanent_at is not None and ctx.attempt == shape.permanent_at:
                calls.append(("step", ctx.step, ctx.attempt, ctx.idempotency_key, "permanent"))
                raise saga.PermanentError(f"{ctx.step} fails for good")
            if ctx.attempt <= shape.transient:
                calls.append(("step", ctx.step, ctx.attempt, ctx.idempotency_key, "transient"))
                raise Transient(f"{ctx.step} attempt {ctx.attempt}")
            calls.append(("step", ctx.step, ctx.attempt, ctx.idempotency_key, "ok"))
            return f"result of {ctx.idempotency_key}"

        retry = saga.Retry(max_attempts=shape.max_attempts, initial_delay=0.001, max_delay=0.005)
        step = s.step(name=name, retry=retry)(forward)
        comp = shape.compensation
        if comp is None:
            continue

        async def undo(ctx: saga.Context[Job], result: str, comp: CompensationShape = comp) -> None:
            outcome = "transient" if ctx.attempt <= comp.transient else "ok"
            # The compensation receives its step's result: record which key it undoes.
            calls.append(
                ("undo", ctx.step, ctx.attempt, ctx.idempotency_key, f"{outcome} {result}")
            )
            if outcome == "transient":
                raise Transient(f"undo {ctx.step} attempt {ctx.attempt}")

        step.compensate(
            retry=saga.Retry(max_attempts=comp.max_attempts, initial_delay=0.001, max_delay=0.005)
        )(undo)
    return s


@pytest.mark.timeout(180)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    print_blob=True,
)
@given(shapes=saga_shapes())
async def test_random_saga_shapes_end_exactly_as_predicted(
    dsn: str, shapes: list[StepShape]
) -> None:
    """For any saga shape and failure schedule within the retry limits: the run ends in
    the predicted state; each completed step executed successfully exactly once, in
    order, after exactly its scheduled attempts; compensations ran for exactly the
    completed steps that have one, newest first, each receiving its step's result; the
    history holds one terminal event, last; and ``ctx.idempotency_key`` is the same for
    every attempt of a step (and distinct for its compensation)."""
    expected = predict(shapes)
    event(f"status: {expected.status}")
    event(f"compensations: {len(expected.compensated)}")
    note(f"prediction: {expected}")
    calls: list[Call] = []
    definition = build(shapes, calls)
    async with saga.Orchestrator(
        dsn, sagas=[definition], poll_interval=0.05, shutdown_timeout=1
    ) as orch:
        run = await orch.start(definition, Job(n=1))
        try:
            output = await run.result(timeout=30)
        except saga.RunError as exc:
            outcome: object = exc
        else:
            outcome = output
        info = await run.info()
        history = await run.history()
    note(f"calls: {calls}")
    note("history:\n" + "\n".join(e.describe() for e in history))
    names = [f"s{i}" for i in range(len(shapes))]

    # The final state, and the error the caller sees.
    assert info.status == expected.status
    assert list(info.completed_steps) == expected.completed
    if expected.status == "completed":
        assert outcome == f"result of {run.id}:step:{names[-1]}"
    else:
        assert isinstance(outcome, saga.RunError)
        assert outcome.error is not None
        assert outcome.error.step == expected.failing_step
        assert outcome.error.type == (
            "saga.PermanentError"
            if shapes[names.index(expected.failing_step or "")].permanent_at is not None
            else f"{__name__}.Transient"
        )
        if expected.status == "failed":
            assert isinstance(outcome, saga.RunFailedError)
            assert outcome.compensation_error is not None
            assert outcome.compensation_error.step == expected.failing_compensation
        else:
            assert isinstance(outcome, saga.RunCompensatedError)
            assert outcome.compensation_error is None

    # Forward steps: scheduled attempts, numbered 1..n; one success per completed step,
    # in order; one idempotency key per step across its attempts.
    forward = [c for c in calls if c[0] == "step"]
    assert {c[4] for c in forward} <= {"ok", "transient", "permanent"}  # no wrong results
    assert [c[1] for c in forward if c[4] == "ok"] == expected.completed
    ran = names[: len(expected.completed) + (expected.failing_step is not None)]
    assert [c[1] for c in forward] == [n for n in ran for _ in range(shapes[int(n[1:])].calls)]
    for name in ran:
        assert [c[2] for c in forward if c[1] == name] == list(
            range(1, shapes[int(name[1:])].calls + 1)
        )
        assert {c[3] for c in forward if c[1] == name} == {f"{run.id}:step:{name}"}

    # Compensations: exactly the completed steps that have one, newest first, each with
    # its step's result and a key of its own, stable across its attempts.
    undos = [c for c in calls if c[0] == "undo"]
    assert [c[1] for c in undos if c[4].startswith("ok ")] == expected.compensated
    undone = expected.compensated + (
        [expected.failing_compensation] if expected.failing_compensation else []
    )
    comps = {n: shapes[int(n[1:])].compensation for n in undone}
    assert [c[1] for c in undos] == [n for n, comp in comps.items() for _ in range(comp.calls)]
    for c in undos:
        assert c[3] == f"{run.id}:compensation:{c[1]}"
        assert c[4].endswith(f" result of {run.id}:step:{c[1]}")

    # The history: one terminal event, last; the checkpoints match the executions.
    kinds = [e.kind for e in history]
    terminal = [k for k in kinds if k in ("run_completed", "run_compensated", "run_failed")]
    assert terminal == [f"run_{expected.status}"]
    assert kinds[-1] == terminal[0]
    assert kinds.count("run_cancelled") == 0
    assert [e.step for e in history if e.kind == "step_completed"] == expected.completed
    assert [e.step for e in history if e.kind == "compensation_completed"] == expected.compensated
    if expected.status != "completed":
        plans = [e.data["plan"] for e in history if e.kind == "run_compensating"]
        assert plans == [
            [n for n in reversed(expected.completed) if shapes[int(n[1:])].compensation]
        ]
