"""The LISTEN connection and the in-process result waiters.

One pooled connection listens on the schema's two channels: new work (wakes the claim
loop) and finished runs (wakes ``result()`` waiters in this process). It reconnects with
backoff; while it is down, claiming and waiting fall back to polling, so a lost
notification only costs latency.

Waiters do not poll on their own: one loop asks the database, every ``poll_interval``,
which of the runs anybody here waits for have ended (one query, whatever the number of
waiters), and wakes theirs. When the orchestrator closes, every waiter is woken and
raises :class:`~saga.LifecycleError` instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from saga._db import translate_errors
from saga._errors import DatabaseError, LifecycleError
from saga._log import Outage, logger
from saga._store import Store

#: Most run ids asked about in one fallback poll query.
_POLL_BATCH = 5000


class Waiters:
    """Who waits for which run to end, in this process; owned by the listener."""

    def __init__(self) -> None:
        self._events: dict[uuid.UUID, set[anyio.Event]] = {}
        self.closed: str | None = None  # why waiting is over for everyone

    def __len__(self) -> int:
        return len(self._events)

    def __bool__(self) -> bool:
        return bool(self._events)

    def subscribe(self, run_id: uuid.UUID) -> anyio.Event:
        """An event set when the run may have ended (notified, polled, reconnected or
        closing): the waiter then reads the run again."""
        if self.closed is not None:
            raise LifecycleError(self.closed)
        event = anyio.Event()
        self._events.setdefault(run_id, set()).add(event)
        return event

    def unsubscribe(self, run_id: uuid.UUID, event: anyio.Event) -> None:
        events = self._events.get(run_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[run_id]

    def wake(self, run_id: uuid.UUID) -> None:
        for event in self._events.get(run_id, ()):
            event.set()

    def wake_all(self) -> None:
        for run_id in list(self._events):
            self.wake(run_id)

    def run_ids(self) -> list[uuid.UUID]:
        return list(self._events)

    def close(self, reason: str) -> None:
        """Wake everyone for good: later waits raise LifecycleError(reason)."""
        self.closed = reason
        self.wake_all()


class Listener:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: Store,
        *,
        wants_work: Callable[[str], bool],
        wake: Callable[[], None],
        worker_id: str,
        poll_interval: float,
        outage: Outage,
    ) -> None:
        self._pool = pool
        self._store = store
        self._wants_work = wants_work
        self._wake = wake
        self._worker_id = worker_id
        self._poll_interval = poll_interval
        self._outage = outage
        self.waiters = Waiters()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        if channel == self._store.done_channel:
            with contextlib.suppress(ValueError):
                self.waiters.wake(uuid.UUID(str(payload)))
        elif self._wants_work(str(payload)):
            self._wake()

    async def poll_waiters(self) -> None:
        """The waiters' fallback: one query per interval for all the runs waited for."""
        while True:
            await anyio.sleep(self._poll_interval)
            run_ids = self.waiters.run_ids()
            for start in range(0, len(run_ids), _POLL_BATCH):
                try:
                    ended = await self._store.ended_runs(run_ids[start : start + _POLL_BATCH])
                except DatabaseError as exc:
                    self._outage.lost("polling waited-for runs", exc)
                    break
                self._outage.back()
                for run_id in ended:
                    self.waiters.wake(run_id)

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Hold the LISTEN connection; reconnect with backoff. Polling covers the gaps."""
        store, started, delay = self._store, False, 0.1
        channels = (store.work_channel, store.done_channel)
        while True:
            lost = anyio.Event()
            try:
                async with translate_errors("listening"), self._pool.acquire() as conn:
                    conn.add_termination_listener(_setter(lost))
                    for channel in channels:
                        await conn.add_listener(channel, self._on_notify)
                    try:
                        if not started:
                            started = True
                            task_status.started()
                        else:
                            # Notifications may have been missed: everyone re-checks.
                            logger.info("listener_reconnected", worker=self._worker_id)
                            self._outage.back()
                            self._wake()
                            self.waiters.wake_all()
                        delay = 0.1
                        while not lost.is_set() and not conn.is_closed():
                            with anyio.move_on_after(5):
                                await lost.wait()
                    finally:
                        if not conn.is_closed():
                            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                                for channel in channels:
                                    await conn.remove_listener(channel, self._on_notify)
            except DatabaseError as exc:
                if not started:
                    raise
                self._outage.lost("listening", exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _setter(event: anyio.Event) -> Any:
    return lambda _conn: event.set()
