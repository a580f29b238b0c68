"""The state machine's transitions at sleeps and waits (see ``saga._plan``): park a run
after its step, and stop it at a wait for an operator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saga._model import EventKind, RunStatus
from saga._transition import Event, RunState, Transition
from saga._waits import Parking, Wait, due_seconds


def park(
    parking: Parking,
    next_step: str,
    state: RunState,
    done: Event,
    result: str | None,
    park_in: float | None,
) -> Transition:
    """Record the step and park the run at the sleep or wait after it, unleased, due
    at the sleep's end or the wait's timeout: one write, no lease, no slot."""
    waits = isinstance(parking, Wait)
    seconds = due_seconds(parking) if park_in is None else park_in
    data: dict[str, Any] = {"signal": parking.name} if waits else {"seconds": seconds}
    if isinstance(parking, Wait) and parking.timeout is not None:
        data["timeout"] = parking.timeout
    kind = EventKind.WAIT_STARTED if waits else EventKind.SLEEP_STARTED
    return Transition(
        status=RunStatus.WAITING if waits else RunStatus.SLEEPING,
        step=next_step,
        attempt=0,
        events=(done, Event(kind, parking.name, data=data)),
        completed_step=state.step,
        result_json=result,
        due_in=seconds,
        unless_cancelled=True,  # a cancel accepted meanwhile rolls back at once instead
        wait=parking.name,
    )


def wait_timed_out_error(wait: str, timeout: float | None) -> Mapping[str, Any]:
    return {
        "type": "saga.WaitTimedOut",
        "message": f"no signal {wait!r} arrived within {timeout:g} seconds",
        "step": wait,
    }


def stopped_at_wait(
    wait: str, state: RunState, timed_out: Event, error: Mapping[str, Any], pivot: str | None
) -> Transition:
    data = None if pivot is None else {"pivot": pivot}
    return Transition(
        status=RunStatus.STOPPED,
        step=state.step,
        attempt=0,
        events=(timed_out, Event(EventKind.RUN_STOPPED, wait, data=data)),
        error=error,
        wait=wait,
        unless_cancelled=True,  # a cancel accepted meanwhile rolls back instead
    )
