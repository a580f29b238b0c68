"""An attempt's parts, shared by the linear and the graph runner: its context, its span
(opened and ended with its metrics), and the checkpoint after the user's function
returned (hooks, the result encoded, a computed sleep's length).

A part of :class:`~saga._runner.Runner` (a mixin).
"""

from __future__ import annotations

import time
from typing import Any

from saga._active import ActiveRun, Reads
from saga._codec import encode_checked
from saga._context import Context
from saga._definition import Step
from saga._errors import SagaError, error_record
from saga._held import Lease
from saga._hooks import Hooks
from saga._model import Outcome, Phase, RunStatus
from saga._parked import sleep_length
from saga._store import Store
from saga._telemetry import Telemetry, in_run_trace
from saga._transition import Failed, Succeeded, idempotency_key
from saga._waits import Sleep, Wait

# Enum members used per step, read once (an enum attribute costs a call in 3.11).
_STEP = Phase.STEP
_COMPENSATION = Phase.COMPENSATION
_SUCCESS = Outcome.SUCCESS


class AttemptParts:
    """Needs ``store``, ``telemetry``, ``worker``, ``_hooks`` and ``_max_payload`` from
    the runner it is part of."""

    store: Store
    telemetry: Telemetry
    worker: str
    _hooks: Hooks
    _max_payload: int

    async def checkpoint(
        self,
        run: ActiveRun,
        step: Step[Any, Any],
        ctx: Context[Any],
        done: Succeeded,
        result: Any,
        lease: Lease,
    ) -> tuple[Succeeded | Failed, Any]:
        """A step or compensation returned: the hooks' checkpoint, then (a step) its
        result encoded, and the length of a computed sleep after it."""
        await self._hooks.before_checkpoint(ctx)
        if run.phase is not _STEP:
            return done, result
        outcome, result = self._encode(run, step, result)
        after = step.after
        if isinstance(after, Sleep) and after.until is not None and isinstance(outcome, Succeeded):
            with in_run_trace(run.span, run.trace_parent):
                outcome = await sleep_length(
                    after, ctx, run.results, step.name, result, outcome, lease, self.store
                )
        return outcome, result

    def _encode(
        self, run: ActiveRun, step: Step[Any, Any] | Wait[Any], result: Any
    ) -> tuple[Succeeded | Failed, Any]:
        what = "timeout result of wait" if isinstance(step, Wait) else "result of step"
        try:
            text, decoded = encode_checked(
                result, step.result_type, what=f"{what} {step.name!r}", max_bytes=self._max_payload
            )
        except SagaError as exc:
            return Failed(error_record(exc, step.name), retryable=False), None
        return Succeeded(text), decoded

    def context(self, run: ActiveRun, name: str, phase: Phase) -> Context[Any]:
        return Context(
            run_id=run.id,
            saga=run.saga.name,
            step=name,
            attempt=run.attempt,
            idempotency_key=idempotency_key(run.id, name, phase),
            is_compensation=phase is _COMPENSATION,
            _results=Reads(run),
            _definition=run.saga,
        )

    def open_attempt(self, run: ActiveRun) -> None:
        run.outcome, run.error_type = _SUCCESS, None
        run.started = time.perf_counter()
        run.span = self.telemetry.attempt_span(
            run.trace_parent,
            saga=run.saga.name,
            version=run.saga.version,
            run_id=str(run.id),
            step=run.step,
            attempt=run.attempt,
            kind=str(run.phase),
            worker=self.worker,
        )

    def end_attempt(
        self, run: ActiveRun, outcome: Outcome, run_status: RunStatus | None = None
    ) -> None:
        span, run.span = run.span, None
        if span is None:
            return
        self.telemetry.end_attempt(
            span,
            kind=str(run.phase),
            saga=run.saga.name,
            step=run.step,
            outcome=str(outcome),
            error_type=run.error_type,
            duration=time.perf_counter() - run.started,
            run_status=None if run_status is None else str(run_status),
        )
