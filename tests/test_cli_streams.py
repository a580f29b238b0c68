"""The command line as jobs, daemons and supervisors run it: real subprocesses with no
tty, with a standard stream closed (``<&-``, ``>&-``, ``2>&-``), or interrupted by
Ctrl-C while an action waits for a row another transaction holds; ``saga worker``
processes run the runs they act on. Exit codes are what scripts act on.

The sagas below are the targets of the commands (the child processes import this
module: it must stay free of side effects at import).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from examples.checkout import SAGAS as CHECKOUT_SAGAS
from examples.checkout import Order, checkout
from tests._harness import ROOT, Children, popen, python_env
from tests._sagas import until_status
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(90)

TARGET = "tests.test_cli_streams:SAGAS"
YES = '{"approved": true, "manager": "ana"}'


class Req(BaseModel):
    n: int = 0


class Decision(BaseModel):
    approved: bool
    manager: str


refund = saga.Saga("cli_refund", input=Req)


@refund.step()
async def hold(ctx: saga.Context[Req]) -> str:
    return "hold"


@hold.compensate
async def release(ctx: saga.Context[Req], hold: str) -> None:
    pass


decision = refund.wait_for("decision", Decision, timeout=timedelta(hours=1))


@refund.step()
async def pay(ctx: saga.Context[Req]) -> str:
    return ctx.result(decision).manager


SAGAS: list[saga.Saga[Any]] = [refund]


def _saga_process(
    dsn: str, *argv: str, close: tuple[int, ...] = (), stdin: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """`python -m saga ARGV --dsn DSN` from the repository root, as a script or a cron
    job runs it (no tty); the file descriptors in ``close`` are closed in the child
    before it starts (a daemon's or a supervisor's closed stdin/stdout/stderr)."""

    def closing() -> None:
        for fd in close:
            os.close(fd)

    return subprocess.Popen(
        [sys.executable, "-m", "saga", *argv, "--dsn", dsn],
        cwd=ROOT,
        env=python_env(),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=closing,
    )


async def _finish(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str, str]:
    def wait() -> tuple[bytes, bytes]:
        return proc.communicate(timeout=timeout)

    try:
        out, err = await anyio.to_thread.run_sync(wait)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def _signals_received(db: asyncpg.Connection, run_id: uuid.UUID) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'signal_received'",
            run_id,
        )
    )


async def test_signal_with_payload_from_stdin_and_no_stdin_is_a_usage_error(
    dsn: str, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """README, Command line: "`saga signal SIGNAL RUN --payload JSON --target
    MODULE:OBJECT` ... `--payload -` reads the JSON from stdin", and exit "`2` usage
    (... for `saga signal`, bad JSON ...: nothing is written)".

    Run from a job or a daemon whose stdin is closed (`<&-`), `--payload -` has no JSON
    to read: a usage error (exit 2, no traceback), and nothing is written."""
    client = await open_client(*SAGAS)
    run = await client.start(refund, Req(n=1), key="no-stdin")
    proc = _saga_process(
        dsn,
        "signal",
        "decision",
        str(run.id),
        "--payload",
        "-",
        "--target",
        TARGET,
        close=(0,),
    )
    code, _, err = await _finish(proc)
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert await _signals_received(db, run.id) == 0


async def test_an_interrupted_signal_that_was_recorded_exits_0_not_130(
    dsn: str, open_client: ClientFactory, db: asyncpg.Connection, children: Children
) -> None:
    """README, Command line: `saga signal` "Exits 0 when recorded", and exit "`130`
    interrupted".

    A live worker holds a run waiting for its decision; the run's row is locked by an
    application's transaction (README, "In your transaction": a signal with `conn=`
    "locks the run's row until your transaction ends"). The operator's `saga signal`
    waits for that lock and the operator presses Ctrl-C (SIGINT) meanwhile; the lock
    is then released. The write in flight is not undone by an interrupt: the signal is
    recorded (the worker completes the run), and the command says so and exits 0,
    not 130 ("interrupted" would tell a script that nothing was sent)."""
    worker = children.saga_worker(dsn, TARGET, "--poll-interval", "0.2")
    await worker.wait_ready()
    client = await open_client(*SAGAS)
    run = await client.start(refund, Req(n=2), key="interrupted")
    await until_status(run, saga.RunStatus.WAITING)

    app = await asyncpg.connect(dsn)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id)
        proc = _saga_process(
            dsn, "signal", "decision", str(run.id), "--payload", YES, "--target", TARGET
        )
        try:
            # The command now waits for the row (its write tries again while the row is
            # held): still running, nothing recorded yet.
            await anyio.sleep(3.0)
            assert proc.poll() is None, proc.communicate()
            assert await _signals_received(db, run.id) == 0
            proc.send_signal(signal.SIGINT)
            await anyio.sleep(1.0)
            interrupted_while_blocked = proc.poll()
        finally:
            await tx.rollback()
        code, _, err = await _finish(proc)
    finally:
        await app.close()
    recorded = await _signals_received(db, run.id)
    if recorded:
        assert await run.result(timeout=20) == "ana"
    assert (code, recorded) == (0, 1), (
        f"exit {code} ({err.strip()!r}) with {recorded} signal recorded; "
        f"still running 1 s after SIGINT: {interrupted_while_blocked is None}"
    )
    assert "finishing the write in flight" in err, err


async def test_stdout_closed_from_the_start_stops_quietly(
    dsn: str, open_client: ClientFactory
) -> None:
    """README, Command line: exit "`141` stdout closed early (`saga runs | head -1`: the
    output stops quietly, nothing on stderr)".

    With stdout closed before the command starts (`saga runs >&-`, as a cron job or a
    supervisor may run it), `saga runs` stops at its first line: 141, nothing on
    stderr, no traceback."""
    client = await open_client(*SAGAS)
    await client.start(refund, Req(n=3), key="stdout-closed")
    proc = _saga_process(dsn, "runs", close=(1,))
    code, _, err = await _finish(proc)
    assert "Traceback" not in err, err
    assert (code, err) == (141, ""), (code, err)


async def test_not_found_exits_3_with_stderr_closed(dsn: str) -> None:
    """README, Command line: "Exit codes: ... `3` run not found (by id or key)".

    The exit code is what a script acts on: with stderr closed (`2>&-`) `saga show` of
    a run id that names no run still exits 3 (the message has nowhere to go)."""
    missing = str(uuid.uuid4())
    proc = _saga_process(dsn, "show", missing, close=(2,))
    code, out, _ = await _finish(proc)
    assert code == 3, (code, out)


async def test_a_worker_with_stderr_closed_runs_until_sigterm(
    dsn: str, open_client: ClientFactory
) -> None:
    """README, Command line: "`saga worker MODULE:OBJECT` | execute the runs of a
    `saga.Saga` or a list/tuple of them until SIGTERM/SIGINT, then shut down gracefully
    and exit 0".

    Started by a supervisor with stderr closed, `saga worker` runs (its "ready" line
    and logs have nowhere to go) and executes the runs until SIGTERM, then exits 0."""
    client = await open_client(*SAGAS)
    proc = _saga_process(dsn, "worker", TARGET, "--poll-interval", "0.2", close=(2,))
    try:
        run = await client.start(refund, Req(n=4), key="stderr-closed")
        with anyio.fail_after(20):
            while (await run.info()).status is not saga.RunStatus.WAITING:
                assert proc.poll() is None, f"the worker exited {proc.returncode}"
                await anyio.sleep(0.05)
        assert proc.poll() is None, f"the worker exited {proc.returncode}"
        proc.send_signal(signal.SIGTERM)
        code, _, _ = await _finish(proc)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _blocked(db: asyncpg.Connection, proc: subprocess.Popen[bytes]) -> None:
    """Until a statement of the command waits for a lock (the test's transaction's)."""
    with anyio.fail_after(20):
        while not await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        ):
            assert proc.poll() is None, proc.communicate()
            await anyio.sleep(0.1)


async def _stopped_run(orchestrator: OrchestratorFactory, name: str) -> saga.RunHandle:
    """A run stopped for an operator, with no worker left to move it on."""
    s = saga.Saga(name, input=Req)

    @s.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def one(ctx: saga.Context[Req]) -> str:
        raise saga.PermanentError("declined")

    orch = await orchestrator(s)
    run = await s.start(Req())
    with pytest.raises(saga.RunStoppedError):
        await run.result(timeout=20)
    await orch.aclose()
    return run


async def _retried(db: asyncpg.Connection, run: saga.RunHandle) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'run_retried'", run.id
        )
    )


async def test_ctrl_c_before_an_actions_write_stops_it(
    dsn: str, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Command line: exit "`130` interrupted"; only an action whose write is in
    flight finishes it. `saga retry RUN` first reads the run; that read waits (here for
    a table lock an application's migration holds) when the operator presses Ctrl-C:
    nothing was written, so the command stops, exits 130, and the run is not retried,
    even once the lock is gone."""
    run = await _stopped_run(orchestrator, "cli_interrupted_read")
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction():
            await app.execute("LOCK TABLE saga.runs IN ACCESS EXCLUSIVE MODE")
            proc = _saga_process(dsn, "retry", str(run.id))
            await _blocked(db, proc)  # connected, and reading the run: held by the lock
            proc.send_signal(signal.SIGINT)
            await anyio.sleep(1.0)
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await app.close()
    code, _, err = await _finish(proc)
    assert (code, await _retried(db, run)) == (130, 0), err
    assert "finishing" not in err, err
    assert await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run.id) == "stopped"


async def test_a_second_ctrl_c_aborts_an_action_waiting_for_a_held_row(
    dsn: str, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Command line: an action interrupted while its write is in flight finishes
    it; "a second Ctrl-C aborts (130)". `saga retry RUN` waits for the run's row, which
    an application's transaction holds; two Ctrl-C: the command exits 130 at once, and
    its write, never committed, left nothing."""
    run = await _stopped_run(orchestrator, "cli_second_ctrl_c")
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction():
            await app.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id)
            proc = _saga_process(dsn, "retry", str(run.id))
            await _blocked(db, proc)  # its write waits for the row
            proc.send_signal(signal.SIGINT)
            await anyio.sleep(1.0)
            assert proc.poll() is None  # finishing its write
            proc.send_signal(signal.SIGINT)  # abort
            with anyio.move_on_after(10):
                while proc.poll() is None:  # noqa: ASYNC110 - a child process
                    await anyio.sleep(0.1)
            aborted = proc.poll()
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await app.close()
    code, _, err = await _finish(proc)
    assert aborted == code == 130, (aborted, code, err)
    assert "finishing the write in flight" in err, err
    assert await _retried(db, run) == 0
    assert await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run.id) == "stopped"


class _Rollback(Exception):
    """Leaves a test's transaction block, rolled back."""


async def _ready_worker(dsn: str) -> subprocess.Popen[bytes]:
    """A `saga worker` of the checkout example, once it says it is ready (its stderr a
    pipe this test reads)."""
    proc = popen(
        "-m", "saga", "worker", "examples.checkout:SAGAS", "--dsn", dsn,
        env=python_env(dsn), stdout=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stderr is not None
    with anyio.fail_after(20):
        while True:
            line = await anyio.to_thread.run_sync(proc.stderr.readline)
            assert line, "the worker ended before it was ready"
            if b" ready: " in line:
                return proc


async def test_worker_keeps_running_when_the_reader_of_its_log_goes_away(
    dsn: str, open_client: ClientFactory
) -> None:
    """README, Command line: "`saga worker MODULE:OBJECT` | execute the runs ... until
    SIGTERM/SIGINT", and "with stderr closed (`2>&-`) they [messages] are dropped and the
    exit code still tells"; DESIGN: no setting "can stop an orchestrator".

    A worker whose stderr is a pipe whose reader goes away (`saga worker ... 2>&1 | tee
    log`, a log shipper restarting) keeps running: its log lines are dropped and the
    next run completes. Before, the first log line after that raised BrokenPipeError
    inside the orchestrator and the worker exited 141, leaving the next run pending."""
    proc = await _ready_worker(dsn)
    try:
        assert proc.stderr is not None
        proc.stderr.close()  # the log's reader goes away; nothing signals the worker
        await open_client(*CHECKOUT_SAGAS)
        first = await checkout.start(Order(order_id="o-1", amount_cents=5))
        assert (await first.result(timeout=10)).order_id == "o-1"
        await anyio.sleep(1.0)
        second = await checkout.start(Order(order_id="o-2", amount_cents=5))
        with contextlib.suppress(saga.RunTimeoutError):
            await second.result(timeout=8)
        assert proc.poll() is None, (
            f"saga worker exited {proc.poll()} with no SIGTERM/SIGINT once its stderr "
            f"reader went away; the next run is {(await second.info()).status}"
        )
        assert (await second.info()).status is saga.RunStatus.COMPLETED
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


async def test_an_idle_worker_whose_log_reader_went_away_stops_on_sigterm_with_exit_0(
    dsn: str,
) -> None:
    """README, Command line: `saga worker` runs "until SIGTERM/SIGINT, then shut down
    gracefully and exit 0", and log lines are dropped "once their reader went away".

    A worker is ready, the reader of its stderr goes away, nothing runs (no log line),
    then SIGTERM: it exits 0. Before, its own note ("SIGTERM received, shutting down")
    went straight to stderr: BrokenPipeError, exit 1."""
    proc = await _ready_worker(dsn)
    try:
        assert proc.stderr is not None
        proc.stderr.close()  # the log's reader goes away
        await anyio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(lambda: proc.wait(20))
        assert code == 0, f"saga worker exited {code} on SIGTERM once its log reader went away"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
