"""The `saga` command line on a real PostgreSQL: in process through main(argv), and as
real subprocesses (`python -m saga ...`)."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid

import anyio
import asyncpg
import pytest

import saga
from tests import _harness
from tests._harness import Children
from tests._sagas import ONCE, Fail, Job, fast, parked_saga, permanent, small_saga
from tests.conftest import Cli, ClientFactory, OrchestratorFactory

DECLINED = "charge"  # Job(fail=DECLINED): the card is declined


def ops_saga(undo_fails: list[bool] | None = None) -> saga.Saga[Job]:
    """reserve (compensated) then charge, which fails for good when the input's ``fail``
    is DECLINED; while ``undo_fails[0]`` is true the compensation gives up."""
    undo_fails = undo_fails if undo_fails is not None else [False]
    hostile = "card declined\x1b[31m"  # an ANSI escape
    return small_saga(
        "ops",
        ["reserve", "charge"],
        compensate={"reserve"},
        fail={"charge": permanent(hostile, when=lambda ctx: ctx.input.fail == DECLINED)},
        fail_undo={
            "reserve": Fail(RuntimeError, "warehouse offline", when=lambda _: undo_fails[0])
        },
        result={"reserve": lambda ctx: ctx.input.n, "charge": lambda ctx: ctx.input.n * 100},
        retry=fast(2),
        undo_retry=ONCE,
    )


def test_durations_parse_and_bad_ones_are_rejected() -> None:
    """Durations accept s/m/h/d/w and combinations; anything else is an error naming
    the value and the accepted form (private: the CLI's duration parser is what this
    checks)."""
    from saga._cli import parse_duration

    assert parse_duration("90s").total_seconds() == 90
    assert parse_duration("10m").total_seconds() == 600
    assert parse_duration("1h30m").total_seconds() == 5400
    assert parse_duration("3d").total_seconds() == 3 * 86400
    assert parse_duration("1w").total_seconds() == 7 * 86400
    assert parse_duration("0.5h").total_seconds() == 1800
    for bad in ("", "10", "m", "10x", "-5m", "1h 30m", "5m10"):
        with pytest.raises(Exception, match="invalid duration"):
            parse_duration(bad)


async def test_every_command_has_help(cli: Cli) -> None:
    """`saga --help` and `saga COMMAND --help` print usage and exit 0; the top-level help
    documents the exit codes."""
    code, out, _ = await cli("--help", dsn=False)
    assert code == 0
    assert "exit codes: 0 ok, 1 error, 2 usage, 3 run not found, 4 invalid run state" in out
    for command in ("migrate", "worker", "runs", "show", "retry", "cancel", "prune", "demo"):
        code, out, _ = await cli(command, "--help", dsn=False)
        assert code == 0, command
        assert out.startswith(f"usage: saga {command}"), command


async def test_usage_errors_exit_2_with_a_message(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad durations, run ids, statuses, limits, schema names, a missing DSN, unknown
    commands and bad worker targets exit 2 and say what is wrong, touching nothing."""
    monkeypatch.delenv("SAGA_DSN", raising=False)
    cases = [
        (["runs", "--older-than", "3 days"], "invalid duration '3 days'"),
        (["runs", "--status", "done"], "unknown status 'done'"),
        (["runs", "--limit", "0"], "must be a positive integer"),
        (["runs", "--before", "123"], "invalid run id '123'"),
        (["show", "not-a-uuid"], "invalid run id 'not-a-uuid'"),
        (["cancel", "zzz"], "invalid run id 'zzz'"),
        (["prune"], "--older-than"),
        (["prune", "--older-than", "yesterday"], "invalid duration 'yesterday'"),
        (["runs", "--schema", "Bad;Schema"], "invalid schema name"),
        (["frobnicate"], "invalid choice"),
        (["worker", "no_colon"], "expected MODULE:OBJECT"),
        (["worker", "no_such_module_xyz:sagas"], "cannot import 'no_such_module_xyz'"),
        (["worker", "examples.checkout:missing"], "has no attribute 'missing'"),
        (["worker", "examples.checkout:Order"], "not a saga.Saga"),
    ]
    for argv, message in cases:
        code, _, err = await cli(*argv)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
    code, _, err = await cli("runs", dsn=False)
    assert code == 2
    assert "pass --dsn or set SAGA_DSN" in err


async def test_migrate_then_commands_on_a_fresh_schema(cli: Cli) -> None:
    """On a schema that does not exist yet, operator commands exit 1 and say to
    migrate; `saga migrate` applies every migration once (then reports up to date)."""
    code, _, err = await cli("runs", "--schema", "fresh")
    assert code == 1
    assert "not migrated" in err
    assert "saga migrate" in err
    code, out, _ = await cli("migrate", "--schema", "fresh")
    assert code == 0
    assert "applied migrations 1, 2, 3" in out
    data = await cli.json("migrate", "--schema", "fresh")
    assert data["applied"] == []
    assert data["schema"] == "fresh"
    assert await cli.json("runs", "--schema", "fresh") == {"runs": [], "next_before": None}


async def test_runs_lists_filters_and_pages(
    cli: Cli, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """`saga runs` prints a table newest first; --json carries every field; --saga,
    --status and --older-than/--newer-than filter; --limit/--before page through all
    runs exactly once."""
    s = ops_saga()
    orch = await orchestrator(s, concurrency=4)
    runs = [await orch.start(s, Job(n=i, fail=DECLINED if i == 0 else "")) for i in range(5)]
    for run in runs:
        with pytest.raises(saga.RunCompensatedError) if run is runs[0] else _nothing():
            await run.result(timeout=20)
    await db.execute(
        "UPDATE saga.runs SET created_at = now() - interval '2 days' WHERE id = $1", runs[0].id
    )

    code, out, _ = await cli("runs")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["RUN", "SAGA", "STATUS"]
    assert [line.split()[0] for line in lines] == [str(r.id) for r in reversed(runs)]
    assert "\x1b" not in out  # the hostile error message is escaped
    assert "card declined\\x1b[31m" in out

    data = await cli.json("runs")
    assert [r["id"] for r in data["runs"]] == [str(r.id) for r in reversed(runs)]
    assert data["runs"][-1]["status"] == "compensated"
    assert data["runs"][-1]["error"]["message"] == "card declined\x1b[31m"
    assert data["next_before"] is None

    only = await cli.json("runs", "--status", "compensated")
    assert [r["id"] for r in only["runs"]] == [str(runs[0].id)]
    assert len((await cli.json("runs", "--status", "completed,pending"))["runs"]) == 4
    assert len((await cli.json("runs", "--status", "finished"))["runs"]) == 5
    assert (await cli.json("runs", "--status", "active"))["runs"] == []
    assert [r["id"] for r in (await cli.json("runs", "--older-than", "1d"))["runs"]] == [
        str(runs[0].id)
    ]
    assert len((await cli.json("runs", "--newer-than", "1h"))["runs"]) == 4
    assert (await cli.json("runs", "--saga", "other"))["runs"] == []

    seen: list[str] = []
    page = await cli.json("runs", "--limit", "2")
    while True:
        seen += [r["id"] for r in page["runs"]]
        if page["next_before"] is None:
            break
        page = await cli.json("runs", "--limit", "2", "--before", page["next_before"])
    assert seen == [str(r.id) for r in reversed(runs)]
    code, _, err = await cli("runs", "--limit", "2")
    assert "more: add --before" in err


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_show_prints_the_timeline_or_exits_3(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga show RUN` prints the run's state and one line per step and compensation
    attempt with worker, duration, outcome and error; --json carries the same; an
    unknown run exits 3."""
    s = ops_saga()
    orch = await orchestrator(s, concurrency=2)
    run = await orch.start(s, Job(n=1, fail=DECLINED))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=20)

    code, out, _ = await cli("show", str(run.id), "--events")
    assert code == 0
    assert f"run:                {run.id}" in out
    assert "status:             compensated" in out
    table = out[out.index("STEP") :].splitlines()
    assert table[0].split() == [
        "STEP", "PHASE", "ATTEMPT", "WORKER", "STARTED", "TOOK", "OUTCOME", "ERROR",
    ]  # fmt: skip
    assert table[1].split()[:3] == ["reserve", "step", "1"]
    assert table[2].split()[:3] == ["charge", "step", "1"]
    assert "failed" in table[2]
    assert "saga.PermanentError: card declined\\x1b[31m" in table[2]
    assert table[3].split()[:3] == ["reserve", "compensation", "1"]
    assert orch.worker_id in table[1]
    assert "run_compensated" in out  # --events: the raw history
    assert "\x1b" not in out

    data = await cli.json("show", str(run.id))
    assert data["run"]["status"] == "compensated"
    assert [(a["step"], a["compensation"], a["outcome"]) for a in data["attempts"]] == [
        ("reserve", False, "completed"),
        ("charge", False, "failed"),
        ("reserve", True, "completed"),
    ]
    assert data["attempts"][1]["error"]["type"] == "saga.PermanentError"
    assert all(a["worker"] == orch.worker_id for a in data["attempts"])
    assert data["events"][0]["kind"] == "run_started"

    code, _, err = await cli("show", str(uuid.uuid4()))
    assert code == 3
    assert "no run with id" in err


async def test_cancel_and_retry_with_exit_codes(
    cli: Cli, orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """`saga cancel` on an active run exits 0 and the run ends cancelled; on an ended run
    it exits 4, on an unknown run 3. `saga retry` on a failed run exits 0 and the run
    resumes at the compensation that gave up; on any other state it exits 4."""
    parked = parked_saga()
    client = await open_client(parked)
    pending = await client.start(parked, Job(n=1))
    code, out, _ = await cli("cancel", str(pending.id))
    assert code == 0, out
    assert "cancel requested" in out
    assert (await pending.info()).cancel_requested
    code, _, _ = await cli("cancel", str(pending.id))  # twice is harmless
    assert code == 0

    undo_fails = [True]
    s = ops_saga(undo_fails)
    orch = await orchestrator(s, concurrency=2)
    run = await orch.start(s, Job(n=1, fail=DECLINED))
    with pytest.raises(saga.RunFailedError):
        await run.result(timeout=20)
    code, _, err = await cli("cancel", str(run.id))
    assert code == 4
    assert "already ended failed" in err
    code, _, err = await cli("cancel", str(uuid.uuid4()))
    assert code == 3

    undo_fails[0] = False  # the warehouse is back
    code, out, _ = await cli("retry", str(run.id))
    assert code == 0
    assert "resuming at compensation 'reserve'" in out
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=20)
    code, _, err = await cli("retry", str(run.id))
    assert code == 4
    assert "only failed and stopped runs can be retried" in err
    code, _, _ = await cli("retry", str(uuid.uuid4()))
    assert code == 3


async def test_prune_reports_counts_and_honours_dry_run(
    cli: Cli, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """`saga prune --older-than D` deletes finished runs older than D with their events
    and reports the counts (--dry-run only counts; failed runs need --include-failed)."""
    undo_fails = [True]
    s = ops_saga(undo_fails)
    orch = await orchestrator(s, concurrency=4)
    runs = [await orch.start(s, Job(n=i)) for i in range(3)]
    failed = await orch.start(s, Job(n=9, fail=DECLINED))
    for run in runs:
        await run.result(timeout=20)
    with pytest.raises(saga.RunFailedError):
        await failed.result(timeout=20)
    await db.execute("UPDATE saga.runs SET finished_at = now() - interval '8 days'")
    events = await db.fetchval(
        "SELECT count(*) FROM saga.events WHERE run_id = ANY($1)", [r.id for r in runs]
    )

    code, out, _ = await cli("prune", "--older-than", "7d", "--dry-run")
    assert code == 0
    assert f"would delete 3 runs and {events} events" in out
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 4
    data = await cli.json("prune", "--older-than", "7d", "--batch-size", "2")
    assert data == {
        "runs": 3,
        "events": events,
        "batches": 2,
        "days": 0,
        "keys": 0,
        "dry_run": False,
    }
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 1
    code, out, _ = await cli("prune", "--older-than", "30d", "--include-failed")
    assert "deleted 0 runs" in out
    code, out, _ = await cli("prune", "--older-than", "1w", "--include-failed")
    assert code == 0
    assert "deleted 1 runs" in out
    assert await db.fetchval("SELECT count(*) FROM saga.events") == 0


async def test_commands_run_as_a_real_subprocess(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """`python -m saga` works as a process: SAGA_DSN from the environment, JSON on stdout
    only, and the documented exit codes."""
    s = ops_saga()
    orch = await orchestrator(s, concurrency=2)
    run = await orch.start(s, Job(n=3))
    await run.result(timeout=20)
    env = _harness.python_env(dsn)

    async def saga_cmd(*argv: str) -> subprocess.CompletedProcess[str]:
        return await _harness.run("-m", "saga", *argv, env=env, timeout=12)

    listed = await saga_cmd("runs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)["runs"]] == [str(run.id)]
    shown = await saga_cmd("show", str(run.id))
    assert shown.returncode == 0, shown.stderr
    assert "status:             completed" in shown.stdout
    missing = await saga_cmd("show", str(uuid.uuid4()))
    assert missing.returncode == 3
    bad = await saga_cmd("runs", "--older-than", "soon")
    assert bad.returncode == 2
    assert "invalid duration 'soon'" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_worker_runs_sagas_until_signalled_then_exits_0(
    dsn: str, open_client: ClientFactory, children: Children, sig: signal.Signals
) -> None:
    """`saga worker module:object` executes the runs of the sagas it names until SIGTERM
    or SIGINT; a step in flight when the signal arrives still finishes (graceful
    shutdown), and the process exits 0."""
    from examples.checkout import Order, checkout

    worker = children.saga_worker(
        dsn,
        "examples.checkout:checkout",
        "--worker-id",
        "cli-worker",
        "--concurrency",
        "2",
        "--lease-seconds",
        "10",
        "--shutdown-timeout",
        "10",
    )
    await worker.wait_ready()
    client = await open_client(checkout)
    done = await client.start(checkout, Order(order_id="w-1", amount_cents=1))
    assert (await done.result(timeout=20)).shipped_by.endswith(f":{worker.pid}")
    slow = await client.start(checkout, Order(order_id="w-2", amount_cents=1, step_delay=0.5))
    with anyio.fail_after(10):
        while (await slow.info()).worker is None:  # noqa: ASYNC110 - polling the DB
            await anyio.sleep(0.02)
    assert await worker.stop(sig) == 0, worker.output
    history = await slow.history()
    # The step running at the signal completed: nothing was cut off mid-step.
    started = [e for e in history if e.kind == "step_started"]
    completed = [e for e in history if e.kind == "step_completed"]
    assert len(completed) >= 1
    assert len(started) - len(completed) <= 1
    assert all(e.kind != "lease_expired" for e in history)
    assert f"{sig.name} received, shutting down" in worker.output
    assert "saga worker: stopped" in worker.output
