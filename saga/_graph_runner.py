"""Running the items of graph runs: one item per task, on the linear runner's parts.

Each claimed item (a step or a compensation of a graph run) is run like a linear run's
item (same call, timeout, span, checkpoint, encoding), then its outcome is written with
the plan deciding under the run's lock (:meth:`Store.graph_write`). The items that write
leased to this worker (new branches, a join, compensations) start in tasks of their own,
so branches run concurrently here too, and on any other worker that claims them.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from saga import _graph_plan, _plan
from saga._active import ActiveRun
from saga._definition import Saga
from saga._errors import DatabaseError, error_record
from saga._graph_plan import Finished, GraphChange, Parked
from saga._held import Lease
from saga._lease import Leases
from saga._log import Cause, log_events, logger, needs_cause
from saga._model import EventKind, Outcome, Phase, RunStatus
from saga._runner import Runner
from saga._spawner import Children
from saga._store_children import ClaimLost, ParentClaim
from saga._store_graph import GraphWritten
from saga._telemetry import in_run_trace
from saga._transition import ClaimedItem, Event, Failed, RunState, Succeeded
from saga._write import COMMITTED

_STEP = Phase.STEP
_LOST = object()  # the lease was lost while the item ran: nothing is written
# The events of a run's end, by the state it is counted in (saga.runs.<status>), as the
# runner's writes do.
_ENDED_BY = {
    str(EventKind.ended(status)): status
    for status in (RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.CANCELLED,
                   RunStatus.FAILED, RunStatus.STOPPED)
}  # fmt: skip


class GraphRunner:
    """Runs graph items; hands linear runs to the linear runner."""

    def __init__(self, runner: Runner, leases: Leases, children: Children) -> None:
        self._runner = runner
        self._leases = leases
        self._children = children

    async def run(self, item: ClaimedItem, lease: Lease) -> None:
        """The claim loop's handler: a graph item here, a linear run to the runner."""
        if item.phase is None:
            await self._runner.run(item, lease)
        else:
            await self._runner.guard(item, lease, self._process)

    async def _process(self, item: ClaimedItem, saga: Saga[Any], lease: Lease) -> None:
        runner = self._runner
        run = runner.active(item, saga, lease)
        if item.phase is Phase.COMPENSATION:
            run.status = RunStatus.COMPENSATING
        elif run.status is RunStatus.COMPENSATING:
            run.status = RunStatus.RUNNING  # a branch finishing while the run rolls back
        log = logger.bind(run_id=str(run.id), saga=saga.name)
        try:
            await self._item(item, run, lease, log)
        finally:
            runner.end_attempt(run, Outcome.INTERRUPTED)  # crash, cancellation, db error

    async def _item(self, item: ClaimedItem, run: ActiveRun, lease: Lease, log: Any) -> None:
        runner = self._runner
        spawns = run.saga.get_step(run.step).spawn is not None
        # A step of a run rolling back does not start, but one whose attempt began and
        # was lost (its worker died, or shut down past shutdown_timeout) runs again.
        dropping = item.dropping and not await runner.writer.lost_midway(run)
        if dropping and not spawns:
            outcome: object = None
        else:
            outcome = await self._attempt(run, lease, dropping)
        if outcome is None or isinstance(outcome, Succeeded | Failed | Parked):
            undo = dropping and spawns
            done = Finished(run.step, run.phase, run.attempt, outcome, undo)
        else:  # _LOST
            runner.end_attempt(run, Outcome.LEASE_LOST)
            return
        # The free slots are this write's until what it leased is held (the claim loop
        # would lease into them meanwhile); this item's own slot is free once written.
        extra = self._leases.reserve(_may_lease(run.saga, done))
        try:
            await self._write(item, run, lease, done, extra + 1, log)
        finally:
            self._leases.unreserve(extra)

    async def _write(
        self, item: ClaimedItem, run: ActiveRun, lease: Lease, done: Finished, slots: int, log: Any
    ) -> None:
        """Write the item's outcome, leasing up to ``slots`` ready items to this worker."""
        runner = self._runner
        lease_for = runner.lease_for(run)
        decide = partial(
            _graph_plan.after_item, run.saga, done=done, lease_for=lease_for, slots=slots
        )
        first = _first_event(done)
        key = lease.item_key
        written = await runner.writer.write_graph(key, lease, decide, first, run.ctx, log)
        if written is None:
            runner.refused(run, lease, log)
            return
        if written is COMMITTED:  # its reply was lost: what it recorded is read back
            await self._recorded_unseen(run, first, log)
            self._leases.wake()  # (it may have parked a step whose children ended meanwhile)
            await self._carry_on(run, first)
            return
        change, result = written
        await self._recorded(run, change, result, log)
        for step, new_phase, token in result.leased:
            self._adopt(item, run, change, result, step, new_phase, token)

    async def _recorded_unseen(self, run: ActiveRun, first: Event | None, log: Any) -> None:
        """An uncertain write committed: what it recorded, read back from the history,
        closes the item's span, counts and logs as its reply would have (the run's end
        timed by the database clock, as a reply's). A dropped item's write has no event
        of its own: only its run's end, if it ended the run. Unreadable: only the span
        closes."""
        runner = self._runner
        store, worker = runner.store, runner.worker
        try:
            if first is None:
                events = await store.dropped_write_events(run.id, worker)
            else:
                events = await store.write_events(
                    run.id, str(first.kind), first.step, first.attempt, worker
                )
            ended = next((_ENDED_BY[e.kind] for e in events if e.kind in _ENDED_BY), None)
            row = None if ended is None else await store.get_run(run.id)
            cause: Cause = (None, None, None)
            if needs_cause(events, None):  # (the run failed in an earlier write)
                cause = await self._last_failure(run)
        except DatabaseError:  # counted by no one: the run itself goes on all the same
            runner.end_attempt(run, run.outcome)
            return
        retry_in = events[0].data.get("retry_in") if events else None
        if isinstance(retry_in, int | float) and retry_in < math.inf:
            run.outcome = Outcome.RETRY
            self._leases.wake_later(retry_in)
        runner.end_attempt(run, run.outcome, ended)
        if ended is not None and row is not None:
            end = next(e.at for e in events if e.kind in _ENDED_BY)
            age = (end - row.info.created_at).total_seconds()
            runner.telemetry.run_ended(run.saga.name, ended, age)
        log_events(log, events, cause)

    async def _attempt(self, run: ActiveRun, lease: Lease, dropping: bool) -> object:
        """Run the item: its outcome (None: a children step dropped, its children
        undone), or ``_LOST``."""
        runner = self._runner
        step = run.saga.get_step(run.step)
        rule = _plan.policy(run.saga, RunState(run.status, run.step, run.attempt))
        lost = run.attempt > rule.max_attempts  # the last attempt's worker died: none left
        if lost:
            run.attempt -= 1  # the attempt lost fails; none starts
        runner.open_attempt(run)
        spawns = step.spawn is not None and run.phase is _STEP
        if lost and spawns and dropping:
            # Dropped in a rollback: it undoes its children, as any dropped children step.
            run.ctx = runner.context(run, step.name, run.phase)
            return await self._spawn(run, step, run.ctx, lease, dropping)
        if lost:
            run.outcome, run.error_type = Outcome.FAILURE, "saga.AttemptLost"
            failed = Failed(_plan.attempt_lost(run.step, run.attempt + 1), retryable=False)
            return await self._undo_lost(run, step, lease, failed) if spawns else failed
        run.reclaimed = run.reclaimed and not dropping  # (a dropped item does not start)
        if lease.lost or (run.reclaimed and not await runner.writer.started(run, lease)):
            return _LOST
        ctx = runner.context(run, step.name, run.phase)
        run.ctx = ctx
        if step.spawn is not None:
            return await self._spawn(run, step, ctx, lease, dropping)
        outcome, result = await runner.call_user(run, step, ctx, lease, rule)
        if lease.scope.cancel_called:
            lease.mark_lost()
            return _LOST
        if outcome is None:  # cancelled while it waited for its rate limit: not started
            run.outcome = Outcome.INTERRUPTED
            return None
        if isinstance(outcome, Succeeded):
            outcome, _ = await runner.checkpoint(run, step, ctx, outcome, result, lease)
        if isinstance(outcome, Failed):
            run.outcome, run.error_type = Outcome.FAILURE, str(outcome.error["type"])
        return outcome

    async def _undo_lost(self, run: ActiveRun, step: Any, lease: Lease, failed: Failed) -> object:
        """A children step whose last attempt's worker died fails, once the children its
        attempts started are undone (as any failure of the step undoes them first)."""
        assert run.span is not None
        with lease.attempt_scope(self._runner.lease_seconds), in_run_trace(run.span, None):
            undone = await self._children.undo(run.id, step)
        if lease.scope.cancel_called:
            lease.mark_lost()
            return _LOST
        if isinstance(undone, Parked):  # (each wake-up's claim is this lost attempt again)
            run.outcome = Outcome.PARKED
            return Parked(undone.ended, undone.of, False, lost=True)
        stuck = undone.error if isinstance(undone, Failed) else None
        return Failed(failed.error, retryable=False, undo_error=stuck)

    async def _spawn(
        self, run: ActiveRun, step: Any, ctx: Any, lease: Lease, dropping: bool
    ) -> object:
        """A children step: start or look at its children (forward), or undo them
        (compensation, or dropped during a rollback)."""
        runner = self._runner
        assert run.span is not None
        # The attempt's span is current: the children's start spans are its children,
        # so each child run is in its parent's trace (and sampled with it).
        with lease.attempt_scope(runner.lease_seconds), in_run_trace(run.span, None):
            try:
                await runner.hooks.before_call(ctx, runner.faults)
            except Exception as exc:  # saga.testing's injected failures
                rule = _plan.policy(run.saga, RunState(run.status, run.step, run.attempt))
                return Failed(error_record(exc, step.name), rule.retryable(exc))
            if run.phase is _STEP and not dropping:
                claim = ParentClaim(run.id, step.name, lease.token, runner.worker)
                rule = _plan.policy(run.saga, RunState(run.status, run.step, run.attempt))
                final = run.attempt >= rule.max_attempts and rule.on_give_up != "stop"
                try:
                    outcome = await self._children.forward(claim, step, ctx, final)
                except ClaimLost:
                    lease.mark_lost()
                    return _LOST
            else:
                outcome = await self._children.undo(run.id, step)
                if dropping and isinstance(outcome, Succeeded):
                    outcome = None  # undone: the step is dropped like any other
            await runner.hooks.before_checkpoint(ctx)
        if lease.scope.cancel_called:
            lease.mark_lost()
            return _LOST
        if isinstance(outcome, Parked):
            run.outcome = Outcome.PARKED
        elif isinstance(outcome, Failed):
            run.outcome, run.error_type = Outcome.FAILURE, str(outcome.error["type"])
        return outcome

    async def _recorded(
        self, run: ActiveRun, change: GraphChange, written: GraphWritten, log: Any
    ) -> None:
        """The item's outcome is in the database: close its span, count, log."""
        runner = self._runner
        if change.retry_in is not None and change.retry_in < math.inf:
            run.outcome = Outcome.RETRY
            self._leases.wake_later(change.retry_in)
        elif change.retry_in is not None:
            # Parked: a child that ended while this ran left the item due now, and its
            # notification came before the item was claimable: claim again.
            self._leases.wake()
        terminal = change.terminal
        runner.end_attempt(run, run.outcome, change.status if terminal else None)
        if terminal:
            runner.telemetry.run_ended(run.saga.name, change.status, written.age)
        if any(n.lease_seconds is None for n in change.new):
            self._leases.wake()
        cause: Cause = (None, None, change.error)
        if needs_cause(change.events, change.error):  # (the run failed in an earlier write)
            cause = await self._last_failure(run)
        log_events(log, change.events, cause)

    async def _last_failure(self, run: ActiveRun) -> Cause:
        """The run's latest failure in its history (for the line of a run that now
        waits for an operator); unknown if the history cannot be read."""
        try:
            return await self._runner.store.last_failure(run.id)
        except DatabaseError:
            return (None, None, None)

    def _adopt(
        self,
        item: ClaimedItem,
        run: ActiveRun,
        change: GraphChange,
        written: GraphWritten,
        step: str,
        phase: Phase,
        token: int,
    ) -> None:
        """Start an item the write leased to this worker, in a task of its own."""
        new = ClaimedItem(
            run_id=item.run_id,
            saga_name=item.saga_name,
            saga_version=item.saga_version,
            status=change.status,
            step_name=step,
            attempt=1,
            lease_token=token,
            input=item.input,
            results=written.results,
            completed_steps=written.completed,
            cancel_requested=False,
            has_error=item.has_error or change.error is not None,
            trace_context=item.trace_context,
            age=written.age,  # (the run's, by the database clock, at this write)
            expired_owner=None,
            phase=phase,
        )
        seconds = run.saga.get_step(step).lease_seconds or self._runner.lease_seconds
        self._leases.adopt(new, Lease(item.run_id, token, seconds, item=(step, phase)))

    async def _carry_on(self, run: ActiveRun, first: Event | None) -> None:
        """An uncertain write committed: the items it leased here go on, as claimed
        (those of the write beginning with ``first``; a dropped item's write has no
        event of its own: every item leased here not held yet)."""
        held = {lease.key for lease in self._leases.inflight.values()}
        by = None if first is None else (str(first.kind), first.step, first.attempt)
        store, worker = self._runner.store, self._runner.worker
        for item in await store.items_leased_to(run.id, worker, by):
            assert item.phase is not None
            if (item.run_id, item.step_name, item.phase) in held:
                continue
            seconds = run.saga.get_step(item.step_name).lease_seconds
            lease = Lease(
                item.run_id,
                item.lease_token,
                seconds or self._runner.lease_seconds,
                item=(item.step_name, item.phase),
            )
            self._leases.adopt(item, lease)


def _may_lease(saga: Saga[Any], done: Finished) -> int:
    """How many items the write of ``done`` may lease at most: a step's dependents, a
    compensation's dependencies; a failure or a drop, any (a rollback starts)."""
    graph = saga.graph
    assert graph is not None
    if isinstance(done.outcome, Succeeded) and not done.undo:
        deps = graph.dependents if done.phase is _STEP else graph.deps
        return len(deps[done.step])
    return len(graph.order)


def _first_event(done: Finished) -> Event | None:
    """The event an item's write begins with (its outcome), which tells an uncertain
    write's fate; None for an item that did not run."""
    if done.outcome is None:
        return None
    if isinstance(done.outcome, Parked):
        return Event(EventKind.CHILDREN_WAITING, done.step, done.attempt)
    if done.undo and isinstance(done.outcome, Failed):
        return Event(EventKind.COMPENSATION_FAILED, done.step, done.attempt)
    kind = EventKind.completed if isinstance(done.outcome, Succeeded) else EventKind.failed
    return Event(kind(done.phase), done.step, done.attempt)
