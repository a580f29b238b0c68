"""The state machine of graph runs: from a run's state (read under its row lock) and how
one item went, the change to write.

Pure, like the linear plan (:mod:`saga._plan`), whose retry and attempt rules it shares.
The store calls :func:`after_item` inside the transaction that holds the run row, so two
branches finishing at once are decided one after the other: the last one to finish sees
every dependency of a join completed and creates the join's item, once. The rules:

- A step that completes records its result; every step whose dependencies have all
  completed becomes an item (``step_ready``), leased to this worker while it has free
  slots, else due now for any worker. When every step completed, the run completes.
- A step that fails is retried after a backoff while attempts and the error allow it,
  unless the run is rolling back or a cancel was requested. A step that fails for good,
  or a cancel, starts the rollback: no new step starts (the items not running are
  dropped), the items running finish their attempt (a step that completes then is
  compensated too).
- Compensations run in reverse dependency order: a completed step's compensation starts
  once every step that runs after it is settled: never ran, or undone (compensated, or
  without compensation and itself settled). Independent compensations run concurrently.
- Once the pivot step (if any) completed, a step that fails for good stops the run for
  an operator instead: no new step starts, the running ones finish, then ``stopped``.
  So does a step whose retry policy says ``on_give_up="stop"``.
- A compensation that fails is retried likewise; when it gives up, no new compensation
  starts and, once the running items finished, the run is ``failed`` for an operator.
  When nothing is left to undo and nothing runs, the run ends ``compensated`` (a step
  failed) or ``cancelled``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from saga._graph import Graph
from saga._model import EventKind, Phase, RunStatus
from saga._plan import policy
from saga._transition import Event, Failed, RunState, Succeeded, value

if TYPE_CHECKING:
    from saga._definition import Saga

_STEP = Phase.STEP
_COMPENSATION = Phase.COMPENSATION
_COMPENSATING = RunStatus.COMPENSATING


@value
class Item:
    """One item of a graph run, as the locked read sees it."""

    step: str
    phase: Phase
    leased: bool  # a worker holds it (or held it: an expired lease is still running)


@value
class GraphRun:
    """A graph run's state, read under its row lock."""

    status: RunStatus
    completed: tuple[str, ...]
    compensated: tuple[str, ...]
    results: Mapping[str, str]  # completed step -> result JSON text
    cancel_requested: bool
    failed_forward: bool  # a step failed for good: the rollback ends compensated
    compensation_failed: bool  # a compensation gave up: no new one starts
    items: tuple[Item, ...]
    failed_step: str | None = None  # the step of the run's error (failed_forward)


@value
class NewItem:
    step: str
    phase: Phase
    lease_seconds: float | None  # leased to this worker for that long; None: due now


@value
class GraphChange:
    """What one finished item changes, written in the transaction that read the run."""

    status: RunStatus
    events: tuple[Event, ...]
    completed_step: str | None = None
    result_json: str | None = None
    compensated_step: str | None = None
    output_json: str | None = None
    error: Mapping[str, Any] | None = None
    compensation_error: Mapping[str, Any] | None = None
    retry_in: float | None = None  # the item stays, unleased, due in this many seconds
    # Parked (retry_in infinite) but due now: a children step that parked while its run
    # rolls back is claimed again at once, to undo its children.
    undo_now: bool = False
    # Parked by a step whose last attempt was lost (undoing its children before it
    # fails): its wake-ups are that lost attempt again, not attempts that start.
    lost: bool = False
    dropped: tuple[tuple[str, Phase], ...] = ()  # other items deleted (not running)
    new: tuple[NewItem, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.status.is_terminal


@value
class Parked:
    """A step waiting for its child runs: ``ended`` of ``of`` have ended (``started``:
    this attempt started them). Its item gives its slot back until one ends."""

    ended: int
    of: int
    started: bool
    lost: bool = False  # undoing the children of a step whose last attempt was lost
    # Undoing the children of a step failing for good with this error (its wake-ups
    # apply it once they are undone; see saga._spawner).
    failing: Mapping[str, Any] | None = None


@value
class Finished:
    """The item that ended: its step, phase and attempt, and how it went (None: it did
    not run, the run rolling back)."""

    step: str
    phase: Phase
    attempt: int
    outcome: Succeeded | Failed | Parked | None
    # A children step dropped in a rollback: it undid its children instead of running
    # (failing to undo them is a compensation that gave up: the run ends failed).
    undo: bool = False


def after_item(
    saga: Saga[Any],
    run: GraphRun,
    done: Finished,
    lease_for: Callable[[str], float] | None,
    slots: int,
    rand: Callable[[], float] = random.random,
) -> GraphChange:
    """The change that records ``done``; up to ``slots`` new items are leased to this
    worker (``lease_for`` gives their lease; None: none is)."""
    graph = saga.graph
    assert graph is not None
    if isinstance(done.outcome, Parked):
        parked = done.outcome
        data: dict[str, Any] = {"ended": parked.ended, "of": parked.of, "started": parked.started}
        if parked.failing is not None:
            data["failing"] = dict(parked.failing)
        event = Event(EventKind.CHILDREN_WAITING, done.step, done.attempt, data)
        # Rolling back (cancelled, or a step failed for good) while this attempt started
        # or looked at the children (not undoing them): parked, so the rollback counts it
        # as a step that ran (it never drops it as unstarted), but due again at once: its
        # next claim undoes the children, rather than parked until one of them ends
        # (which a stopped child never does by itself, and a running one only once it
        # ran on).
        rolling = run.cancel_requested or run.status is _COMPENSATING
        undo_now = done.phase is _STEP and not done.undo and rolling
        return GraphChange(
            status=run.status,
            events=(event,),
            retry_in=math.inf,
            undo_now=undo_now,
            lost=parked.lost,
        )
    retry = _retry(saga, run, done, rand)
    if retry is not None:
        return retry
    b = _Builder(saga, run, done)
    if done.phase is _STEP:
        b.step_outcome(graph)
    else:
        b.compensation_outcome()
    if b.status is _COMPENSATING:
        b.compensate(saga, graph)
    else:
        b.go_on(graph)
    return b.change(graph, lease_for, slots)


def _retry(
    saga: Saga[Any], run: GraphRun, done: Finished, rand: Callable[[], float]
) -> GraphChange | None:
    outcome = done.outcome
    if not isinstance(outcome, Failed) or not outcome.retryable:
        return None
    forward = done.phase is _STEP
    if forward and (run.status is _COMPENSATING or run.cancel_requested):
        return None  # rolling back: no step is retried
    status = _COMPENSATING if not forward else RunStatus.RUNNING
    rule = policy(saga, RunState(status, done.step, done.attempt))
    if done.attempt >= rule.max_attempts:
        return None
    delay = rule.delay(done.attempt, rand)
    data = {"error": outcome.error, "retry_in": delay}
    event = Event(EventKind.failed(done.phase), done.step, done.attempt, data)
    return GraphChange(status=run.status, events=(event,), retry_in=delay)


class _Builder:
    """The change being built for one finished item."""

    def __init__(self, saga: Saga[Any], run: GraphRun, done: Finished) -> None:
        self.saga = saga
        self.run = run
        self.done = done
        self.status = run.status
        self.events: list[Event] = []
        self.completed = set(run.completed)
        self.compensated = set(run.compensated)
        # The items left once this one is gone (it is always deleted, or retried above).
        self.items = {(i.step, i.phase): i for i in run.items}
        self.items.pop((done.step, done.phase), None)
        self.error: Mapping[str, Any] | None = None
        self.compensation_error: Mapping[str, Any] | None = None
        self.completed_step: str | None = None
        self.result_json: str | None = None
        self.compensated_step: str | None = None
        self.output_json: str | None = None
        self.dropped: list[tuple[str, Phase]] = []
        self.ready: list[tuple[str, Phase]] = []

    def step_outcome(self, graph: Graph) -> None:
        done, outcome = self.done, self.done.outcome
        if done.undo and isinstance(outcome, Failed):
            data = {"error": outcome.error}
            self.events.append(Event(EventKind.COMPENSATION_FAILED, done.step, done.attempt, data))
            self.compensation_error = outcome.error
        elif isinstance(outcome, Succeeded):
            self.events.append(Event(EventKind.STEP_COMPLETED, done.step, done.attempt))
            self.completed.add(done.step)
            self.completed_step, self.result_json = done.step, outcome.result_json
        elif isinstance(outcome, Failed):
            data = {"error": outcome.error}
            self.events.append(Event(EventKind.STEP_FAILED, done.step, done.attempt, data))
            if outcome.undo_error is not None:  # its other children could not be undone
                undo = {"error": outcome.undo_error}
                event = Event(EventKind.COMPENSATION_FAILED, done.step, done.attempt, undo)
                self.events.append(event)
                self.compensation_error = outcome.undo_error
            # A cancel pending: no retry (_retry), and the rollback is the cancel's.
            cancelled = self.run.cancel_requested and outcome.retryable
            if self.status is not _COMPENSATING and not cancelled:
                self.error = outcome.error
        if self.halted:
            # Past the pivot, or the step's policy stops: no rollback, and no new step
            # starts (those ready, not started, go: the run's retry() makes them ready
            # again); the run stops once nothing runs.
            self._drop_unstarted()
            return
        if self.status is not _COMPENSATING and (self.error or self.run.cancel_requested):
            self._start_rollback(graph)

    def _drop_unstarted(self) -> None:
        for key, item in list(self.items.items()):
            if item.phase is _STEP and not item.leased:
                self.dropped.append(key)
                del self.items[key]

    def _start_rollback(self, graph: Graph) -> None:
        self.status = _COMPENSATING
        self._drop_unstarted()
        plan = [s for s in reversed(graph.order) if s in self.completed]
        reason = "failure" if self.error else "cancel"
        self.events.append(Event(EventKind.RUN_COMPENSATING, data={"plan": plan, "reason": reason}))

    def compensation_outcome(self) -> None:
        done, outcome = self.done, self.done.outcome
        if isinstance(outcome, Failed):
            data = {"error": outcome.error}
            self.events.append(Event(EventKind.COMPENSATION_FAILED, done.step, done.attempt, data))
            self.compensation_error = outcome.error
            return
        self.events.append(Event(EventKind.COMPENSATION_COMPLETED, done.step, done.attempt))
        self.compensated.add(done.step)
        self.compensated_step = done.step

    @property
    def halted(self) -> bool:
        """A step failed for good past the pivot, or its policy stops when it gives up:
        nothing new starts, and the run stops for an operator once nothing runs."""
        if self.status is _COMPENSATING or self.run.cancel_requested:
            return False
        if self.run.failed_forward:
            return True  # stopping already: a failure that did not start the rollback
        if self.error is None:
            return False
        pivot = self.saga.pivot
        if pivot is not None and pivot in self.completed:
            return True
        return self.saga.get_step(self.done.step).retry.on_give_up == "stop"

    def go_on(self, graph: Graph) -> None:
        if self.halted:
            if not self.items:
                self.status = RunStatus.STOPPED
                # At the step that gave up (the branch ending last may be another).
                step = self.error["step"] if self.error else self.run.failed_step
                step = step or self.done.step
                pivot = self.saga.pivot
                past = pivot is not None and pivot in self.completed
                data: dict[str, Any] = {"pivot": pivot} if past else {"on_give_up": "stop"}
                # The steps the run's retry() starts again (the one that gave up too).
                ready = graph.ready(self.completed, set())
                data["held"] = [{"step": s, "after": list(graph.deps[s])} for s in ready]
                self.events.append(Event(EventKind.RUN_STOPPED, step, data=data))
            return
        taken = {step for step, phase in self.items if phase is _STEP}
        for step in graph.ready(self.completed, taken):
            self.ready.append((step, _STEP))
        if not self.items and not self.ready and len(self.completed) == len(graph.order):
            self.status = RunStatus.COMPLETED
            self.output_json = _output(graph, {**self.run.results, **self._new_result()})
            self.events.append(Event(EventKind.RUN_COMPLETED))

    def _new_result(self) -> dict[str, str]:
        if self.completed_step is None or self.result_json is None:
            return {}
        return {self.completed_step: self.result_json}

    def compensate(self, saga: Saga[Any], graph: Graph) -> None:
        if not (self.run.compensation_failed or self.compensation_error):
            running = {step for step, phase in self.items if phase is _STEP}
            queued = {step for step, phase in self.items if phase is _COMPENSATION}
            ready = graph.undo_ready(saga.undoes, self.completed, self.compensated, running)
            for step in ready:
                if step not in queued:
                    self.ready.append((step, _COMPENSATION))
        if self.items or self.ready:
            return
        if self.run.compensation_failed or self.compensation_error:
            self.status = RunStatus.FAILED
        elif self.run.failed_forward or self.error:
            self.status = RunStatus.COMPENSATED
        else:
            self.status = RunStatus.CANCELLED
        data = None
        if self.status is RunStatus.FAILED:  # what the run's retry() starts again
            held = graph.undo_ready(saga.undoes, self.completed, self.compensated, set())
            data = {"held": [{"step": step} for step in held]}
        self.events.append(Event(EventKind.ended(self.status), data=data))

    def change(
        self, graph: Graph, lease_for: Callable[[str], float] | None, slots: int
    ) -> GraphChange:
        new: list[NewItem] = []
        for step, phase in self.ready:
            seconds = None
            if lease_for is not None and len(new) < slots:  # the first ones are ours
                seconds = lease_for(step)
            new.append(NewItem(step, phase, seconds))
        return GraphChange(
            status=self.status,
            events=(*self.events, *_ready_events(graph, new)),
            completed_step=self.completed_step,
            result_json=self.result_json,
            compensated_step=self.compensated_step,
            output_json=self.output_json,
            error=self.error,
            compensation_error=self.compensation_error,
            dropped=tuple(self.dropped),
            new=tuple(new),
        )


def _ready_events(graph: Graph, new: list[NewItem]) -> list[Event]:
    """A step is ready after its dependencies (the timeline shows which); a new item
    leased to this worker starts now (attempt 1), one due now when a claim takes it."""
    events = []
    for item in new:
        if item.phase is _STEP:
            after = list(graph.deps[item.step])
            events.append(Event(EventKind.STEP_READY, item.step, data={"after": after}))
        if item.lease_seconds is not None:
            events.append(Event(EventKind.started(item.phase), item.step, 1))
    return events


def _output(graph: Graph, results: Mapping[str, str]) -> str:
    """A completed run's output: its one final step's result, or an object of its final
    steps' results by name."""
    if len(graph.sinks) == 1:
        return results[graph.sinks[0]]
    return "{" + ",".join(f"{json.dumps(s)}:{results[s]}" for s in graph.sinks) + "}"
