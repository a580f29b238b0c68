"""One attempt's call of the user's step or compensation, under its lease's cancel scope,
its span and its timeout, after the step's rate limit (if any) let it through."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
from opentelemetry import trace

from saga._aio import cancelling, is_cancellation_by_saga, settle_self_cancel, time_limit
from saga._codec import check_readable, decode_stored
from saga._errors import DatabaseError, SagaError, error_record
from saga._held import cancel_scope
from saga._hooks import FaultTarget, Hooks, SimulatedCrash
from saga._instruments import RATE_LIMIT
from saga._log import Outage
from saga._model import Phase
from saga._rate import RateLimit
from saga._telemetry import Telemetry
from saga._transition import Failed, Succeeded

if TYPE_CHECKING:
    from saga._active import ActiveRun
    from saga._context import Context
    from saga._definition import Step
    from saga._held import Lease
    from saga._lease import Leases
    from saga._policy import Retry
    from saga._store import Store

_NO_TIMEOUT = contextlib.nullcontext()
_COMPENSATION = Phase.COMPENSATION


T = TypeVar("T")


class CallEnv(Protocol):
    """What a call needs from the runner making it."""

    store: Store
    leases: Leases
    worker: str
    lease_seconds: float
    telemetry: Telemetry

    @property
    def outage(self) -> Outage: ...

    @property
    def hooks(self) -> Hooks: ...

    @property
    def faults(self) -> FaultTarget: ...


class CallUser(Protocol):
    def __call__(
        self, run: ActiveRun, step: Step[Any, Any], ctx: Context[Any], lease: Lease, retry: Retry
    ) -> Coroutine[Any, Any, tuple[Succeeded | Failed | None, Any]]: ...


async def call_user(
    run: ActiveRun,
    step: Step[Any, Any],
    ctx: Context[Any],
    lease: Lease,
    retry: Retry,
    *,
    env: CallEnv,
) -> tuple[Succeeded | Failed | None, Any]:
    """Call the user's function; whatever it raises is this attempt's failure
    (GeneratorExit, SystemExit and stray CancelledErrors included), except the
    cancellation of this task: lease lost, timeout, or shutdown. A step with a rate
    limit first waits for its token (not counted in its timeout; the lease is renewed
    meanwhile). A step whose own lease is shorter than the one its item was leased with
    (a claim leases with the orchestrator's) renews it to its own length first, so that
    a worker dying in it is noticed after that step's lease, not the claim's."""
    compensation = run.phase is _COMPENSATION
    comp = step.compensation
    timeout = comp.timeout if compensation and comp else step.timeout
    seconds = step.lease_seconds or env.lease_seconds
    leased = lease.seconds
    assert run.span is not None
    # Spans hold error types only: nothing escaping here records its message.
    current = trace.use_span(
        run.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )
    with lease.attempt_scope(seconds), current:
        if seconds < leased:
            await env.leases.renew(lease)  # a lost lease cancels this scope
        if step.rate_limit is not None and not compensation:
            delay = await take(env.store, step.rate_limit, run, env.worker, lease, env.outage)
            env.telemetry.rate_delay.record(delay, {RATE_LIMIT: step.rate_limit.name})
            if lease.cancel_requested and not run.finishing:
                return None, None  # cancelled while it waited for its token: not started
        before = cancelling()
        try:
            await env.hooks.before_call(ctx, env.faults)
            check_readable(run.input)
            limit = (
                _NO_TIMEOUT if timeout is None else user_time_limit(timeout, lease, "the attempt")
            )
            with limit:
                if compensation and comp is not None:
                    done = _stored_result(run, step)
                    check_readable(done)
                    await comp.fn(ctx, done)
                    result = None
                else:
                    result = await step.fn(ctx)
            if cancelling() > before:  # (checked here: no coroutine per attempt otherwise)
                await settle_self_cancel(before)
            return Succeeded(), result
        except BaseException as exc:
            if issubclass(type(exc), SimulatedCrash) or is_cancellation_by_saga(exc):
                raise
            if cancelling() > before:  # it cancelled its own task, then raised at once
                await settle_self_cancel(before)
            return Failed(error_record(exc, step.name), retry.retryable(exc)), None
    # Only reached when the heartbeat cancelled the scope (lease lost): the caller sees
    # lease.scope.cancel_called and records nothing.
    return Failed(error_record(SagaError("lease lost"), step.name), True), None


@contextlib.contextmanager
def user_time_limit(timeout: float, lease: Lease, what: str) -> Iterator[None]:
    """A time limit on the user's code under ``lease`` (a step's timeout, a sleep's
    until()): TimeoutError once it is past, even when the code swallowed the
    cancellation and returned (its late result is not used). Code still running the
    lease's length after it ignores cancellation: its heartbeats stop (see
    Leases.heartbeat_loop), its slot is freed, another attempt takes over once its lease
    expires, and its own writes are refused."""
    lease.time_limited(anyio.current_time() + timeout)
    try:
        with time_limit(cancel_scope(), timeout, what):
            yield
    finally:
        lease.time_limited(None)


async def take(
    store: Store, limit: RateLimit, run: ActiveRun, worker: str, lease: Lease, outage: Outage
) -> float:
    """Take a token of ``limit`` for the current attempt of ``run``: wait as long as the
    bucket says (the delay is recorded in the run's history), or until a heartbeat sees
    the run cancelled (then the step does not start); return the delay. The step has
    not started: a database away is waited out here (a lost lease cancels the wait),
    never counted as the attempt's failure."""
    assert limit.burst is not None
    lease.before_start(True)  # (left set when the wait is cut short: a shutdown)
    delay = await _take(store, limit, run, worker, lease, outage)
    lease.before_start(False)
    return delay


async def _take(
    store: Store, limit: RateLimit, run: ActiveRun, worker: str, lease: Lease, outage: Outage
) -> float:
    attempt = (run.id, run.step, run.attempt)
    held = (lease.token, None if lease.item is None else lease.item[1].value)
    delay, taken = await _again(
        outage, "taking a rate limit token",
        lambda: store.rate_take(limit.name, limit.per_second, limit.burst or 1),
    )  # fmt: skip
    if delay > 0:
        await _again(
            outage, "recording a rate limit's delay",
            lambda: store.rate_limited(limit.name, delay, taken, attempt, worker, held),
        )  # fmt: skip
    end = anyio.current_time() + delay
    stops = not run.finishing  # (an attempt cut short, run again, finishes: README)
    while not (stops and lease.cancel_requested) and (left := end - anyio.current_time()) > 0:  # noqa: ASYNC110 - the heartbeat sets a flag, not an event
        await anyio.sleep(min(left, _CANCEL_CHECK))
    return delay


async def _again(outage: Outage, what: str, statement: Callable[[], Awaitable[T]]) -> T:
    """``statement``, tried again (every 0.1 s, up to every 2 s) while the database is
    away. A token taken whose reply was lost is taken again: the lost one delays later
    attempts by one token's time, never beyond the rate."""
    wait = 0.1
    while True:
        try:
            done = await statement()
        except DatabaseError as exc:
            outage.lost(what, exc)
            await anyio.sleep(wait)
            wait = min(wait * 2, 2.0)
            continue
        outage.back()
        return done


#: Seconds between two looks at the lease's cancel flag while waiting for a token.
_CANCEL_CHECK = 0.25


def _stored_result(run: ActiveRun, step: Step[Any, Any]) -> Any:
    """The result a compensation receives: its step's, read again from what was stored
    (a later step may have changed the object it read), or None (no result stored)."""
    text = run.stored.get(step.name)
    if text is None:
        return run.results.get(step.name)
    return decode_stored(text, run.saga.result_type(step.name), f"result of {step.name!r}")
