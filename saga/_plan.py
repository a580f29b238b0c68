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
- Past the pivot step, nothing before it is compensated: a failure for good stops the
  run for an operator (``stopped`` at that step; a retry runs it again), as does a step
  whose policy says ``on_give_up="stop"``. Cancel is refused once the run reaches its
  pivot.
- A step followed by a sleep or a wait parks the run there in the same write that
  records the step (``sleeping``, ``waiting``: unleased, due at the sleep's end or the
  wait's timeout). The claim wakes it: on to the next step, or (a wait whose timeout
  passed without its signal) the wait's ``on_timeout``: roll back, stop for an operator
  (``stopped``), or go on with a computed result.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from saga._model import EventKind, Phase, RunStatus
from saga._plan_park import park, stopped_at_wait, wait_timed_out_error
from saga._plan_rollback import (
    compensate,
    compensation_plan,
    finish_rollback,
    next_item,
    rollback,
    stop_for_operator,
)
from saga._transition import Event, Failed, LeaseFor, RunState, Succeeded, Transition

if TYPE_CHECKING:
    from saga._definition import Saga
    from saga._policy import Retry

# Enum members used per step, read once (an enum attribute costs a call in 3.11).
_STEP = Phase.STEP
_COMPENSATION = Phase.COMPENSATION
_STEP_COMPLETED = EventKind.STEP_COMPLETED
_RUN_COMPLETED = EventKind.RUN_COMPLETED
_STEP_STARTED = EventKind.STEP_STARTED
_RUNNING = RunStatus.RUNNING
_COMPLETED = RunStatus.COMPLETED
_WAITING = RunStatus.WAITING


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
        return rollback(saga, state, None, [], None, lease_for)
    return None


#: Claims of a wait whose timeout passed, at most: a worker that dies computing its
#: ``on_timeout`` value every time (out of memory, ``os._exit``) cannot take workers down
#: for ever; then the wait fails, as when the function raises.
WAIT_ATTEMPTS = 3


def attempts_exhausted(saga: Saga[Any], state: RunState, lease_for: LeaseFor) -> Transition | None:
    """An attempt beyond the limit does not run: the previous attempt's worker stopped
    without recording an outcome (it counts), and none are left."""
    if state.status is _WAITING:
        if state.attempt <= WAIT_ATTEMPTS:
            return None
        assert state.wait is not None
        error = attempt_lost(state.wait, state.attempt)
        return after_attempt(saga, state, Failed(error, retryable=False), lease_for)
    if state.attempt > policy(saga, state).max_attempts:
        error = attempt_lost(state.step, state.attempt)
        lost = replace(state, attempt=state.attempt - 1)  # its failure is the lost attempt's
        return after_attempt(saga, lost, Failed(error, retryable=False), lease_for)
    return None


def after_attempt(
    saga: Saga[Any],
    state: RunState,
    outcome: Succeeded | Failed,
    lease_for: LeaseFor,
    rand: Callable[[], float] = random.random,
) -> Transition:
    """The transition that records ``outcome`` of the current item's attempt."""
    if state.status is _WAITING:
        return _wait_timed_out(saga, state, outcome, lease_for)
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
    if completion.status is RunStatus.STOPPED and completion.wait is None:
        # A step gave up, stopping for an operator: rolled back with its error, as when
        # the cancel was seen before it gave up (and as cancelling the stopped run does).
        failed = completion.events[0]
        return rollback(saga, state, completion.error, [failed], None, lease_for)
    if completion.retry:  # a failed attempt's retry: the failure is recorded, no retry
        failed = completion.events[0]
        data = {"error": failed.data["error"]} if failed.data else None
        event = Event(failed.kind, failed.step, failed.attempt, data)
        return rollback(saga, state, None, [event], None, lease_for)
    if completion.completed_step is None:  # a wait's timeout stopping the run
        return rollback(saga, state, None, [], None, lease_for)
    done = completion.events[0]  # step_completed
    undo = rollback(saga, state, None, [done], completion.completed_step, lease_for)
    return replace(
        undo, completed_step=completion.completed_step, result_json=completion.result_json
    )


def _step_done(
    saga: Saga[Any], state: RunState, outcome: Succeeded, lease_for: LeaseFor
) -> Transition:
    done = Event(_STEP_COMPLETED, state.step, state.attempt)
    result = outcome.result_json
    if state.cancel_requested:
        # Cancelled while this step ran: record it, then roll back at once, this step
        # included, rather than lease a next step that will never run.
        undo = rollback(saga, state, None, [done], state.step, lease_for)
        return replace(undo, completed_step=state.step, result_json=result)
    step = saga.get_step(state.step)
    index = step.index
    if outcome.park_error is not None:  # the sleep's until() failed: undo the step too
        failed = Event(
            EventKind.STEP_FAILED, state.step, state.attempt, {"error": outcome.park_error}
        )
        if saga.pivot is not None and saga.pivot in (*state.completed, state.step):
            # Past the pivot: stopped at this step, not recorded completed; the
            # operator's retry() runs it again, and until() after it.
            stopped = Event(EventKind.RUN_STOPPED, state.step, data={"pivot": saga.pivot})
            return Transition(
                status=RunStatus.STOPPED,
                step=state.step,
                attempt=0,
                events=(failed, stopped),
                error=outcome.park_error,
            )
        undo = rollback(saga, state, outcome.park_error, [done, failed], state.step, lease_for)
        return replace(undo, completed_step=state.step, result_json=result)
    if step.after is not None:
        nxt = saga.steps[index + 1].name  # a saga never ends with a sleep or wait
        return park(step.after, nxt, state, done, result, outcome.park_in)
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


def _wait_timed_out(
    saga: Saga[Any], state: RunState, outcome: Succeeded | Failed, lease_for: LeaseFor
) -> Transition:
    """A wait's timeout passed without its signal (the claim closed it): apply its
    ``on_timeout``. ``outcome`` is how computing the result went (a Succeeded without
    result for "compensate" and "stop")."""
    assert state.wait is not None
    wait = saga.get_wait(state.wait)
    assert wait is not None
    error = wait_timed_out_error(wait.name, wait.timeout)
    if isinstance(outcome, Failed):
        data = {"outcome": "failed", "error": outcome.error}
        failed = Event(EventKind.WAIT_TIMED_OUT, wait.name, data=data)
        if saga.pivot is not None and saga.pivot in state.completed:
            # Past the pivot: stopped at the wait, as by on_timeout="stop" (a signal
            # resumes it, retry() waits again).
            return stopped_at_wait(wait.name, state, failed, outcome.error, saga.pivot)
        return rollback(saga, state, outcome.error, [failed], None, lease_for)
    choice = "value" if wait.timeout_value is not None else str(wait.on_timeout)
    timed_out = Event(EventKind.WAIT_TIMED_OUT, wait.name, data={"outcome": choice})
    if choice == "compensate":
        return rollback(saga, state, error, [timed_out], None, lease_for)
    if choice == "stop":
        return stopped_at_wait(wait.name, state, timed_out, error, None)
    events = [timed_out]
    if lease_for is not None:
        events.append(Event(_STEP_STARTED, state.step, 1, unless_cancelled=True))
    return replace(
        next_item(_RUNNING, state.step, events, lease_for),
        completed_step=wait.name,
        result_json=outcome.result_json,
    )


def _step_failed(
    saga: Saga[Any],
    state: RunState,
    outcome: Failed,
    lease_for: LeaseFor,
    rand: Callable[[], float],
) -> Transition:
    failed = Event(EventKind.STEP_FAILED, state.step, state.attempt, {"error": outcome.error})
    if state.cancel_requested and outcome.retryable:
        # No retry for a run being cancelled: it rolls back now, not after the backoff,
        # and ends cancelled (the cancel, not this failure, is why it stopped).
        return rollback(saga, state, None, [failed], None, lease_for)
    retry = _retry(saga, state, outcome, rand)
    if retry is not None:
        return retry
    if saga.get_step(state.step).retry.on_give_up == "stop" and not state.cancel_requested:
        data = {"on_give_up": "stop"}  # the step's policy: an operator looks first
        stop = stop_for_operator(saga, state, outcome.error, [failed], None, data)
        return replace(stop, unless_cancelled=True)  # a cancel accepted meanwhile rolls back
    return rollback(saga, state, outcome.error, [failed], None, lease_for)


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
        return finish_rollback(state, None, [done])
    return compensate(rest[0], [done], None, lease_for)


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
        # A cancel accepted while a step's attempt ran (unseen) rolls back at once
        # instead; a compensation's retry goes on whatever a cancel says.
        unless_cancelled=state.phase is _STEP,
    )
