"""The LISTEN connection and the in-process result waiters.

One pooled connection listens on the schema's two channels: new work (wakes the claim
loop) and finished runs (wakes ``result()`` waiters in this process). It reconnects with
backoff; while it is down, claiming and waiting fall back to polling, so a lost
notification only costs latency.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import structlog
from anyio.abc import TaskStatus

from saga._errors import DatabaseError
from saga._store import Store, translate_errors

logger = structlog.get_logger("saga")


class Listener:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: Store,
        *,
        wants_work: Callable[[str], bool],
        wake: Callable[[], None],
        worker_id: str,
    ) -> None:
        self._pool = pool
        self._store = store
        self._wants_work = wants_work
        self._wake = wake
        self._worker_id = worker_id
        self.waiters: dict[uuid.UUID, set[anyio.Event]] = {}

    def subscribe(self, run_id: uuid.UUID) -> anyio.Event:
        """An event set when the run is notified as ended (or LISTEN reconnects)."""
        event = anyio.Event()
        self.waiters.setdefault(run_id, set()).add(event)
        return event

    def unsubscribe(self, run_id: uuid.UUID, event: anyio.Event) -> None:
        waiters = self.waiters.get(run_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self.waiters[run_id]

    def _run_done(self, run_id: uuid.UUID) -> None:
        for event in self.waiters.get(run_id, ()):
            event.set()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: object) -> None:
        if channel == self._store.done_channel:
            with contextlib.suppress(ValueError):
                self._run_done(uuid.UUID(str(payload)))
        elif self._wants_work(str(payload)):
            self._wake()

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
                            self._wake()
                            for run_id in list(self.waiters):
                                self._run_done(run_id)
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
                logger.warning("listener_lost", error_type=type(exc.__cause__).__name__)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _setter(event: anyio.Event) -> Any:
    return lambda _conn: event.set()
