"""The state machine at sleeps and waits, table-driven and without a database: a step
followed by a sleep or wait parks the run in the same transition; a timed-out wait
applies its on_timeout; a cancel at each point wins."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import BaseModel

import saga
from saga import _plan, _plan_rollback
from saga._model import EventKind as K
from saga._model import RunStatus as S
from saga._transition import Failed, RunState, Succeeded, Transition


class In(BaseModel):
    n: int


class Ok(BaseModel):
    ok: bool


async def forward(ctx: saga.Context[In]) -> int:
    return 1


async def undo(ctx: saga.Context[In], result: int) -> None:
    return None


async def value(ctx: saga.Context[In]) -> Ok:
    return Ok(ok=True)


def _definition(on_timeout: Any = "compensate", timeout: float | None = 60.0) -> saga.Saga[In]:
    """reserve (compensated) -> sleep 30 s -> charge -> wait "ok" -> ship."""
    s = saga.Saga("plan_waits", input=In)
    s.step(name="reserve")(forward).compensate(undo)
    s.sleep(30, name="pause")
    s.step(name="charge")(forward)
    s.wait_for("ok", Ok, timeout=timeout, on_timeout=on_timeout)
    s.step(name="ship")(forward)
    return s


def lease_for(step: str) -> float:
    return 30.0


def kinds(change: Transition) -> list[K]:
    return [e.kind for e in change.events]


def running(step: str, done: tuple[str, ...] = (), **kw: Any) -> RunState:
    return RunState(status=S.RUNNING, step=step, attempt=1, completed=done, **kw)


def timed_out(done: tuple[str, ...] = ("reserve", "charge"), **kw: Any) -> RunState:
    return RunState(status=S.WAITING, step="ship", attempt=1, completed=done, wait="ok", **kw)


@pytest.mark.parametrize(
    ("step", "done", "status", "wait", "due_in", "started"),
    [
        ("reserve", (), S.SLEEPING, "pause", 30.0, K.SLEEP_STARTED),
        ("charge", ("reserve",), S.WAITING, "ok", 60.0, K.WAIT_STARTED),
    ],
)
def test_a_step_before_a_sleep_or_wait_parks_the_run_in_the_same_transition(
    step: str, done: tuple[str, ...], status: S, wait: str, due_in: float, started: K
) -> None:
    """The step's completion and the parking are one transition: unleased, the next
    step named, due at the sleep's end or the wait's timeout, refused if a cancel was
    accepted meanwhile."""
    change = _plan.after_attempt(_definition(), running(step, done), Succeeded('"1"'), lease_for)
    assert change.status is status
    assert change.wait == wait
    assert change.due_in == due_in
    assert not change.leased
    assert change.attempt == 0
    assert change.completed_step == step
    assert change.unless_cancelled
    assert kinds(change) == [K.STEP_COMPLETED, started]
    assert change.step == {"reserve": "charge", "charge": "ship"}[step]


def test_a_wait_without_timeout_is_due_never_and_a_computed_sleep_uses_its_length() -> None:
    """A wait without timeout parks with an infinite due time; a sleep whose length was
    computed (until=) parks for that length."""
    no_timeout = _plan.after_attempt(
        _definition(timeout=None), running("charge", ("reserve",)), Succeeded("1"), lease_for
    )
    assert no_timeout.due_in == math.inf
    computed = _plan.after_attempt(
        _definition(), running("reserve"), Succeeded("1", park_in=5.5), lease_for
    )
    assert computed.due_in == 5.5


def test_a_failing_until_rolls_back_the_step_it_follows() -> None:
    """When the sleep's until() fails, the step is recorded and compensated with the
    others: the run rolls back with that error."""
    error = {"type": "ValueError", "message": "bad", "step": "pause"}
    change = _plan.after_attempt(
        _definition(), running("reserve"), Succeeded("1", park_error=error), lease_for
    )
    assert change.status is S.COMPENSATING
    assert change.step == "reserve"
    assert change.completed_step == "reserve"
    assert kinds(change)[:3] == [K.STEP_COMPLETED, K.STEP_FAILED, K.RUN_COMPENSATING]


def test_a_cancel_requested_during_the_step_before_a_wait_rolls_back_at_once() -> None:
    """A cancel seen when the step before a wait completes does not park the run: it
    rolls back, that step included."""
    state = running("charge", ("reserve",), cancel_requested=True)
    change = _plan.after_attempt(_definition(), state, Succeeded("1"), lease_for)
    assert change.status is S.COMPENSATING
    assert change.wait is None
    assert change.step == "reserve"


@pytest.mark.parametrize(
    ("on_timeout", "outcome", "status", "expect"),
    [
        ("compensate", Succeeded(), S.COMPENSATING, [K.WAIT_TIMED_OUT, K.RUN_COMPENSATING]),
        ("stop", Succeeded(), S.STOPPED, [K.WAIT_TIMED_OUT, K.RUN_STOPPED]),
        (value, Succeeded('{"ok":true}'), S.RUNNING, [K.WAIT_TIMED_OUT, K.STEP_STARTED]),
        (
            value,
            Failed({"type": "E", "message": "m", "step": "ok"}, False),
            S.COMPENSATING,
            [K.WAIT_TIMED_OUT, K.RUN_COMPENSATING],
        ),
    ],
)
def test_a_timed_out_wait_applies_its_on_timeout(
    on_timeout: Any, outcome: Succeeded | Failed, status: S, expect: list[K]
) -> None:
    """compensate: roll back with saga.WaitTimedOut; stop: stopped for an operator (the
    wait named, the error recorded); a value: the wait completes with it and the next
    step is leased; a failing value function: roll back with its error."""
    change = _plan.after_attempt(_definition(on_timeout), timed_out(), outcome, lease_for)
    assert change.status is status
    assert kinds(change)[: len(expect)] == expect
    if status is S.STOPPED:
        assert change.wait == "ok"
        assert change.terminal
        assert change.error is not None
        assert change.error["type"] == "saga.WaitTimedOut"
    if status is S.RUNNING:
        assert change.completed_step == "ok"
        assert change.result_json == '{"ok":true}'
        assert change.step == "ship"
        assert change.leased
    if status is S.COMPENSATING:
        assert change.step == "reserve"  # charge has no compensation
        assert change.error is not None


def test_a_cancel_beats_a_stop() -> None:
    """A stop refused because a cancel was accepted meanwhile rolls back instead."""
    stop = _plan.after_attempt(_definition("stop"), timed_out(), Succeeded(), lease_for)
    assert stop.unless_cancelled
    change = _plan.cancel_instead(
        _definition("stop"), timed_out(cancel_requested=True), stop, lease_for
    )
    assert change.status is S.COMPENSATING
    assert K.RUN_STOPPED not in kinds(change)


def test_waits_have_nothing_to_compensate() -> None:
    """A wait the run passed is in its completed items but not in the rollback plan."""
    assert _plan_rollback.compensation_plan(_definition(), ("reserve", "charge", "ok")) == [
        "reserve"
    ]
