"""A connection saga LISTENed on goes back to its pool listening to nothing, however its
use ended: a cancel in the middle of a LISTEN (a server shutting down while a dashboard
page opens its event stream), an UNLISTEN that fails or hangs, a presence mark cut short.

saga's pools do not UNLISTEN on release (it would cost a round trip per step), so a
listener left behind would stay with a connection that later runs steps, and asyncpg
warns when such a connection is released: CI once failed on that warning, printed by
`saga dashboard` as it stopped. (The suite turns warnings into errors.)
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

import saga
from saga._db import listening
from saga._listener import Listener
from saga._log import Outage
from saga._store import Store
from saga.web._hub import Hub

pytestmark = pytest.mark.timeout(90)

CHANNELS = ("saga_test_a", "saga_test_b")


def _ignore(*_args: Any) -> None:
    pass


class Cutting:
    """A pooled connection whose LISTEN number ``cut_listen`` is cancelled as it is sent,
    and whose UNLISTENs, with ``hang_unlisten``, hang after being sent."""

    def __init__(self, conn: Any, scope: anyio.CancelScope, *, cut_listen: int = -1) -> None:
        self._conn = conn
        self._scope = scope
        self._cut_listen = cut_listen
        self.hang_unlisten = False
        self.listens = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def add_listener(self, name: str, callback: Any) -> None:
        if self.listens == self._cut_listen:
            self._scope.cancel()  # delivered at the LISTEN's first await
        self.listens += 1
        await self._conn.add_listener(name, callback)

    async def remove_listener(self, name: str, callback: Any) -> None:
        await self._conn.remove_listener(name, callback)
        if self.hang_unlisten:
            await anyio.sleep(30)


async def _listening_channels(pool: asyncpg.Pool) -> tuple[int, int]:
    """The backend pid of the pool's one connection, and how many channels it LISTENs on."""
    async with pool.acquire() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        count: int = await conn.fetchval("SELECT count(*) FROM pg_listening_channels()")
    return pid, count


@pytest.mark.parametrize("cut", ["first LISTEN", "second LISTEN", "while listening"])
async def test_a_cancel_anywhere_leaves_no_listener(dsn: str, cut: str) -> None:
    """Cancelled in the middle of its first or second LISTEN, or while listening: the
    block ends without asyncpg's warning, and the pool's connection listens on nothing
    (the connection is closed when a LISTEN was cut short; kept when all went well)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, reset=_no_reset)
    try:
        before, _ = await _listening_channels(pool)
        cut_listen = {"first LISTEN": 0, "second LISTEN": 1}.get(cut, -1)
        with anyio.fail_after(10), anyio.CancelScope() as scope:
            async with pool.acquire() as conn:
                cutting = Cutting(conn, scope, cut_listen=cut_listen)
                async with listening(cutting, CHANNELS, _ignore):
                    assert cut == "while listening", "the cancel did not land"
                    scope.cancel()
                    await anyio.sleep(5)
        assert scope.cancelled_caught
        after, count = await _listening_channels(pool)
        assert count == 0
        if cut == "while listening":
            assert after == before  # UNLISTENed cleanly: the connection is reused
    finally:
        await pool.close()


async def test_an_unlisten_that_hangs_closes_the_connection(dsn: str) -> None:
    """An UNLISTEN that does not answer within 2 s: the connection is closed rather than
    reused with a LISTEN the server may still hold; the block ends after those 2 s."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, reset=_no_reset)
    try:
        before, _ = await _listening_channels(pool)
        with anyio.fail_after(10):
            async with pool.acquire() as conn:
                cutting = Cutting(conn, anyio.CancelScope())
                async with listening(cutting, CHANNELS, _ignore):
                    cutting.hang_unlisten = True
        after, count = await _listening_channels(pool)
        assert (after != before, count) == (True, 0)
    finally:
        await pool.close()


async def _no_reset(_conn: Any) -> None:
    """saga's own pools reset nothing on release (see saga._db._keep_session)."""


async def _idle_listening_backends(db: asyncpg.Connection) -> list[str]:
    """Other idle backends whose last statement was a LISTEN: a clean release's last
    statement is an UNLISTEN, so these are connections left listening in a pool."""
    rows = await db.fetch(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state = 'idle' AND query LIKE 'LISTEN%'"
    )
    return [row["query"] for row in rows]


async def test_the_dashboard_hub_cancelled_at_any_moment_leaves_no_listener(
    orchestrator: Any, db: asyncpg.Connection
) -> None:
    """A page's event stream closing at any moment of the hub taking its connection
    (the sweep of delays lands cancels in the middle of its LISTENs and first reads):
    no warning, and no connection of the pool is left listening."""
    orch = await orchestrator()
    hub = Hub(orch)
    for step in range(60):
        with anyio.move_on_after(step * 0.0002):
            async with hub.subscribe():
                await anyio.sleep(1)
        assert hub.subscribers == 0
        assert not hub.connected
    assert await _idle_listening_backends(db) == []


class CuttingStore(Store):
    """A store whose presence mark is taken and then cut short (the answer came back,
    but a cancel arrived with it), or whose unmarking fails with a DatabaseError."""

    def __init__(self, pool: asyncpg.Pool, scope: anyio.CancelScope, cut: str) -> None:
        super().__init__(pool)
        self.scope = scope
        self.cut = cut

    async def enter_presence(self, conn: Any) -> bool:
        present = await super().enter_presence(conn)
        if self.cut == "entering":
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()
        return present

    async def leave_presence(self, conn: Any) -> None:
        if self.cut == "leaving":
            raise saga.DatabaseError("unmarking this orchestrator failed: (injected)")
        await super().leave_presence(conn)


@pytest.mark.parametrize("cut", ["entering", "leaving", "nothing"])
async def test_a_presence_mark_cut_short_does_not_stay_in_the_pool(
    dsn: str, db: asyncpg.Connection, cut: str
) -> None:
    """An orchestrator's listener whose presence mark was cut short as it was taken, or
    failed to be left: no connection goes back to the pool marked, where it would count
    a phantom peer (and halve every orchestrator's writes in flight) for as long as it
    lives; none is left listening either."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, reset=_no_reset)
    try:
        with anyio.fail_after(10), anyio.CancelScope() as scope:
            listener = Listener(
                pool,
                CuttingStore(pool, scope, cut),
                wants_work=lambda _name: True,
                wake=lambda: None,
                worker_id="w",
                poll_interval=1.0,
                outage=Outage("test"),
                peers=lambda _count: None,
            )
            async with anyio.create_task_group() as tg:
                await tg.start(listener.run)
                assert cut != "entering", "the cancel did not land"
                assert await Store(pool).count_present(db) == 1
                tg.cancel_scope.cancel()
        # A connection closed instead of unmarked: its server process ends (and its mark
        # goes) a moment after the socket closes, longer on a busy machine.
        with anyio.fail_after(5):
            while await Store(pool).count_present(db):  # noqa: ASYNC110 - polling the db
                await anyio.sleep(0.02)
        assert await _idle_listening_backends(db) == []
    finally:
        await pool.close()


async def test_a_closed_orchestrator_leaves_no_peer(
    dsn: str, db: asyncpg.Connection, store: Store
) -> None:
    """Orchestrators opened and closed in a row each count as a peer while open and leave
    the schema when closed."""
    for _ in range(5):
        async with saga.Orchestrator(dsn, sagas=[], concurrency=2):
            assert await store.count_present(db) == 1
        assert await store.count_present(db) == 0
