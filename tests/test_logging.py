"""Logs: quiet unless the application asks for more, and one line per outage."""

from __future__ import annotations

import ast
import logging
import textwrap
from pathlib import Path

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from saga.testing import Faults
from tests import _harness
from tests._sagas import Gate, Job, small_saga
from tests.conftest import OrchestratorFactory

APP = textwrap.dedent(
    """
    import asyncio, sys
    from pydantic import BaseModel
    import saga

    class Job(BaseModel):
        n: int

    s = saga.Saga("quiet", input=Job)

    @s.step(retry=saga.Retry(max_attempts=2, initial_delay=0.01))
    async def flaky(ctx: saga.Context[Job]) -> int:
        if ctx.attempt == 1:
            raise ConnectionError("first attempt fails")
        return ctx.input.n

    async def main() -> None:
        async with saga.Orchestrator(sys.argv[1], sagas=[s], poll_interval=0.1) as orch:
            for n in range(5):
                assert await (await orch.start(s, Job(n=n))).result(timeout=10) == n

    asyncio.run(main())
    """
)


async def test_an_app_that_configures_no_logging_sees_warnings_only(dsn: str) -> None:
    """A fresh process that never configures structlog (a plain uvicorn app) runs five
    runs, each with one failed attempt: stdout stays empty, stderr holds the five
    step_failed warnings and no debug or info line (structlog's own default would print
    every step)."""
    done = await _harness.run("-c", APP, dsn, timeout=50)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 5, lines
    assert all("step_failed" in line and "warning" in line for line in lines), lines


async def test_a_configured_app_gets_every_level(orchestrator: OrchestratorFactory) -> None:
    """Once the application configures structlog (here: capture_logs), saga follows its
    configuration, debug lines included: the README's way to see more."""
    s = small_saga("verbose", ["one"], result=lambda _: 1)
    with capture_logs() as logs:
        orch = await orchestrator(s)
        assert await (await orch.start(s, Job(n=1))).result(timeout=5) == 1
        await orch.aclose()  # the worker logs after its commit, which woke result()
    events = {(e["event"], e["log_level"]) for e in logs}
    assert ("step_completed", "debug") in events
    assert ("run_completed", "info") in events


@pytest.mark.timeout(120)
async def test_an_outage_is_one_line_when_it_starts_and_one_when_it_ends(
    orchestrator: OrchestratorFactory, pg_server: _harness.Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Postgres stopped for 3 s under a worker with runs in flight (claims, heartbeats,
    checkpoints and the listener all failing meanwhile): saga logs database_unavailable
    once and database_available once, a handful of lines in all, and the driver logs no
    traceback; every run then completes."""
    s = small_saga(
        "steady",
        ["one"],
        delay=0.05,
        retry=saga.Retry(max_attempts=10, initial_delay=0.05),
        result=lambda ctx: ctx.input.n,
    )
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        orch = await orchestrator(s, concurrency=8, lease_seconds=1.5, poll_interval=0.1)
        runs = [await orch.start(s, Job(n=n)) for n in range(40)]
        await pg_server.stop()
        await anyio.sleep(3)
        await pg_server.start()
        for n, run in enumerate(runs):
            assert await run.result(timeout=60) == n
    loud = [e for e in logs if e["log_level"] in ("warning", "error", "critical")]
    kinds = [e["event"] for e in loud]
    assert kinds.count("database_unavailable") == 1, kinds
    assert kinds.count("database_available") == 1, kinds
    assert len(loud) <= 6, kinds
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("asyncpg")]
    assert tracebacks == []


_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def _log_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of a logger's level methods: ``logger.warning(...)``, ``log.info(...)``."""
    calls = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _LEVELS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in {"logger", "log", "_log"}
        ):
            calls.append(node)
    return calls


def _texts_of_an_exception(value: ast.expr) -> bool:
    """Whether a log field is the text of an exception: ``str(exc)``, ``repr(exc)`` or
    an f-string of it (saga's code names exceptions ``exc``, ``e``, ``err``...)."""
    names = {"exc", "e", "err", "error", "exception", "again", "cause"}
    func = value.func if isinstance(value, ast.Call) else None
    if isinstance(value, ast.Call) and isinstance(func, ast.Name) and func.id in {"str", "repr"}:
        return any(isinstance(a, ast.Name) and a.id in names for a in value.args)
    if isinstance(value, ast.JoinedStr):
        return any(
            isinstance(part, ast.FormattedValue)
            and isinstance(part.value, ast.Name)
            and part.value.id in names
            for part in value.values
        )
    return False


def test_no_log_line_of_saga_carries_an_exception_message() -> None:
    """Every log call in saga/ passes an error's type, never its message: no field is
    the str(), repr() or an f-string of an exception, and none is named error, message
    or reason (an exception's text can quote the input: the scheduler, the partition
    check and the dashboard's hub once logged it). The scan finds saga's log calls."""
    root = Path(saga.__file__).parent
    found = 0
    for path in sorted(root.rglob("*.py")):
        for call in _log_calls(ast.parse(path.read_text(), str(path))):
            found += 1
            where = f"{path.relative_to(root)}:{call.lineno}"
            for kw in call.keywords:
                assert kw.arg not in {"error", "message", "reason"}, where
                assert not _texts_of_an_exception(kw.value), where
    assert found > 25


@pytest.mark.timeout(30)
async def test_lease_lost_is_logged_with_run_saga_step_and_attempt_bound(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Logging: "Event names are stable snake_case (`run_completed`,
    `step_failed`, `lease_lost`, `stale_write_refused`, ...) with `run_id`, `saga`,
    `step` and `attempt` bound."

    A worker whose heartbeat is refused (another worker now owns the run) logs
    `lease_lost` with the saga, step and attempt whose lease was lost."""
    gate = Gate("a")
    s = small_saga("lost", ["a"], gate=gate)
    with capture_logs() as logs:
        await orchestrator(s, lease_seconds=0.6)  # a heartbeat every 0.2 s
        run = await s.start(Job())
        with anyio.fail_after(5):
            await gate.entered.wait()
        # Another worker took the run over: this worker's next heartbeat is refused.
        await db.execute(
            "UPDATE saga.runs SET lease_owner = 'another-worker' WHERE id = $1", run.id
        )
        with anyio.fail_after(5):
            while not any(line["event"] == "lease_lost" for line in logs):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        gate.release.set()
    lost = next(line for line in logs if line["event"] == "lease_lost")
    assert lost["run_id"] == str(run.id)
    missing = {"saga", "step", "attempt"} - set(lost)
    assert not missing, f"lease_lost lacks {sorted(missing)}: {lost}"
    assert (lost["saga"], lost["step"], lost["attempt"]) == ("lost", "a", 1)


@pytest.mark.timeout(30)
async def test_lease_expired_and_simulated_crash_are_logged_with_step_and_attempt(
    orchestrator: OrchestratorFactory,
) -> None:
    """README, Logging: events "with `run_id`, `saga`, `step` and `attempt` bound".

    After `Faults.crash_after(step)` (README, Testing your sagas), the crash
    (`simulated_crash`) and the takeover (`lease_expired`) are logged with them."""
    s = small_saga("crashy", ["a", "b"])
    faults = Faults()
    faults.crash_after("a")
    with capture_logs() as logs:
        orch = await orchestrator(s, lease_seconds=0.5)
        faults.attach(orch)
        run = await orch.start(s, Job())
        assert await run.result(timeout=20) == "b"
    assert faults.fired["crash_after"] == 1
    lines = [line for line in logs if line["event"] in ("simulated_crash", "lease_expired")]
    assert {line["event"] for line in lines} == {"simulated_crash", "lease_expired"}, logs
    for line in lines:
        missing = {"run_id", "saga", "step", "attempt"} - set(line)
        assert not missing, f"{line['event']} lacks {sorted(missing)}: {line}"
        # Both name the attempt that crashed (as the history's lease_expired does).
        assert (line["run_id"], line["saga"], line["step"], line["attempt"]) == (
            str(run.id),
            "crashy",
            "a",
            1,
        ), line


async def test_an_outage_flapping_as_it_starts_and_stale_connections_after_are_one_outage() -> None:
    """README ("Logging"): outages "are one line per change of state, not one per failed
    call". As Postgres goes down, a call already in flight may still succeed just after
    the first error; once it is back, each pooled connection the restart dropped fails
    once on its first use. Neither is a new outage: one `database_unavailable`, one
    `database_available`. A lasting failure after that is a new outage again."""
    import asyncpg

    from saga._errors import DatabaseError
    from saga._log import Outage

    def error(cause: BaseException) -> DatabaseError:
        exc = DatabaseError("a call failed")
        exc.__cause__ = cause
        return exc

    outage = Outage("w")
    with capture_logs() as logs:
        outage.lost("claiming work", error(asyncpg.InternalClientError("going down")))
        outage.back()  # a call in flight as it went down
        outage.lost("recording an outcome", error(ConnectionRefusedError()))
        await anyio.sleep(0.6)
        outage.back()  # the database is back
        outage.lost("heartbeat", error(asyncpg.ConnectionDoesNotExistError("dropped")))
        outage.back()
    loud = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert loud == ["database_unavailable", "database_available"]
    with capture_logs() as logs:
        outage.lost("claiming work", error(ConnectionRefusedError()))  # down again
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["database_unavailable"]
