"""Test fixtures: a real PostgreSQL, and a fresh database per test.

``scripts/test.sh`` provisions a throwaway cluster and exports ``SAGA_TEST_DSN``. A
template database is migrated once per session; each test gets ``CREATE DATABASE ...
TEMPLATE`` (about 0.1 s), which isolates rows, NOTIFY channels and advisory locks.

On that database: ``dsn``, ``db`` (a plain connection), ``pool`` (an asyncpg pool),
``store`` (saga's private store, for the tests of that piece), ``orchestrator`` and
``open_client`` (factories, closed at teardown), ``cli`` (the `saga` command in process).
Around it: ``children`` (processes started through tests._harness, killed at teardown)
and ``pg_server`` (the server's pg_ctl). Small sagas come from tests._sagas.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from saga.__main__ import main
from saga._model import EventKind
from saga._store import Store
from tests._harness import Children, Server

TEMPLATE = "saga_test_template"

# In every test database: a history row whose kind saga._model.EventKind does not know
# fails the statement that writes it, so the whole suite checks the one vocabulary
# (tests/test_vocabulary.py proves the guard itself). The kinds are enum values
# ([a-z_]+), safe to write as literals.
_KINDS = ", ".join(f"'{kind}'" for kind in EventKind)
VOCABULARY_GUARD = f"""
CREATE FUNCTION saga.known_event_kind() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind NOT IN ({_KINDS}) THEN
        RAISE EXCEPTION 'unknown history event kind %', NEW.kind;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER known_event_kind BEFORE INSERT ON saga.events
    FOR EACH ROW EXECUTE FUNCTION saga.known_event_kind();
"""


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def base_dsn() -> str:
    dsn = os.environ.get("SAGA_TEST_DSN")
    if not dsn:
        pytest.fail(
            "SAGA_TEST_DSN is not set: run the suite with `bash scripts/test.sh`, which "
            "starts a throwaway PostgreSQL, or point SAGA_TEST_DSN at a server you own"
        )
    return dsn


@pytest.fixture(scope="session")
async def template_dsn(base_dsn: str) -> AsyncIterator[str]:
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        dsn = _with_database(base_dsn, TEMPLATE)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            await saga.migrate(pool, schema="saga")
            await pool.execute(VOCABULARY_GUARD)
        finally:
            await pool.close()
        yield dsn
    finally:
        await admin.close()
        await _drop(base_dsn, TEMPLATE)


async def _drop(base_dsn: str, database: str) -> None:
    # A fresh connection: a test may have restarted the server meanwhile.
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def dsn(base_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A DSN to a new database, already migrated (schema ``saga``), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(base_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await admin.close()
    try:
        yield _with_database(base_dsn, name)
    finally:
        await _drop(base_dsn, name)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, to inspect what the library wrote."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        if not conn.is_closed():
            conn.terminate()


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on the test database (up to 4 connections), closed afterwards."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        with anyio.move_on_after(10) as scope:
            await pool.close()
        if scope.cancelled_caught:  # a connection still in use: do not wait for it
            pool.terminate()


@pytest.fixture
def store(pool: asyncpg.Pool) -> Store:
    """saga's private store on ``pool`` (schema ``saga``): only for tests of the store
    itself (its statements, fencing, leases), which say so."""
    return Store(pool)


OrchestratorFactory = Callable[..., Any]
ClientFactory = Callable[..., Any]


@pytest.fixture
async def orchestrator(dsn: str) -> AsyncIterator[OrchestratorFactory]:
    """Open orchestrators on the test database; all are closed at teardown.

    Defaults suit tests: short poll interval and shutdown timeout.
    """
    async with AsyncExitStack() as stack:

        async def open_(*sagas: saga.Saga[Any], **options: Any) -> saga.Orchestrator:
            options.setdefault("poll_interval", 0.2)
            options.setdefault("shutdown_timeout", 2.0)
            orch = saga.Orchestrator(dsn, sagas=list(sagas), **options)
            return await stack.enter_async_context(orch)

        yield open_


@pytest.fixture
async def open_client(dsn: str) -> AsyncIterator[ClientFactory]:
    """Open clients (saga.Client: starts runs and waits for them, executes nothing) on
    the test database; all are closed at teardown. Short poll interval by default."""
    async with AsyncExitStack() as stack:

        async def open_(*sagas: saga.Saga[Any], **options: Any) -> saga.Client:
            options.setdefault("poll_interval", 0.2)
            client = saga.Client(dsn, sagas=list(sagas), **options)
            return await stack.enter_async_context(client)

        yield open_


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    """Start processes through tests._harness (their logs in ``tmp_path``); every one
    still running at teardown is killed and reaped."""
    started = Children(tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def pg_server() -> Server:
    """The test server's control (stop, start, crash-restart); the test is skipped when
    it runs without scripts/test.sh's server."""
    server = Server.from_env()
    if server is None:
        pytest.skip("needs the server control of scripts/test.sh (SAGA_TEST_PGCTL/PGDATA)")
    return server


class Cli:
    """Runs `saga` in process (in a thread, since main() runs its own event loop), on the
    test database unless ``dsn=False``; returns (exit code, stdout, stderr)."""

    def __init__(self, dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.dsn = dsn
        self.capsys = capsys

    async def __call__(self, *argv: str, dsn: bool = True) -> tuple[int, str, str]:
        self.capsys.readouterr()
        args = [*argv, "--dsn", self.dsn] if dsn else list(argv)
        with anyio.fail_after(30):
            code = await anyio.to_thread.run_sync(main, args)
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *argv: str) -> Any:
        """The command's --json output, decoded (it must exit 0)."""
        code, out, err = await self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(dsn: str, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """`saga` in process; meanwhile this process's own orchestrator logs are captured,
    so they stay out of the command's stdout."""
    with capture_logs():
        yield Cli(dsn, capsys)
