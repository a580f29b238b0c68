"""Schedules through outages: the scheduler loop rides out a database that goes away,
its log lines carry error types only, and after days with nothing running the slots
within grace still run while the late ones follow the missed policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory

SECRET = "s3cr3t-marker-7f1c"
EVERY_SECOND = saga.Schedule.every(timedelta(seconds=1))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _slot(key: str) -> datetime:
    """The slot of a scheduled run's key ``schedule:<name>:<slot>``."""
    stamp = key.split(":", 2)[2]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


async def _slots_run(db: asyncpg.Connection, name: str) -> list[datetime]:
    rows = await db.fetch(
        "SELECT idempotency_key FROM saga.runs WHERE idempotency_key LIKE $1",
        f"schedule:{name}:%",
    )
    return sorted(_slot(r[0]) for r in rows)


async def _block_connections(
    base_dsn: str, dsn: str, blocked: bool, keep: asyncpg.Connection
) -> None:
    """Refuse (or allow again) new connections to the test database; when refusing,
    terminate the ones it has but ``keep`` (the test's own): an outage of that database
    alone, the server stays up."""
    database = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {not blocked}')
        if blocked:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> $2",
                database,
                keep.get_server_pid(),
            )
    finally:
        await admin.close()


async def _wait_for_slot_after(db: asyncpg.Connection, name: str, moment: datetime) -> None:
    with anyio.fail_after(20):
        while not [x for x in await _slots_run(db, name) if x > moment]:  # noqa: ASYNC110
            await anyio.sleep(0.1)


@pytest.mark.timeout(90)
async def test_an_orchestrator_with_schedules_rides_out_an_outage(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, base_dsn: str, dsn: str
) -> None:
    """The test database refuses connections for 3 s and every backend is terminated
    (pool connections and the scheduler's included), twice: the orchestrator holding an
    every-second schedule stays open (no ``orchestrator_crashed``, ``start()`` works),
    logs ``database_unavailable`` and ``database_available`` once per outage, and its
    schedule fires again after each one."""
    s = small_saga("tick", 1)
    ticks = saga.Scheduled("ticks", s, EVERY_SECOND, Job())
    with capture_logs() as logs:
        orch = await orchestrator(s, schedules=[ticks], poll_interval=0.1)
        await _wait_for_slot_after(db, "ticks", datetime.now(UTC) - timedelta(seconds=2))
        for _ in range(2):
            await _block_connections(base_dsn, dsn, True, db)
            try:
                await anyio.sleep(3)
            finally:
                await _block_connections(base_dsn, dsn, False, db)
            back = datetime.now(UTC)
            await _wait_for_slot_after(db, "ticks", back)
            assert orch.is_open
        run = await orch.start(s, Job(n=1))
        assert await run.result(timeout=10) == "s1"
    events = [e["event"] for e in logs]
    assert "orchestrator_crashed" not in events
    assert events.count("database_unavailable") == 2, events
    assert events.count("database_available") == 2, events


class _Loud(Exception):
    """An exception whose every rendering carries the secret."""

    def __str__(self) -> str:
        return f"loud {SECRET}"

    def __repr__(self) -> str:
        return f"_Loud({SECRET!r})"


_RAISED: tuple[type[Exception], ...] = (ValueError, KeyError, RuntimeError, _Loud)


def _raises(slot: datetime) -> Job:
    """An input function that fails with the secret in its message."""
    raise _RAISED[slot.second % len(_RAISED)](f"no input: {SECRET}")


def _invalid(slot: datetime) -> Any:
    """An input the saga's model refuses: pydantic's message quotes the value."""
    return {"n": SECRET, "fail": SECRET}


def _too_large(slot: datetime) -> Job:
    """An input larger than the orchestrator's max_payload_bytes."""
    return Job(fail=SECRET * 100)


async def test_scheduler_log_lines_carry_error_types_only(
    orchestrator: OrchestratorFactory,
) -> None:
    """Input functions that raise (several exception types, the secret in the message),
    return an input the model refuses (pydantic quotes the value), or one too large: the
    scheduler logs ``schedule_input_failed`` and ``schedule_start_refused`` with the
    error's type, and no log line anywhere carries the secret marker."""
    s = small_saga("leaky", 1)
    schedules = [
        saga.Scheduled("raises", s, EVERY_SECOND, _raises),
        saga.Scheduled("invalid", s, EVERY_SECOND, _invalid),
        saga.Scheduled("large", s, EVERY_SECOND, _too_large),
    ]
    with capture_logs() as logs:
        orch = await orchestrator(s, schedules=schedules, max_payload_bytes=1000)
        await anyio.sleep(4.5)
        await orch.aclose()
    assert [e for e in logs if SECRET in repr(e)] == []
    failed = [e for e in logs if e["event"] == "schedule_input_failed"]
    refused = [e for e in logs if e["event"] == "schedule_start_refused"]
    assert {e["error_type"] for e in failed} >= {"ValueError", "KeyError", "RuntimeError"}
    assert {(e["schedule"], e["error_type"]) for e in refused} == {
        ("invalid", "InvalidInputError"),
        ("large", "PayloadTooLargeError"),
    }
