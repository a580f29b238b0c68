"""The live hub: one per dashboard app, one database connection while anybody watches.

Browsers never poll the database. Each open page holds a server-sent events stream; the
hub tells every stream when something changed, and the page fetches itself again.

The hub holds one connection from the client's pool (of at least 3: with 2, it holds
none and reads the sequence below through the pool), only while at least one stream is
open: it LISTENs on the schema's work and done channels (new work, runs that ended), and
reads the history's identity sequence once per second (an O(1) read), because the steps
in the middle of a run send no NOTIFY on purpose (a NOTIFY serializes commits), with the
transactions running then (see History). Changes are announced at most twice per second.

No task outlives the streams: the first stream to arrive takes a lock and runs the
watch loop inside its own task group; the others wait on that lock. When the holder's
stream closes, its loop is cancelled, the connection goes back to the pool, and the next
waiting stream takes over. The last stream to leave leaves no connection behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from saga._client import Client
from saga._db import channel, listening, translate_errors
from saga._errors import SagaError
from saga._log import Outage
from saga._store_dash import Sequence

#: How often the history's sequence is read while somebody watches (s).
SEQUENCE_INTERVAL = 1.0
#: The shortest time between two announcements (s).
DEBOUNCE = 0.5
#: The smallest client pool the hub holds a connection of while pages are open; below
#: it (a pool of 2, one held by the client's LISTEN), it polls and holds none.
_HOLD_FROM_POOL_SIZE = 3


class History:
    """Whether the history changed since the last look: its sequence moved, or one of
    the transactions that were running when it moved has ended since. An event is
    numbered when it is written and seen only once its transaction commits: a signal
    sent in a caller's transaction that commits seconds later would otherwise be
    announced while nobody can read it yet, and never again. (A transaction that ended
    without writing an event makes one announcement too: a page fetches itself again
    for nothing.)"""

    def __init__(self) -> None:
        self._seq: int | None = None
        self._xmax = 0  # watched: every transaction from here on ...
        self._running: frozenset[int] = frozenset()  # ... and these, below it

    def changed(self, now: Sequence) -> bool:
        if now.seq != self._seq:
            self._seq, self._xmax, self._running = now.seq, now.xmax, now.running
            return True
        below = {x for x in now.running if self._xmax <= x < now.xmax}
        ended = not self._running <= now.running or now.xmax - self._xmax > len(below)
        self._running = (self._running & now.running) | below
        self._xmax = now.xmax
        return ended


class Hub:
    """Announces changes to the open streams of one dashboard app."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lead = anyio.Lock()
        self._changed = anyio.Event()
        self._poke = anyio.Event()
        self.version = 0
        self._closed = False
        self.subscribers = 0
        self.connected = False  # whether the watch loop holds its connection (tests)
        self._connections = 0  # how many times it took one

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        """A subscription while the block runs: the watch loop runs while any is open."""
        self.subscribers += 1
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._lead_when_free)
                try:
                    yield Subscription(self)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self.subscribers -= 1

    async def _lead_when_free(self) -> None:
        async with self._lead:
            await self._watch()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """The server is shutting down: every stream ends now (browsers reconnect)."""
        self._closed = True
        self._publish()

    def _publish(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def next_change(self) -> None:
        """Return at the next announcement."""
        await self._changed.wait()

    def _on_notify(self, *_args: Any) -> None:
        self._poke.set()

    async def _watch(self) -> None:
        """Hold the connection and announce changes. An outage is logged once when it
        starts and once when it ends (as every loop's); the connection is tried again
        after 1 s, then backing off to 10 s, and from 1 s again after each success."""
        outage = Outage("dashboard")
        delay = 1.0
        while True:
            before = self._connections
            try:
                await self._watch_once(outage)
            except SagaError as exc:  # the database is away, or the client closed
                outage.lost("listening for the dashboard", exc)
            self.connected = False
            delay = 1.0 if self._connections != before else min(delay * 2, 10.0)
            await anyio.sleep(delay)

    async def _watch_once(self, outage: Outage) -> None:
        store = self._client._store_or_raise()
        if store.pool.get_max_size() < _HOLD_FROM_POOL_SIZE:
            await self._poll(outage)
            return
        channels = (channel(store.schema, "work"), channel(store.schema, "done"))
        async with (
            translate_errors("listening for the dashboard"),
            store.pool.acquire() as conn,
            listening(conn, channels, self._on_notify),
        ):
            try:
                self.connected = True
                self._connections += 1
                outage.back()
                await self._loop(conn)
            finally:
                self.connected = False

    async def _poll(self, outage: Outage) -> None:
        """A pool too small to lend a connection for long (the client's LISTEN holds one
        of two): read the sequence through it once per interval, holding nothing."""
        store = self._client._store_or_raise()

        async def sequence() -> Sequence:
            async with (
                translate_errors("reading the history's sequence"),
                store.pool.acquire() as conn,
            ):
                return await store.events_sequence(conn)

        history = History()
        history.changed(await sequence())
        self.connected = True
        self._connections += 1
        outage.back()
        try:
            self._publish()  # as _loop: what changed before this baseline
            while True:
                await anyio.sleep(SEQUENCE_INTERVAL)
                if history.changed(await sequence()):
                    self._publish()
                    await anyio.sleep(DEBOUNCE)
        finally:
            self.connected = False

    async def _loop(self, conn: Any) -> None:
        store = self._client._store_or_raise()
        history = History()
        history.changed(await store.events_sequence(conn))
        # Whatever changed before this baseline was heard by nobody: after an outage, or
        # between a page's render (its stream then open, its refresh done) and this
        # connection's first read. The open streams are told once.
        self._publish()
        while True:
            with anyio.move_on_after(SEQUENCE_INTERVAL):
                await self._poke.wait()
            poked = self._poke.is_set()
            self._poke = anyio.Event()
            if history.changed(await store.events_sequence(conn)) or poked:
                self._publish()
                await anyio.sleep(DEBOUNCE)


class Subscription:
    """One stream's view of the hub."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._seen = hub.version

    async def changed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a change since the last call; whether one
        came (changes in between are announced once)."""
        hub = self._hub
        if hub.version == self._seen:
            with anyio.move_on_after(timeout):
                await hub.next_change()
        if hub.version == self._seen:
            return False
        self._seen = hub.version
        return True
