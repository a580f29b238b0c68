"""What a worker computes at a sleep or a wait: the length of a sleep whose end a
function gives, and the result a timed-out wait goes on with. The plan decides the
transitions; these only run the user's functions and report how they went."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from saga._aio import is_cancellation_by_saga, own_cancel_settled
from saga._call import user_time_limit
from saga._codec import check_readable
from saga._errors import DatabaseError, error_record
from saga._held import Lease
from saga._hooks import SimulatedCrash
from saga._transition import Failed, Succeeded
from saga._waits import Sleep, Wait

if TYPE_CHECKING:
    from saga._store import Store

Encode = Callable[[Wait[Any], Any], tuple[Succeeded | Failed, Any]]

#: Seconds a sleep's until() or a wait's on_timeout function has to return: past it,
#: it failed with TimeoutError (it would hold its run, and a worker slot, for ever).
CALLBACK_SECONDS = 60.0


async def sleep_length(
    sleep: Sleep,
    ctx: Any,
    results: dict[str, Any],
    step: str,
    result: Any,
    done: Succeeded,
    lease: Lease,
    store: Store,
) -> Succeeded:
    """``done`` with the length of the sleep after ``step``, from ``until(ctx)`` (the
    step's result readable) and the database's clock, read once it returned (the sleep
    ends at that time whatever the worker's clock says); a failure of ``until`` rolls
    the run back, step included."""
    results[step] = result
    try:
        what = f"until() of sleep {sleep.name!r}"
        value = await _limited(sleep.target, ctx, lease, what)
        seconds = sleep.seconds_until(value, await clock(store))
    except BaseException as exc:
        if issubclass(type(exc), SimulatedCrash) or is_cancellation_by_saga(exc):
            raise
        return replace(done, park_error=error_record(exc, sleep.name))
    finally:
        del results[step]
    return replace(done, park_in=seconds)


async def clock(store: Store) -> datetime:
    """The database's clock (timers count in it); the worker's while it is away."""
    try:
        return await store.database_now()
    except DatabaseError:
        return datetime.now(UTC)


async def timeout_result(
    wait: Wait[Any], ctx: Any, encode: Encode, lease: Lease
) -> tuple[Succeeded | Failed, Any]:
    """A wait whose timeout passed without its signal: the result to go on with, when
    its ``on_timeout`` computes one (else nothing to compute: the plan compensates or
    stops). Whatever the function raises is a failure: the run rolls back."""
    compute = wait.timeout_value
    if compute is None:
        return Succeeded(), None
    try:
        check_readable(ctx.input)
        value = await _limited(compute, ctx, lease, f"on_timeout of wait {wait.name!r}")
        if not isinstance(value, wait.model):  # a mapping, as a signal's payload may be
            value = wait.model.model_validate(value)
        return encode(wait, value)
    except BaseException as exc:
        if issubclass(type(exc), SimulatedCrash) or is_cancellation_by_saga(exc):
            raise
        return Failed(error_record(exc, wait.name), retryable=False), None


async def _limited(fn: Callable[[Any], Awaitable[Any]], ctx: Any, lease: Lease, what: str) -> Any:
    """``fn(ctx)`` within ``CALLBACK_SECONDS`` (past it, TimeoutError, a sync function
    that blocked that long included); a cancellation of its own task it left pending is
    taken here, raised or not."""
    async with own_cancel_settled():
        with user_time_limit(CALLBACK_SECONDS, lease, what):
            return await fn(ctx)
