"""First contact with the command line and the bulk actions: a DSN saga cannot read is
a ConfigurationError naming what is wrong (never a raw ValueError, never a wrapped
port), the CLI exits 2 for arguments it checks before connecting and 1 for what it
finds on open, and the bulk actions' arguments are refused under the name the caller
wrote, before anything is read."""

from __future__ import annotations

import uuid

import anyio
import asyncpg
import pytest
from asyncpg import connect_utils
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import saga
from saga._db import describe_dsn, validate_dsn
from tests._harness import run
from tests.conftest import Cli, ClientFactory

SECRET = "pw-Zq9xK"  # a password: never in an error message
NO_SOCKET = "host=/nonexistent-saga-dir"  # a unix socket folder that does not exist
MALFORMED = (
    "postgresql://[bad",
    "postgresql://postgres@/postgres?host=/tmp&port=abc",
    "postgresql://u@h:5432:1/x",
    "postgresql://u@,h/x",
    "postgresql://u@h/x?port=5432,",
    "postgresql://u@[zz]/x",
    f"postgresql://u:{SECRET}@h/x?password{SECRET}",
)
OUT_OF_RANGE = (
    "postgresql://postgres@localhost:99999/x",
    "postgresql://postgres@localhost:0/x",
    "postgresql://postgres@/x?host=/tmp&port=99999",
    "postgresql://postgres@/x?host=/tmp&port=65536",
    "postgresql://postgres@/x?port=0",
)


def _parse_like_asyncpg(dsn: str) -> None:
    """asyncpg's own reading of a DSN, as it does on each connection."""
    connect_utils._parse_connect_dsn_and_args(
        dsn=dsn,
        host=None,
        port=None,
        user=None,
        password=None,
        passfile=None,
        database=None,
        ssl=None,
        service=None,
        servicefile=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )


@pytest.mark.parametrize("dsn", MALFORMED + OUT_OF_RANGE)
def test_a_dsn_asyncpg_cannot_read_is_refused_when_the_client_is_built(dsn: str) -> None:
    """Malformed DSNs (an unbalanced '[', a port that is no number, an empty host in a
    list, a bad query) and ports outside 1-65535 (in the host part or in port=) are a
    ConfigurationError from saga.Client(...) saying "invalid DSN", without the password;
    before, they passed, then raised a bare ValueError on open or connected to a wrapped
    port."""
    with pytest.raises(saga.ConfigurationError, match="invalid DSN") as raised:
        saga.Client(dsn)
    assert SECRET not in str(raised.value)
    with pytest.raises(saga.ConfigurationError, match="invalid DSN"):
        saga.Orchestrator(dsn, sagas=[])


@given(st.text(max_size=60))
@example("[bad")
@example("u@h:99999/x")
@example("u@/x?host=/tmp&port=abc")
@example("u@h/x?port=1,2")
@settings(max_examples=400, deadline=None)
def test_what_validate_dsn_accepts_asyncpg_can_read(rest: str) -> None:
    """For any text after postgresql:// (with a password in front), validate_dsn either
    refuses it with a ConfigurationError that does not repeat the password, or asyncpg
    reads it without the ValueError/IndexError it raises for what it cannot parse (its
    own ClientConfigurationError, and OSError for missing SSL files, stay possible: saga
    translates them on open), and every port it reads is from 1 to 65535."""
    dsn = f"postgresql://u:{SECRET}@{rest}"
    refused = ""
    try:
        validate_dsn(dsn)
    except saga.ConfigurationError as exc:
        refused = str(exc) or "?"
    if refused:
        assert SECRET not in refused
        return
    try:
        _parse_like_asyncpg(dsn)
    except (asyncpg.ClientConfigurationError, OSError):
        return
    assert SECRET not in describe_dsn(dsn)


@given(port=st.text(max_size=12), database=st.text(alphabet="abcxyz_-%.", max_size=8))
@example(port="abc", database="x")
@example(port="99999", database="x")
@example(port="1,", database="x")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_opening_any_dsn_raises_only_saga_errors(port: str, database: str) -> None:
    """saga.Client(dsn) then opening it, for DSNs with an arbitrary port= text and a
    server that cannot be reached (a socket folder that does not exist, so it fails at
    once): only ConfigurationError (refused) or DatabaseError (unreachable, naming the
    database and port) come out, never the password."""
    dsn = f"postgresql://u:{SECRET}@/{database}?{NO_SOCKET}&port={port}"

    async def open_() -> None:
        with anyio.fail_after(10):
            async with saga.Client(dsn):
                pass

    with pytest.raises((saga.ConfigurationError, saga.DatabaseError)) as raised:
        anyio.run(open_)
    assert SECRET not in str(raised.value)
    if isinstance(raised.value, saga.DatabaseError):
        assert str(raised.value).startswith("connecting to the database "), raised.value
        assert "/nonexistent-saga-dir" in str(raised.value)


async def test_an_unreachable_host_list_names_each_host_and_port() -> None:
    """A DSN listing several hosts with their ports that cannot be reached is a
    DatabaseError naming each host with its own port (before, urllib's reading named
    "127.0.0.1:1,127.0.0.2" at port 2)."""
    dsn = "postgresql://postgres@127.0.0.1:1,127.0.0.2:2/postgres"
    with anyio.fail_after(30), pytest.raises(saga.DatabaseError) as raised:
        async with saga.Client(dsn):
            pass
    message = str(raised.value)
    assert "the database 'postgres' at 127.0.0.1 port 1, 127.0.0.2 port 2" in message


@pytest.mark.parametrize("dsn", MALFORMED[:3] + OUT_OF_RANGE[:1])
@pytest.mark.parametrize(
    "command", [["runs"], ["migrate"], ["worker", "examples.checkout:checkout"]]
)
async def test_cli_says_a_malformed_dsn_in_one_line_with_exit_2(
    cli: Cli, dsn: str, command: list[str]
) -> None:
    """`saga --dsn BAD runs|migrate|worker` exits 2 (usage) with one line on stderr
    naming the DSN's problem: no traceback, no password (before: a ValueError's
    traceback, exit 1, or a connection to a wrapped port)."""
    code, _, err = await cli("--dsn", dsn, *command, dsn=False)
    assert code == 2, err
    assert "invalid DSN" in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert SECRET not in err


COMMANDS = (
    ["worker", "examples.checkout:checkout", "--no-migrate"],
    ["runs"],
    ["stats"],
    ["attention"],
    ["queues"],
    ["schedules"],
    ["show", str(uuid.uuid4())],
    ["cancel", "--all"],
    ["retry", "--all", "--yes"],
)


async def _saga(cli: Cli, dsn: str, *argv: str) -> tuple[int, str]:
    """`saga --dsn DSN ARGV`: the exit code and stderr; a worker runs in a process of
    its own (it handles signals, which only a main thread can)."""
    if "worker" in argv:
        done = await run("-m", "saga", "--dsn", dsn, *argv)
        return done.returncode, done.stderr
    code, _, err = await cli("--dsn", dsn, *argv, dsn=False)
    return code, err


async def test_every_command_exits_2_for_bad_arguments_and_1_for_what_open_finds(
    cli: Cli,
) -> None:
    """Every command draws the same line: a bad argument checked before connecting (a
    schema name Postgres reserves) exits 2; what opening finds (a schema that is not
    migrated, a server that cannot be reached) exits 1, `saga worker --no-migrate`
    included (it exited 2 for an unmigrated schema, while `saga runs` exited 1)."""
    unreachable = f"postgresql://postgres@/postgres?{NO_SOCKET}&port=5432"
    for command in COMMANDS:
        for dsn, schema, code, says in (
            (cli.dsn, "pg_x", 2, "reserves the prefix pg_"),
            (cli.dsn, "fresh2", 1, "not migrated"),
            (unreachable, "saga", 1, "connecting to the database 'postgres'"),
        ):
            got, err = await _saga(cli, dsn, "--schema", schema, *command)
            assert (got, says in err) == (code, True), (command, schema, err)
            assert "Traceback" not in err
    code, err = await _saga(cli, unreachable, "migrate")
    assert code == 1, err
    assert "connecting to the database 'postgres'" in err


@pytest.mark.parametrize("verb", ["cancel", "retry"])
@pytest.mark.parametrize("extra", [[], ["--expect", "3"], ["--yes"]])
@pytest.mark.parametrize("limit", ["10001", "0", "-5", "many"])
async def test_cli_bulk_limit_is_refused_naming_limit(
    cli: Cli, verb: str, extra: list[str], limit: str
) -> None:
    """`saga cancel|retry --all --limit N` outside 1-10000 exits 2 naming --limit (not
    the Python argument `cap` of count_matching), whether it would count or act."""
    code, out, err = await cli(verb, "--all", "--limit", limit, *extra)
    assert code == 2, err
    assert "--limit" in err
    assert "10000" in err
    assert "cap" not in err
    assert out == ""


@pytest.mark.parametrize("expect", [-1, 1.5, True, False, "3", 3.0])
async def test_bulk_expect_must_be_a_count(open_client: ClientFactory, expect: object) -> None:
    """cancel_runs and retry_runs refuse an `expect` that is not an int >= 0 (a bool, a
    float, a str, a negative number) with a ConfigurationError naming `expect`, rather
    than "N runs match now, not the -1 expected"; an out-of-range `limit` names
    `limit`."""
    client = await open_client()
    for act in (saga.cancel_runs, saga.retry_runs):
        with pytest.raises(saga.ConfigurationError, match=r"^expect must be"):
            await act(client, limit=5, expect=expect)  # type: ignore[arg-type]
        with pytest.raises(saga.ConfigurationError, match=r"^limit must be an int from 1 to"):
            await act(client, limit=10_001, expect=0)


async def test_bulk_arguments_are_checked_before_anything_is_read(
    open_client: ClientFactory,
) -> None:
    """A bad `expect` is refused before the runs are listed: on a closed client (which
    cannot read) the error is still the ConfigurationError about `expect`."""
    client = await open_client()
    await client.aclose()
    for act in (saga.cancel_runs, saga.retry_runs):
        with pytest.raises(saga.ConfigurationError, match=r"^expect must be"):
            await act(client, limit=5, expect=-1)
