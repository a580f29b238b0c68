"""Sagas started on a schedule: one run per slot however many orchestrators hold the
schedule, the declared policy for slots missed while nothing ran, pause and resume, and
refusals at definition time."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, small_saga
from tests.conftest import Cli, OrchestratorFactory
from tests.test_telemetry import points

EVERY_SECOND = saga.Schedule.every(timedelta(seconds=1))


async def _scheduled_runs(db: asyncpg.Connection, name: str) -> list[str]:
    rows = await db.fetch(
        "SELECT idempotency_key FROM saga.runs WHERE idempotency_key LIKE $1 ORDER BY 1",
        f"schedule:{name}:%",
    )
    return [r[0] for r in rows]


def _slot(key: str) -> datetime:
    """The slot of a scheduled run's key ``schedule:<name>:<slot>``."""
    stamp = key.split(":", 2)[2]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


async def test_every_slot_starts_one_run_across_orchestrators(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Three orchestrators hold the same every-second schedule: over about 4 s each slot
    starts exactly one run (no key twice, no slot missing between the first and the
    last), and the runs complete."""
    s = small_saga("tick", 1)
    ticks = saga.Scheduled("ticks", s, EVERY_SECOND, Job(n=1))
    for _ in range(3):
        await orchestrator(s, schedules=[ticks], poll_interval=0.2)
    await anyio.sleep(4.2)
    keys = await _scheduled_runs(db, "ticks")
    assert len(keys) >= 3
    assert Counter(keys).most_common(1)[0][1] == 1
    slots = sorted(_slot(k) for k in keys)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(slots))
    info = {i.name: i for i in await saga.list_schedules(await orchestrator(s))}["ticks"]
    assert info.last_fire == slots[-1] or info.last_fire > slots[-1]
    assert info.next_fire > info.last_fire
    assert info.spec == "every 1 s" or "1" in info.spec


@pytest.mark.parametrize(
    ("missed", "expected"),
    [("skip", 0), ("latest", 1), ("all", 3)],
)
async def test_slots_missed_while_nothing_ran_follow_the_policy(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, missed: str, expected: int
) -> None:
    """A minutely schedule whose next slot is 10 minutes overdue (no orchestrator ran):
    "skip" starts none of the late slots, "latest" the most recent one, "all" (catch_up
    3) the 3 most recent; the rest are counted as skipped and the next slot moves past
    now. (Away from a minute's turn: a slot handled within 2 s of its time is on time.)"""
    second = datetime.now(UTC).second
    if not 3 <= second <= 50:
        await anyio.sleep((63 - second) % 60)
    s = small_saga("report", 1)
    minutely = saga.Schedule.every(timedelta(minutes=1))
    report = saga.Scheduled(
        "report", s, minutely, Job(), missed=missed, catch_up=3, grace=timedelta(seconds=0)
    )  # type: ignore[arg-type]
    overdue = minutely.latest_at_or_before(datetime.now(UTC) - timedelta(minutes=10))
    assert overdue is not None
    await db.execute(
        "INSERT INTO saga.schedules (name, saga_name, saga_version, spec, missed, catch_up,"
        " next_fire) VALUES ('report', 'report', 1, $1, $2, 3, $3)",
        minutely.describe(),
        missed,
        overdue,
    )
    await orchestrator(s, schedules=[report])
    with anyio.fail_after(10):
        next_fire = "SELECT next_fire FROM saga.schedules"
        while (await db.fetchval(next_fire)) <= datetime.now(UTC):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # the orchestrator's loop moves it
    keys = await _scheduled_runs(db, "report")
    late = [_slot(k) for k in keys]
    assert len(late) == expected
    row = await db.fetchrow("SELECT skipped, last_fire FROM saga.schedules")
    assert row["skipped"] + expected >= 10
    if expected:
        assert row["last_fire"] == max(late)
        assert max(late) > datetime.now(UTC) - timedelta(minutes=1, seconds=5)


async def test_pause_and_resume(orchestrator: OrchestratorFactory, db: asyncpg.Connection) -> None:
    """A paused schedule starts nothing (its slots pass), and stays paused; resumed, its
    slots from then on start runs, and those that passed while paused never do."""
    s = small_saga("pulse", 1)
    pulse = saga.Scheduled("pulse", s, EVERY_SECOND, Job())
    orch = await orchestrator(s, schedules=[pulse], poll_interval=0.2)
    await saga.pause_schedule(orch, "pulse")
    paused_at = datetime.now(UTC)
    await anyio.sleep(2.5)
    resumed_at = datetime.now(UTC)
    during = [
        k
        for k in await _scheduled_runs(db, "pulse")
        if paused_at + timedelta(seconds=0.5) < _slot(k) < resumed_at
    ]
    assert during == []
    assert [i.paused for i in await saga.list_schedules(orch)] == [True]
    await saga.resume_schedule(orch, "pulse")
    await anyio.sleep(2.2)
    after = [
        k
        for k in await _scheduled_runs(db, "pulse")
        if _slot(k) >= resumed_at - timedelta(seconds=1)
    ]
    assert len(after) >= 1
    assert all(_slot(k) >= resumed_at - timedelta(seconds=1) for k in after)
    with pytest.raises(saga.ConfigurationError, match="no schedule named 'nope'"):
        await saga.pause_schedule(orch, "nope")


async def test_a_function_input_gets_the_slot(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """input may be a function of the slot's time: each run's input is built from its
    own slot."""
    s = small_saga("stamp", 1)
    stamp = saga.Scheduled("stamp", s, EVERY_SECOND, lambda slot: Job(n=slot.second))
    await orchestrator(s, schedules=[stamp], poll_interval=0.2)
    await anyio.sleep(2.2)
    rows = await db.fetch("SELECT idempotency_key, input FROM saga.runs")
    assert rows
    for key, data in rows:
        assert f'"n":{_slot(key).second}' in data.replace(" ", "")


def test_refused_at_definition() -> None:
    """A schedule that is not a Schedule, an input of another model, an unknown missed
    policy, a catch_up out of 1-1000 or a negative grace: DefinitionError naming it."""
    s = small_saga("bad", 1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"schedule": "0 * * * *"}, "schedule must be a saga.Schedule"),
        ({"input": {"n": 1}}, "input must be a Job"),
        ({"missed": "sometimes"}, "missed must be one of"),
        ({"catch_up": 0}, "catch_up"),
        ({"grace": timedelta(seconds=-1)}, "grace"),
    ]
    for change, message in cases:
        args: dict[str, Any] = {"schedule": EVERY_SECOND, "input": Job(), **change}
        with pytest.raises(saga.DefinitionError, match=message):
            saga.Scheduled("nightly", s, **args)
    with pytest.raises(saga.DefinitionError, match="schedule name"):
        saga.Scheduled("bad name!", s, EVERY_SECOND, Job())
    with pytest.raises(saga.DefinitionError, match=r"time zone|timezone"):
        saga.Schedule.cron("0 9 * * *", timezone="Mars/Olympus")


async def test_an_orchestrator_refuses_schedules_it_cannot_start(
    orchestrator: OrchestratorFactory,
) -> None:
    """A schedule of a saga the orchestrator did not register, or two of one name, is a
    ConfigurationError when the orchestrator is built."""
    s, other = small_saga("mine", 1), small_saga("theirs", 1)
    with pytest.raises(saga.ConfigurationError, match="not in sagas="):
        saga.Orchestrator(
            "postgresql://x", sagas=[s], schedules=[saga.Scheduled("x", other, EVERY_SECOND, Job())]
        )
    twice = [
        saga.Scheduled("x", s, EVERY_SECOND, Job()),
        saga.Scheduled("x", s, EVERY_SECOND, Job()),
    ]
    with pytest.raises(saga.ConfigurationError, match="two schedules are named 'x'"):
        saga.Orchestrator("postgresql://x", sagas=[s], schedules=twice)


_NOW = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)


@settings(max_examples=100, deadline=None)
@given(
    missed=st.sampled_from(["skip", "latest", "all"]),
    down=st.integers(min_value=0, max_value=500),
    catch_up=st.integers(min_value=1, max_value=20),
    grace=st.integers(min_value=0, max_value=120),
)
def test_the_missed_policy_as_a_property(missed: str, down: int, catch_up: int, grace: int) -> None:
    """For a minutely schedule down for ``down`` minutes: slots within grace always run;
    "skip" runs no late slot, "latest" at most one (the newest, and only when no slot is
    on time), "all" the newest ``catch_up`` late ones; fired + skipped = every slot."""
    s = small_saga("p", 1)
    minutely = saga.Schedule.every(timedelta(minutes=1))
    d = saga.Scheduled("p", s, minutely, Job(), missed=missed, catch_up=catch_up,
                       grace=timedelta(seconds=grace))  # type: ignore[arg-type]  # fmt: skip
    since = _NOW - timedelta(minutes=down)
    fire, skipped = d.slots(since, _NOW)
    every = minutely.fires_between(since, _NOW, limit=10_000)
    assert len(fire) + skipped == len(every)
    on_time = [x for x in every if _NOW - x <= d.grace]
    late = [x for x in every if _NOW - x > d.grace]
    assert fire == sorted(fire)
    assert set(on_time) <= set(fire)
    fired_late = [x for x in fire if x in late]
    if missed == "skip":
        assert fired_late == []
    elif missed == "latest":
        assert fired_late == ([] if on_time else late[-1:])
    else:
        assert fired_late == late[-catch_up:]


async def test_the_command_line_lists_pauses_and_resumes(
    orchestrator: OrchestratorFactory, cli: Cli
) -> None:
    """`saga schedules` lists a registered schedule with its next fire time;
    `saga pause-schedule NAME` pauses it (the list says so), `saga resume-schedule`
    resumes it; an unknown name exits 2."""
    s = small_saga("nightly", 1)
    nightly = saga.Scheduled(
        "nightly", s, saga.Schedule.cron("0 2 * * *", timezone="Europe/Paris"), Job()
    )
    await orchestrator(s, schedules=[nightly])
    listed = (await cli.json("schedules"))["schedules"]
    assert [(x["name"], x["saga"], x["paused"]) for x in listed] == [("nightly", "nightly", False)]
    assert "Europe/Paris" in listed[0]["spec"]
    code, out, err = await cli("pause-schedule", "nightly")
    assert code == 0, err
    assert "paused" in out
    assert (await cli.json("schedules"))["schedules"][0]["paused"] is True
    code, out, _ = await cli("schedules")
    assert "paused" in out
    assert (await cli("resume-schedule", "nightly"))[0] == 0
    assert (await cli.json("schedules"))["schedules"][0]["paused"] is False
    code, _, err = await cli("pause-schedule", "nope")
    assert code == 2
    assert "no schedule named 'nope'" in err


async def test_a_schedule_nobody_handles_shows_in_the_late_gauge(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """saga.schedules.late: a schedule whose slot passed 2 minutes ago with no
    orchestrator holding it reads about 120 s (alertable); a paused one is not gauged."""
    await db.execute(
        "INSERT INTO saga.schedules (name, saga_name, saga_version, spec, missed, catch_up,"
        " next_fire, paused) VALUES ('orphan', 'gone', 1, 'every 1 min', 'skip', 1,"
        " now() - interval '2 minutes', false), ('resting', 'gone', 1, 'every 1 min', 'skip',"
        " 1, now() - interval '2 minutes', true)"
    )
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    await orchestrator(concurrency=0, meter_provider=meters, census_interval=0.1)
    with anyio.fail_after(5):
        while not points(reader).get("saga.schedules.late"):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    late = {attrs["saga.schedule"]: value for attrs, value in points(reader)["saga.schedules.late"]}
    assert set(late) == {"orphan"}
    assert 115 <= late["orphan"] <= 180


async def test_a_zero_grace_schedule_fires_every_slot_while_an_orchestrator_is_up(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Schedules): each slot starts "exactly one [run] while at least one
    [orchestrator] is up"; slots missed while nothing ran follow `missed`. With
    grace=0 and missed="skip", an orchestrator that stays up still starts a run for
    (nearly) every slot of an every-second schedule: it handles a slot a little after
    its time, which is not a slot missed while nothing ran."""
    s = small_saga("zero_grace", 1)
    ticks = saga.Scheduled("zero-grace", s, EVERY_SECOND, Job(), grace=timedelta(0))
    orch = await orchestrator(s, schedules=[ticks], poll_interval=0.2)
    await anyio.sleep(4.2)
    assert len(await _scheduled_runs(db, "zero-grace")) >= 3
    (info,) = await saga.list_schedules(orch)
    assert info.skipped == 0


async def _hangs(slot: datetime) -> Job:
    await anyio.sleep(3600)  # an async input over 10 s fails; its slot is tried again
    return Job()


async def test_schedules_with_hung_inputs_do_not_hold_up_the_others(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Schedules): a slot whose async input function takes more than 10 s is
    tried again while within grace, "the schedule's later slots wait behind it; other
    schedules do not". Three hung schedules beside a plain one: the plain schedule
    goes on firing every second."""
    s = small_saga("hung_inputs", 1)
    hung = [saga.Scheduled(f"hung-{n}", s, EVERY_SECOND, _hangs) for n in range(3)]
    plain = saga.Scheduled("plain", s, EVERY_SECOND, Job())
    with capture_logs():  # (the hung slots' schedule_input_failed lines)
        await orchestrator(s, schedules=[*hung, plain], poll_interval=0.2)
        await anyio.sleep(5.5)
    assert len(await _scheduled_runs(db, "plain")) >= 3
    for n in range(3):
        assert await _scheduled_runs(db, f"hung-{n}") == []


async def _input_taking_2_5s(slot: datetime) -> Job:
    await anyio.sleep(2.5)  # well under the 10 s an async input function has
    return Job(n=1)


async def test_a_slow_input_does_not_make_its_slot_late(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Schedules): a slot handled within grace of its time (at least 2 s) always
    runs; an async input fails only past 10 s. With grace=0 and missed="skip", slots
    whose input takes 2.5 s still start their runs: computing the input is part of
    handling the slot, not lateness."""
    s = small_saga("slow_input", 1)
    every_3s = saga.Schedule.every(timedelta(seconds=3))
    slow = saga.Scheduled("slow-input", s, every_3s, _input_taking_2_5s, grace=timedelta(0))
    orch = await orchestrator(s, schedules=[slow], poll_interval=0.2)
    with anyio.fail_after(15):  # two slots: up to 3 s to the first, 3 s more, 2.5 s each
        while len(await _scheduled_runs(db, "slow-input")) < 2:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    (info,) = await saga.list_schedules(orch)
    assert info.skipped == 0
