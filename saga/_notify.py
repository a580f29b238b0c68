"""Waking the workers when runs start or are signalled, without a NOTIFY per write.

A NOTIFY takes a cluster-wide lock at commit, so under load one start or signal per
window (per saga, per process) notifies in its own statement; the ones in between are
covered by a trailing NOTIFY scheduled once they committed (never before: a NOTIFY sent
before a write commits would wake workers that cannot see it yet).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

#: At most one in-statement NOTIFY per saga per window from one process.
WINDOW = 0.005

Send = Callable[[str], Coroutine[Any, Any, None]]
Spawn = Callable[..., None]


class WorkNotifier:
    def __init__(self, send: Send, spawn: Spawn) -> None:
        self._send = send
        self._spawn = spawn
        self._notified_at: dict[str, float] = {}
        self._trailing: set[str] = set()

    def claim(self, saga_name: str) -> bool:
        """Whether this start (or signal) should NOTIFY the workers itself."""
        now = time.monotonic()  # (anyio.current_time() looks up the event loop: µs a start)
        if now - self._notified_at.get(saga_name, -math.inf) >= WINDOW:
            self._notified_at[saga_name] = now
            return True
        return False

    def after_commit(self, saga_name: str) -> None:
        """A write that did not NOTIFY has committed: make sure a NOTIFY follows it."""
        if saga_name not in self._trailing:
            self._trailing.add(saga_name)
            self._spawn(self._later, saga_name)

    async def flush(self) -> None:
        """The trailing NOTIFYs still owed (a close came before their wait ended, or
        before they could be scheduled): sent now."""
        owed, self._trailing = self._trailing, set()
        for saga_name in sorted(owed):
            await self._send(saga_name)

    async def _later(self, saga_name: str) -> None:
        await anyio.sleep(WINDOW)
        self._trailing.discard(saga_name)
        self._notified_at[saga_name] = time.monotonic()
        await self._send(saga_name)
