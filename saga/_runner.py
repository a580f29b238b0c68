"""Running leased work: one item at a time, per claimed run, in its own task.

For each item: build the context, call the user's function (under its timeout, its
attempt span and the lease's cancel scope), encode the result, ask the plan for the
transition, write it. When the plan leases the run's next item to this worker, go on in
the same task: the happy path costs one commit per step. No SQL here, and no decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from saga import _plan
from saga._active import ActiveRun, claimed_run
from saga._aio import is_cancellation_by_saga
from saga._attempt import AttemptParts
from saga._call import CallUser, call_user
from saga._context import Context
from saga._definition import Saga, Step
from saga._errors import DatabaseError, exception_type
from saga._held import Lease
from saga._hooks import FaultTarget, Hooks, SimulatedCrash
from saga._instruments import SAGA
from saga._lease import Leases
from saga._log import Outage, frames, log_events, logger
from saga._model import Outcome, Phase, RunStatus
from saga._parked import timeout_result
from saga._store import Store
from saga._telemetry import Telemetry, in_run_trace
from saga._transition import (
    ClaimedItem,
    Failed,
    LeaseFor,
    RunState,
    Succeeded,
    Transition,
)
from saga._write import COMMITTED, Writer, Written

#: What runs a claimed item: the linear runner's, or the graph runner's.
Process = Callable[[ClaimedItem, Saga[Any], Lease], Awaitable[None]]

# Enum members used per step, read once (an enum attribute costs a call in 3.11).
_STEP = Phase.STEP
_FAILURE = Outcome.FAILURE
_RETRY = Outcome.RETRY
_WAITING = RunStatus.WAITING


class Runner(AttemptParts):
    def __init__(
        self,
        store: Store,
        leases: Leases,
        *,
        sagas: dict[tuple[str, int], Saga[Any]],
        worker_id: str,
        lease_seconds: float,
        max_payload_bytes: int,
        telemetry: Telemetry,
        hooks: Hooks,
        outage: Outage,
        faults: FaultTarget,
    ) -> None:
        self.store = store
        self.leases = leases
        self._sagas = sagas
        self.worker = worker_id
        self.lease_seconds = lease_seconds
        self._max_payload = max_payload_bytes
        self.telemetry = telemetry
        self._hooks = hooks
        self._outage = outage
        self._faults = faults
        self.writer = Writer(store, worker_id, hooks, outage)
        self._lease_fns: dict[int, Callable[[str], float]] = {}  # per saga (by identity)
        #: Drive one claimed run until it ends, waits, or the lease is lost; whatever
        #: happens, free its slot (unless cancelled by shutdown: then it is released).
        #: A partial, not a method: no coroutine frame of its own on every claimed run.
        self.run: Callable[[ClaimedItem, Lease], Coroutine[Any, Any, None]] = partial(
            self.guard, process=self._process
        )
        #: Call the user's function for an attempt (see saga._call), with this runner's
        #: hooks, lease length and rate limits.
        self.call_user: CallUser = partial(call_user, env=self)

    @property
    def hooks(self) -> Hooks:
        return self._hooks

    @property
    def outage(self) -> Outage:
        return self._outage

    @property
    def faults(self) -> FaultTarget:
        return self._faults

    def use_hooks(self, hooks: Hooks) -> None:
        """Fault injection attached to a running orchestrator (saga.testing)."""
        self._hooks = hooks
        self.writer.hooks = hooks

    async def guard(self, item: ClaimedItem, lease: Lease, process: Process) -> None:
        """Run ``process`` on a claimed item; a crash, a database outage or a bug of
        saga's ends it (the lease runs out), and its slot is freed. Then go on, in this
        task, with a run the transitions ending runs claimed along, if one is left."""
        while True:
            saga = self._sagas[(item.saga_name, item.saga_version)]
            finished = False
            try:
                await process(item, saga, lease)
                finished = True
            except SimulatedCrash:
                # saga.testing: behave as a dead worker would: write nothing, hold the
                # lease until it expires, and never release it.
                finished = True
                self.leases.died(lease)
                where = {"saga": item.saga_name, "step": item.step_name, "attempt": item.attempt}
                logger.warning("simulated_crash", **(where | lease.log_fields()))
            except DatabaseError as exc:
                finished = True  # the lease runs out and any worker takes the run again
                self._outage.lost("recording an outcome", exc)
            except BaseException as exc:
                if is_cancellation_by_saga(exc):
                    raise  # shutdown: the lease stays listed so it is released
                # A bug of saga's, or a cancel a step scheduled on this task (call_soon,
                # call_later) that landed after it returned: not a shutdown (no scope was
                # cancelled; the cancel is taken back). The lease runs out and the run is
                # retried, counting an attempt.
                finished = True
                lease.mark_lost()
                logger.error(
                    "internal_error",
                    run_id=str(item.run_id),
                    saga=item.saga_name,
                    step=item.step_name,
                    attempt=item.attempt,
                    error_type=exception_type(exc),
                    where=frames(exc),  # (never the message: it may quote a payload)
                )
            finally:
                if finished:
                    self.leases.finished(item, lease)
            taken = self.leases.take_over()
            if taken is None:
                return
            item, lease = taken
            process = self._process  # runs are claimed along only without graph sagas

    def active(self, item: ClaimedItem, saga: Saga[Any], lease: Lease) -> ActiveRun:
        """The claimed item as this worker drives it under ``lease``; an expired lease it
        took over is counted and logged."""
        if item.expired_owner is not None:
            self.telemetry.leases_expired.add(1, {SAGA: saga.name})
            logger.warning(
                "lease_expired",
                run_id=str(item.run_id),
                saga=saga.name,
                step=item.timed_out_wait or item.step_name,  # (a wait's on_timeout)
                attempt=item.attempt - 1,  # the attempt that expired (as in the history)
                previous_worker=item.expired_owner,
                worker=self.worker,  # the one taking it over
            )
        run = lease.active = claimed_run(item, saga)
        return run

    async def _process(self, item: ClaimedItem, saga: Saga[Any], lease: Lease) -> None:
        run = self.active(item, saga, lease)
        # One bound logger per claimed run: binding resolves structlog's configuration.
        log = logger.bind(run_id=str(run.id), saga=saga.name)
        try:
            await self._drive(run, lease, log)
        finally:
            self.end_attempt(run, Outcome.INTERRUPTED)  # crash, cancellation, db error

    def lease_for(self, run: ActiveRun) -> LeaseFor:
        """How the plan leases the next item to us: not while shutting down."""
        if self.leases.stopping:
            return None
        found = self._lease_fns.get(id(run.saga))
        if found is None:
            lengths = {s.name: s.lease_seconds or self.lease_seconds for s in run.saga.steps}
            found = self._lease_fns[id(run.saga)] = lengths.__getitem__
        return found

    async def _drive(self, run: ActiveRun, lease: Lease, log: Any) -> None:
        while True:
            change, completed_result = await self._attempt(run, lease, log)
            run.reclaimed = False  # the next item's start is logged by this transition
            if change is None:
                self.end_attempt(run, Outcome.LEASE_LOST)
                return  # lease lost while the step ran; another worker owns the run now
            # A transition that frees this slot claims the next due run with it.
            claim = None if change.leased else self.leases.along()
            written = await self.writer.write(
                run.id, lease, change, run.ctx, log, run.child, run.key_limit, claim
            )
            if written is None and change.unless_cancelled:
                change, written = await self._cancel_instead(run, lease, change, log)
            if written is None:
                self.refused(run, lease, log)
                return
            self._recorded(run, change, written, log)
            if not change.leased:  # (COMMITTED: its reply was lost, a signal may have come)
                due = change.due_in
                if due == 0 or (change.wait and (written is COMMITTED or written.signalled)):
                    self.leases.wake()
                if due is not None and 0 < due < math.inf:
                    self.leases.wake_later(due)
                return
            if written is COMMITTED:
                return  # committed, but the run has moved on since: nothing more for us
            assert change.step is not None  # leased its next item to us: go on in this task
            assert change.due_in is not None
            lease.moved_on(written.lease_token, change.due_in)
            if change.completed_step is not None:
                run.completed.append(change.completed_step)
                run.results[change.completed_step] = completed_result
                run.stored[change.completed_step] = change.result_json
            run.failed_forward |= change.error is not None
            run.status, run.step, run.attempt = change.status, change.step, change.attempt
            run.wait = None  # (past the wait whose timeout this task decided, if any)
            run.cancel_requested = written.cancel_requested

    def refused(self, run: ActiveRun, lease: Lease, log: Any) -> None:
        """The attempt's write was refused by its fence: another worker holds the item."""
        lease.mark_lost()
        self.telemetry.writes_refused.add(1, {SAGA: run.saga.name})
        self.end_attempt(run, Outcome.REFUSED)
        log.warning("stale_write_refused", step=run.wait or run.step, attempt=run.attempt)

    async def _cancel_instead(
        self, run: ActiveRun, lease: Lease, change: Transition, log: Any
    ) -> tuple[Transition, Written]:
        """A completion was refused: if for a cancel accepted while the last step ran,
        the rollback is written instead (else the lease was lost: nothing written)."""
        if not await self.writer.cancelled_meanwhile(run.id, lease):
            return change, None
        run.cancel_requested = True
        lease_for = self.lease_for(run)
        change = _plan.cancel_instead(run.saga, run.state(), change, lease_for)
        written = await self.writer.write(
            run.id, lease, change, run.ctx, log, run.child, run.key_limit
        )
        return change, written

    def _recorded(self, run: ActiveRun, change: Transition, written: Written, log: Any) -> None:
        """The attempt's outcome is in the database: close its span, count, log."""
        terminal = change.terminal
        self.end_attempt(run, run.outcome, change.status if terminal else None)
        if terminal:
            if written is COMMITTED or written is None:  # its reply was lost: from the claim
                age = time.perf_counter() - run.born
            else:
                age = written.age
            self.telemetry.run_ended(run.saga.name, change.status, age)
        log_events(log, change.events, (None, None, change.error))

    async def _attempt(
        self, run: ActiveRun, lease: Lease, log: Any
    ) -> tuple[Transition | None, Any]:
        """Run the current item; return the transition to record (None: lease lost).
        The plan is asked after the attempt for how to lease the next item: a shutdown
        that began meanwhile leases nothing more to us (it would be cut off)."""
        run.ctx = None
        lease_for = self.lease_for(run)
        state = run.state()
        skip = _plan.cancelled_before_start(run.saga, state, lease_for)
        if skip is not None and not await self.writer.lost_midway(run):
            return skip, None
        if run.status is _WAITING:
            assert run.wait is not None
            wait = run.saga.get_wait(run.wait)
            assert wait is not None
            skip = _plan.attempts_exhausted(run.saga, state, lease_for)
            if skip is not None:
                run.outcome, run.error_type = _FAILURE, "saga.AttemptLost"
                return skip, None
            ctx = self.context(run, wait.name, _STEP)
            with lease.attempt_scope(self.lease_seconds), in_run_trace(None, run.trace_parent):
                outcome, result = await timeout_result(wait, ctx, partial(self._encode, run), lease)
            return _plan.after_attempt(run.saga, state, outcome, self.lease_for(run)), result
        step = run.saga.get_step(run.step)
        skip = _plan.attempts_exhausted(run.saga, state, lease_for)
        if skip is not None:
            run.attempt -= 1  # the attempt lost fails; none starts
        self.open_attempt(run)
        if skip is not None:
            run.outcome, run.error_type = _FAILURE, "saga.AttemptLost"
            return skip, None
        if lease.lost or (run.reclaimed and not await self.writer.started(run, lease)):
            return None, None
        ctx = run.ctx = self.context(run, step.name, run.phase)
        called, result = await self.call_user(run, step, ctx, lease, _plan.policy(run.saga, state))
        if lease.scope.cancel_called:
            lease.mark_lost()
            log.warning(f"{run.phase}_cancelled_lease_lost", step=run.step, attempt=run.attempt)
            return None, None
        if called is None:  # cancelled while it waited for its rate limit: not started
            run.cancel_requested, run.outcome = True, Outcome.INTERRUPTED
            return _plan.cancelled_before_start(run.saga, run.state(), self.lease_for(run)), None
        return await self._settle(run, step, ctx, lease, state, called, result)

    async def _settle(
        self, run: ActiveRun, step: Step[Any, Any], ctx: Context[Any], lease: Lease,
        state: RunState, outcome: Succeeded | Failed, res: Any,
    ) -> tuple[Transition, Any]:  # fmt: skip
        """The step's function returned or raised: the transition that records it."""
        if isinstance(outcome, Succeeded):
            outcome, res = await self.checkpoint(run, step, ctx, outcome, res, lease)
        failure = outcome.error if isinstance(outcome, Failed) else outcome.park_error
        if failure is not None:  # (a sleep's until() failing fails the step's attempt)
            run.outcome, run.error_type = _FAILURE, str(failure["type"])
        if lease.cancel_requested and not run.cancel_requested:
            run.cancel_requested = True
            state = run.state()
        change = _plan.after_attempt(run.saga, state, outcome, self.lease_for(run))
        if change.retry:
            run.outcome = _RETRY
        return change, res
