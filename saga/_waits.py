"""Sleeps and waits: the points between two steps where a run parks.

A parked run is only a row with a due time: the end of a sleep, or a wait's timeout
(none: it waits for its signal only). It holds no lease, no worker slot, no connection
and no task, so it survives any restart, and it costs nothing while it waits. Declared
with :meth:`Saga.sleep` and :meth:`Saga.wait_for`; each follows the step declared before
it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from saga import _checks
from saga._errors import DefinitionError

P = TypeVar("P", bound=BaseModel)

#: The longest sleep or wait timeout: ten years (longer is a mistake, not a process).
MAX_WAIT_SECONDS = 3653 * 24 * 3600.0  # ten years, with their leap days

#: What a wait does when its timeout passes without its signal: roll back what completed
#: ("compensate"), stop for an operator ("stop"), or go on with the value an async
#: function computes from the context (the wait's result, as if it were the payload).
OnTimeout = Literal["compensate", "stop"] | Callable[[Any], Awaitable[Any]]


def wait_seconds(name: str, value: Any) -> float:
    """A sleep's length or a wait's timeout: a timedelta or seconds, > 0, <= 10 years."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return _checks.seconds(name, value, DefinitionError, maximum=MAX_WAIT_SECONDS)


@dataclass(frozen=True, slots=True, eq=False)
class Sleep:
    """A durable sleep after the step ``after``: ``seconds``, or until the time
    ``until(ctx)`` returns (computed once that step completed)."""

    name: str
    saga: Any  # the Saga it belongs to
    after: str
    seconds: float | None
    until: Callable[[Any], datetime | Awaitable[datetime]] | None

    async def target(self, ctx: Any) -> datetime:
        """The time ``until(ctx)`` gives (a fixed sleep's length is :func:`due_seconds`)."""
        assert self.until is not None
        value = self.until(ctx)
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise TypeError(
                f"sleep {self.name!r}: until() must return a timezone-aware datetime, "
                f"got {_checks.show(value)}"
            )
        return value

    def seconds_until(self, value: datetime, now: datetime) -> float:
        """Seconds from ``now`` (the database's clock) until ``value`` (0 for a time
        already past)."""
        seconds = (value - now).total_seconds()
        if seconds > MAX_WAIT_SECONDS:
            raise ValueError(
                f"sleep {self.name!r}: until() returned {value.isoformat()}, more than "
                "ten years ahead"
            )
        return max(seconds, 0.0)

    def __repr__(self) -> str:
        return f"<Sleep {self.saga.name}.{self.name}>"


@dataclass(frozen=True, slots=True, eq=False)
class Wait(Generic[P]):
    """A wait for the signal ``name`` after the step ``after``; its payload (a ``model``)
    is the wait's result, read by later steps with ``ctx.result(wait)``."""

    name: str
    saga: Any  # the Saga it belongs to
    after: str
    model: type[P]
    timeout: float | None
    on_timeout: OnTimeout

    @property
    def result_type(self) -> type[P]:
        return self.model

    @property
    def timeout_value(self) -> Callable[[Any], Awaitable[Any]] | None:
        """The function computing the result on timeout, if that is the choice."""
        return None if isinstance(self.on_timeout, str) else self.on_timeout

    def __repr__(self) -> str:
        return f"<Wait {self.saga.name}.{self.name}>"


Parking = Sleep | Wait[Any]


def check_on_timeout(saga: str, name: str, on_timeout: Any, timeout: float | None) -> None:
    if on_timeout == "compensate":  # the default: with no timeout it never applies
        return
    if on_timeout != "stop" and (
        isinstance(on_timeout, str) or not inspect.iscoroutinefunction(on_timeout)
    ):
        raise DefinitionError(
            f"wait {name!r} of saga {saga!r}: on_timeout must be 'compensate', 'stop' or an "
            f"`async def (ctx)` returning the wait's result, got {_checks.show(on_timeout)}"
        )
    if on_timeout != "stop":
        _checks.takes(on_timeout, 1, f"wait {name!r} of saga {saga!r}: on_timeout")
    if timeout is None:
        raise DefinitionError(
            f"wait {name!r} of saga {saga!r}: on_timeout is given but there is no timeout"
        )


def due_seconds(parking: Parking) -> float:
    """How long the run parks when the wait starts (inf: a wait without timeout)."""
    if isinstance(parking, Wait):
        return math.inf if parking.timeout is None else parking.timeout
    assert parking.seconds is not None
    return parking.seconds


def _park_after(saga: Any, what: str, name: str) -> Any:
    """The step a new sleep or wait follows: the saga's last declared step."""
    saga._check_open()
    _checks.validate_name(name, what)
    if not saga.steps:
        raise DefinitionError(
            f"saga {saga.name!r}: {what} {name!r} must follow a step (a run starts with "
            "its first step; declare the step before it)"
        )
    last = saga.steps[-1]
    if last.after is not None:
        raise DefinitionError(
            f"saga {saga.name!r}: {what} {name!r} follows {last.after!r} with no step in "
            "between; declare one sleep or wait between two steps"
        )
    saga._check_new_name(name)
    return last


def declare_sleep(saga: Any, duration: Any, until: Any, name: str | None) -> Sleep:
    """``Saga.sleep``: a sleep after the saga's last declared step."""
    if (duration is None) == (until is None):
        raise DefinitionError(f"saga {saga.name!r}: sleep takes a duration or until=, one")
    if until is not None and not callable(until):
        raise DefinitionError(f"saga {saga.name!r}: until must be a function of the context")
    if until is not None:
        _checks.takes(until, 1, f"saga {saga.name!r}: until")
    seconds = None if duration is None else wait_seconds("sleep duration", duration)
    default = f"sleep_after_{saga.steps[-1].name}" if saga.steps else "sleep"
    name = default if name is None else name  # "" is a bad name, not the default
    step = _park_after(saga, "sleep", name)
    sleep = Sleep(name, saga, step.name, seconds, until)
    step.after = sleep
    saga._parkings[sleep.name] = sleep
    return sleep


def declare_wait(
    saga: Any, name: str, model: type[P], timeout: Any, on_timeout: OnTimeout
) -> Wait[P]:
    """``Saga.wait_for``: a wait for the signal ``name`` after the last declared step."""
    _checks.validate_name(name, "wait")  # first: the messages below quote it
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise DefinitionError(
            f"saga {saga.name!r}: the payload of wait {name!r} must be a pydantic model"
        )
    seconds = None if timeout is None else wait_seconds(f"timeout of wait {name!r}", timeout)
    check_on_timeout(saga.name, name, on_timeout, seconds)
    step = _park_after(saga, "wait", name)
    wait: Wait[P] = Wait(name, saga, step.name, model, seconds, on_timeout)
    step.after = wait
    saga._parkings[name] = wait
    return wait
