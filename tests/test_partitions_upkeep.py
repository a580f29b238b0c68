"""The coming days' partitions are kept created: a failed check is tried again a minute
later whatever the census interval, a database away is an outage (one line as it
starts) rather than a warning a minute, and `saga migrate` says what it created."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from saga import _census
from saga import _partitions as partitions
from saga._partitions import partition
from tests._sagas import small_saga

pytestmark = pytest.mark.timeout(60)

TABLES = ["runs", "events", "watches", "signals"]


async def _drop_last_day(conn: asyncpg.Connection) -> datetime:
    day = datetime.now(UTC).date() + timedelta(days=partitions.DAYS_AHEAD)
    for table in TABLES:
        await conn.execute(f"DROP TABLE saga.{partition(table, day)}")
    return day  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def _report(dsn: str) -> AsyncIterator[asyncpg.transaction.Transaction]:
    """A long read of the runs (a report): the new day's partitions cannot be attached
    while it lasts (their lock is not granted within 500 ms)."""
    reader = await asyncpg.connect(dsn)
    try:
        report = reader.transaction()
        await report.start()
        await reader.fetchval("SELECT count(*) FROM saga.runs")
        yield report
    finally:
        await reader.close()


async def _until_logged(logs: list[dict[str, object]], event: str) -> None:
    with anyio.fail_after(20):
        while not any(e["event"] == event for e in logs):  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_a_failed_check_is_tried_again_soon_whatever_the_census_interval(
    dsn: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Retention): a `partitions_not_created` check is "retried a minute later"
    (a second here). With census_interval=300 the day's partitions exist within seconds
    of the report ending. Before, the retry waited for the census's next turn (300 s,
    or a day at census_interval=86400), and the day's runs went to DEFAULT meanwhile."""
    monkeypatch.setattr(_census, "_PARTITIONS_RETRY", 1.0)
    day = await _drop_last_day(db)
    quick = small_saga("quick", 1)
    with capture_logs() as logs:
        async with (
            _report(dsn) as report,
            saga.Orchestrator(
                dsn, sagas=[quick], poll_interval=0.2, census_interval=300, migrate=False
            ),
        ):
            await _until_logged(logs, "partitions_not_created")
            await report.rollback()
            await _until_logged(logs, "partitions_created")
    assert day in await partitions.days(db, "saga")


class _Relay:
    """A TCP relay to the test server's socket; ``cut()`` closes every connection and
    refuses new ones: the database is away, as a network outage makes it."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.open = True
        self.streams: list[anyio.abc.ByteStream] = []

    async def _pipe(self, src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(Exception):
            async for chunk in src:
                await dst.send(chunk)
        with contextlib.suppress(Exception):
            await dst.aclose()

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        if not self.open:
            await client.aclose()
            return
        server = await anyio.connect_unix(self.socket)
        self.streams += [client, server]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pipe, client, server)
            tg.start_soon(self._pipe, server, client)

    async def cut(self) -> None:
        self.open = False
        for stream in self.streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
        self.streams.clear()


async def test_a_database_away_is_one_outage_line_not_a_partitions_warning_each_try(
    dsn: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Logging): "Outages are one line per change of state, not one per failed
    call". An orchestrator whose last partitions check failed loses its database: the
    tries of the check during the outage log nothing more than the one
    `database_unavailable`. Before, each try (every minute; every second here) logged
    `partitions_not_created` for as long as the outage lasted."""
    monkeypatch.setattr(_census, "_PARTITIONS_RETRY", 0.5)
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    relay = _Relay(f"{query['host'][0]}/.s.PGSQL.{query['port'][0]}")
    await _drop_last_day(db)
    quick = small_saga("quick", 1)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    relayed = f"postgresql://postgres@127.0.0.1:{port}{parts.path}"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, relay.handle)
        with capture_logs() as logs:
            async with (
                _report(dsn) as report,
                saga.Orchestrator(
                    relayed, sagas=[quick], poll_interval=0.2, census_interval=1, migrate=False
                ),
            ):
                await _until_logged(logs, "partitions_not_created")
                await report.rollback()
                start = len(logs)
                await relay.cut()
                await anyio.sleep(4)  # several tries of the check, the database away
                during = [
                    e["event"] for e in logs[start:] if e["log_level"] in ("warning", "error")
                ]
                relay.open = True
        tg.cancel_scope.cancel()
    assert during == ["database_unavailable"]


async def test_migrate_logs_the_partitions_it_creates(dsn: str, db: asyncpg.Connection) -> None:
    """README (Retention): `saga migrate` creates the coming days' partitions, "the log
    says `partitions_created`". Before, only the orchestrators' check logged it."""
    day = await _drop_last_day(db)
    with capture_logs() as logs, anyio.fail_after(30):
        assert await saga.migrate(dsn) == []
    assert day in await partitions.days(db, "saga")
    created = [e for e in logs if e["event"] == "partitions_created"]
    assert [e["days"] for e in created] == [[str(day)]]
