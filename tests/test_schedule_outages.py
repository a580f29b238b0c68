"""Schedules through outages: the scheduler loop rides out a database that goes away,
its log lines carry error types only, and after days with nothing running the slots
within grace still run while the late ones follow the missed policy."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import saga
from saga._schedules import LOOKBACK
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


_CALLS = itertools.count()


def _raises(slot: datetime) -> Job:
    """An input function that fails with the secret in its message, another exception
    type at each call (a slot is tried again while on time)."""
    raise _RAISED[next(_CALLS) % len(_RAISED)](f"no input: {SECRET}")


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
    error's type (and the slot tried again in a second: it is on time), and no log line
    anywhere carries the secret marker."""
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
    assert {e["retry_in"] for e in failed + refused} == {1.0}


def _reference(
    interval: int, since: datetime, now: datetime, grace: int, missed: str, catch_up: int
) -> tuple[list[datetime], int]:
    """The slots of ``every(interval s)`` to run, and the count skipped, by integer
    arithmetic in microseconds (slots are multiples of the interval since the epoch).
    The late slots run are found however long ago ``since`` is; the skipped ones are
    counted over the last LOOKBACK only."""
    step = interval * 1_000_000
    now_us = (now - _EPOCH) // _US
    since_us = (since - _EPOCH) // _US
    start_us = max(since_us, now_us - LOOKBACK // _US)
    cut_us = now_us - grace * 1_000_000
    on_time = range(-(-max(start_us + 1, cut_us) // step), now_us // step + 1)
    late = range(since_us // step + 1, -(-cut_us // step))
    counted = range(start_us // step + 1, -(-cut_us // step))
    if missed == "all":
        fired_late = late[-catch_up:]
    elif missed == "latest" and not on_time:
        fired_late = late[-1:]
    else:
        fired_late = range(0)
    slots = [_EPOCH + k * step * _US for k in [*fired_late, *on_time]]
    return slots, len(counted) - sum(1 for k in fired_late if k in counted)


_NOW = datetime(2026, 3, 29, 0, 30, 0, tzinfo=UTC)


@settings(max_examples=200, deadline=None)
@example(interval=1, down=2 * 86400, grace=60, missed="skip", catch_up=10, jitter=0)
@example(interval=1, down=40 * 86400, grace=5, missed="all", catch_up=1000, jitter=1)
@example(interval=1, down=2 * 86400, grace=0, missed="latest", catch_up=10, jitter=7)
@example(interval=86400, down=2680201, grace=0, missed="all", catch_up=32, jitter=0)
@given(
    interval=st.sampled_from([1, 2, 7, 30, 60, 3600, 86400]),
    down=st.integers(min_value=0, max_value=45 * 86400),
    grace=st.integers(min_value=0, max_value=86400),
    missed=st.sampled_from(["skip", "latest", "all"]),
    catch_up=st.integers(min_value=1, max_value=1000),
    jitter=st.integers(min_value=0, max_value=10**9),
)
def test_interval_slots_within_grace_run_however_long_the_outage(
    interval: int, down: int, grace: int, missed: str, catch_up: int, jitter: int
) -> None:
    """An interval schedule down from seconds to 45 days: every slot within grace of now
    (at least 2 s, the scheduler's own delay) runs, the late ones follow the policy
    ("skip": none, "latest": the newest when none is on time, "all": the newest
    ``catch_up``, however long ago), and the skipped count is exact (over the last 31
    days at most). The reference is integer arithmetic, not the schedule."""
    s = small_saga("p", 1)
    schedule = saga.Schedule.every(timedelta(seconds=interval))
    d = saga.Scheduled("p", s, schedule, Job(), missed=missed, catch_up=catch_up,
                       grace=timedelta(seconds=grace))  # type: ignore[arg-type]  # fmt: skip
    now = _NOW + jitter * _US
    since = now - timedelta(seconds=down)
    on_time = max(grace, 2)  # the scheduler's own delay (HANDLING) is always on time
    assert d.slots(since, now) == _reference(interval, since, now, on_time, missed, catch_up)


@settings(max_examples=30, deadline=None)
@given(
    expression=st.sampled_from(["* * * * *", "*/7 * * * *", "0 * * * *", "30 1-3 * * *"]),
    zone=st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe"]),
    down=st.integers(min_value=0, max_value=45 * 86400),
    grace=st.integers(min_value=0, max_value=86400),
    missed=st.sampled_from(["skip", "latest", "all"]),
    catch_up=st.integers(min_value=1, max_value=1000),
    shift=st.integers(min_value=0, max_value=366 * 86400),
)
def test_cron_slots_within_grace_run_however_long_the_outage(
    expression: str, zone: str, down: int, grace: int, missed: str, catch_up: int, shift: int
) -> None:
    """A cron schedule (time zones with daylight saving) down from seconds to 45 days:
    the slots within grace of now run, the late ones follow the policy (however long
    ago), and the skipped ones are counted over the last 31 days at most."""
    s = small_saga("p", 1)
    schedule = saga.Schedule.cron(expression, timezone=zone)
    d = saga.Scheduled("p", s, schedule, Job(), missed=missed, catch_up=catch_up,
                       grace=timedelta(seconds=grace))  # type: ignore[arg-type]  # fmt: skip
    now = _NOW + timedelta(seconds=shift)
    since = now - timedelta(seconds=down)
    fire, skipped = d.slots(since, now)
    start = max(since, now - LOOKBACK)
    every = schedule.fires_between(since, now, limit=10**6)
    on_time = [x for x in every if now - x <= d.on_time]
    late = [x for x in every if now - x > d.on_time]
    counted = [x for x in late if x > start]  # skipped ones: over the last LOOKBACK only
    if missed == "all":
        fired_late = late[-catch_up:]
    elif missed == "latest" and not on_time:
        fired_late = late[-1:]
    else:
        fired_late = []
    assert fire == fired_late + on_time
    assert skipped == len(counted) - sum(1 for x in fired_late if x > start)


async def _down_since(db: asyncpg.Connection, d: saga.Scheduled[Any], ago: timedelta) -> datetime:
    """The schedule's row as a long outage leaves it: its next slot (returned) ``ago``
    in the past."""
    overdue = d.schedule.latest_at_or_before(datetime.now(UTC) - ago)
    assert overdue is not None
    await db.execute(
        "INSERT INTO saga.schedules (name, saga_name, saga_version, spec, missed, catch_up,"
        " next_fire) VALUES ($1, $2, 1, $3, $4, $5, $6)",
        d.name,
        d.saga.name,
        d.schedule.describe(),
        d.missed,
        d.catch_up,
        overdue,
    )
    return overdue


async def _handled(db: asyncpg.Connection, name: str) -> tuple[list[datetime], int]:
    """Wait for the orchestrator to move the schedule past now: the slots run by then,
    and the slots skipped."""
    with anyio.fail_after(20):
        while True:
            row = await db.fetchrow("SELECT now(), next_fire, skipped FROM saga.schedules")
            if row["next_fire"] > row["now"]:
                break
            await anyio.sleep(0.05)
    ran = [x for x in await _slots_run(db, name) if x <= row["now"]]
    return ran, row["skipped"]


def _consecutive(slots: list[datetime], step: timedelta) -> bool:
    return all(b - a == step for a, b in itertools.pairwise(slots))


@pytest.mark.parametrize(
    ("missed", "grace", "late_runs"),
    [("skip", 5, 0), ("all", 5, 3), ("latest", 0, 1)],
)
async def test_after_two_days_down_an_every_second_schedule_runs_its_grace_window(
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    missed: str,
    grace: int,
    late_runs: int,
) -> None:
    """An every-second schedule whose next slot is two days overdue (172,800 slots):
    the orchestrator runs each slot of the grace window before now, preceded by the
    ``late_runs`` newest late ones the policy runs (and nothing older), and counts
    every slot before those as skipped, exactly (in the database and in the log line,
    which says from when it counted)."""
    s = small_saga("tick", 1)
    d = saga.Scheduled("tick", s, EVERY_SECOND, Job(), missed=missed, catch_up=3,
                       grace=timedelta(seconds=grace))  # type: ignore[arg-type]  # fmt: skip
    overdue = await _down_since(db, d, timedelta(days=2))
    opened = datetime.now(UTC)
    with capture_logs() as logs:
        await orchestrator(s, schedules=[d])
        ran, skipped = await _handled(db, "tick")
    said = next(e for e in logs if e["event"] == "schedule_slots_skipped")
    assert (said["skipped"], said["counted_from"]) == (skipped, str(overdue))
    assert len(ran) >= grace + late_runs
    assert _consecutive(ran, timedelta(seconds=1))
    assert ran[0] >= opened - timedelta(seconds=grace + late_runs + 2)
    assert skipped == (ran[0] - overdue).total_seconds()


async def test_after_three_days_down_a_cron_schedule_runs_its_grace_window(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A minutely cron schedule in Europe/Paris whose next slot is three days overdue,
    grace 3 minutes, missed="all" with catch_up 2: the slots of the last 3 minutes run,
    and the 2 just before them; every slot before those is counted as skipped."""
    s = small_saga("cron", 1)
    minutely = saga.Schedule.cron("* * * * *", timezone="Europe/Paris")
    d = saga.Scheduled("cron", s, minutely, Job(), missed="all", catch_up=2,
                       grace=timedelta(minutes=3))  # fmt: skip
    overdue = await _down_since(db, d, timedelta(days=3))
    opened = datetime.now(UTC)
    await orchestrator(s, schedules=[d])
    ran, skipped = await _handled(db, "cron")
    assert 5 <= len(ran) <= 7
    assert _consecutive(ran, timedelta(minutes=1))
    assert opened - timedelta(minutes=6) < ran[0] <= opened - timedelta(minutes=4)
    assert skipped == (ran[0] - overdue) // timedelta(minutes=1)
