"""The state machine: from a run's state and how an attempt went, the transition to write.

Pure: no I/O, no clock, no randomness of its own (the jitter source is a parameter), so
every rule is tested table-driven without a database. The store applies transitions; it
decides nothing. The rules, in one place:

- A forward step that completes hands the run to the next step (leased to the same
  worker when it goes on), or completes the run after the last one.
- A cancel accepted before the run ended wins over everything forward: a step not yet
  started does not start, a step that completed is compensated with the others.
- A step that fails is retried after a backoff while attempts and the error allow it;
  otherwise the run turns ``compensating`` and the completed steps are undone newest
  first (those without a compensation have nothing to undo).
- A compensation that fails is retried likewise; when it gives up the run is ``failed``
  and waits for an operator. When the last compensation completes the run ends
  ``compensated`` (a step failed) or ``cancelled`` (it was cancelled).
- An attempt beyond the limit (its worker died before recording an outcome, or it was
  released twice) fails at once with ``saga.AttemptLost``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from saga._model import EventKind, Phase, RunStatus

if TYPE_CHECKING:
    from saga._definition import Retry, Saga

#: How a leased next item's lease length is found (None: do not lease, e.g. stopping).
LeaseFor = Callable[[str], float] | None

# Enum members used per step, read once (an enum attribute costs a call in 3.11).
_STEP = Phase.STEP
_COMPENSATION = Phase.COMPENSATION
_STEP_COMPLETED = EventKind.STEP_COMPLETED
_RUN_COMPLETED = EventKind.RUN_COMPLETED
_STEP_STARTED = EventKind.STEP_STARTED
_RUNNING = RunStatus.RUNNING
_COMPLETED = RunStatus.COMPLETED
_COMPENSATING = RunStatus.COMPENSATING


# Which phase a status runs (a dict: enum attribute lookups cost on the hot path).
_PHASES = {status: _COMPENSATION if status is _COMPENSATING else _STEP for status in RunStatus}


@dataclass(frozen=True, slots=True)
class Event:
    """One history entry a transition appends (the store adds the worker and time)."""

    kind: EventKind
    step: str | None = None
    attempt: int | None = None
    data: Mapping[str, Any] | None = None
    # Dropped by the store when a cancel was requested meanwhile: a step leased to this
    # worker on a run being cancelled will not start.
    unless_cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    """One fenced state change of a leased run."""

    status: RunStatus
    step: str | None  # the next item's step (None once terminal)
    attempt: int  # the next item's attempt (0: not started)
    events: tuple[Event, ...]
    completed_step: str | None = None
    result_json: str | None = None
    output_json: str | None = None
    error: Mapping[str, Any] | None = None
    compensation_error: Mapping[str, Any] | None = None
    due_in: float | None = None  # seconds until the next item is due; None once terminal
    leased: bool = False  # the next item is leased to the worker writing this
    unless_cancelled: bool = False  # refused if a cancel was requested meanwhile
    retry: bool = False  # the same item again after a backoff

    @property
    def terminal(self) -> bool:
        return self.status.is_terminal


@dataclass(frozen=True, slots=True)
class RunState:
    """What the plan needs to know of a run whose current item was just attempted."""

    status: RunStatus
    step: str
    attempt: int
    completed: tuple[str, ...] = ()
    cancel_requested: bool = False
    failed_forward: bool = False  # a step failed for good: the rollback ends compensated

    @property
    def phase(self) -> Phase:
        return _PHASES[self.status]


@dataclass(frozen=True, slots=True)
class Succeeded:
    result_json: str | None = None  # a step's result; None for a compensation


@dataclass(frozen=True, slots=True)
class Failed:
    error: Mapping[str, Any]
    retryable: bool = field(default=True)


def attempt_lost(step: str, attempt: int) -> Mapping[str, Any]:
    return {
        "type": "saga.AttemptLost",
        "message": f"the worker running attempt {attempt - 1} stopped before recording an "
        "outcome, and no attempts are left",
        "step": step,
    }


def policy(saga: Saga[Any], state: RunState) -> Retry:
    step = saga.get_step(state.step)
    if state.phase is _COMPENSATION and step.compensation is not None:
        return step.compensation.retry
    return step.retry


def cancelled_before_start(
    saga: Saga[Any], state: RunState, lease_for: LeaseFor
) -> Transition | None:
    """A forward item of a run being cancelled does not start: roll back instead."""
    if state.phase is _STEP and state.cancel_requested:
        return _rollback(saga, state, None, [], None, lease_for)
    return None


def attempts_exhausted(saga: Saga[Any], state: RunState, lease_for: LeaseFor) -> Transition | None:
    """An attempt beyond the limit does not run: the previous attempt's worker stopped
    without recording an outcome (it counts), and none are left."""
    if state.attempt > policy(saga, state).max_attempts:
        error = attempt_lost(state.step, state.attempt)
        return after_attempt(saga, state, Failed(error, retryable=False), lease_for)
    return None


def after_attempt(
    saga: Saga[Any],
    state: RunState,
    outcome: Succeeded | Failed,
    lease_for: LeaseFor,
    rand: Callable[[], float] = random.random,
) -> Transition:
    """The transition that records ``outcome`` of the current item's attempt."""
    if state.phase is _COMPENSATION:
        if isinstance(outcome, Failed):
            return _compensation_failed(saga, state, outcome, lease_for, rand)
        return _compensation_done(saga, state, lease_for)
    if isinstance(outcome, Failed):
        return _step_failed(saga, state, outcome, lease_for, rand)
    return _step_done(saga, state, outcome, lease_for)


def cancel_instead(
    saga: Saga[Any], state: RunState, completion: Transition, lease_for: LeaseFor
) -> Transition:
    """A completion refused because a cancel was accepted meanwhile: roll back instead,
    the step that just completed included."""
    assert completion.completed_step is not None
    done = completion.events[0]  # step_completed
    rollback = _rollback(saga, state, None, [done], completion.completed_step, lease_for)
    return replace(
        rollback, completed_step=completion.completed_step, result_json=completion.result_json
    )


def _step_done(
    saga: Saga[Any], state: RunState, outcome: Succeeded, lease_for: LeaseFor
) -> Transition:
    done = Event(_STEP_COMPLETED, state.step, state.attempt)
    result = outcome.result_json
    if state.cancel_requested:
        # Cancelled while this step ran: record it, then roll back at once, this step
        # included, rather than lease a next step that will never run.
        rollback = _rollback(saga, state, None, [done], state.step, lease_for)
        return replace(rollback, completed_step=state.step, result_json=result)
    index = saga.get_step(state.step).index
    if index + 1 == len(saga.steps):
        return Transition(
            status=_COMPLETED,
            step=None,
            attempt=state.attempt,
            events=(done, Event(_RUN_COMPLETED)),
            completed_step=state.step,
            result_json=result,
            output_json=result,
            unless_cancelled=True,  # a cancel accepted meanwhile must roll back instead
        )
    nxt = saga.steps[index + 1].name
    if lease_for is None:
        return Transition(
            status=_RUNNING,
            step=nxt,
            attempt=0,
            events=(done,),
            completed_step=state.step,
            result_json=result,
            due_in=0.0,
        )
    return Transition(
        status=_RUNNING,
        step=nxt,
        attempt=1,
        events=(done, Event(_STEP_STARTED, nxt, 1, unless_cancelled=True)),
        completed_step=state.step,
        result_json=result,
        due_in=lease_for(nxt),
        leased=True,
    )


def _step_failed(
    saga: Saga[Any],
    state: RunState,
    outcome: Failed,
    lease_for: LeaseFor,
    rand: Callable[[], float],
) -> Transition:
    retry = _retry(saga, state, outcome, rand)
    if retry is not None:
        return retry
    failed = Event(EventKind.STEP_FAILED, state.step, state.attempt, {"error": outcome.error})
    return _rollback(saga, state, outcome.error, [failed], None, lease_for)


def _compensation_failed(
    saga: Saga[Any],
    state: RunState,
    outcome: Failed,
    lease_for: LeaseFor,
    rand: Callable[[], float],
) -> Transition:
    retry = _retry(saga, state, outcome, rand)
    if retry is not None:
        return retry
    data = {"error": outcome.error}
    return Transition(
        status=RunStatus.FAILED,
        step=state.step,
        attempt=state.attempt,
        events=(
            Event(EventKind.COMPENSATION_FAILED, state.step, state.attempt, data),
            Event(EventKind.RUN_FAILED),
        ),
        compensation_error=outcome.error,
    )


def _compensation_done(saga: Saga[Any], state: RunState, lease_for: LeaseFor) -> Transition:
    done = Event(EventKind.COMPENSATION_COMPLETED, state.step, state.attempt)
    plan = compensation_plan(saga, state.completed)
    rest = plan[plan.index(state.step) + 1 :] if state.step in plan else []
    if not rest:
        return _finish_rollback(state, None, [done])
    return _compensate(rest[0], [done], None, lease_for)


def _retry(
    saga: Saga[Any], state: RunState, outcome: Failed, rand: Callable[[], float]
) -> Transition | None:
    retry = policy(saga, state)
    if not (outcome.retryable and state.attempt < retry.max_attempts):
        return None
    delay = retry.delay(state.attempt, rand)
    data = {"error": outcome.error, "retry_in": delay}
    return Transition(
        status=state.status,
        step=state.step,
        attempt=state.attempt,
        events=(Event(EventKind.failed(state.phase), state.step, state.attempt, data),),
        due_in=delay,
        retry=True,
    )


def compensation_plan(saga: Saga[Any], completed: tuple[str, ...]) -> list[str]:
    """The compensations to run, in order: completed steps newest first, those without a
    compensation left out (they have nothing to undo)."""
    return [name for name in reversed(completed) if saga.get_step(name).compensation]


def _rollback(
    saga: Saga[Any],
    state: RunState,
    error: Mapping[str, Any] | None,
    events: list[Event],
    just_completed: str | None,
    lease_for: LeaseFor = None,
) -> Transition:
    """Start compensating the completed steps (or end at once if none needs it)."""
    completed = (*state.completed, just_completed) if just_completed else state.completed
    plan = compensation_plan(saga, completed)
    reason = "failure" if error else "cancel"
    events.append(Event(EventKind.RUN_COMPENSATING, data={"plan": plan, "reason": reason}))
    if not plan:
        return _finish_rollback(state, error, events)
    return _compensate(plan[0], events, error, lease_for)


def _compensate(
    step: str, events: list[Event], error: Mapping[str, Any] | None, lease_for: LeaseFor
) -> Transition:
    if lease_for is not None:
        events.append(Event(EventKind.COMPENSATION_STARTED, step, 1))
    return replace(_next_item(_COMPENSATING, step, events, lease_for), error=error)


def _next_item(
    status: RunStatus, step: str, events: list[Event], lease_for: LeaseFor
) -> Transition:
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


def _finish_rollback(
    state: RunState, error: Mapping[str, Any] | None, events: list[Event]
) -> Transition:
    failed_forward = error is not None or state.failed_forward
    status = RunStatus.COMPENSATED if failed_forward else RunStatus.CANCELLED
    events.append(Event(EventKind.ended(status)))
    return Transition(status=status, step=None, attempt=0, events=tuple(events), error=error)


# -- decisions the store applies outside the transition of an attempt ---------------------


def on_claim(status: RunStatus, cancel_requested: bool) -> tuple[RunStatus, EventKind | None]:
    """What claiming an item does: the status it takes, and the start event it records
    (None: a forward step of a run being cancelled will not start; it rolls back)."""
    if status is _COMPENSATING:
        return status, EventKind.COMPENSATION_STARTED
    new = _RUNNING if status is RunStatus.PENDING else status
    return new, None if cancel_requested else _STEP_STARTED


def claim_table() -> list[tuple[RunStatus, bool, RunStatus, EventKind | None]]:
    """:func:`on_claim` for every claimable (status, cancel requested), as the claim
    statement receives it."""
    return [
        (status, cancel, *on_claim(status, cancel))
        for status in RunStatus.active()
        for cancel in (False, True)
    ]


#: A failed run that an operator retries resumes here: the compensation that gave up,
#: with fresh attempts.
RETRIED_STATUS = _COMPENSATING
RETRIABLE_STATUS = RunStatus.FAILED
