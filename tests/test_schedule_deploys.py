"""Schedules across pauses, deploys and long downtimes: resuming keeps a slot still
ahead, a definition changed in a deploy keeps its pending slots, the missed policy
reaches back however long nothing ran, and cron steps wider than their range fire as
in cron."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import saga
from saga._schedules import described
from tests._sagas import Job, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory
from tests.test_schedule_outages import _down_since
from tests.test_telemetry import points


async def _slots(db: asyncpg.Connection, name: str) -> list[datetime]:
    """The slots of the runs the schedule ``name`` started (from their keys)."""
    rows = await db.fetch(
        "SELECT idempotency_key FROM saga.runs WHERE idempotency_key LIKE $1",
        f"schedule:{name}:%",
    )
    stamps = (r[0].removeprefix(f"schedule:{name}:") for r in rows)
    return sorted(datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) for s in stamps)


async def _sleep_until(moment: datetime) -> None:
    await anyio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


async def test_resuming_a_schedule_no_orchestrator_runs_keeps_its_next_slot(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """README (Schedules): "`ScheduleInfo` has the last and next fire times, ... and
    `late` (seconds since a slot passed unhandled); the gauge `saga.schedules.late` is
    the figure to alert on" (metrics table: "seconds since a schedule's slot passed
    without starting its run (0 on time)").

    A nightly schedule (02:00 Paris) registered by an orchestrator that is then closed
    (a deploy, maintenance). An operator pauses and resumes it: no slot passed, so its
    next fire is still the next 02:00, and `late` and the `saga.schedules.late` gauge
    (read by another orchestrator's census) stay 0: no false alert."""
    s = small_saga("nightly", 1)
    nightly = saga.Scheduled(
        "nightly", s, saga.Schedule.cron("0 2 * * *", timezone="Europe/Paris"), Job()
    )
    holder = await orchestrator(s, schedules=[nightly])
    await holder.aclose()
    client = await open_client(s)
    (before,) = await saga.list_schedules(client)
    assert before.late == 0
    reader = InMemoryMetricReader()
    # Another service's orchestrator on the database: it gauges every schedule.
    await orchestrator(concurrency=0, meter_provider=MeterProvider(metric_readers=[reader]),
                       census_interval=0.1)  # fmt: skip
    with anyio.fail_after(20):
        await saga.pause_schedule(client, "nightly")
        await saga.resume_schedule(client, "nightly")
        await anyio.sleep(3)
        (after,) = await saga.list_schedules(client)
        gauge = {a["saga.schedule"]: v for a, v in points(reader).get("saga.schedules.late", [])}
    assert after.paused is False
    assert (after.next_fire, after.late, gauge.get("nightly", 0)) == (before.next_fire, 0, 0)


async def test_an_equivalent_schedule_respelled_in_a_deploy_keeps_its_slots(
    dsn: str, db: asyncpg.Connection
) -> None:
    """README (Schedules): "A slot handled within `grace` of its time (at least 2 s ...)
    always runs; slots missed while nothing ran follow `missed`: ... `"all"` (each,
    oldest first, at most the `catch_up` most recent), however long nothing ran; late
    slots are counted ... (`ScheduleInfo.skipped` ...)".

    An every-2-s schedule (missed="all", default grace of 1 min) is deployed again after
    about 5 s without an orchestrator, its schedule now written with an explicit anchor
    at 2000-01-01 UTC: another description of the very same slots. The 2-3 slots that
    passed during the deploy are within grace: each runs, none is counted as skipped."""
    s = small_saga("respelled", 1)
    old = saga.Schedule.every(timedelta(seconds=2))
    new = saga.Schedule.every(timedelta(seconds=2), anchor=datetime(2000, 1, 1, tzinfo=UTC))
    now = datetime.now(UTC)
    soon = now + timedelta(minutes=1)
    assert old.fires_between(now, soon, limit=99) == new.fires_between(now, soon, limit=99)
    with anyio.fail_after(40):
        async with saga.Orchestrator(
            dsn, sagas=[s], poll_interval=0.2, shutdown_timeout=1,
            schedules=[saga.Scheduled("report", s, old, Job(), missed="all")],
        ):  # fmt: skip
            await anyio.sleep(2.5)
        before = await _slots(db, "report")
        assert before, "the first deploy started nothing"
        await anyio.sleep(5)  # the deploy: 2-3 slots pass, all within grace
        async with saga.Orchestrator(
            dsn, sagas=[s], poll_interval=0.2, shutdown_timeout=1,
            schedules=[saga.Scheduled("report", s, new, Job(), missed="all")],
        ):  # fmt: skip
            await anyio.sleep(2.5)
        started = await _slots(db, "report")
        skipped = await db.fetchval("SELECT skipped FROM saga.schedules")
    every = old.fires_between(before[0] - timedelta(microseconds=1), started[-1], limit=99)
    missing = [x for x in every if x not in started]
    assert (missing, skipped) == ([], 0)


async def test_the_missed_policy_reaches_slots_older_than_31_days(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Schedules): "slots missed while nothing ran follow `missed`: `"skip"`
    (none), `"latest"` (the most recent one), `"all"` (each, oldest first, at most the
    `catch_up` most recent), however long nothing ran; late slots are counted over the
    last 31 days at most".

    Two schedules whose orchestrators were down for 70 days (their next slot, as the
    library left it, lies 70 days back): a yearly one (`0 0 D M *`, its one slot in that
    time 40 days ago) with missed="latest", and a weekly one with missed="all",
    catch_up=10 (10 slots missed). "latest" starts one run, for the slot of 40 days ago;
    "all" starts the 10 missed slots: the 31-day window counts late slots, it does not
    bound which ones the policy runs."""
    now = datetime.now(UTC)
    day = now - timedelta(days=40)
    s = small_saga("annual", 1)
    yearly = saga.Schedule.cron(f"0 0 {day.day} {day.month} *")
    weekly = saga.Schedule.every(timedelta(days=7))
    annual = saga.Scheduled("annual", s, yearly, Job(), missed="latest")
    digest = saga.Scheduled("digest", s, weekly, Job(), missed="all", catch_up=10)
    holder = await orchestrator(s, schedules=[annual, digest])
    await holder.aclose()
    down_since = now - timedelta(days=70)
    for sched in (annual, digest):  # nothing ran for 70 days: next_fire 70 days back
        await db.execute(
            "UPDATE saga.schedules SET next_fire = $2 WHERE name = $1",
            sched.name,
            sched.schedule.next_after(down_since),
        )
    missed_yearly = yearly.fires_between(down_since, now, limit=99)
    missed_weekly = weekly.fires_between(down_since, now, limit=99)
    assert len(missed_yearly) == 1
    assert len(missed_weekly) == 10
    await orchestrator(s, schedules=[annual, digest])
    with anyio.fail_after(20):
        while await db.fetchval("SELECT min(next_fire) FROM saga.schedules") <= now:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # the orchestrator's loop moves them
    assert (await _slots(db, "annual"), await _slots(db, "digest")) == (
        missed_yearly,
        missed_weekly,
    )


@pytest.mark.parametrize(
    ("expression", "fires"),
    [
        ("0 0 1 */12 *", [datetime(2027, 1, 1, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC)]),
        ("0 */24 * * *", [datetime(2026, 6, 2, tzinfo=UTC), datetime(2026, 6, 3, tzinfo=UTC)]),
        (
            "30/30 9 * * *",
            [datetime(2026, 6, 1, 9, 30, tzinfo=UTC), datetime(2026, 6, 2, 9, 30, tzinfo=UTC)],
        ),
    ],
)
def test_valid_cron_steps_wider_than_their_range_are_accepted(
    expression: str, fires: list[datetime]
) -> None:
    """README (Schedules): "`Schedule.cron(expression, timezone="UTC")` takes the 5 cron
    fields (`*`, lists, ranges, steps, ...)"; "Refused at definition ...: cron
    expressions that do not parse or can never fire".

    `0 0 1 */12 *` (once a year, "every 12 months"), `0 */24 * * *` (daily, "every 24
    hours") and `30/30 9 * * *` (09:30, `30-59/30`) are ordinary cron expressions (Vixie
    cron and its descendants accept them) that parse and fire: accepted, and they fire
    at their range's first value."""
    schedule = saga.Schedule.cron(expression)
    start = datetime(2026, 6, 1, 0, 0, 30, tzinfo=UTC)
    assert schedule.fires_between(start, fires[-1], limit=2) == fires


async def _slow_job(slot: datetime) -> Job:
    await anyio.sleep(0.3)  # an input read from a service: well under the 10 s limit
    return Job()


@pytest.mark.timeout(60)
async def test_a_rolling_deploy_runs_the_new_definitions_slots(
    dsn: str, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Schedules): "any number of them may hold the same one"; a definition
    changed in a deploy: "the new definition's slots since then run on time or follow
    `missed`, none is lost to the deploy". An old orchestrator holds "sync" daily at
    12:00 UTC; the new one (every second) starts, then the old one stops: every second
    after the deploy has its run, whichever orchestrator handled it (the old one by the
    row's definition). Before, the old orchestrator handled the first due slot by its
    own definition and moved the next slot to 12:00: no run until then, none counted."""
    s = small_saga("sync", 1)
    old = saga.Scheduled("sync", s, saga.Schedule.cron("0 12 * * *"), Job())
    new = saga.Scheduled("sync", s, saga.Schedule.every(timedelta(seconds=1)), _slow_job)
    async with saga.Orchestrator(dsn, sagas=[s], schedules=[old], poll_interval=0.2,
                                 shutdown_timeout=2.0):  # fmt: skip
        await orchestrator(s, schedules=[new])
        deployed = datetime.now(UTC)
        await anyio.sleep(2.5)
    await anyio.sleep(3)  # the new orchestrator alone
    ran = [x for x in await _slots(db, "sync") if x > deployed]
    row = await db.fetchrow("SELECT spec, skipped FROM saga.schedules")
    assert row["spec"] == "every 1 s"
    assert len(ran) + row["skipped"] >= 4, (ran, dict(row))


@pytest.mark.parametrize("zone", ["right/Europe/Paris", "posix/UTC", "right/UTC"])
def test_tzdata_builds_are_not_iana_zones(zone: str) -> None:
    """README: cron times are "in an IANA time zone", and time zones that do not exist
    are refused with a DefinitionError. tzdata's right/ (leap seconds) and posix/ builds
    are refused. Before, right/Europe/Paris was taken, and `0 2 * * *` fired at 01:00 in
    Paris in December (Python keeps that file's summer time for ever)."""
    with pytest.raises(saga.DefinitionError, match="unknown time zone"):
        saga.Schedule.cron("0 2 * * *", timezone=zone)


async def test_a_schedule_resumed_after_its_slot_passed_is_next_due_at_its_next_slot(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """README: `resume_schedule` (slots that passed while paused never run);
    `ScheduleInfo.late`: "seconds since a slot passed unhandled". A daily 02:00 Paris
    schedule paused over its slot, resumed with no orchestrator up, says its next fire is
    tomorrow's 02:00 Paris, and it is not late. Before, its next fire was the instant of
    the resume (no slot) and `late` grew from there."""
    s = small_saga("report", 1)
    daily = saga.Schedule.cron("0 2 * * *", timezone="Europe/Paris")
    d = saga.Scheduled("nightly", s, daily, Job())
    now = datetime.now(UTC)
    await _down_since(db, d, timedelta(minutes=1))
    await db.execute("UPDATE saga.schedules SET paused = true")
    client = await open_client(s)
    await saga.resume_schedule(client, "nightly")
    await anyio.sleep(1)
    (info,) = await saga.list_schedules(client)
    assert (info.next_fire, info.late, info.paused) == (daily.next_after(now), 0, False)


async def test_resuming_drops_the_late_slots_a_schedule_was_paused_with(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """README: resuming, "those that passed while it was paused, or were late when it
    was paused, do not" run. An hourly schedule (missed="all") 3 hours overdue, paused
    and resumed: it is next due at its next hourly slot, and an orchestrator starting
    then runs none of the late slots (pausing is the operator's say)."""
    s = small_saga("hourly", 1)
    hourly = saga.Schedule.every(timedelta(hours=1))
    d = saga.Scheduled("hourly", s, hourly, Job(), missed="all", catch_up=10)
    await _down_since(db, d, timedelta(hours=3))
    client = await open_client(s)
    await saga.pause_schedule(client, "hourly")
    await saga.resume_schedule(client, "hourly")
    (info,) = await saga.list_schedules(client)
    assert info.next_fire == hourly.next_after(datetime.now(UTC))
    await orchestrator(s, schedules=[d])
    await anyio.sleep(1)
    assert await _slots(db, "hourly") == []


_UNITS = st.sampled_from(["*", "0", "*/15", "5-40/5", "1,2,3"])


@example(seconds=86400, anchor=None, minute="0", hour="2", zone="Europe/Paris")
@settings(max_examples=200, deadline=None)
@given(
    seconds=st.integers(1, 366 * 86400),
    anchor=st.none() | st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    minute=_UNITS,
    hour=st.sampled_from(["*", "2", "9-17", "*/6"]),
    zone=st.sampled_from(["UTC", "Europe/Paris", "America/Santiago", "Australia/Lord_Howe"]),
)
def test_a_stored_spec_reads_back_as_the_same_schedule(
    seconds: int, anchor: datetime | None, minute: str, hour: str, zone: str
) -> None:
    """Orchestrators handle a schedule by the definition registered last, read back from
    its row (`Schedule.describe()`): for intervals (with or without anchors) and cron
    expressions in any zone, what is read back describes itself the same and fires at
    the same times."""
    every = saga.Schedule.every(
        timedelta(seconds=seconds),
        anchor=None if anchor is None else anchor.replace(microsecond=0, tzinfo=UTC),
    )
    cron = saga.Schedule.cron(f"{minute} {hour} * * *", timezone=zone)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    for schedule in (every, cron):
        back = described(schedule.describe())
        assert back is not None
        assert back.describe() == schedule.describe()
        assert back.fires_between(start, start + timedelta(days=40), limit=5) == (
            schedule.fires_between(start, start + timedelta(days=40), limit=5)
        )
