"""The live hub: the event stream tells open pages that something changed, from one
database connection held only while somebody watches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from starlette.types import Message
from structlog.testing import capture_logs

from saga._store_dash import Sequence
from saga.web._hub import History
from tests._sagas import Gate, small_saga
from tests.web.conftest import mounted


class Stream:
    """A GET of /saga/events driven through the ASGI interface itself (httpx's ASGI
    transport would wait for the end of a response that never ends)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.text = ""
        self.status: int | None = None
        self.received = anyio.Event()
        self._disconnect = anyio.Event()
        self._requested = False

    async def run(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/saga/events",
            "raw_path": b"/saga/events",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"testserver"), (b"x-user", b"alice")],
            "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80),
        }
        await self.app(scope, self._receive, self._send)

    async def _receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.text += message.get("body", b"").decode()
            self.received.set()
            self.received = anyio.Event()

    async def until(self, fragment: str, timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            while fragment not in self.text:
                await self.received.wait()

    def close(self) -> None:
        self._disconnect.set()


async def _eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until ``condition()`` holds (the hub's state has no event to wait on)."""
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.02)


def _hub(app: Any) -> Any:
    """The dashboard's hub, for the tests of that piece: host app -> mount -> the
    dashboard app -> its dashboard."""
    return app.routes[0].app._dash.hub


async def test_a_run_ending_sends_a_change_event(orchestrator: Any) -> None:
    """A run whose last step completes in the middle of nobody's wait (no NOTIFY: it is
    not watched) still reaches open streams as a change event, through the history's
    sequence that the hub reads once per second."""
    gate = Gate("s2")
    s = small_saga("live", ["s1", "s2"], gate=gate)
    orch = await orchestrator(s)
    handle = await orch.start(s, {})
    with anyio.fail_after(10):
        await gate.entered.wait()
    app = mounted(orch)
    hub = _hub(app)
    stream = Stream(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        await stream.until("retry:")
        assert stream.status == 200
        await _eventually(lambda: hub.connected)
        gate.release.set()
        await stream.until("event: change")
        assert (await orch.info(handle.id)).status.value in ("running", "completed")
        stream.close()
    assert hub.subscribers == 0
    assert not hub.connected  # the connection went back to the pool


async def test_streams_share_one_connection_and_take_over(orchestrator: Any) -> None:
    """Two open streams share the hub's one connection; when the first closes, the
    second goes on receiving changes (a new run starting NOTIFYs the work channel)."""
    s = small_saga("share", ["s1"])
    orch = await orchestrator(s)
    app = mounted(orch)
    hub = _hub(app)
    first, second = Stream(app), Stream(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        tg.start_soon(second.run)
        await first.until("retry:")
        await second.until("retry:")
        assert hub.subscribers == 2
        first.close()
        await _eventually(lambda: hub.subscribers == 1 and hub.connected)
        await (await orch.start(s, {})).result(timeout=10)
        await second.until("event: change")
        second.close()
    assert hub.subscribers == 0


async def test_close_streams_ends_open_streams(orchestrator: Any) -> None:
    """close_streams() (a server shutting down) ends every open event stream at once:
    its response completes (the app returns) instead of waiting for the server's
    graceful-shutdown timeout."""
    orch = await orchestrator()
    app = mounted(orch)
    first, second = Stream(app), Stream(app)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.run)
            tg.start_soon(second.run)
            await first.until("retry:")
            await second.until("retry:")
            app.routes[0].app.close_streams()
        # Both runs returned by themselves: nobody disconnected.
    assert _hub(app).subscribers == 0


async def test_after_an_outage_open_streams_hear_at_once(orchestrator: Any, db: Any) -> None:
    """The hub's connection is killed (the database restarting does the same): it logs
    the outage once when it starts and once when it ends, reconnects, and announces a
    change at once, because anything may have changed while it was away (runs that ended
    then sent no event the hub heard). It used to announce nothing until the next change
    after it was back, and to log every failed reconnect."""
    s = small_saga("outage_live", ["s1"])
    orch = await orchestrator(s)
    app = mounted(orch)
    hub = _hub(app)
    stream = Stream(app)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run)
            await stream.until("retry:")
            await _eventually(lambda: hub.connected)
            before = stream.text.count("event: change")
            connections = hub._connections
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database()"
            )
            # (back on a new connection: the old one may still look connected a moment)
            await _eventually(lambda: hub.connected and hub._connections > connections)
            with anyio.fail_after(10):
                while stream.text.count("event: change") == before:
                    await stream.received.wait()
            stream.close()
    mine = [e for e in logs if e.get("worker") == "dashboard"]
    assert [e["event"] for e in mine] == ["database_unavailable", "database_available"]


async def test_a_stream_is_told_once_when_the_hub_starts_watching(orchestrator: Any) -> None:
    """The first stream to open starts the hub's watch, whose baseline is read a moment
    after the stream opened (and after the page's refresh on open): a run ending in
    between was heard by nobody, and the page showed it running for ever (CI once saw a
    retried run stay `compensating`). The hub announces a change once it holds its
    baseline, so the page fetches itself again, even when nothing else changes."""
    orch = await orchestrator()
    app = mounted(orch)
    stream = Stream(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        await stream.until("retry:")
        await stream.until("event: change", timeout=5)
        stream.close()


def test_the_hub_announces_the_commit_of_a_transaction_running_when_the_history_moved() -> None:
    """README, Dashboard: "Live. Open pages update without a reload: ... reads the
    history's sequence once a second". An event is numbered when it is written and seen
    when its transaction commits: the hub announces a change when the sequence moves,
    and again when a transaction running then has ended (listed below the snapshot's
    xmax, or at it and above), never while nothing moved and nothing ended."""
    history = History()
    assert history.changed(Sequence(5, 100, frozenset()))  # the first look
    assert not history.changed(Sequence(5, 100, frozenset()))
    # Transaction 100 (at xmax: not ended) writes event 6 and holds it uncommitted.
    assert history.changed(Sequence(6, 100, frozenset()))
    assert not history.changed(Sequence(6, 100, frozenset()))
    assert history.changed(Sequence(6, 101, frozenset()))  # it committed: told again
    assert not history.changed(Sequence(6, 101, frozenset()))
    # A transaction listed running (99, below xmax 103) when event 7 was numbered.
    assert history.changed(Sequence(7, 103, frozenset({99, 101})))
    assert not history.changed(Sequence(7, 103, frozenset({99, 101})))
    assert history.changed(Sequence(7, 103, frozenset({101})))  # 99 ended
    assert not history.changed(Sequence(7, 103, frozenset({101})))
    assert history.changed(Sequence(7, 103, frozenset()))  # and 101
    assert not history.changed(Sequence(7, 103, frozenset()))
