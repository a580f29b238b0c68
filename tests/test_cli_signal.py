"""The command line of waits on a real PostgreSQL, in process: `saga signal` (by id, by
key, payload from stdin, repeats, and every refusal with its exit code and what it
leaves written), `saga show` and `saga runs` of parked runs, and `saga retry` /
`saga cancel` of a run stopped at its wait. The sagas are tests._wait_sagas."""

from __future__ import annotations

import getpass
import io
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga.testing import advance
from tests._sagas import Job, until_status
from tests._wait_sagas import SAGAS, approval, napping, open_ended
from tests.conftest import Cli, ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(60)

TARGET = "tests._wait_sagas:SAGAS"
YES = '{"approved": true, "by": "ana"}'
INVALID = "invalid payload for signal 'decision'"


async def waiting(
    orch: saga.Orchestrator, s: saga.Saga[Job], key: str | None = None
) -> saga.RunHandle:
    run = await orch.start(s, Job(n=1), key=key)
    await until_status(run, saga.RunStatus.WAITING)
    return run


async def signal_rows(db: asyncpg.Connection) -> tuple[int, int]:
    """(signal rows with a payload, signal_received events) in the whole database."""
    rows = await db.fetchval("SELECT count(*) FROM saga.signals WHERE payload IS NOT NULL")
    events = await db.fetchval("SELECT count(*) FROM saga.events WHERE kind = 'signal_received'")
    return rows, events


async def test_signal_by_id_reaches_a_waiting_run_which_completes(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga signal decision RUN --payload JSON --target ...` exits 0 and says the signal
    was recorded; the waiting run wakes with the payload as the wait's result and
    completes."""
    orch = await orchestrator(*SAGAS)
    run = await waiting(orch, approval)
    code, out, err = await cli(
        "signal", "decision", str(run.id), "--payload", YES, "--target", TARGET
    )
    assert code == 0, err
    assert out == f"run {run.id}: signal 'decision' recorded\n"
    assert await run.result(timeout=10) == "ana"
    assert "signal_received" in [e.kind for e in await run.history()]


async def test_signal_by_key_with_saga_when_several_use_it(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga signal decision --key KEY` names the run by its idempotency key; a key that
    runs of two sagas use is a usage error (exit 2) until --saga picks one; --json
    prints the run and "accepted": true."""
    orch = await orchestrator(*SAGAS)
    run = await waiting(orch, approval, key="refund-7")
    other = await waiting(orch, open_ended, key="refund-7")
    argv = ["signal", "decision", "--key", "refund-7", "--payload", YES, "--target", TARGET]
    code, _, err = await cli(*argv)
    assert code == 2
    assert "pick one with --saga" in err
    data = await cli.json(*argv, "--saga", "approval")
    assert data["accepted"] is True
    assert data["signal"] == "decision"
    assert data["run"]["id"] == str(run.id)
    assert await run.result(timeout=10) == "ana"
    assert (await other.info()).status is saga.RunStatus.WAITING


async def test_the_payload_can_come_from_stdin(
    cli: Cli, orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--payload -` reads the JSON from stdin; bad JSON there is a usage error that
    names stdin."""
    orch = await orchestrator(*SAGAS)
    run = await waiting(orch, approval)
    monkeypatch.setattr("sys.stdin", io.StringIO("{not json"))
    code, _, err = await cli(
        "signal", "decision", str(run.id), "--payload", "-", "--target", TARGET
    )
    assert code == 2
    assert "invalid JSON on stdin" in err
    monkeypatch.setattr("sys.stdin", io.StringIO('{\n  "approved": true,\n  "by": "bo"\n}\n'))
    code, _, err = await cli(
        "signal", "decision", str(run.id), "--payload", "-", "--target", TARGET
    )
    assert code == 0, err
    assert await run.result(timeout=10) == "bo"


async def test_a_repeat_exits_0_and_says_nothing_changed(
    cli: Cli, orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """A second signal of the same name, sent before the run consumed the first (no
    worker runs it yet: the first is kept for its wait), exits 0 but says a signal of
    that name was already recorded and nothing changed ("accepted": false in JSON); the
    first payload wins."""
    client = await open_client(*SAGAS)
    run = await client.start(open_ended, Job(n=1))
    argv = ["signal", "decision", str(run.id), "--target", TARGET]
    assert (await cli.json(*argv, "--payload", YES))["accepted"] is True
    code, out, _ = await cli(*argv, "--payload", '{"approved": false}')
    assert code == 0
    assert out == (
        f"run {run.id}: a signal 'decision' was already recorded; nothing changed "
        "(the first signal of a name wins)\n"
    )
    data = await cli.json(*argv, "--payload", '{"approved": false, "by": "eve"}')
    assert data["accepted"] is False
    await orchestrator(*SAGAS)
    assert await run.result(timeout=10) == "ana"


async def test_bad_signals_exit_2_and_write_nothing(
    cli: Cli,
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad JSON (NaN included), a payload the wait's model refuses (wrong type, not an
    object, too large), a name the saga has no wait for (control characters escaped), a
    target without the run's saga or that does not import, no target, and RUN/--key
    misuse: each exits 2 naming the problem, and no signal row with a payload nor any
    history entry is written; the run still waits."""
    orch = await orchestrator(*SAGAS)
    run = await waiting(orch, approval)
    rid = str(run.id)
    events = await db.fetchval("SELECT count(*) FROM saga.events")
    cases = [
        (["decision", rid, "--payload", "{approved: true}"], "invalid JSON in --payload"),
        (["decision", rid, "--payload", '{"approved": NaN}'], "NaN is not JSON"),
        (["decision", rid, "--payload", '{"approved": "perhaps"}'], INVALID),
        (["decision", rid, "--payload", "[true]"], INVALID),
        (["nope\x1b[31m", rid, "--payload", YES], "no wait for a signal named 'nope\\x1b[31m'"),
        (["reserve", rid, "--payload", YES], "its signals: 'decision'"),
        (["decision", rid, "--payload", YES, "--target", "tests._wait_sagas:napping"],
         "which tests._wait_sagas:napping does not define"),
        (["decision", rid, "--payload", YES, "--target", "no_such_module_xyz:SAGAS"],
         "cannot import 'no_such_module_xyz'"),
        (["decision", "--payload", YES], "name the run by its id (RUN) or by --key KEY"),
        (["decision", rid, "--key", "k", "--payload", YES], "not both"),
        (["decision", rid, "--saga", "approval", "--payload", YES], "--saga goes with --key"),
    ]  # fmt: skip
    for argv, message in cases:
        target = [] if "--target" in argv else ["--target", TARGET]
        code, out, err = await cli("signal", *argv, *target)
        assert (code, out) == (2, ""), (argv, err)
        assert message in err, (argv, err)
        assert "\x1b" not in err
    code, _, err = await cli("signal", "decision", rid, "--payload", YES)
    assert code == 2
    assert "--target" in err
    monkeypatch.setattr("sys.stdin", io.StringIO('{"approved": true, "by": "%s"}' % ("x" * 2**21)))
    code, _, err = await cli("signal", "decision", rid, "--payload", "-", "--target", TARGET)
    assert code == 2
    assert "payload of signal 'decision'" in err
    assert await signal_rows(db) == (0, 0)
    assert await db.fetchval("SELECT count(*) FROM saga.events") == events
    assert (await run.info()).status is saga.RunStatus.WAITING


async def test_an_unknown_run_or_key_exits_3(
    cli: Cli, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A run id or an idempotency key (with or without --saga) that names no run exits
    3, and nothing is written."""
    await orchestrator(*SAGAS)
    missing = uuid.uuid4()
    code, _, err = await cli(
        "signal", "decision", str(missing), "--payload", YES, "--target", TARGET
    )
    assert code == 3
    assert f"no run with id {missing}" in err
    for extra in ([], ["--saga", "approval"]):
        argv = ["signal", "decision", "--key", "nobody", *extra, "--payload", YES]
        code, _, err = await cli(*argv, "--target", TARGET)
        assert code == 3
        assert "no run with key 'nobody'" in err
    assert await db.fetchval("SELECT count(*) FROM saga.signals") == 0


async def test_a_signal_to_an_ended_run_exits_4_and_the_refusal_is_recorded(
    cli: Cli, orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A signal to a run that has ended (completed, or cancelled while it waited) exits 4
    and says so; the refusal is in the run's history (signal_refused), and no payload is
    stored."""
    orch = await orchestrator(*SAGAS)
    done = await waiting(orch, approval)
    await done.signal("decision", {"approved": True})
    await done.result(timeout=10)
    cancelled = await waiting(orch, open_ended)
    await cancelled.cancel()
    with pytest.raises(saga.RunCancelledError):
        await cancelled.result(timeout=10)
    before = await signal_rows(db)
    for run in (done, cancelled):
        argv = ["signal", "decision", str(run.id), "--payload", YES, "--target", TARGET]
        code, out, err = await cli(*argv)
        assert (code, out) == (4, ""), err
        assert "has ended: signal 'decision' refused" in err
        refused = [e for e in await run.history() if e.kind == "signal_refused"]
        by = getpass.getuser()  # README: --by defaults to the user running the command
        assert [e.data for e in refused] == [{"signal": "decision", "reason": "ended", "by": by}]
    assert await signal_rows(db) == before


async def test_show_and_runs_say_where_a_run_waits_and_until_when(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """`saga show` of a waiting run prints the wait and when it times out (or "no
    timeout"), of a sleeping run when it wakes; --json carries wait and due_at; the
    `saga runs` status column names the wait."""
    orch = await orchestrator(*SAGAS)
    timed = await waiting(orch, approval)
    untimed = await waiting(orch, open_ended)
    sleeper = await orch.start(napping, Job(n=1))
    asleep = await until_status(sleeper, saga.RunStatus.SLEEPING)
    info = await timed.info()
    assert info.due_at is not None

    code, out, _ = await cli("show", str(timed.id))
    assert code == 0
    assert "status:             waiting\n" in out
    expected = info.due_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert f"waiting for:        decision (times out {expected} UTC)\n" in out
    code, out, _ = await cli("show", str(untimed.id))
    assert "waiting for:        decision (no timeout)\n" in out
    code, out, _ = await cli("show", str(sleeper.id))
    assert asleep.due_at is not None
    assert asleep.wait is not None
    wakes = asleep.due_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert f"sleeping:           {asleep.wait} (wakes {wakes} UTC)\n" in out

    data = (await cli.json("show", str(timed.id)))["run"]
    assert data["status"] == "waiting"
    assert data["wait"] == "decision"
    assert datetime.fromisoformat(data["due_at"]) == info.due_at
    assert (await cli.json("show", str(untimed.id)))["run"]["due_at"] is None

    code, out, _ = await cli("runs")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "waiting (decision)" in rows[str(timed.id)]
    assert f"sleeping ({asleep.wait})" in rows[str(sleeper.id)]


async def test_a_stopped_run_is_shown_retried_signalled_or_cancelled(
    cli: Cli, orchestrator: OrchestratorFactory
) -> None:
    """Runs stopped at a timed-out wait: `saga show` says where and what can resume
    them; `saga retry` exits 0, says it waits again for its signal, and the run waits
    with a fresh timeout until `saga signal` completes it; `saga signal` resumes another
    stopped run directly; `saga cancel` compensates a third."""
    orch = await orchestrator(*SAGAS)
    runs = [await waiting(orch, approval) for _ in range(3)]
    for run in runs:
        await advance(orch, run, timedelta(hours=48))
        await until_status(run, saga.RunStatus.STOPPED)
    retried, signalled, cancelled = runs

    code, out, _ = await cli("show", str(retried.id))
    assert code == 0
    assert "status:             stopped\n" in out
    assert "stopped at:         decision: the wait timed out (saga signal resumes it" in out

    code, out, err = await cli("retry", str(retried.id))
    assert code == 0, err
    assert out == f"run {retried.id}: waiting again for signal 'decision', with a fresh timeout\n"
    info = await until_status(retried, saga.RunStatus.WAITING)
    assert info.due_at is not None
    assert info.due_at > datetime.now(UTC) + timedelta(hours=47)
    argv = ["decision", "--payload", YES, "--target", TARGET]
    code, _, err = await cli("signal", argv[0], str(retried.id), *argv[1:])
    assert code == 0, err
    assert await retried.result(timeout=10) == "ana"

    code, _, err = await cli("signal", argv[0], str(signalled.id), *argv[1:])
    assert code == 0, err
    assert await signalled.result(timeout=10) == "ana"

    code, out, err = await cli("cancel", str(cancelled.id))
    assert code == 0, err
    assert "cancel requested" in out
    with pytest.raises(saga.RunCancelledError):
        await cancelled.result(timeout=10)
    code, _, err = await cli("retry", str(cancelled.id))
    assert code == 4
    assert "only failed and stopped runs can be retried" in err


async def test_signal_has_help(cli: Cli) -> None:
    """`saga signal --help` shows the command's usage and exits 0."""
    code, out, _ = await cli("signal", "--help", dsn=False)
    assert code == 0
    assert out.startswith("usage: saga signal")
    assert "--payload JSON" in out
    assert "--target MODULE:OBJECT" in out


class Verdict(BaseModel):
    amount: int


def _approval_redefined() -> saga.Saga[Job]:
    """``approval`` v1 as another release defines it: its wait takes another model."""
    s = saga.Saga("approval", input=Job)

    @s.step()
    async def reserve(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    @reserve.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        return None

    verdict = s.wait_for("decision", Verdict, timeout=timedelta(hours=48), on_timeout="stop")

    @s.step()
    async def finish(ctx: saga.Context[Job]) -> str:
        return str(ctx.result(verdict).amount)

    return s


@pytest.mark.parametrize("payload", [YES, '{"amount": 5}'])
async def test_signal_to_a_run_of_another_definition_says_so_whatever_the_payload(
    cli: Cli, orchestrator: OrchestratorFactory, payload: str
) -> None:
    """README (Deploys): a run is executed only by its own definition (name, version,
    fingerprint). `saga signal` to a run of ``approval`` v1 as another release defined
    it (another model at the wait) exits 2 saying the definitions differ, with both
    fingerprints, whether the payload suits the --target's model or the run's (it never
    calls the payload invalid for a model the run does not wait with); nothing is
    written and the run keeps waiting."""
    other = _approval_redefined()
    orch = await orchestrator(other)
    run = await waiting(orch, other)
    code, _, err = await cli(
        "signal", "decision", str(run.id), "--payload", payload, "--target", TARGET
    )
    assert code == 2
    assert "invalid payload" not in err
    assert f"fingerprint {other.fingerprint}" in err, err
    assert f"fingerprint {approval.fingerprint}" in err, err
    assert (await run.info()).status is saga.RunStatus.WAITING
    assert "signal_received" not in [e.kind for e in await run.history()]
