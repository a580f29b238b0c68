"""Executing leased work: run a step or compensation, then record what comes next.

The engine never sees SQL: it computes a :class:`~saga._store.Transition` and asks the
store to apply it, fenced by the lease token. When the next item of the same run is
runnable at once, the same transition leases it to this worker, so the happy path costs
one commit per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import anyio
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.trace import Span

from saga._aio import is_cancellation
from saga._codec import decode, encode_checked
from saga._definition import Context, Retry, Saga, Step
from saga._errors import DatabaseError, SagaError, SerializationError, error_record
from saga._log import Outage, logger
from saga._store import ClaimedItem, Store, Transition, TransitionResult
from saga._telemetry import SAGA, TERMINAL, Telemetry

_NO_TIMEOUT = contextlib.nullcontext()


class _Committed(enum.Enum):
    """An uncertain write turned out committed, and the run has moved on since."""

    COMMITTED = "committed"


COMMITTED = _Committed.COMMITTED

# Waits between attempts to write a transition through connection errors (seconds).
_WRITE_RETRY_DELAYS = (0.05, 0.25, 1.0, 3.0)


@dataclass(slots=True)
class Lease:
    """A lease this worker holds; the token changes when the run moves to its next item."""

    run_id: UUID
    token: int
    seconds: float  # lease length of the item held now; heartbeats renew by this much
    cancel_requested: bool = False  # seen by a heartbeat while the step ran
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    lost: bool = False


class SimulatedCrash(BaseException):
    """Raised by saga.testing hooks: the worker 'dies' here, writing nothing more.

    A BaseException so that user code's ``except Exception`` cannot swallow it.
    """


class Hooks(Protocol):
    """Fault-injection points (see saga.testing). Production runs have none."""

    async def before_call(self, ctx: Context[Any], store: Store, runtime: Runtime) -> None:
        """Before the step or compensation function; may raise to fail the attempt."""

    async def before_checkpoint(self, ctx: Context[Any]) -> None:
        """After the function returned, before its outcome is written."""

    async def write(
        self, ctx: Context[Any], attempt_write: Callable[[], Awaitable[TransitionResult | None]]
    ) -> TransitionResult | None:
        """Around the write of the attempt's outcome."""


class Runtime(Protocol):
    """What the engine needs from its orchestrator."""

    worker_id: str
    lease_seconds: float
    max_payload_bytes: int
    hooks: Hooks | None
    telemetry: Telemetry
    outage: Outage

    def wake(self) -> None: ...

    @property
    def stopping(self) -> bool: ...

    def wake_later(self, delay: float) -> None: ...


def idempotency_key(run_id: UUID, step: str, compensation: bool) -> str:
    """``<run id>:step:<name>`` or ``<run id>:compensation:<name>``: the run id has a
    fixed length and the phase a fixed place, so no two operations share a key whatever
    the step names (which may hold ':')."""
    return f"{run_id}:{'compensation' if compensation else 'step'}:{step}"


class _Unreadable:
    """A stored payload that no longer decodes: using it fails the attempt, clearly."""

    __slots__ = ("error",)

    def __init__(self, error: SerializationError) -> None:
        self.error = error


def _decode_stored(text: str, annotation: Any, what: str) -> Any:
    try:
        return decode(text, annotation)
    except Exception as exc:
        return _Unreadable(
            SerializationError(f"the stored {what} no longer reads as its declared type: {exc}")
        )


@dataclass(slots=True)
class _RunState:
    run_id: UUID
    saga: Saga[Any]
    status: str
    step_name: str
    attempt: int
    input: Any  # the input model, or _Unreadable
    results: dict[str, Any]  # decoded results of completed steps (or _Unreadable)
    completed: list[str]
    cancel_requested: bool
    has_error: bool
    trace_parent: OtelContext | None = None  # the run's start span, for attempt spans
    ctx: Context[Any] | None = None  # of the attempt whose outcome is being written
    # The attempt being run: its span, start time, and how it went.
    span: Span | None = None
    started: float = 0.0
    kind: str = "step"
    outcome: str = "success"
    error_type: str | None = None


class Engine:
    def __init__(self, store: Store, runtime: Runtime) -> None:
        self._store = store
        self._rt = runtime

    async def process(self, item: ClaimedItem, saga: Saga[Any], lease: Lease) -> None:
        """Drive one claimed run until it ends, waits (backoff), or the lease is lost."""
        state = _RunState(
            run_id=item.run_id,
            saga=saga,
            status=item.status,
            step_name=item.step_name,
            attempt=item.attempt,
            input=_decode_stored(item.input, saga.input_type, "input"),
            results={
                name: _decode_stored(text, saga.get_step(name).result_type, f"result of {name!r}")
                for name, text in json.loads(item.results).items()
            },
            completed=item.completed_steps,
            cancel_requested=item.cancel_requested,
            has_error=item.has_error,
            trace_parent=Telemetry.parent_context(item.trace_context),
        )
        telemetry = self._rt.telemetry
        if item.expired_owner is not None:
            telemetry.leases_expired.add(1, {SAGA: saga.name})
            logger.warning(
                "lease_expired",
                run_id=str(item.run_id),
                saga=saga.name,
                step=item.step_name,
                previous_worker=item.expired_owner,
            )
        # One bound logger per claimed run: binding resolves structlog's configuration.
        log = logger.bind(run_id=str(state.run_id), saga=saga.name)
        try:
            await self._drive(state, lease, log)
        finally:
            self._end_attempt(state, "interrupted")  # crash, cancellation, database error

    async def _drive(self, state: _RunState, lease: Lease, log: Any) -> None:
        telemetry, saga = self._rt.telemetry, state.saga
        while True:
            change, completed_result = await self._step(state, lease, log)
            if change is None:
                self._end_attempt(state, "lease_lost")
                return  # lease lost while the step ran; another worker owns the run now
            outcome = await self._apply(state, lease, change, log)
            if outcome is None and change.unless_cancelled and await self._cancelled(state, lease):
                # A cancel was accepted while the last step ran: roll back instead.
                state.cancel_requested = True
                change = self._cancel_instead(state, change)
                outcome = await self._apply(state, lease, change, log)
            if outcome is None:
                lease.lost = True
                telemetry.writes_refused.add(1, {SAGA: saga.name})
                self._end_attempt(state, "refused")
                log.warning("stale_write_refused", step=state.step_name, attempt=state.attempt)
                return
            ended = change.status if change.status in TERMINAL else None
            self._end_attempt(state, state.outcome, ended)
            if ended is not None:
                age = outcome.age if isinstance(outcome, TransitionResult) else None
                telemetry.run_ended(saga.name, ended, age)
            for event in change.events:
                _log_event(log, event)
            if outcome is COMMITTED:
                return  # committed, but the run has moved on since: nothing more for us
            if change.due_in is not None and change.lease_owner is None and change.due_in > 0:
                self._rt.wake_later(change.due_in)
            if change.lease_owner is None:
                return
            # The transition leased the run's next item to us: go on in this task.
            lease.token = outcome.lease_token
            if change.completed_step is not None:
                state.completed.append(change.completed_step)
                state.results[change.completed_step] = completed_result
            if change.error is not None:
                state.has_error = True
            assert change.step_name is not None
            state.status = change.status
            state.step_name = change.step_name
            state.attempt = change.attempt
            state.cancel_requested = outcome.cancel_requested

    async def _cancelled(self, state: _RunState, lease: Lease) -> bool:
        """Whether a refused write was refused for a cancel, the lease still ours."""
        record = await self._store.get_run(state.run_id)
        return (
            record is not None
            and record["cancel_requested"]
            and record["lease_owner"] == self._rt.worker_id
            and record["lease_token"] == lease.token
            and record["status"] == "running"
        )

    def _cancel_instead(self, state: _RunState, completion: Transition) -> Transition:
        assert completion.completed_step is not None
        done = completion.events[0]  # step_completed
        rollback = self._rollback(state, None, [done], just_completed=completion.completed_step)
        return dataclasses.replace(
            rollback,
            completed_step=completion.completed_step,
            result_json=completion.result_json,
        )

    def _end_attempt(self, state: _RunState, outcome: str, run_status: str | None = None) -> None:
        span, state.span = state.span, None
        if span is None:
            return
        self._rt.telemetry.end_attempt(
            span,
            kind=state.kind,
            saga=state.saga.name,
            step=state.step_name,
            outcome=outcome,
            error_type=state.error_type,
            duration=time.perf_counter() - state.started,
            run_status=run_status,
        )

    async def _apply(
        self, state: _RunState, lease: Lease, change: Transition, log: Any
    ) -> TransitionResult | _Committed | None:
        """Write a transition, retrying through connection errors.

        A write whose connection broke may or may not have committed. Replaying it is safe
        (the fence refuses a second application), and when the replay is refused the run
        is re-read to tell "it committed" from "the lease was lost", never guessed.
        """
        uncertain = False
        hooks, ctx = self._rt.hooks, state.ctx

        async def write() -> TransitionResult | None:
            return await self._store.transition(
                self._rt.worker_id, state.run_id, lease.token, change
            )

        for delay in (*_WRITE_RETRY_DELAYS, None):
            try:
                outcome = await (
                    write() if hooks is None or ctx is None else hooks.write(ctx, write)
                )
            except DatabaseError as exc:
                if delay is None:
                    raise
                uncertain = True
                self._rt.outage.lost("recording an outcome", exc)
                await anyio.sleep(delay)
                continue
            self._rt.outage.back()
            if outcome is None and uncertain:
                return await self._resolve(state, change, log)
            return outcome
        return None  # pragma: no cover - the loop returns or raises

    async def _resolve(
        self, state: _RunState, change: Transition, log: Any
    ) -> TransitionResult | _Committed | None:
        """After an uncertain write was refused on replay: did the first one commit?

        The history answers exactly (an attempt writes its outcome once). If it committed
        and leased the run's next item to us, and nothing moved since, carry on holding it.
        """
        first = change.events[0]
        committed = await self._store.has_event(
            state.run_id, first["kind"], first["step"], first["attempt"], self._rt.worker_id
        )
        log.info("ambiguous_commit_resolved", committed=committed)
        if not committed:
            return None
        if change.lease_owner is not None:
            record = await self._store.get_run(state.run_id)
            if (
                record is not None
                and record["lease_owner"] == change.lease_owner
                and record["status"] == change.status
                and record["step_name"] == change.step_name
                and record["attempt"] == change.attempt
            ):
                return TransitionResult(record["lease_token"], record["cancel_requested"])
        return COMMITTED

    async def _step(
        self, state: _RunState, lease: Lease, run_log: Any
    ) -> tuple[Transition | None, Any]:
        """Run the current item; return the transition to record (None: lease lost)."""
        saga = state.saga
        state.ctx = None
        if state.status != "compensating" and state.cancel_requested:
            return self._rollback(state, None, events=[]), None
        step = saga.get_step(state.step_name)
        lease.seconds = self._lease_for(step)
        compensating = state.status == "compensating"
        comp = step.compensation
        if compensating and comp is None:  # pragma: no cover - plan only names these
            raise SagaError(f"step {step.name!r} has no compensation to run")
        policy = comp.retry if compensating and comp else step.retry
        kind = "compensation" if compensating else "step"
        ctx: Context[Any] = Context(
            run_id=state.run_id,
            saga=saga.name,
            step=step.name,
            attempt=state.attempt,
            input=state.input,
            idempotency_key=idempotency_key(state.run_id, step.name, compensating),
            is_compensation=compensating,
            _results=state.results,
            _definition=saga,
        )
        log = run_log.bind(step=step.name, attempt=state.attempt)
        error: dict[str, Any] | None = None
        retryable = False
        result: Any = None
        state.kind, state.outcome, state.error_type = kind, "success", None
        state.started = time.perf_counter()
        state.span = self._rt.telemetry.attempt_span(
            state.trace_parent,
            saga=saga.name,
            version=saga.version,
            run_id=str(state.run_id),
            step=step.name,
            attempt=state.attempt,
            kind=kind,
            worker=self._rt.worker_id,
        )
        if state.attempt > policy.max_attempts:
            # The previous attempt's worker stopped (crash, kill, lost connection) before
            # recording an outcome: it counts as an attempt, and there are none left.
            error = {
                "type": "saga.AttemptLost",
                "message": f"the worker running attempt {state.attempt - 1} stopped before "
                "recording an outcome, and no attempts are left",
                "step": step.name,
            }
        else:
            timeout = comp.timeout if compensating and comp else step.timeout
            if lease.lost:
                return None, None
            # A fresh scope per attempt: the heartbeat cancels it if the lease is lost.
            lease.scope = anyio.CancelScope()
            state.ctx = ctx
            hooks = self._rt.hooks
            with lease.scope, trace.use_span(state.span, end_on_exit=False):
                try:
                    if hooks is not None:
                        await hooks.before_call(ctx, self._store, self._rt)
                    _check_readable(state.input)
                    with anyio.fail_after(timeout) if timeout is not None else _NO_TIMEOUT:
                        if compensating and comp is not None:
                            done = state.results.get(step.name)
                            _check_readable(done)
                            await comp.fn(ctx, done)
                        else:
                            result = await step.fn(ctx)
                except BaseException as exc:
                    # Whatever user code raises is this attempt's failure (GeneratorExit,
                    # SystemExit and stray CancelledErrors included), except the
                    # cancellation of this task: lease lost, timeout, or shutdown.
                    if is_cancellation(exc) or isinstance(exc, SimulatedCrash):
                        raise
                    error = error_record(exc, step.name)
                    retryable = policy.retryable(exc)
            if lease.scope.cancel_called:
                lease.lost = True
                log.warning(f"{kind}_cancelled_lease_lost")
                return None, None
            if hooks is not None and error is None:
                await hooks.before_checkpoint(ctx)
        if compensating:
            return self._after_compensation(state, error, retryable, policy), None
        if error is None:
            try:
                result_json, decoded = encode_checked(
                    result,
                    step.result_type,
                    what=f"result of step {step.name!r}",
                    max_bytes=self._rt.max_payload_bytes,
                )
            except SagaError as exc:
                error, retryable = error_record(exc, step.name), False
            else:
                state.cancel_requested |= lease.cancel_requested
                return self._after_success(state, step, result_json), decoded
        assert error is not None
        return self._after_failure(state, error, retryable, policy, "step"), None

    def _lease_for(self, step: Step[Any, Any]) -> float:
        return step.lease_seconds or self._rt.lease_seconds

    def _continue(self, state: _RunState, step_name: str) -> tuple[float, str | None]:
        """(due_in, owner) for a next item runnable now: ours unless shutting down."""
        if self._rt.stopping:
            return 0.0, None
        return self._lease_for(state.saga.get_step(step_name)), self._rt.worker_id

    def _event(
        self, kind: str, step: str | None, attempt: int | None, **data: Any
    ) -> dict[str, Any]:
        return {
            "kind": kind,
            "step": step,
            "attempt": attempt,
            "worker": self._rt.worker_id,
            "data": data or None,
        }

    def _after_success(
        self, state: _RunState, step: Step[Any, Any], result_json: str
    ) -> Transition:
        done = self._event("step_completed", step.name, state.attempt)
        steps = state.saga.steps
        if step.index + 1 < len(steps) and state.cancel_requested:
            # Cancelled while this step ran: record it, then roll back at once, this step
            # included, rather than lease a next step that will never run.
            rollback = self._rollback(state, None, [done], just_completed=step.name)
            return dataclasses.replace(rollback, completed_step=step.name, result_json=result_json)
        if step.index + 1 < len(steps):
            nxt = steps[step.index + 1]
            due_in, owner = self._continue(state, nxt.name)
            events = [done]
            if owner is not None:
                events.append(self._event("step_started", nxt.name, 1))
            return Transition(
                status="running",
                step_name=nxt.name,
                attempt=1 if owner else 0,
                events=events,
                completed_step=step.name,
                result_json=result_json,
                due_in=due_in,
                lease_owner=owner,
            )
        if state.cancel_requested:
            # The last step completed, but a cancel was accepted before the run ended:
            # it is compensated like every other completed step.
            rollback = self._rollback(state, None, [done], just_completed=step.name)
            return dataclasses.replace(rollback, completed_step=step.name, result_json=result_json)
        return Transition(
            status="completed",
            step_name=None,
            attempt=state.attempt,
            events=[done, self._event("run_completed", None, None)],
            completed_step=step.name,
            result_json=result_json,
            output_json=result_json,
            unless_cancelled=True,  # a cancel accepted meanwhile must roll back instead
        )

    def _after_failure(
        self,
        state: _RunState,
        error: dict[str, Any],
        retryable: bool,
        policy: Retry,
        kind: str,
    ) -> Transition:
        state.error_type = error["type"]
        state.outcome = "failure"
        if retryable and state.attempt < policy.max_attempts:
            state.outcome = "retry"
            delay = policy.delay(state.attempt)
            return Transition(
                status=state.status,
                step_name=state.step_name,
                attempt=state.attempt,
                events=[
                    self._event(
                        f"{kind}_failed",
                        state.step_name,
                        state.attempt,
                        error=error,
                        retry_in=delay,
                    )
                ],
                due_in=delay,
            )
        failed = self._event(f"{kind}_failed", state.step_name, state.attempt, error=error)
        return self._rollback(state, error, events=[failed])

    def _rollback(
        self,
        state: _RunState,
        error: dict[str, Any] | None,
        events: list[dict[str, Any]],
        just_completed: str | None = None,
    ) -> Transition:
        """Start compensating the completed steps, newest first (or end if none need it)."""
        plan = self._plan(state, just_completed)
        events.append(
            self._event(
                "run_compensating", None, None, plan=plan, reason="failure" if error else "cancel"
            )
        )
        if not plan:
            return self._finish_rollback(state, error, events)
        return self._compensate_next(state, plan[0], events, error)

    def _compensate_next(
        self,
        state: _RunState,
        step_name: str,
        events: list[dict[str, Any]],
        error: dict[str, Any] | None = None,
    ) -> Transition:
        """Make the compensation of ``step_name`` the run's next item (ours if we go on)."""
        due_in, owner = self._continue(state, step_name)
        if owner is not None:
            events.append(self._event("compensation_started", step_name, 1))
        return Transition(
            status="compensating",
            step_name=step_name,
            attempt=1 if owner else 0,
            events=events,
            error=error,
            due_in=due_in,
            lease_owner=owner,
        )

    def _finish_rollback(
        self, state: _RunState, error: dict[str, Any] | None, events: list[dict[str, Any]]
    ) -> Transition:
        failed_forward = error is not None or state.has_error
        status = "compensated" if failed_forward else "cancelled"
        events.append(self._event(f"run_{status}", None, None))
        return Transition(status=status, step_name=None, attempt=0, events=events, error=error)

    def _plan(self, state: _RunState, just_completed: str | None = None) -> list[str]:
        completed = [*state.completed, just_completed] if just_completed else state.completed
        return [
            name
            for name in reversed(completed)
            if state.saga.get_step(name).compensation is not None
        ]

    def _after_compensation(
        self, state: _RunState, error: dict[str, Any] | None, retryable: bool, policy: Retry
    ) -> Transition:
        if error is not None:
            if retryable and state.attempt < policy.max_attempts:
                return self._after_failure(state, error, retryable, policy, "compensation")
            state.error_type, state.outcome = error["type"], "failure"
            return Transition(
                status="failed",
                step_name=state.step_name,
                attempt=state.attempt,
                events=[
                    self._event("compensation_failed", state.step_name, state.attempt, error=error),
                    self._event("run_failed", None, None),
                ],
                compensation_error=error,
            )
        done = self._event("compensation_completed", state.step_name, state.attempt)
        plan = self._plan(state)
        rest = plan[plan.index(state.step_name) + 1 :]
        if not rest:
            return self._finish_rollback(state, None, [done])
        return self._compensate_next(state, rest[0], [done])


def _check_readable(value: Any) -> None:
    if isinstance(value, _Unreadable):
        raise value.error


def _log_event(log: Any, event: dict[str, Any]) -> None:
    kind = event["kind"]
    fields: dict[str, Any] = {}
    if event.get("step"):
        fields["step"] = event["step"]
    if event.get("attempt"):
        fields["attempt"] = event["attempt"]
    data = event.get("data") or {}
    if "error" in data:
        # Only the type: messages may carry payload data and secrets.
        fields["error_type"] = data["error"]["type"]
    if "retry_in" in data:
        fields["retry_in"] = round(data["retry_in"], 3)
    if kind in ("step_failed", "compensation_failed"):
        log.warning(kind, **fields)
    elif kind == "run_failed":
        log.error(kind, **fields)
    elif kind.startswith("run_"):
        log.info(kind, **fields)
    else:
        log.debug(kind, **fields)
