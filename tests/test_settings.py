"""Settings that cannot work are refused when given, naming the setting (README, "What you
can rely on"), and the settings at the edges of what works really work end to end."""

from __future__ import annotations

import math
import re
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import saga
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory

YEAR = 365 * 24 * 3600.0
HUGE_INT = 2**1024  # an int no float can hold
ENORMOUS_INT = 10**5000  # an int Python refuses to print (more than 4300 digits)


def _cases(*groups: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [case for group in groups for case in group]


NOT_NUMBERS: list[tuple[str, Any]] = [("True", True), ("False", False), ("str", "1")]
NONE: list[tuple[str, Any]] = [("None", None)]
NON_FINITE: list[tuple[str, Any]] = [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]
NEGATIVE: list[tuple[str, Any]] = [("-1", -1), ("-1e-9", -1e-9)]
ZERO: list[tuple[str, Any]] = [("0", 0), ("0.0", 0.0)]
TOO_BIG_FOR_FLOATS: list[tuple[str, Any]] = [("2**1024", HUGE_INT), ("10**5000", ENORMOUS_INT)]
BEYOND_INT32: list[tuple[str, Any]] = [("2**31", 2**31), ("2**63", 2**63), ("1e300", 1e300)]
FRACTIONAL: list[tuple[str, Any]] = [("1.5", 1.5), ("0.5", 0.5)]
DURATION_TOO_LONG: list[tuple[str, Any]] = [("a year and a second", YEAR + 1), ("1e300", 1e300)]

# Durations (seconds), counts and flags, each with the values that cannot work for it.
DURATION = _cases(NOT_NUMBERS, NON_FINITE, NEGATIVE, TOO_BIG_FOR_FLOATS)
POSITIVE_DURATION = _cases(DURATION, ZERO)
COUNT = _cases(NOT_NUMBERS, NONE, NON_FINITE, FRACTIONAL, BEYOND_INT32, [("-1", -1)])
COUNT.append(("10**5000", ENORMOUS_INT))


def _params(setting: str, cases: list[tuple[str, Any]]) -> list[Any]:
    return [pytest.param(setting, value, id=f"{setting}={label}") for label, value in cases]


RETRY_CASES = [
    *_params("max_attempts", _cases(COUNT, ZERO[:1], [("1_000_001", 1_000_001)])),
    *_params("initial_delay", _cases(DURATION, NONE, DURATION_TOO_LONG)),
    *_params("max_delay", _cases(DURATION, NONE, DURATION_TOO_LONG)),
    *_params("multiplier", _cases(DURATION, NONE, ZERO, [("0.5", 0.5)])),
    *_params("jitter", _cases(DURATION, NONE, [("1.5", 1.5), ("2", 2), ("1e300", 1e300)])),
]


@pytest.mark.parametrize(("setting", "value"), RETRY_CASES)
def test_retry_refuses_settings_that_cannot_work(setting: str, value: Any) -> None:
    """Every numeric setting of saga.Retry refuses NaN, infinities, bools, strings, None,
    negative numbers, numbers too large to mean anything (or to store), zero or a fraction
    where a count or a growth factor is needed, with a DefinitionError naming it."""
    with pytest.raises(saga.DefinitionError, match=re.escape(f"Retry.{setting}")):
        saga.Retry(**{setting: value})


STEP_CASES = [
    *_params("timeout", _cases(POSITIVE_DURATION, DURATION_TOO_LONG)),
    *_params(
        "lease_seconds",
        _cases(POSITIVE_DURATION, [("0.05", 0.05), ("a day and a second", 86401.0)]),
    ),
]


@pytest.mark.parametrize(("setting", "value"), STEP_CASES)
def test_step_refuses_settings_that_cannot_work(setting: str, value: Any) -> None:
    """@saga.step(timeout=, lease_seconds=) refuse durations that cannot work (NaN,
    infinities, zero, negative, beyond a year / outside 0.1 s to 24 h, not a number) with
    a DefinitionError naming the setting, and the saga keeps no half-declared step."""
    s = saga.Saga("settings", input=Job)
    with pytest.raises(saga.DefinitionError, match=re.escape(setting)):

        @s.step(**{setting: value})
        async def work(ctx: saga.Context[Job]) -> None: ...

    assert s.steps == []


@pytest.mark.parametrize(
    ("setting", "value"), _params("timeout", _cases(POSITIVE_DURATION, DURATION_TOO_LONG))
)
def test_compensation_timeout_refuses_settings_that_cannot_work(setting: str, value: Any) -> None:
    """@step.compensate(timeout=) refuses the same durations as a step's timeout, naming
    it, and the step keeps no compensation."""
    s = saga.Saga("settings", input=Job)

    @s.step()
    async def work(ctx: saga.Context[Job]) -> int:
        return 1

    with pytest.raises(saga.DefinitionError, match=re.escape(setting)):

        @work.compensate(timeout=value)
        async def undo(ctx: saga.Context[Job], result: int) -> None: ...

    assert work.compensation is None


@pytest.mark.parametrize(("setting", "value"), _params("version", _cases(COUNT, ZERO[:1])))
def test_saga_version_refuses_values_that_cannot_be_stored(setting: str, value: Any) -> None:
    """Saga(version=) must be an int from 1 to 2**31-1 (Postgres integer): anything else
    is a DefinitionError naming the version."""
    with pytest.raises(saga.DefinitionError, match=setting):
        saga.Saga("versioned", input=Job, version=value)


TEXT_CASES: list[tuple[str, Any]] = [
    ("empty", ""),
    ("NUL", "worker\x00one"),
    ("lone surrogate", "worker\ud800"),
    ("int", 5),
    ("bytes", b"worker"),
    ("True", True),
]
ORCHESTRATOR_CASES = [
    *_params("concurrency", _cases(COUNT)),
    *_params("lease_seconds", _cases(POSITIVE_DURATION, NONE, [("0.05", 0.05)])),
    *_params("lease_seconds", [("a day and a second", 86401.0), ("1e300", 1e300)]),
    *_params("poll_interval", _cases(POSITIVE_DURATION, NONE, [("1e300", 1e300)])),
    *_params("shutdown_timeout", _cases(DURATION, NONE, [("1e300", 1e300)])),
    *_params("max_payload_bytes", _cases(COUNT, ZERO[:1])),
    *_params("census_interval", _cases(POSITIVE_DURATION, NONE, [("1e300", 1e300)])),
    *_params("worker_id", TEXT_CASES),
    *_params("migrate", [("None", None), ("1", 1), ("0", 0), ("str", "false")]),
    *_params("schema", [("upper", "Saga"), ("empty", ""), ("64 chars", "s" * 64), ("None", None)]),
    *_params("schema", [("injection", 'x"; drop schema public; --'), ("digit first", "1s")]),
]


@pytest.mark.parametrize(("setting", "value"), ORCHESTRATOR_CASES)
def test_orchestrator_refuses_settings_that_cannot_work(setting: str, value: Any) -> None:
    """saga.Orchestrator refuses every setting that cannot work when it is constructed,
    before any connection, with a ConfigurationError naming the setting."""
    s = saga.Saga("settings", input=Job)
    with pytest.raises(saga.ConfigurationError, match=re.escape(setting)):
        saga.Orchestrator("postgresql://nowhere.invalid/db", sagas=[s], **{setting: value})


def test_settings_at_the_documented_limits_are_accepted() -> None:
    """The limits themselves work: a million attempts, zero and one-year delays, no or
    full jitter, a multiplier of 1, leases of 0.1 s and 24 h, version 2**31-1, a client
    without concurrency and a shutdown that does not wait."""
    saga.Retry(max_attempts=1_000_000, initial_delay=0, max_delay=YEAR, multiplier=1, jitter=0)
    saga.Retry(max_attempts=1, initial_delay=YEAR, max_delay=0, multiplier=1e300, jitter=1)
    s = saga.Saga("limits", input=Job, version=2**31 - 1)

    @s.step(timeout=YEAR, lease_seconds=0.1)
    async def short(ctx: saga.Context[Job]) -> int:
        return 1

    @short.compensate(timeout=YEAR)
    async def undo(ctx: saga.Context[Job], result: int) -> None: ...

    @s.step(lease_seconds=86400)
    async def long(ctx: saga.Context[Job]) -> None: ...

    for options in (
        {"concurrency": 0, "shutdown_timeout": 0, "lease_seconds": 0.1},
        {"concurrency": 2**31 - 1, "lease_seconds": 86400, "max_payload_bytes": 1},
    ):
        saga.Orchestrator("postgresql://nowhere.invalid/db", sagas=[s], **options)


finite_delays = st.floats(min_value=0, max_value=YEAR) | st.integers(0, int(YEAR))
any_numbers = st.floats() | st.integers(-(2**64), 2**64) | finite_delays


@settings(max_examples=300, deadline=None)
@given(
    max_attempts=st.integers(1, 1_000_000) | st.integers(-5, 5),
    initial_delay=any_numbers,
    max_delay=any_numbers,
    multiplier=any_numbers | st.floats(min_value=1, allow_infinity=False),
    jitter=any_numbers | st.floats(0, 1),
    data=st.data(),
)
def test_any_accepted_retry_policy_gives_finite_non_negative_delays(
    max_attempts: int,
    initial_delay: float,
    max_delay: float,
    multiplier: float,
    jitter: float,
    data: st.DataObject,
) -> None:
    """For any numbers Retry accepts, delay(n) for every attempt n up to max_attempts is a
    finite, non-negative number of seconds, at most max_delay, and never raises
    (OverflowError included): a policy that was accepted cannot break a worker later."""
    try:
        policy = saga.Retry(
            max_attempts=max_attempts,
            initial_delay=initial_delay,
            max_delay=max_delay,
            multiplier=multiplier,
            jitter=jitter,
        )
    except saga.DefinitionError:
        return
    attempts = {1, policy.max_attempts, data.draw(st.integers(1, policy.max_attempts))}
    for attempt in sorted(attempts):
        delay = policy.delay(attempt)
        assert math.isfinite(delay)
        assert 0 <= delay <= policy.max_delay


# -- on a real database --------------------------------------------------------------------


def _counting_saga(name: str = "pooled") -> saga.Saga[Job]:
    """one, two, three: each returns n + the length of its name."""

    def result(ctx: saga.Context[Job]) -> int:
        return ctx.input.n + len(ctx.step)

    return small_saga(name, ["one", "two", "three"], result=result, retry=None)


async def test_user_pool_with_one_connection_is_refused(dsn: str) -> None:
    """An application's asyncpg pool with max_size=1 cannot work (the LISTEN connection
    holds one): the orchestrator refuses it with a ConfigurationError, and leaves the
    pool open."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=1)
    try:
        with anyio.fail_after(10), pytest.raises(saga.ConfigurationError, match="pool"):
            async with saga.Orchestrator(pool, sagas=[_counting_saga()]):
                pass
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_user_pool_with_two_connections_runs_sagas(dsn: str) -> None:
    """An application's asyncpg pool with max_size=2 is enough: runs complete through it,
    and the pool stays open (and usable) after the orchestrator closed."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2)
    s = _counting_saga()
    try:
        with anyio.fail_after(20):
            async with saga.Orchestrator(pool, sagas=[s], poll_interval=0.2) as orch:
                runs = [await orch.start(s, Job(n=n)) for n in range(5)]
                assert [await run.result(timeout=10) for run in runs] == [n + 5 for n in range(5)]
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("length", range(55, 64))
async def test_long_schema_names_work_with_notifications(
    orchestrator: OrchestratorFactory, length: int
) -> None:
    """Schema names of 55 to 63 characters (the most Postgres allows) migrate, start and
    finish runs. Both sides poll only every 30 s, so the worker learning of the new run
    and the client learning of its end within the test's timeout prove that the
    LISTEN/NOTIFY channels of such schemas work."""
    schema = f"s{length}_".ljust(length, "x")
    assert len(schema) == length
    s = _counting_saga("long_schema")
    await orchestrator(s, schema=schema, poll_interval=30)  # the worker, idle
    client = await orchestrator(s, schema=schema, poll_interval=30, concurrency=0)
    with anyio.fail_after(15):
        run = await client.start(s, Job(n=1))
        assert await run.result(timeout=10) == 6


async def _objects(db: asyncpg.Connection, schema: str) -> list[Any]:
    """The schema (if it exists) and every relation in it."""
    rows = await db.fetch(
        "SELECT n.nspname, c.relname FROM pg_namespace n"
        " LEFT JOIN pg_class c ON c.relnamespace = n.oid WHERE n.nspname = $1 ORDER BY 2",
        schema,
    )
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("state", ["missing", "empty", "one migration behind"])
async def test_migrate_false_refuses_a_schema_not_fully_migrated(
    dsn: str, db: asyncpg.Connection, state: str
) -> None:
    """Opening with migrate=False against a schema that does not exist, is empty or lacks
    the latest migration fails on `async with` with a ConfigurationError telling to run
    `saga migrate`, and creates nothing; against a migrated schema it opens."""
    schema = "unmigrated"
    if state == "empty":
        await db.execute(f"CREATE SCHEMA {schema}")
    elif state == "one migration behind":
        assert await saga.migrate(dsn, schema=schema)
        await db.execute(
            f"DELETE FROM {schema}.migrations"
            f" WHERE version = (SELECT max(version) FROM {schema}.migrations)"
        )
    objects_before = await _objects(db, schema)
    s = _counting_saga()
    with anyio.fail_after(10):
        with pytest.raises(saga.ConfigurationError, match="saga migrate"):
            async with saga.Orchestrator(dsn, sagas=[s], schema=schema, migrate=False):
                pass
        assert await _objects(db, schema) == objects_before
        async with saga.Orchestrator(dsn, sagas=[s], migrate=False, poll_interval=0.2) as orch:
            assert await (await orch.start(s, Job(n=0))).result(timeout=10) == 5
