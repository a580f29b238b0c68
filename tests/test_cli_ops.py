"""`saga` as an operator's tool on a real PostgreSQL: `--version`, output piped into a
reader that stops early (`| head`), finding a run by its business key, and `saga stats`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from tests.examples._worker import ROOT
from tests.test_cli import Cli

PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Keep this process's own orchestrator logs out of captured stdout."""
    with capture_logs():
        yield


@pytest.fixture
def cli(dsn: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(dsn, capsys)


def saga_process(
    dsn: str | None, *argv: str, stdout: int | None = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    """`python -m saga ARGV` from the repository root, SAGA_DSN set to ``dsn`` (or unset)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SAGA_DSN", None)
    if dsn is not None:
        env["SAGA_DSN"] = dsn
    return subprocess.Popen(
        [sys.executable, "-m", "saga", *argv],
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )


async def insert_runs(
    db: asyncpg.Connection,
    count: int,
    saga_name: str,
    *,
    key_prefix: str | None = None,
    status: str = "completed",
) -> None:
    """Insert ``count`` runs of ``saga_name`` directly (fast, no worker), keyed
    ``key_prefix + n`` when a prefix is given; finished ones carry an error message so
    that table rows are wide."""
    finished = status in {"completed", "compensated", "failed", "cancelled"}
    await db.execute(
        """
        INSERT INTO saga.runs (id, saga_name, saga_version, idempotency_key, status, input,
                               step_name, due_at, finished_at, error)
        SELECT gen_random_uuid(), $1, 1, $3 || g, $4, '{}', 'charge',
               CASE WHEN $5 THEN NULL ELSE now() END, CASE WHEN $5 THEN now() END,
               jsonb_build_object('type', 'ConnectionError', 'message', repeat('x', 50))
        FROM generate_series(1, $2::integer) AS g
        """,
        saga_name,
        count,
        key_prefix,
        status,
        finished,
    )


async def test_version_prints_the_package_version_without_a_database(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`saga --version` prints `saga <saga.__version__>` and exits 0, in process and as a
    process, with no DSN anywhere: it never touches a database."""
    monkeypatch.delenv("SAGA_DSN", raising=False)
    assert await cli("--version", dsn=False) == (0, f"saga {saga.__version__}\n", "")

    def run() -> tuple[int, bytes, bytes]:
        proc = saga_process(None, "--version")
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err

    code, out, err = await anyio.to_thread.run_sync(run)
    assert (code, out.decode(), err) == (0, f"saga {saga.__version__}\n", b"")


@pytest.mark.timeout(180)
async def test_a_reader_that_stops_early_ends_the_command_quietly(
    cli: Cli, dsn: str, db: asyncpg.Connection
) -> None:
    """When the reader of stdout goes away early (`saga runs | head -c 64`), `runs`,
    `show` and their `--json` forms stop quietly: exit 141 (128 + SIGPIPE), nothing on
    stderr, no traceback. Each output is over twice a pipe's capacity, so the pipe
    really breaks while the command is still writing."""
    await insert_runs(db, 1000, "piped-saga-with-a-long-name")
    shown = uuid.uuid4()
    await db.execute(
        "INSERT INTO saga.runs (id, saga_name, saga_version, status, input, step_name,"
        " finished_at) VALUES ($1, 'flaky', 1, 'failed', '{}', 'flaky', now())",
        shown,
    )
    await db.execute(  # 2000 failed attempts: a long timeline and a longer history
        """
        INSERT INTO saga.events (run_id, kind, step, attempt, worker, data)
        SELECT $1, CASE WHEN g % 2 = 1 THEN 'step_started' ELSE 'step_failed' END, 'flaky',
               (g + 1) / 2, 'a-worker-with-a-rather-long-name',
               CASE WHEN g % 2 = 1 THEN '{}'::jsonb ELSE jsonb_build_object('retry_in', 0.5,
                   'error', jsonb_build_object('type', 'ConnectionError',
                                               'message', repeat('y', 50))) END
        FROM generate_series(1, 4000) AS g ORDER BY g
        """,
        shown,
    )
    commands = [
        ["runs", "--limit", "1000"],
        ["runs", "--limit", "1000", "--json"],
        ["show", str(shown), "--events"],
        ["show", str(shown), "--json"],
    ]

    def read_then_close(argv: list[str]) -> tuple[int | None, bytes, bytes]:
        with saga_process(dsn, *argv) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            try:
                first = proc.stdout.read(64)
                proc.stdout.close()
                err = proc.stderr.read()
                return proc.wait(timeout=60), first, err
            finally:
                if proc.poll() is None:
                    proc.kill()

    for argv in commands:
        code, out, err = await cli(*argv)
        assert code == 0, err
        # More than the pipe and Python's 8 KiB buffer can hold when the reader leaves.
        assert len(out.encode()) > 2 * PIPE_BUFFER, argv
        code, first, stderr = await anyio.to_thread.run_sync(read_then_close, argv)
        assert first == out.encode()[:64], argv
        assert (code, stderr.decode()) == (141, ""), argv
