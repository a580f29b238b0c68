"""`saga dashboard` opens like the other operator commands: it never creates or
migrates a schema (an unmigrated one is exit 1, and stays absent), a bad schema name is
a usage error (exit 2) with the message `saga runs` gives, and an operator name or
title the dashboard could not use refuses to start (exit 2) instead of answering 500
to every request.

Each case runs the real command in a process with a timeout: a command that served
instead of refusing fails the test, it does not hang it.
"""

from __future__ import annotations

import socket

import asyncpg
import pytest

from tests import _harness
from tests.conftest import Cli


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _dashboard(dsn: str, *args: str) -> tuple[int, str]:
    """`python -m saga --dsn DSN dashboard ARGS` on a free port: exit code, stderr."""
    done = await _harness.run(
        "-m", "saga", "--dsn", dsn, "dashboard", "--port", str(_free_port()), *args,
        timeout=30,
    )  # fmt: skip
    return done.returncode, done.stderr


@pytest.mark.parametrize("read_only", [True, False])
async def test_an_unmigrated_schema_is_refused_and_never_created(
    dsn: str, db: asyncpg.Connection, read_only: bool
) -> None:
    """`saga dashboard --schema another_typo` (read-only or not) exits 1 saying the
    schema is not migrated and to run `saga migrate`, as `saga runs` does; the schema
    is not created (it used to be, with every table, by a viewer)."""
    code, err = await _dashboard(
        dsn, "--schema", "another_typo", *(["--read-only"] if read_only else [])
    )
    assert code == 1, err
    assert "not migrated" in err
    assert "saga migrate" in err
    assert "Traceback" not in err
    exists = "SELECT count(*) FROM pg_namespace WHERE nspname = 'another_typo'"
    assert await db.fetchval(exists) == 0


@pytest.mark.parametrize("schema", ["Bad-Name", "pg_saga", "1abc", "a" * 64, "x y"])
async def test_a_bad_schema_name_is_a_usage_error_as_for_saga_runs(
    dsn: str, cli: Cli, schema: str
) -> None:
    """A schema name saga refuses exits 2 (usage), before any connection, with the
    same message as `saga runs --schema NAME`."""
    code, err = await _dashboard(dsn, "--schema", schema)
    runs_code, _, runs_err = await cli("runs", "--schema", schema)
    assert (code, runs_code) == (2, 2), err
    message = runs_err.strip().removeprefix("saga runs: ")
    assert "invalid schema name" in message
    assert err.strip() == f"saga dashboard: {message}"


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--operator", "", "non-empty"),
        ("--operator", "o" * 201, "at most 200"),
        ("--operator", "\udcff", "Unicode"),  # a byte that is not UTF-8 in argv
        ("--title", "", "title must be a non-empty str"),
        ("--title", "t" * 201, "title must be at most 200"),
    ],
)
async def test_an_operator_name_or_title_the_dashboard_cannot_use_refuses_to_start(
    dsn: str, option: str, value: str, reason: str
) -> None:
    """`--operator ""` (and any name an action could not record) or a title no page
    could show exits 2 at once with a message naming the problem, by the rule the
    dashboard's guard applies to every operator: it used to start, then answer 500
    with a server traceback to every signed-in request."""
    code, err = await _dashboard(dsn, option, value)
    assert code == 2, err
    assert reason in err
    assert "Traceback" not in err
    if option == "--operator":
        assert "--operator" in err
