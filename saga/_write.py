"""Writing a transition through connection errors, never guessing its fate.

A write whose connection broke may or may not have committed. Replaying it is safe (the
fence of lease token and owner refuses a second application), and when the replay is
refused the history is read to tell "it committed" from "the lease was lost".
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import anyio

from saga._active import ActiveRun
from saga._context import Context
from saga._db import unreachable
from saga._errors import DatabaseError
from saga._graph_plan import GraphChange, GraphRun
from saga._held import Lease
from saga._hooks import Hooks
from saga._log import Outage
from saga._model import EventKind, RunStatus
from saga._store import Store, TransitionResult
from saga._store_batch import ClaimAlong
from saga._store_graph import GraphWritten, ItemKey
from saga._transition import Event, Transition

T = TypeVar("T")


class _Committed(enum.Enum):
    """An uncertain write turned out committed, and the run has moved on since."""

    COMMITTED = "committed"


COMMITTED = _Committed.COMMITTED
Written = TransitionResult | _Committed | None

# Waits between attempts to write a transition through connection errors (seconds).
_RETRY_DELAYS = (0.05, 0.25, 1.0, 3.0)
# Then, while the database cannot be reached, one more attempt every this many seconds
# for as long as it takes: the worker holds the attempt's outcome, and giving it up
# would charge the attempt for an outage (a step with one attempt would roll back).
_AWAY_DELAY = 2.0


class Writer:
    def __init__(self, store: Store, worker_id: str, hooks: Hooks, outage: Outage) -> None:
        self._store = store
        self._worker = worker_id
        self.hooks = hooks
        self._outage = outage

    async def write(
        self,
        run_id: UUID,
        lease: Lease,
        change: Transition,
        ctx: Context[Any] | None,
        log: Any,
        child: bool = False,
        key_limit: int | None = None,
        claim: ClaimAlong | None = None,
    ) -> Written:
        """Apply ``change``: its result, ``COMMITTED`` (an uncertain write that committed,
        the run moved on since), or None (refused: lease lost, or cancelled meanwhile).
        ``child``: the run is a child run (its end wakes its parent's step); ``key_limit``:
        it holds a concurrency key, of this limit (its end frees the slot); ``claim``:
        claim the next due run with it (see ``Store.transition``)."""
        # A partial, not a closure: one coroutine frame less on every step's write.
        attempt = partial(
            self._store.transition,
            self._worker,
            run_id,
            lease.token,
            change,
            child,
            key_limit,
            claim,
        )
        lease.writing = True  # (until the lease moves on, or goes)
        try:
            written = await (attempt() if ctx is None else self.hooks.write(ctx, attempt))
        except DatabaseError as exc:
            written = await self._after_error(attempt, ctx, exc)
            return written if written is not None else await self._resolve(run_id, change, log)
        self._outage.back()
        return written

    async def started(self, run: ActiveRun, lease: Lease) -> bool:
        """An attempt claimed after an expired lease or a release logs its start (the
        claim did not: the attempt lost, or given back a second time, may have been the
        last one allowed, and then none starts);
        whether the lease still holds. Other attempts: True, nothing to do."""
        if not run.reclaimed:
            return True
        run.reclaimed = False
        event = Event(EventKind.started(run.phase), run.step, run.attempt)
        phase = None if lease.item is None else lease.item[1]
        attempt = partial(self._store.started, self._worker, run.id, lease.token, event, phase)
        try:
            held = await attempt()
        except DatabaseError as exc:
            return await self._after_error(attempt, None, exc)
        self._outage.back()
        return held

    async def lost_midway(self, run: ActiveRun) -> bool:
        """Whether the attempt this claim took over (after an expired lease or a
        release: ``reclaimed``) had begun running its (forward, not children) step and
        recorded no outcome: it may have had effects, so a run rolling back runs that
        step again (and compensates it if it completes) rather than dropping it. False
        for any other claim."""
        if not run.reclaimed or run.status is RunStatus.WAITING:
            return False
        step = next((s for s in run.saga.steps if s.name == run.step), None)
        if step is None or step.spawn is not None:
            return False
        attempt = partial(self._store.attempt_began, run.id, run.step)
        try:
            began = await attempt()
        except DatabaseError as exc:
            began = await self._after_error(attempt, None, exc)
        self._outage.back()
        run.finishing = began
        return began

    async def write_graph(
        self,
        key: ItemKey,
        lease: Lease,
        decide: Callable[[GraphRun], GraphChange],
        first: Event | None,
        ctx: Context[Any] | None,
        log: Any,
    ) -> tuple[GraphChange, GraphWritten] | _Committed | None:
        """Apply a graph item's outcome (``decide`` runs under the run's lock):
        ``COMMITTED`` when an uncertain write turned out committed (``first`` is the
        event it begins with; None: it has none of its own (a dropped item), and its
        item's row being gone tells)."""
        attempt = partial(self._store.graph_write, self._worker, key, lease.token, decide)
        lease.writing = True  # (until the lease moves on, or goes)
        try:
            written = await (attempt() if ctx is None else self.hooks.write(ctx, attempt))
        except DatabaseError as exc:
            written = await self._after_error(attempt, ctx, exc)
            if written is not None:
                return written
            if first is None:  # (an item dropped: no event of its own) its row tells
                committed = await self._store.item_lease(key) is None
                where: dict[str, Any] = {"step": key[1]}
            else:
                committed = await self._store.has_event(
                    key[0], str(first.kind), first.step, first.attempt, self._worker
                )
                where = {"step": first.step, "attempt": first.attempt}
            log.info("ambiguous_commit_resolved", committed=committed, **where)
            return COMMITTED if committed else None
        self._outage.back()
        return written

    async def _after_error(
        self, attempt: Callable[[], Awaitable[T]], ctx: Context[Any] | None, exc: DatabaseError
    ) -> T:
        """A write (fenced: replaying it is safe) broke its connection, so it may have
        committed unseen: try again after each delay until it gets an answer (the
        caller resolves a refusal from the history), or raise the last error. While the
        database cannot be reached at all, go on trying every ``_AWAY_DELAY`` seconds:
        once it is back the write lands, or its fence says another worker took over."""
        delays = iter(_RETRY_DELAYS)
        while True:
            delay = next(delays, None)
            if delay is None:
                if not unreachable(exc):
                    raise exc
                delay = _AWAY_DELAY
            self._outage.lost("recording an outcome", exc)
            await anyio.sleep(delay)
            try:
                written = await (attempt() if ctx is None else self.hooks.write(ctx, attempt))
            except DatabaseError as again:
                exc = again
                continue
            self._outage.back()
            return written

    async def _resolve(self, run_id: UUID, change: Transition, log: Any) -> Written:
        """After an uncertain write was refused on replay: did the first one commit?

        The history answers exactly (an attempt writes its outcome once). If it committed
        and leased the run's next item to us, and nothing moved since, carry on holding it.
        """
        first = change.events[0]
        committed = await self._store.has_event(
            run_id, str(first.kind), first.step, first.attempt, self._worker
        )
        where = {"step": first.step, "attempt": first.attempt}
        log.info("ambiguous_commit_resolved", committed=committed, **where)
        if not committed:
            return None
        if change.leased:
            row = await self._store.get_run(run_id)
            if (
                row is not None
                and row.info.worker == self._worker
                and row.info.status is change.status
                and row.info.step == change.step
                and row.info.attempt == change.attempt
            ):
                return TransitionResult(row.lease_token, row.info.cancel_requested)
        return COMMITTED

    async def cancelled_meanwhile(self, run_id: UUID, lease: Lease) -> bool:
        """Whether a refused completion was refused for a cancel, the lease still ours."""
        row = await self._store.get_run(run_id)
        return (
            row is not None
            and row.info.cancel_requested
            and row.info.worker == self._worker
            and row.lease_token == lease.token
            and not row.info.status.is_terminal
        )
