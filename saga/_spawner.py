"""Running children steps (declared by ``saga._children``): start, look at, cancel and
revert a step's child runs, for the graph runner."""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from saga._aio import is_cancellation_by_saga, own_cancel_settled
from saga._checks import show
from saga._children import ChildFailed, InputsChanged, TakenKey, TooManyChildren
from saga._errors import (
    DatabaseError,
    InvalidInputError,
    PayloadTooLargeError,
    SerializationError,
    error_record,
)
from saga._graph_plan import Parked
from saga._hooks import SimulatedCrash
from saga._model import RunStatus
from saga._store_children import Child, ClaimLost, ParentClaim
from saga._transition import Failed, Succeeded

if TYPE_CHECKING:
    from saga._context import Context
    from saga._definition import Step

_COMPLETED = RunStatus.COMPLETED
_STOPPED = RunStatus.STOPPED
_NOT_OVER = (_COMPLETED, _STOPPED)
Outcome = Succeeded | Failed | Parked | None


class Children:
    """Runs children steps: start, look, cancel and revert child runs."""

    def __init__(
        self, store: Any, start: Callable[..., Awaitable[Any]], max_payload_bytes: int
    ) -> None:
        self._store = store
        self._start = start  # Client.start_child
        self._max_bytes = max_payload_bytes  # of the step's result, the outputs' list

    async def forward(
        self, claim: ParentClaim, step: Step[Any, Any], ctx: Context[Any], final: bool = False
    ) -> Outcome:
        """The step's attempt under ``claim``: start what is missing (only while the claim
        holds: ``ClaimLost``), then done, failed, or parked. ``final``: a failure of this
        attempt fails the step for good (its last, and its policy does not stop)."""
        assert step.spawn is not None
        run_id = claim.run_id
        failing = await self._store.children_failing(run_id, step.name)
        if failing is not None:  # decided on an earlier wake-up: undo, then fail with it
            return await self._fail_undone(run_id, step, Failed(failing, retryable=False))
        kids = await self._store.children_of(run_id, step.name)
        started = False
        if not kids or len(kids) < _count(kids):
            made = await self._start_all(claim, step, ctx, _count(kids))
            if isinstance(made, Failed) and (not made.retryable or final):
                # Failing for good (an input refused mid-list, the last attempt): the
                # children started before it are undone first, as any failure's.
                return await self._fail_undone(run_id, step, made)
            if made is not None:
                return made
            kids = await self._store.children_of(run_id, step.name)
            started = True
            if missing := sorted(set(range(_count(kids))) - {k.index for k in kids}):
                taken = TakenKey(
                    f"step {step.name!r}: the idempotency key of child {missing[0]} "
                    f"({run_id}:child:{step.name}:{_count(kids)}:{missing[0]}) belongs to a run "
                    "started outside the step (saga reserves these keys for its children)"
                )
                return await self._fail_undone(run_id, step, _failure(step, taken))
        if all(k.output is not None for k in kids):  # all completed (some reverted since)
            ordered = sorted(kids, key=lambda k: k.index)
            joined = "[" + ",".join(k.output or "null" for k in ordered) + "]"
            size = len(joined.encode("utf-8"))
            if size <= self._max_bytes and all(k.status is _COMPLETED for k in kids):
                return Succeeded(joined)
            if size > self._max_bytes:  # the step fails: its children are undone first
                too_large = PayloadTooLargeError(
                    f"result of step {step.name!r}: the {len(kids)} child runs' outputs are "
                    f"{size} bytes of JSON, above the limit of {self._max_bytes} bytes "
                    "(max_payload_bytes)"
                )
                return await self._fail_undone(run_id, step, _failure(step, too_large))
        # A stopped child is not over: an operator retries it (the step goes on waiting),
        # cancels it (it then ends cancelled, which fails the step) or resolves it (which
        # fails the step too).
        # A stopped child an operator resolved is over (it will not go on by itself).
        failed = [
            k for k in kids if k.status.is_terminal and (k.status not in _NOT_OVER or k.resolved)
        ]
        if failed:
            # The child that ended first: on its own, or cancelled or resolved by an
            # operator; chosen now, before this step cancels or reverts the others.
            first = min(failed, key=_culprit_order)
            error = ChildFailed(f"child run {first.id} ended {first.status}: {_reason(first)}")
            return await self._fail_undone(run_id, step, _failure(step, error))
        ended = sum(1 for k in kids if k.status.is_terminal and k.status is not _STOPPED)
        return Parked(ended, len(kids), started)

    async def _fail_undone(
        self, run_id: Any, step: Step[Any, Any], failed: Failed
    ) -> Failed | Parked:
        """``failed`` for good, once the step's children are undone (parked until then,
        with the failure, which its wake-ups then apply: they start no child, and the
        failure chosen now stays the step's)."""
        undone = await self.undo(run_id, step)
        if isinstance(undone, Parked):
            return Parked(undone.ended, undone.of, False, failing=failed.error)
        stuck = undone.error if isinstance(undone, Failed) else None
        return Failed(failed.error, retryable=False, undo_error=stuck)

    async def _start_all(
        self, claim: ParentClaim, step: Step[Any, Any], ctx: Context[Any], started: int
    ) -> Succeeded | Failed | None:
        """Compute the inputs and start every child (idempotent); an outcome when there
        is nothing to start or the inputs are refused. ``started``: how many children an
        earlier attempt started children for (0: none), which the inputs must match."""
        spec = step.spawn
        assert spec is not None
        try:
            async with own_cancel_settled():
                made = spec.inputs(ctx)
                values = await made if inspect.isawaitable(made) else made
            if not isinstance(values, Sequence) or isinstance(values, str | bytes):
                raise TypeError(
                    f"inputs of step {step.name!r} must return a list, got {show(values)}"
                )
            if len(values) > spec.max_children:
                raise TooManyChildren(
                    f"step {step.name!r} would start {len(values)} child runs of saga "
                    f"{spec.saga.name!r}, over its max_children={spec.max_children}"
                )
            if started and len(values) != started:
                raise InputsChanged(
                    f"inputs of step {step.name!r} returned {len(values)} item(s), and an "
                    f"earlier attempt started children for {started}: inputs must return "
                    "the same list on every attempt"
                )
            if not values:
                return Succeeded("[]")
            count = len(values)
            async with own_cancel_settled():  # (the child saga's key function is the user's)
                for index, value in enumerate(values):
                    key = f"{claim.run_id}:child:{step.name}:{count}:{index}"
                    await self._start(spec.saga, value, key, claim)
        except (DatabaseError, ClaimLost):
            raise  # an outage: the lease runs out and the step runs again; or it ran out
        except BaseException as exc:  # the user's inputs, or an input the child refuses
            if issubclass(type(exc), SimulatedCrash) or is_cancellation_by_saga(exc):
                raise
            refused = TooManyChildren | InputsChanged | TypeError | InvalidInputError
            retry = (
                not issubclass(type(exc), refused | SerializationError)
                and issubclass(type(exc), Exception)
                and step.retry.retryable(exc)  # PermanentError, non_retryable: at once
            )
            return Failed(error_record(exc, step.name), retryable=retry)
        return None

    async def undo(self, run_id: Any, step: Step[Any, Any]) -> Succeeded | Failed | Parked:
        """Cancel the running (and stopped) children, revert the completed ones; done
        once all ended: undone, or (a child that cannot be undone) failed for an operator,
        but only once the others ended too."""
        assert step.spawn is not None
        limit = step.spawn.saga.traffic.limit
        for _ in range(3):  # a child that completed as it was asked to cancel: reverted
            stuck = await self._ask_undo(await self._store.children_of(run_id, step.name), limit)
            kids = await self._store.children_of(run_id, step.name)
            held = {kid.id for kid, _ in stuck}
            if not any(k.status is _COMPLETED and k.id not in held for k in kids):
                break
        if any(not k.status.is_terminal for k in kids if k.id not in held):
            ended = sum(1 for k in kids if k.status.is_terminal)
            return Parked(ended, len(kids), False)  # the others are still rolling back
        if stuck:
            return _stuck(step, *stuck[0])
        for kid in kids:  # (one an operator resolved is closed: not stuck)
            if kid.status in (RunStatus.FAILED, RunStatus.STOPPED) and not kid.resolved:
                return _stuck(step, kid, f"ended {kid.status}: {_reason(kid)}")
        if all(k.status is not _COMPLETED for k in kids):
            return Succeeded()
        ended = sum(1 for k in kids if k.status.is_terminal)
        return Parked(ended, len(kids), False)

    async def _ask_undo(self, kids: list[Child], key_limit: int) -> list[tuple[Child, str]]:
        """Ask each child to end undone (revert a completed one, queued again for its key
        of ``key_limit`` if it has one; cancel the others); the children that cannot be,
        and why."""
        stuck: list[tuple[Child, str]] = []
        for kid in kids:
            if kid.status is _COMPLETED:
                if not await self._store.revert_run(kid.id, key_limit):
                    stuck.append((kid, "passed its pivot step and cannot be undone"))
            elif kid.status is _STOPPED and not kid.cancel_requested:
                # A resolved child whose key resolving freed is left alone: an operator
                # closed it (README: it is cancelled with its siblings' undoing unless so).
                if not await self._store.request_cancel(kid.id) and not kid.resolved:
                    why = "is stopped past its pivot step and cannot be undone"
                    stuck.append((kid, why))
            elif not kid.status.is_terminal and not kid.cancel_requested:
                await self._store.request_cancel(kid.id)
        return stuck


def _failure(step: Step[Any, Any], error: Exception) -> Failed:
    """The step fails for good with ``error`` (once its children are undone)."""
    return Failed(error_record(error, step.name), retryable=False)


def _culprit_order(kid: Child) -> tuple[datetime, bool, int]:
    return (kid.finished_at or _NEVER, kid.cancel_requested, kid.index)


_NEVER = datetime.max.replace(tzinfo=UTC)


def _count(kids: list[Child]) -> int:
    return max((k.count for k in kids), default=0)


def _reason(kid: Child) -> str:
    if kid.error is None:
        return "cancelled"
    error = json.loads(kid.error)
    return f"{error.get('type')}: {error.get('message')}"


def _stuck(step: Step[Any, Any], kid: Child, why: str) -> Failed:
    error = ChildFailed(f"child run {kid.id} of step {step.name!r} {why}")
    return Failed(error_record(error, step.name), retryable=False)
