"""The `saga` command line (a real `python -m saga` subprocess on a real PostgreSQL) on
runs of the newer capabilities: what `saga show`, `runs`, `schedules` and `prune` say of
signalled waits, resolved keyed runs, runs queued for their key, graph runs running and
ended, a cancelled parent of child runs, and waits of days."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga.testing import advance
from tests import _harness
from tests._sagas import Job, until_status
from tests.conftest import OrchestratorFactory

pytestmark = pytest.mark.timeout(60)

TARGET = "tests.test_cli_newer_runs:SAGAS"


class Decision(BaseModel):
    approved: bool


# A wait of two hours, stopped for an operator on timeout, one run at a time per account.
keyed_wait = saga.Saga("h18_keyed_wait", input=Job, concurrency_key=lambda job: f"acct-{job.n}")


@keyed_wait.step()
async def prepare(ctx: saga.Context[Job]) -> int:
    return ctx.input.n


decision = keyed_wait.wait_for("decision", Decision, timeout=timedelta(hours=2), on_timeout="stop")


@keyed_wait.step()
async def finish(ctx: saga.Context[Job]) -> bool:
    return ctx.result(decision).approved


# One at a time per account; the step stops the run for an operator when it gives up
# (fail="x"), so the stopped run keeps its key.
keyed_stop = saga.Saga("h18_keyed_stop", input=Job, concurrency_key=lambda job: "acct-7")


@keyed_stop.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
async def transfer(ctx: saga.Context[Job]) -> int:
    if ctx.input.fail:
        raise saga.PermanentError("account frozen")
    return ctx.input.n


class Report(BaseModel):
    days: int = 1


report = saga.Saga("h18_report", input=Report)


@report.step()
async def build(ctx: saga.Context[Report]) -> int:
    return ctx.input.days


SAGAS = [keyed_wait, keyed_stop, report]


async def saga_cmd(dsn: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """The real `python -m saga ARGV` on the test database."""
    return await _harness.run("-m", "saga", *argv, env=_harness.python_env(dsn), timeout=30)


def field(out: str, name: str) -> str:
    """The value of `saga show`'s ``name:`` line."""
    for line in out.splitlines():
        if line.startswith(name + ":"):
            return line[len(name) + 1 :].strip()
    raise AssertionError(f"no {name!r} line in:\n{out}")


def utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


async def test_show_of_a_signalled_wait_does_not_say_it_times_out_at_the_signals_time(
    dsn: str,
) -> None:
    """README, Command line: `saga show RUN` prints "for a sleeping, waiting or stopped
    run, the sleep or wait and when it wakes or times out"; Waits: "The first signal of
    a name wins", the signal decides the wait.

    A run waits for `decision` (timeout in two hours); `saga signal` records the signal
    while no worker is up. `saga show` says the signal was received, not that the wait
    times out at the signal's own time (before: "waiting for: decision (times out <the
    signal's time> UTC)", two hours early)."""
    async with saga.Orchestrator(dsn, sagas=SAGAS, poll_interval=0.2) as orch:
        run = await orch.start(keyed_wait, Job(n=1))
        before = await until_status(run, saga.RunStatus.WAITING)
    assert before.due_at is not None
    sent = await saga_cmd(
        dsn, "signal", "decision", str(run.id), "--payload", '{"approved": true}',
        "--target", TARGET,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    async with saga.Client(dsn) as client:
        after = await client.get_run(run.id).info()
    assert after.status is saga.RunStatus.WAITING
    assert after.due_at is not None
    assert after.due_at < before.due_at - timedelta(hours=1)  # the wake-up, not the timeout
    shown = await saga_cmd(dsn, "show", str(run.id))
    assert shown.returncode == 0, shown.stderr
    line = field(shown.stdout, "waiting for")
    assert f"times out {utc(after.due_at)}" not in line, line


async def test_show_of_a_resolved_keyed_stopped_run_offers_no_action_that_is_refused(
    dsn: str,
) -> None:
    """README, One at a time per key: "`resolve()` frees the key; that run can then no
    longer be retried or cancelled"; Waits: a run resolved with a concurrency key "can no
    longer go on (reason `resolved`)"; Command line: `saga resolve` marks the run
    resolved, and `saga show` prints the run's state.

    A keyed run stopped at its timed-out wait is resolved with `saga resolve`. `saga
    show` says "resolved" and offers neither `saga signal` nor `saga retry` (each exits
    4 now). Before, it printed "status: stopped" and advised the three refused
    commands."""
    async with saga.Orchestrator(dsn, sagas=SAGAS, poll_interval=0.2) as orch:
        run = await orch.start(keyed_wait, Job(n=2))
        await until_status(run, saga.RunStatus.WAITING)
        await advance(orch, run, timedelta(hours=2))
        await until_status(run, saga.RunStatus.STOPPED)
    resolved = await saga_cmd(dsn, "resolve", str(run.id), "--note", "refunded by phone")
    assert resolved.returncode == 0, resolved.stderr
    retried = await saga_cmd(dsn, "retry", str(run.id))
    assert retried.returncode == 4  # refused, as documented
    shown = await saga_cmd(dsn, "show", str(run.id))
    assert shown.returncode == 0, shown.stderr
    assert "resolved" in field(shown.stdout, "status"), shown.stdout
    stopped_at = field(shown.stdout, "stopped at")
    assert "saga retry" not in stopped_at, stopped_at
    assert "saga signal" not in stopped_at, stopped_at


async def test_show_of_a_run_queued_behind_its_key_says_it_waits_for_the_key(
    dsn: str,
) -> None:
    """README, One at a time per key: "The others are `pending` with
    `RunInfo.waiting_for_key` (and `RunInfo.concurrency_key`), due never"; "A run that
    ends `failed` or `stopped` keeps its key ... until an operator resolves it";
    Command line: `saga show RUN` prints "the run's state", `--json` "prints JSON for
    scripts instead of tables"; Operator API: "The commands are thin layers over
    functions exported from `saga`, with the same semantics".

    A run stopped for an operator holds key `acct-7`; the next run of that account is
    queued behind it. `saga show` of the queued run names the key it waits for, and
    `--json` has `waiting_for_key` and `concurrency_key`. Before, nothing said so: the
    run read as one no worker picks up."""
    async with saga.Orchestrator(dsn, sagas=SAGAS, poll_interval=0.2) as orch:
        holder = await orch.start(keyed_stop, Job(n=1, fail="x"))
        await until_status(holder, saga.RunStatus.STOPPED)
        queued = await orch.start(keyed_stop, Job(n=2))
        info = await queued.info()
    assert info.waiting_for_key
    assert info.concurrency_key == "acct-7"
    shown = await saga_cmd(dsn, "show", str(queued.id))
    assert shown.returncode == 0, shown.stderr
    assert "acct-7" in shown.stdout, shown.stdout
    data = await saga_cmd(dsn, "show", str(queued.id), "--json")
    assert data.returncode == 0, data.stderr
    run = json.loads(data.stdout)["run"]
    assert run.get("waiting_for_key") is True, run
    assert run.get("concurrency_key") == "acct-7", run


async def test_schedules_prints_fire_times_with_their_time_zone(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """README, Traffic control: "`Schedule.cron(expression, timezone="UTC")` takes the 5
    cron fields ... in an IANA time zone"; Command line: `saga schedules` prints "the
    schedules: saga, spec, paused or not, last and next fire".

    A schedule "every day at 02:00 Paris time" is listed with its fire times in UTC,
    and the table says so. Before, `NEXT FIRE 2026-12-07 01:00:00` stood next to a
    spec in Paris time with no zone: it read as an hour early."""
    nightly = saga.Scheduled(
        "h18_nightly", report, saga.Schedule.cron("0 2 * * *", timezone="Europe/Paris"), Report()
    )
    await orchestrator(report, schedules=[nightly])
    listed = await saga_cmd(dsn, "schedules")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert "Europe/Paris" in row
    assert "UTC" in header or "UTC" in row, listed.stdout


async def test_runs_lists_a_completed_graph_run_without_a_current_step(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """README, Operator API: RunInfo has "status, step, attempt, errors, worker, times";
    Command line: `saga runs` lists runs (STEP and ATTEMPT columns); a completed
    linear run shows "-" in both, being at no step.

    A completed graph run (a and b in parallel, then c) is at no step, as a completed
    linear run. Before, it was listed with STEP "c" and ATTEMPT "0" (an attempt that
    never existed)."""
    g = saga.Saga("h18_graph", input=Job)

    @g.step()
    async def a(ctx: saga.Context[Job]) -> int:
        return 1

    @g.step(after=[])
    async def b(ctx: saga.Context[Job]) -> int:
        return 2

    @g.step(after=[a, b])
    async def c(ctx: saga.Context[Job]) -> int:
        return ctx.result(a) + ctx.result(b)

    orch = await orchestrator(g)
    run = await orch.start(g, Job())
    assert await run.result(timeout=20) == 3
    listed = await saga_cmd(dsn, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    (info,) = json.loads(listed.stdout)["runs"]
    assert info["status"] == "completed"
    assert info["step"] is None, info


stops = saga.Saga("h18_stops", input=Job)


@stops.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
async def charge(ctx: saga.Context[Job]) -> int:
    raise saga.PermanentError("card declined")


async def test_prune_can_delete_a_resolved_stopped_run_that_finished_long_ago(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """README, Command line: `saga prune --older-than D` "delete[s] runs that finished
    more than D ago, with their events ...; failed runs only with `--include-failed`";
    `saga show` prints a stopped run's "finished:" time; Operator API: `prune` deletes
    "a failed or stopped run" too (its key freed first).

    A run stopped for an operator, who then resolved it (`saga resolve`), finished more
    than a second ago: `saga prune --older-than 1s --include-stopped` deletes it.
    Before, the command had no way to prune a stopped run (the Python API can), so a
    day holding one could never be dropped whole."""
    orch = await orchestrator(stops)
    run = await orch.start(stops, Job())
    await until_status(run, saga.RunStatus.STOPPED)
    resolved = await saga_cmd(dsn, "resolve", str(run.id), "--note", "refunded by hand")
    assert resolved.returncode == 0, resolved.stderr
    await anyio.sleep(1.5)
    pruned = await saga_cmd(dsn, "prune", "--older-than", "1s", "--include-stopped", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["runs"] == 1, pruned.stdout


kid = saga.Saga("h18_kid", input=Job, output=int)


@kid.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
async def kid_work(ctx: saga.Context[Job]) -> int:
    if ctx.input.fail:
        raise saga.PermanentError("kid broke")
    return ctx.input.n


@kid_work.compensate
async def kid_undo(ctx: saga.Context[Job], n: int) -> None:
    return None


family = saga.Saga("h18_family", input=Job)


@family.step()
async def plan(ctx: saga.Context[Job]) -> int:
    return 2


family_kids = family.children(
    "kids", kid, lambda ctx: [Job(n=1), Job(n=2, fail=ctx.input.fail)], after=[plan]
)


async def test_show_of_a_cancelled_parent_has_no_phantom_attempts_of_its_children_step(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """README, Command line: `saga show RUN` prints "every step and compensation attempt
    with worker, start, duration, outcome and error"; Child sagas: "Compensating the
    step (a later failure, a cancel) ... cancels its running and stopped children and
    rolls back the completed ones ...; it completes when they all ended".

    A parent's `kids` step waits on two children (one completed, one stopped for an
    operator); `saga cancel PARENT` undoes them and the parent ends `cancelled`. Its
    `saga show` has no step attempt of `kids` without a start. Before, it ended with
    rows "kids  step  -  1  <worker>  -  -  waiting" (one per child that ended during
    the undoing: their `children_waiting` events came before `run_compensating`), read
    as attempts still waiting in a run that has ended."""
    orch = await orchestrator(family, kid)
    run = await orch.start(family, Job(fail="x"))
    with anyio.fail_after(20):
        while not [i for i in (await saga.needs_attention(orch)).runs if i.saga == "h18_kid"]:  # noqa: ASYNC110
            await anyio.sleep(0.05)
        while (await run.history())[-1].kind != "children_waiting":  # noqa: ASYNC110
            await anyio.sleep(0.05)
    cancelled = await saga_cmd(dsn, "cancel", str(run.id))
    assert cancelled.returncode == 0, cancelled.stderr
    await until_status(run, saga.RunStatus.CANCELLED)
    shown = await saga_cmd(dsn, "show", str(run.id), "--json")
    assert shown.returncode == 0, shown.stderr
    phantoms = [
        a for a in json.loads(shown.stdout)["attempts"]
        if a["step"] == "kids" and not a["compensation"] and a["started_at"] is None
    ]  # fmt: skip
    assert phantoms == [], (await saga_cmd(dsn, "show", str(run.id))).stdout


async def test_show_of_a_running_graph_run_names_the_worker_and_attempt_running_it(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """README, Command line: `saga show RUN` prints "the run's state"; Operator API:
    RunInfo has "status, step, attempt, errors, worker, times"; a running linear run
    shows `step: s (attempt 1)` and `worker: <the worker>`.

    A graph run whose two branches `left` and `right` both run (attempt 1, on this
    test's worker) shows both as the steps running, and the worker running them.
    Before, the header said "step: left (attempt 0)" and "worker: -"."""
    release = anyio.Event()
    g = saga.Saga("h18_branches", input=Job)

    @g.step()
    async def left(ctx: saga.Context[Job]) -> int:
        await release.wait()
        return 1

    @g.step(after=[])
    async def right(ctx: saga.Context[Job]) -> int:
        await release.wait()
        return 2

    orch = await orchestrator(g)
    run = await orch.start(g, Job())
    with anyio.fail_after(15):
        while [e.kind for e in await run.history()].count("step_started") < 2:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    try:
        shown = await saga_cmd(dsn, "show", str(run.id))
    finally:
        release.set()
    assert shown.returncode == 0, shown.stderr
    assert field(shown.stdout, "status") == "running"
    assert field(shown.stdout, "worker") != "-", shown.stdout
    running = field(shown.stdout, "steps running")
    assert sorted(running.split(", ")) == ["left (attempt 1)", "right (attempt 1)"], running


async def test_show_events_of_a_run_that_waited_days_tell_the_days_apart(
    dsn: str, orchestrator: OrchestratorFactory
) -> None:
    """README, Command line: `saga show RUN` prints the run's timeline, "`--events` adds
    the raw history"; Waits: a run waits "up to 48 hours" for a decision, a trial
    sleeps seven days; every other time `saga show` prints has its date and "UTC".

    A run entered its wait two days ago (its history rows are dated so, as for a run
    that really waited) and got its signal now: `saga show --events` prints each
    event's day. Before, "HH:MM:SS.mmm kind ...": the two read as minutes apart."""
    orch = await orchestrator(keyed_wait)
    run = await orch.start(keyed_wait, Job(n=5))
    await until_status(run, saga.RunStatus.WAITING)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE saga.events SET at = at - interval '2 days' WHERE run_id = $1", run.id
        )
        started = await conn.fetchval(
            "SELECT at FROM saga.events WHERE run_id = $1 AND kind = 'wait_started'", run.id
        )
    finally:
        await conn.close()
    sent = await saga_cmd(
        dsn, "signal", "decision", str(run.id), "--payload", '{"approved": true}',
        "--target", TARGET,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    shown = await saga_cmd(dsn, "show", str(run.id), "--events")
    assert shown.returncode == 0, shown.stderr
    (line,) = [ln for ln in shown.stdout.splitlines() if " wait_started " in f" {ln} "]
    assert started.astimezone(UTC).strftime("%Y-%m-%d") in line, shown.stdout
