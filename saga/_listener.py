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
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from saga._db import Executor, listening, translate_errors
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


@contextlib.asynccontextmanager
async def _forgetting(conn: Executor, on_lost: Callable[[Any], None]) -> AsyncIterator[None]:
    """The termination listener stays with this use of the connection, not the pool's."""
    try:
        yield
    finally:
        conn.remove_termination_listener(on_lost)


@contextlib.asynccontextmanager
async def _marked_present(conn: Executor, store: Store) -> AsyncIterator[None]:
    """The session's presence mark while the block runs. The mark is a session advisory
    lock: when taking or leaving it was cut short (a cancel, an error, 2 s), the session
    may still hold it, and back in the pool it would count a peer for as long as the
    connection lives; the connection is closed instead."""
    entered = present = False
    try:
        present = await store.enter_presence(conn)
        entered = True
        yield
    finally:
        clean = entered
        if present and not conn.is_closed():
            with anyio.CancelScope(shield=True), anyio.move_on_after(2) as late:
                try:
                    await store.leave_presence(conn)
                except DatabaseError:
                    clean = False
            clean = clean and not late.cancelled_caught
        if not clean and not conn.is_closed():
            conn.terminate()


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
        peers: Callable[[int], None] | None = None,
    ) -> None:
        self._pool = pool
        self._store = store
        self._wants_work = wants_work
        self._wake = wake
        self._worker_id = worker_id
        self._poll_interval = poll_interval
        self._outage = outage
        self._peers = peers
        self._stirred = anyio.Event()  # the connection was lost, or peers came or went
        self.waiters = Waiters()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        if channel == self._store.done_channel:
            with contextlib.suppress(ValueError):
                self.waiters.wake(uuid.UUID(str(payload)))
        elif channel == self._store.peers_channel:
            self._stirred.set()
        elif self._wants_work(str(payload)):
            self._wake()

    def _on_lost(self, lost: anyio.Event) -> Callable[[Any], None]:
        def on_lost(_conn: Any) -> None:
            lost.set()
            self._stirred.set()

        return on_lost

    async def _count_peers(self, conn: Executor) -> None:
        if self._peers is not None:
            self._peers(await self._store.count_present(conn))

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
        """Hold the LISTEN connection; reconnect with backoff. Polling covers the gaps.

        With ``peers``, the connection also marks this orchestrator present (see
        ``saga._store_peers``), and ``peers`` hears how many are, at once, whenever one
        comes or goes, and every 5 s (one whose process died just disappears)."""
        started, delay = False, 0.1
        while True:
            lost = anyio.Event()
            try:
                async with translate_errors("listening"), self._pool.acquire() as conn:
                    on_lost = self._on_lost(lost)
                    conn.add_termination_listener(on_lost)
                    async with _forgetting(conn, on_lost), self._listening(conn):
                        await self._count_peers(conn)
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
                        await self._hold(conn, lost)
            except DatabaseError as exc:
                if not started:
                    raise
                self._outage.lost("listening", exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    @contextlib.asynccontextmanager
    async def _listening(self, conn: Executor) -> AsyncIterator[None]:
        """LISTEN on the schema's channels (and be present) until the block ends."""
        store = self._store
        channels = [store.work_channel, store.done_channel]
        if self._peers is not None:
            channels.append(store.peers_channel)
        async with listening(conn, channels, self._on_notify):
            if self._peers is None:
                yield
            else:
                async with _marked_present(conn, store):
                    yield

    async def _hold(self, conn: Executor, lost: anyio.Event) -> None:
        """Until the connection is lost: count the peers when stirred, or every 5 s."""
        while not lost.is_set() and not conn.is_closed():
            with anyio.move_on_after(5):
                await self._stirred.wait()
            self._stirred = anyio.Event()
            if not lost.is_set() and not conn.is_closed():
                await self._count_peers(conn)
