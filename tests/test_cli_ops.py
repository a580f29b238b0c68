"""`saga` as an operator's tool on a real PostgreSQL: `--version`, output piped into a
reader that stops early (`| head`), finding a run by its business key, and `saga stats`."""

from __future__ import annotations

import getpass
import uuid

import anyio
import asyncpg
import pytest

import saga
from tests import _harness
from tests._sagas import Job, parked_saga, permanent, small_saga, until_status
from tests._wait_sagas import SAGAS as WAIT_SAGAS
from tests._wait_sagas import approval
from tests.conftest import Cli, ClientFactory, OrchestratorFactory
from tests.test_operator_lookup import KEYS

PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity


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

    done = await _harness.run("-m", "saga", "--version", timeout=30)  # SAGA_DSN unset
    assert (done.returncode, done.stdout, done.stderr) == (0, f"saga {saga.__version__}\n", "")


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
        with _harness.popen("-m", "saga", *argv, env=_harness.python_env(dsn)) as proc:
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


async def test_show_and_runs_find_a_run_by_its_key(cli: Cli, open_client: ClientFactory) -> None:
    """`saga show --key KEY` shows the one run started with KEY and `saga runs --key KEY`
    lists it, for keys with quotes, spaces, unicode, ':', wildcards, a leading '-'
    (`--key=-K`) and 512 characters; the key line of `show` prints it escaped."""
    alpha = parked_saga("alpha")
    client = await open_client(alpha)
    keys = [*KEYS, "-dash-first", "tab\there"]
    runs = {key: await client.start(alpha, Job(n=i), key=key) for i, key in enumerate(keys)}
    for key, run in runs.items():
        shown = await cli.json("show", f"--key={key}")
        assert shown["run"]["id"] == str(run.id), key
        assert shown["run"]["key"] == key
        listed = await cli.json("runs", f"--key={key}")
        assert [r["id"] for r in listed["runs"]] == [str(run.id)], key
    code, out, _ = await cli("show", "--key", "tab\there")
    assert code == 0
    assert "key:                tab\\there\n" in out
    assert (await cli.json("runs", "--key", "order"))["runs"] == []  # exact match only


async def test_show_by_key_when_several_sagas_or_none_have_it(
    cli: Cli, open_client: ClientFactory
) -> None:
    """A key used by two sagas is a usage error (exit 2) naming both sagas and asking for
    --saga, which then picks the run; an unknown key, or a key of another saga, exits 3;
    a key no run can have (too long, NUL, undecodable) finds nothing or exits 2."""
    alpha, beta = parked_saga("alpha"), parked_saga("beta")
    client = await open_client(alpha, beta)
    a = await client.start(alpha, Job(n=1), key="shared:1")
    b = await client.start(beta, Job(n=2), key="shared:1")

    code, out, err = await cli("show", "--key", "shared:1")
    assert (code, out) == (2, "")
    assert "key 'shared:1' is used by runs of 2 sagas ('alpha', 'beta')" in err
    assert "--saga NAME" in err
    assert (await cli.json("show", "--key", "shared:1", "--saga", "beta"))["run"]["id"] == str(b.id)
    assert (await cli.json("show", "--key", "shared:1", "--saga", "alpha"))["run"]["id"] == str(
        a.id
    )
    listed = await cli.json("runs", "--key", "shared:1")
    assert {r["id"] for r in listed["runs"]} == {str(a.id), str(b.id)}

    for argv, message in [
        (["--key", "nope"], "no run with key 'nope'"),
        (["--key", "shared:1", "--saga", "gamma"], "no run with key 'shared:1' in saga 'gamma'"),
        (["--key", "k" * 10_000], "no run with key 'kkk"),
    ]:
        code, _, err = await cli("show", *argv)
        assert code == 3, argv
        assert message in err, argv
    for argv, message in [
        ([], "name the run by its id (RUN) or by --key KEY\n"),
        ([str(a.id), "--key", "shared:1"], "not both"),
        ([str(a.id), "--saga", "alpha"], "--saga goes with --key"),
        (["--key", "a\x00b"], "key must be a non-empty str without NUL"),
        (["--key", "\udcff"], "key must be a non-empty str without NUL"),
        (["--key", "x", "--saga", "bad\x00saga"], "saga must be a non-empty str"),
    ]:
        code, _, err = await cli("show", *argv)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)


async def test_stats_on_an_empty_database_prints_zeros(cli: Cli) -> None:
    """`saga stats` on a database without runs prints the header and a total row of
    zeros; --json has every status at 0 and no saga."""
    code, out, _ = await cli("stats")
    assert code == 0
    header, total = out.splitlines()
    statuses = [s.value for s in saga.RunStatus]
    assert header.split() == ["SAGA", *(s.upper() for s in statuses), "TOTAL"]
    assert total.split() == ["(total)", *["0"] * (len(statuses) + 1)]
    assert await cli.json("stats") == {
        "sagas": {},
        "total": {**dict.fromkeys(statuses, 0), "total": 0},
    }


async def test_stats_counts_runs_per_saga_and_status_with_filters(
    cli: Cli, db: asyncpg.Connection, open_client: ClientFactory
) -> None:
    """`saga stats` prints one row per saga (a column per status, then the total) and a
    total row; --saga, --older-than and --newer-than filter like `saga runs`, --json
    carries the same numbers as saga.count_runs, a hostile saga name is escaped, and a
    bad duration exits 2."""
    await insert_runs(db, 3, "alpha")
    await insert_runs(db, 2, "alpha", status="pending")
    await insert_runs(db, 1, "beta\x1b[31m", status="failed")
    await insert_runs(db, 4, "gamma", status="cancelled")
    await db.execute(
        "UPDATE saga.runs SET created_at = now() - interval '2 days' WHERE saga_name = 'gamma'"
    )

    code, out, _ = await cli("stats")
    assert code == 0
    assert "\x1b" not in out
    header, *rows = [line.split() for line in out.splitlines()]
    column = {name: i for i, name in enumerate(header)}
    by_saga = {row[0]: row for row in rows}
    assert list(by_saga) == ["alpha", "beta\\x1b[31m", "gamma", "(total)"]
    assert by_saga["alpha"][column["COMPLETED"]] == "3"
    assert by_saga["alpha"][column["PENDING"]] == "2"
    assert by_saga["alpha"][column["TOTAL"]] == "5"
    assert by_saga["gamma"][column["CANCELLED"]] == "4"
    assert by_saga["(total)"][column["TOTAL"]] == "10"
    assert by_saga["(total)"][column["FAILED"]] == "1"

    data = await cli.json("stats")
    assert data["sagas"]["alpha"] == {
        **dict.fromkeys((s.value for s in saga.RunStatus), 0),
        "completed": 3,
        "pending": 2,
        "total": 5,
    }
    assert data["sagas"]["beta\x1b[31m"]["failed"] == 1
    client = await open_client()
    counts = await saga.count_runs(client)
    assert data["total"] == {
        **{s.value: n for s, n in counts.items()},
        "total": sum(counts.values()),
    }

    only = await cli.json("stats", "--saga", "gamma")
    assert list(only["sagas"]) == ["gamma"]
    assert only["total"]["total"] == 4
    assert list((await cli.json("stats", "--older-than", "1d"))["sagas"]) == ["gamma"]
    assert (await cli.json("stats", "--newer-than", "1h"))["total"]["total"] == 6
    code, _, err = await cli("stats", "--older-than", "soon")
    assert code == 2
    assert "invalid duration 'soon'" in err
    code, out, _ = await cli("stats", "--help", dsn=False)
    assert code == 0
    assert out.startswith("usage: saga stats")


async def test_cli_signal_records_the_user_running_it_when_no_by_is_given(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """README (Command line): every action, `signal` included, takes `--by NAME`
    (default: the user running the command), recorded in the run's history."""
    orch = await orchestrator(*WAIT_SAGAS)
    run = await orch.start(approval, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    code, _, err = await cli(
        "signal",
        "decision",
        str(run.id),
        "--payload",
        '{"approved": true, "by": "ana"}',
        "--target",
        "tests._wait_sagas:SAGAS",
        "--note",
        "approved on the phone",
    )
    assert code == 0, err
    (received,) = [e for e in await run.history() if e.kind == "signal_received"]
    assert received.data["note"] == "approved on the phone"
    assert received.data["by"] == getpass.getuser()


async def test_cli_show_tells_a_run_stopped_at_a_step_from_one_stopped_at_a_wait(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """README (Stopping for an operator): a step whose policy says on_give_up="stop"
    ends the run `stopped` at that step; `saga show` says so and what resumes it
    (retry, cancel), not that a wait timed out nor that a signal resumes it."""
    s = small_saga(
        "stopper",
        ["a"],
        fail={"a": permanent("declined")},
        retry=saga.Retry(max_attempts=1, on_give_up="stop"),
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job())
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=15)
    code, out, err = await cli("show", str(run.id))
    assert code == 0, err
    assert "a: the step gave up (saga retry runs it again, saga cancel compensates)" in out
    assert "wait timed out" not in out
    assert "saga signal" not in out
