"""An orchestrator's scheduler loop: start one run per due slot of its schedules.

On open, an orchestrator registers its schedules (their rows are updated from the code;
a paused one stays paused). Then, until it closes, it sleeps until the first of them is
due (at most ``poll`` seconds: another orchestrator may have moved them, or an operator
resumed one), and handles the due ones: in one transaction it locks each due row (``FOR
UPDATE SKIP LOCKED``: one orchestrator at a time), starts the runs of its slots (the
missed policy decides which), and moves its next slot. A slot's run has the idempotency
key ``schedule:<name>:<slot>``, so even a transaction replayed after an uncertain commit
starts it once: a slot never starts two runs, and, as long as one orchestrator holding
the schedule is up, every slot is handled.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pydantic import BaseModel

from saga._aio import Threads, is_cancellation_by_saga, own_cancel_settled, time_limit
from saga._db import unreachable
from saga._errors import DatabaseError, exception_type
from saga._log import Outage, logger
from saga._run import RunHandle
from saga._schedules import LOOKBACK, Scheduled, as_stored, key_of
from saga._store import Store
from saga._store_sched import DueSchedule

#: Start one run in the given transaction: (saga, input, key, conn) -> handle.
StartIn = Callable[[Any, Any, str, Any], Awaitable[RunHandle]]

_EPSILON = timedelta(microseconds=1)
#: Seconds before an on-time slot whose run could not start is tried again.
_RETRY = 1.0
# An input function taking longer fails (the slot is tried again within grace).
_INPUT_SECONDS = 10.0
# Due schedules handled at once (a transaction, so a connection, each).
_AT_ONCE = 2


class Scheduler:
    def __init__(
        self,
        store: Store,
        scheduled: Mapping[str, Scheduled[Any]],
        start: StartIn,
        *,
        poll: float,
        outage: Outage,
    ) -> None:
        self._store = store
        self._scheduled = dict(scheduled)
        self._start = start
        self._poll = poll
        self._outage = outage
        self._firing: set[str] = set()  # the schedules being handled now
        # Schedules whose on-time slot failed: tried again at this time (anyio's clock).
        self._backoff: dict[str, float] = {}
        self._wake = anyio.Event()  # set when a schedule's task ends
        self._limiter = anyio.CapacityLimiter(_AT_ONCE)
        self._threads = Threads()  # the sync input functions

    async def register(self, names: Collection[str] | None = None) -> None:
        """Register the schedules (``names`` only, when given)."""
        now = await self._store.database_now()  # slots come from the database's clock
        for s in self._scheduled.values():
            if names is not None and s.name not in names:
                continue
            await self._store.register_schedule(
                s.name,
                (s.saga.name, s.saga.version),
                s.schedule.describe(),
                s.missed,
                s.catch_up,
                s.schedule.next_after(now),
            )

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Register, then handle due slots until cancelled. A database away is an
        outage (logged once, through ``Outage``): the loop waits it out and goes on."""
        await self.register()
        task_status.started()
        async with anyio.create_task_group() as tg:
            while True:
                idle = self._idle()
                try:
                    await self.fire_due(tg, idle)
                    idle = self._idle()  # (the schedules just handed to a task are busy)
                    wait, found = await self._store.schedules_next(idle) if idle else (None, ())
                    if missing := set(idle).difference(found):  # an operator removed them
                        await self.register(missing)  # (declared here: they come back)
                        wait = 0.0
                except DatabaseError as exc:
                    self._outage.lost("starting scheduled runs", exc)
                    wait = self._poll
                else:
                    self._outage.back()
                wait = min(self._poll, wait if wait is not None else self._poll)
                if self._backoff:  # a failed slot is tried again after its delay
                    wait = min(wait, min(self._backoff.values()) - anyio.current_time())
                with anyio.move_on_after(max(wait, 0.01)):
                    await self._wake.wait()  # (or a task ending: its schedule is free)
                self._wake = anyio.Event()

    def _idle(self) -> list[str]:
        """The schedules neither being handled nor waiting to try a failed slot again."""
        now = anyio.current_time()
        for name, until in list(self._backoff.items()):
            if until <= now:
                del self._backoff[name]
        return [n for n in self._scheduled if n not in self._firing and n not in self._backoff]

    async def fire_due(self, tg: TaskGroup, names: list[str]) -> None:
        """Handle each of ``names`` that is due in a task of its own (see
        :meth:`_fire_one`): a slow input function holds up only its own schedule."""
        if not names:
            return
        async with self._store.schedule_transaction() as conn:  # which are due (no lock kept)
            due = await self._store.schedules_due(conn, names)
        for d in due:
            self._firing.add(d.name)
            tg.start_soon(self._fire_one, d)

    async def _fire_one(self, due: DueSchedule) -> None:
        """The schedule's due slots: their inputs first, computed outside any transaction
        (a slow input function holds neither a connection nor another schedule's turn),
        then their runs, in a transaction of its own holding the schedule's row (one
        orchestrator at a time), at most ``_AT_ONCE`` schedules at once."""
        name = due.name
        s = as_stored(self._scheduled[name], due.spec, due.missed, due.catch_up)
        try:
            slots = s.slots(due.next_fire - _EPSILON, due.now)  # (once: a month of minutes)
            inputs = await _inputs(s, slots[0], self._threads)
            async with self._limiter, self._store.schedule_transaction() as conn:
                for locked in await self._store.schedules_due(conn, [name]):  # still due
                    if locked.next_fire == due.next_fire:  # (else handled meanwhile)
                        # Judged at the time the slots were read: computing their inputs
                        # is part of handling them, not lateness.
                        await self._fire(conn, s, due.next_fire, due.now, slots, inputs)
        except DatabaseError as exc:
            # The loop's own queries report an outage (once, as it starts and ends); a
            # task's connection cut by it may only fail after the loop saw it end.
            if not unreachable(exc):
                logger.error(
                    "schedule_failed", schedule=name, error_type=_name(exc.__cause__ or exc)
                )
        finally:
            self._firing.discard(name)
            self._wake.set()

    async def _fire(
        self,
        conn: Any,
        s: Scheduled[Any],
        next_fire: datetime,
        now: datetime,
        due: tuple[list[datetime], int],
        inputs: dict[datetime, Any],
    ) -> int:
        """Start the runs of the schedule's ``due`` slots (and the late ones its missed
        policy skipped), with the ``inputs`` computed for them (a slot without one is
        left for the next pass, at once). A slot whose input function raised, or whose
        start is refused, is tried again while it is on time (within ``grace``), the
        schedule waiting for it; a late one is skipped (and counted)."""
        slots, skipped = due
        last: tuple[datetime, Any] | None = None
        following = s.schedule.next_after(now)
        started = 0
        for slot in slots:
            if slot not in inputs:
                following = slot  # became due since the inputs were computed
                self._wake.set()
                break
            handle = await self._start_slot(conn, s, slot, inputs[slot], now)
            if handle is not None:
                started += 1
                last = (slot, handle.id)
                logger.info(
                    "schedule_fired", schedule=s.name, slot=str(slot), run_id=str(handle.id),
                    saga=s.saga.name,
                )  # fmt: skip
            elif slot >= now - s.on_time:
                following = slot  # due again: tried until its grace has passed
                self._backoff[s.name] = anyio.current_time() + _RETRY
                break
            else:
                skipped += 1
        if skipped:
            # Late slots are counted over the last LOOKBACK at most: say from when.
            since = str(max(next_fire, now - LOOKBACK))
            logger.warning(
                "schedule_slots_skipped", schedule=s.name, skipped=skipped, counted_from=since
            )
        await self._store.schedule_fired(conn, s.name, following, last, skipped)
        return started

    async def _start_slot(
        self, conn: Any, s: Scheduled[Any], slot: datetime, data: Any, now: datetime
    ) -> RunHandle | None:
        """The run of ``slot``, or None (logged) when its input function failed (``data``
        is then the failure) or its start was refused."""
        if isinstance(data, _InputFailed):
            event, error = "schedule_input_failed", data.error_type
        else:
            try:
                async with own_cancel_settled():  # (the saga's key function is the user's)
                    return await self._start(s.saga, data, key_of(s.name, slot), conn)
            except BaseException as exc:  # refused (the saga's key, priority or validators
                # raising included, whatever they raise: they cannot stop the orchestrator)
                if isinstance(exc, DatabaseError) or is_cancellation_by_saga(exc):
                    raise
                event, error = "schedule_start_refused", _name(exc)
        retry = slot >= now - s.on_time
        logger.error(
            event,
            schedule=s.name,
            slot=str(slot),
            error_type=error,
            retry_in=_RETRY if retry else None,
        )
        return None


@dataclass(frozen=True, slots=True)
class _InputFailed:
    """A slot's input function raised (or, async, ran out of time)."""

    error_type: str


async def _inputs(
    s: Scheduled[Any], slots: list[datetime], threads: Threads
) -> dict[datetime, Any]:
    """The inputs of ``slots``, oldest first, up to the first that fails (included, as
    an :class:`_InputFailed`: the later slots wait behind it). A sync function runs in a
    worker thread (one at a time per schedule), so that a blocking one holds up nothing
    else; past its time limit it is left to finish there."""
    inputs: dict[datetime, Any] = {}
    what = f"input of {s.name!r}"
    fn = s.input
    sync = not isinstance(fn, BaseModel) and not inspect.iscoroutinefunction(fn)
    for slot in slots:
        try:
            async with own_cancel_settled():
                with time_limit(anyio.CancelScope(), _INPUT_SECONDS, what):
                    if sync:
                        data = await threads.call(s.name, what, fn, slot)
                    else:
                        data = s.input_for(slot)
                    if inspect.isawaitable(data):
                        data = await data
        except BaseException as exc:  # the user's input function (or its time limit)
            if is_cancellation_by_saga(exc):
                raise
            inputs[slot] = _InputFailed(_name(exc))
            break
        inputs[slot] = data
    return inputs


def _name(exc: BaseException) -> str:
    """The exception's type, unqualified (as the scheduler's lines always gave it)."""
    return exception_type(exc).rsplit(".", 1)[-1]
