"""Mistakes a new user makes at first contact get an error that names what is wrong, of
the type the README's error table maps to it, and write nothing: an unreachable or
malformed database address, a reserved schema name, ages and time shifts beyond what
Postgres' timestamps hold, a bad ``result(timeout=)``, the wrong object given to
``start()`` or ``get_run()``, a step name given to ``ctx.result()``, and definitions whose
settings cannot work. Operators see who acted and why in the CLI's raw history, and learn
why a resolved run with a concurrency key can no longer be retried."""

from __future__ import annotations

import argparse
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

import saga
from saga import _checks
from saga._cli_values import parse_duration
from saga._model import HistoryEvent
from saga.testing import advance
from tests._sagas import Job, small_saga
from tests.conftest import Cli, ClientFactory, OrchestratorFactory

UNREACHABLE = (
    "postgresql://postgres@/postgres?host=/nonexistent-dir&port=1",
    "postgresql://postgres@127.0.0.1:1/postgres",
)
TOO_OLD = (timedelta(days=366_000), timedelta(days=999_999_999))


@pytest.mark.parametrize("dsn", UNREACHABLE)
async def test_an_unreachable_database_is_named_as_such(dsn: str) -> None:
    """Opening a client, or migrating, with a server that does not answer raises
    DatabaseError saying that connecting failed and where (host and port), not that a
    migration failed."""
    port = "port 1"
    with anyio.fail_after(30):
        with pytest.raises(saga.DatabaseError) as raised:
            async with saga.Client(dsn):
                pass
        with pytest.raises(saga.DatabaseError) as migrating:
            await saga.migrate(dsn)
    for error in (raised.value, migrating.value):
        assert str(error).startswith("connecting to the database 'postgres' at "), error
        assert port in str(error)
        assert "migration" not in str(error)


@pytest.mark.parametrize(
    "dsn", ["not a dsn", "host=/tmp dbname=app", "mysql://u@h/db", "", "postgresql:/x"]
)
def test_a_dsn_that_is_not_a_postgres_uri_is_refused_at_once(dsn: str) -> None:
    """A DSN asyncpg cannot read (no postgresql:// scheme, e.g. a libpq key=value
    string) is a ConfigurationError when the client is built, before any connection."""
    with pytest.raises(saga.ConfigurationError, match="postgresql:// URI"):
        saga.Client(dsn)


async def test_a_dsn_option_asyncpg_refuses_is_a_configuration_error(dsn: str) -> None:
    """A URI whose option asyncpg refuses (an unknown sslmode) is a ConfigurationError
    when the client opens, not a DatabaseError to retry."""
    with anyio.fail_after(30), pytest.raises(saga.ConfigurationError, match="sslmode"):
        async with saga.Client(dsn + "&sslmode=bogus"):
            pass


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("connect_timeout=5", "connect_timeout"),  # libpq's, which asyncpg sends on
        ("statement_timeout=abc", "statement_timeout"),
        ("shared_buffers=1MB", "shared_buffers"),
    ],
)
async def test_a_dsn_option_the_server_refuses_is_a_configuration_error(
    dsn: str, cli: Cli, option: str, named: str
) -> None:
    """README, Errors: a DSN option refused is "a `ConfigurationError` ... on open, and
    a server that cannot be reached a `DatabaseError`". asyncpg sends the DSN's query
    options it does not know to the server as settings; one the server refuses (an
    unknown name, a bad value, one it cannot change now) was a DatabaseError, the kind
    a caller retries as an outage. It is a ConfigurationError naming the option, for the
    client and the orchestrator alike; the CLI exits 1 naming it (found on open, as
    an unknown sslmode is), not with a traceback."""
    bad = dsn + "&" + option
    with anyio.fail_after(30), pytest.raises(saga.ConfigurationError, match=named):
        async with saga.Client(bad):
            pass
    with anyio.fail_after(30), pytest.raises(saga.ConfigurationError, match=named):
        async with saga.Orchestrator(bad, sagas=[small_saga("dsn_options")]):
            pass
    code, _, err = await cli("runs", "--dsn", bad, dsn=False)
    assert (code, named in err, "Traceback" in err) == (1, True, False), err


@pytest.mark.parametrize("schema", ["pg_x", "pg_", "pg_catalog"])
def test_schema_names_postgres_reserves_are_refused(schema: str) -> None:
    """Schema names that match saga's pattern but start with pg_ (reserved by
    Postgres) are a ConfigurationError when the client is built."""
    with pytest.raises(saga.ConfigurationError, match="reserves the prefix pg_"):
        saga.Client("postgresql://localhost/app", schema=schema)


async def test_ages_beyond_a_thousand_years_are_refused_naming_the_setting(
    open_client: ClientFactory,
) -> None:
    """list_runs, count_runs, cancel_runs and prune refuse older_than / newer_than beyond
    1,000 years with a ConfigurationError naming the setting (Postgres' timestamps would
    overflow: a DatabaseError, read as "retry later"); 1,000 years is accepted."""
    client = await open_client()
    calls: list[tuple[str, Any]] = []
    for age in TOO_OLD:
        calls += [
            ("older_than", lambda a=age: saga.list_runs(client, older_than=a)),
            ("newer_than", lambda a=age: saga.count_runs(client, newer_than=a)),
            ("older_than", lambda a=age: saga.cancel_runs(client, older_than=a, limit=10)),
            ("older_than", lambda a=age: saga.prune(client, older_than=a, dry_run=True)),
        ]
    for name, call in calls:
        with pytest.raises(saga.ConfigurationError, match=f"{name} must be at most 1,000 years"):
            await call()
    page = await saga.list_runs(client, older_than=timedelta(days=365_250))
    assert page.runs == []


async def test_a_time_shift_beyond_a_thousand_years_is_refused(
    orchestrator: OrchestratorFactory,
) -> None:
    """saga.testing.advance refuses a shift that is infinite, beyond 1,000 years or not a
    duration with InvalidInputError, and a run id that is no UUID with ConfigurationError,
    as every other function taking a run id does."""
    s = small_saga("shifted", 2)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    for by in (math.inf, 10.0**12, TOO_OLD[0], "1s", True):
        with pytest.raises(saga.InvalidInputError, match="1,000 years"):
            await advance(orch, run, by)  # type: ignore[arg-type]
    with pytest.raises(saga.ConfigurationError, match="not a run id"):
        await advance(orch, "junk", 1.0)


@given(
    st.integers(min_value=1001 * 53, max_value=10**30).map(lambda w: f"{w}w")
    | st.sampled_from(["99999999w", "9" * 400 + "s", "1" * 40 + "d1h"])
)
def test_cli_durations_beyond_a_thousand_years_are_usage_errors(text: str) -> None:
    """A CLI duration beyond 1,000 years (however written, however many digits) is an
    argparse usage error naming it, never an overflow traceback."""
    with pytest.raises(argparse.ArgumentTypeError, match="at most 1,000 years"):
        parse_duration(text)


async def test_cli_refuses_a_huge_age_with_exit_2(cli: Cli) -> None:
    """`saga runs --older-than 9999999999999w` exits 2 with a message naming the
    duration, no traceback."""
    code, _, err = await cli("runs", "--older-than", "9999999999999w")
    assert code == 2
    assert "at most 1,000 years" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1.0, "1", True, [1]])
async def test_result_timeout_is_checked(orchestrator: OrchestratorFactory, timeout: Any) -> None:
    """``result(timeout=)`` refuses NaN, infinities, negative values, bools and
    non-numbers with a ConfigurationError naming ``timeout``; 0 is a plain expiry."""
    s = small_saga("awaited", 1, delay=5.0)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(10), pytest.raises(saga.ConfigurationError, match="timeout must"):
        await run.result(timeout=timeout)
    with anyio.fail_after(10), pytest.raises(saga.RunTimeoutError):
        await run.result(timeout=0)


async def test_start_refuses_what_is_not_its_saga_and_writes_nothing(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """start() with something else than a Saga, with a second Saga object of a
    registered name and version (a module imported twice), with a ``conn`` that is not an
    asyncpg connection, or a non-bool ``require_same_input`` raises a SagaError saying
    which; no run is written."""
    s = small_saga("twice", 1)
    orch = await orchestrator(s)
    with pytest.raises(saga.ConfigurationError, match=r"takes a saga\.Saga, got 'twice'"):
        await orch.start("twice", Job(n=1))  # type: ignore[arg-type]
    with pytest.raises(saga.DefinitionError, match="another Saga object named 'twice' v1"):
        await orch.start(small_saga("twice", 1), Job(n=1))
    with pytest.raises(saga.DefinitionError, match="'other' v1 is not registered"):
        await orch.start(small_saga("other", 1), Job(n=1))
    with pytest.raises(saga.ConfigurationError, match="conn must be an asyncpg connection"):
        await orch.start(s, Job(n=1), conn=object())  # type: ignore[arg-type]
    with pytest.raises(saga.ConfigurationError, match="require_same_input must be a bool"):
        await orch.start(s, Job(n=1), key="k", require_same_input="no")  # type: ignore[arg-type]
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


@given(st.one_of(st.text(max_size=40), st.integers(), st.none(), st.binary(max_size=16)))
def test_anything_but_a_uuid_is_not_a_run_id(value: Any) -> None:
    """A run id is a UUID or its text; anything else (random text, ints, bytes, None)
    is the given error type saying "not a run id", never a ValueError or AttributeError."""
    try:
        expected: uuid.UUID | None = uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        expected = None
    if expected is not None:
        assert _checks.run_id(value, saga.ConfigurationError) == expected
    else:
        with pytest.raises(saga.ConfigurationError, match="not a run id"):
            _checks.run_id(value, saga.ConfigurationError)


async def test_get_run_refuses_what_is_not_a_run_id(open_client: ClientFactory) -> None:
    """get_run() with text that is no UUID, or a number, raises ConfigurationError
    "not a run id", as list_runs(before=...) does."""
    client = await open_client()
    for value in ("junk", 5, None):
        with pytest.raises(saga.ConfigurationError, match="not a run id"):
            client.get_run(value)  # type: ignore[arg-type]
    run_id = uuid.uuid4()
    assert client.get_run(str(run_id)).id == run_id


class In(BaseModel):
    n: int = 0


async def test_ctx_result_of_a_step_name_says_what_it_takes(
    orchestrator: OrchestratorFactory,
) -> None:
    """A step calling ``ctx.result("a")`` (a name, not the step) fails with a
    DefinitionError saying ctx.result() takes a step or a wait, not an AttributeError."""
    s = saga.Saga("by_name", input=In)

    @s.step(retry=saga.Retry(max_attempts=1))
    async def a(ctx: saga.Context[In]) -> int:
        return 1

    @s.step(retry=saga.Retry(max_attempts=1))
    async def b(ctx: saga.Context[In]) -> int:
        return int(ctx.result("a"))  # type: ignore[call-overload]

    orch = await orchestrator(s)
    run = await orch.start(s, In())
    with anyio.fail_after(10), pytest.raises(saga.RunError) as raised:
        await run.result()
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.DefinitionError"
    assert "ctx.result() takes a step or a wait of saga 'by_name'" in raised.value.error.message


def test_definitions_whose_settings_cannot_work_are_refused() -> None:
    """A rate limit's error names its unit (calls per second, not seconds); an empty
    sleep name is refused like every other empty name; a concurrency_limit without a
    concurrency_key (nothing to limit) is refused."""
    for rate in (0, math.nan):
        with pytest.raises(saga.DefinitionError, match="calls per second"):
            saga.RateLimit("r", per_second=rate)
    s = saga.Saga("named", input=In)

    @s.step()
    async def a(ctx: saga.Context[In]) -> int:
        return 1

    with pytest.raises(saga.DefinitionError, match="invalid sleep name ''"):
        s.sleep(5, name="")
    with pytest.raises(saga.DefinitionError, match="give concurrency_key= too"):
        saga.Saga("limited", input=In, concurrency_limit=5)
    saga.Saga("limited", input=In, concurrency_limit=5, concurrency_key=lambda i: "k")


def test_the_raw_history_shows_who_acted_and_why_but_no_payload() -> None:
    """An event's line (the CLI's --events, the demo) shows the operator's name and note,
    the signal and why it was refused, and a rate limit's delay; never a payload."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    acted = HistoryEvent(1, at, "cancel_requested", None, None, None, {"by": "bob", "note": "no"})
    assert 'by="bob"' in acted.describe()
    assert 'note="no"' in acted.describe()
    refused = HistoryEvent(
        2, at, "signal_refused", None, None, None, {"signal": "go", "reason": "ended"}
    )
    assert 'signal="go"' in refused.describe()
    assert 'reason="ended"' in refused.describe()
    waited = HistoryEvent(3, at, "woke", "w", None, None, {"w": {"secret": 1}})
    assert "secret" not in waited.describe()


async def test_a_resolved_run_with_a_key_says_why_it_cannot_be_retried(
    orchestrator: OrchestratorFactory,
) -> None:
    """A failed run with a concurrency key, resolved by an operator (its key freed):
    retry() and cancel() raise InvalidRunStateError saying it was resolved and its key
    freed (the README's Traffic control and Operator API say the same)."""
    s = saga.Saga("keyed_fail", input=In, concurrency_key=lambda i: "acct")

    @s.step()
    async def a(ctx: saga.Context[In]) -> int:
        return 1

    @a.compensate(retry=saga.Retry(max_attempts=1))
    async def undo_a(ctx: saga.Context[In], one: int) -> None:
        raise RuntimeError("undo failed")

    @s.step()
    async def b(ctx: saga.Context[In]) -> int:
        raise saga.PermanentError("no")

    orch = await orchestrator(s)
    run = await orch.start(s, In())
    with anyio.fail_after(10), pytest.raises(saga.RunFailedError):
        await run.result()
    await run.resolve(note="refunded by hand", by="ana")
    for action in (run.retry, run.cancel):
        with pytest.raises(saga.InvalidRunStateError, match="freed its concurrency key"):
            await action()
