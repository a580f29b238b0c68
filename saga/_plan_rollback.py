"""The state machine's rollbacks: compensating the completed steps newest first, or
(past the pivot) stopping for an operator; and the run's next item. Pure, as
:mod:`saga._plan` (whose rules these are).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from saga._model import EventKind, RunStatus
from saga._transition import Event, LeaseFor, RunState, Transition

if TYPE_CHECKING:
    from saga._definition import Saga

_COMPENSATING = RunStatus.COMPENSATING


def compensation_plan(saga: Saga[Any], completed: tuple[str, ...]) -> list[str]:
    """The compensations to run, in order: completed steps newest first, those without a
    compensation left out (they have nothing to undo)."""
    steps = saga.get_step
    return [
        name
        for name in reversed(completed)
        if saga.get_wait(name) is None and steps(name).compensation is not None
    ]


def rollback(
    saga: Saga[Any],
    state: RunState,
    error: Mapping[str, Any] | None,
    events: list[Event],
    just_completed: str | None,
    lease_for: LeaseFor = None,
) -> Transition:
    """Start compensating the completed steps, or (past the pivot) stop for an operator."""
    completed = (*state.completed, just_completed) if just_completed else state.completed
    if error is not None and saga.pivot is not None and saga.pivot in completed:
        return stop_for_operator(saga, state, error, events, just_completed, {"pivot": saga.pivot})
    plan = compensation_plan(saga, completed)
    reason = "failure" if error else "cancel"
    events.append(Event(EventKind.RUN_COMPENSATING, data={"plan": plan, "reason": reason}))
    if not plan:
        return finish_rollback(state, error, events)
    return compensate(plan[0], events, error, lease_for)


def stop_for_operator(
    saga: Saga[Any],
    state: RunState,
    error: Mapping[str, Any],
    events: list[Event],
    just_completed: str | None,
    data: Mapping[str, Any],
) -> Transition:
    """Stopped for an operator at the step to run again: the one that failed (the next
    one if it completed and what followed it failed)."""
    step = state.step
    if just_completed is not None:
        step = saga.steps[saga.get_step(just_completed).index + 1].name
    events.append(Event(EventKind.RUN_STOPPED, step, data=data))
    return Transition(
        status=RunStatus.STOPPED, step=step, attempt=0, events=tuple(events), error=error
    )


def compensate(
    step: str, events: list[Event], error: Mapping[str, Any] | None, lease_for: LeaseFor
) -> Transition:
    if lease_for is not None:
        events.append(Event(EventKind.COMPENSATION_STARTED, step, 1))
    return replace(next_item(_COMPENSATING, step, events, lease_for), error=error)


def next_item(status: RunStatus, step: str, events: list[Event], lease_for: LeaseFor) -> Transition:
    """The run's next item: leased to this worker at once if it goes on, else due now."""
    leased = lease_for is not None
    return Transition(
        status=status,
        step=step,
        attempt=1 if leased else 0,
        events=tuple(events),
        due_in=lease_for(step) if lease_for is not None else 0.0,
        leased=leased,
    )


def finish_rollback(
    state: RunState, error: Mapping[str, Any] | None, events: list[Event]
) -> Transition:
    failed_forward = error is not None or state.failed_forward
    status = RunStatus.COMPENSATED if failed_forward else RunStatus.CANCELLED
    events.append(Event(EventKind.ended(status)))
    return Transition(status=status, step=None, attempt=0, events=tuple(events), error=error)
