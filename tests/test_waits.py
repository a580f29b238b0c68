"""Runs that sleep and wait for signals, on real Postgres: durable sleeps, typed signals
with timeouts (compensate, stop for an operator, go on with a computed value), signals
before/after the wait, repeats, refusals, cancel and retry, the caller's transaction,
and the bad inputs that must be refused before anything is written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga._partitions import uuid7
from saga._store_signals import Delivery
from saga.testing import advance
from tests._sagas import FAST, Gate, Job, Ledger, until_status
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(60)


class Decision(BaseModel):
    approved: bool
    by: str = "manager"


def approval_saga(
    ledger: Ledger,
    *,
    timeout: float | None = 3600.0,
    on_timeout: Any = "compensate",
    name: str = "approval",
    gate: Gate | None = None,
) -> tuple[saga.Saga[Job], saga.Wait[Decision]]:
    """reserve (compensated) -> wait "decision" -> finish (returns who approved; held by
    ``gate``)."""
    s = saga.Saga(name, input=Job)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @reserve.compensate
    async def release(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    decision = s.wait_for("decision", Decision, timeout=timeout, on_timeout=on_timeout)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        ledger.record(ctx)
        if gate is not None:
            await gate.pass_through(ctx)
        got = ctx.result(decision)
        if not got.approved:
            raise saga.PermanentError(f"rejected by {got.by}")
        return got.by

    return s, decision


def sleep_saga(ledger: Ledger, **sleep: Any) -> saga.Saga[Job]:
    """first -> sleep -> second (returns first's result + 1)."""
    s = saga.Saga("sleepy", input=Job)

    @s.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    @first.compensate
    async def undo_first(ctx: saga.Context[Job], n: int) -> None:
        ledger.record(ctx, n)

    s.sleep(**sleep)

    @s.step(retry=FAST)
    async def second(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.result(first) + 1

    return s


async def kinds(run: saga.RunHandle) -> list[str]:
    return [e.kind for e in await run.history()]


# -- sleep ---------------------------------------------------------------------------------


async def test_a_sleeping_run_holds_nothing_and_wakes_when_its_time_comes(
    orchestrator: OrchestratorFactory,
) -> None:
    """A run sleeping a day is `sleeping`, unleased (no worker), with its wake-up time
    as due_at; advancing the timer wakes it within the claim latency and it completes;
    the history says sleep_started then woke."""
    ledger = Ledger()
    s = sleep_saga(ledger, duration=timedelta(days=1))
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=41))
    info = await until_status(run, saga.RunStatus.SLEEPING)
    assert info.worker is None
    assert info.wait == "sleep_after_first"
    assert info.step == "second"
    assert info.due_at is not None
    assert timedelta(hours=23) < info.due_at - datetime.now(UTC) <= timedelta(days=1)
    await anyio.sleep(0.3)
    assert (await run.info()).status is saga.RunStatus.SLEEPING
    assert await advance(orch, run, timedelta(days=1)) is not None
    assert await run.result(timeout=10) == 42
    history = await kinds(run)
    assert history.index("sleep_started") < history.index("woke") < history.index("run_completed")


async def test_a_sleep_until_a_time_computed_from_the_input_and_earlier_results(
    orchestrator: OrchestratorFactory,
) -> None:
    """sleep(until=...) is computed once the step before it completed, from the input
    and that step's result; a time already past wakes at once."""
    ledger = Ledger()
    seen: list[int] = []

    def when(ctx: saga.Context[Job]) -> datetime:
        seen.append(ctx.result(s.steps[0]))
        return datetime.now(UTC) + timedelta(hours=ctx.input.n)

    s = sleep_saga(ledger, until=when)
    orch = await orchestrator(s)
    later = await orch.start(s, Job(n=5))
    info = await until_status(later, saga.RunStatus.SLEEPING)
    assert info.due_at is not None
    assert timedelta(hours=4.9) < info.due_at - datetime.now(UTC) < timedelta(hours=5.1)
    past = await orch.start(s, Job(n=-2))
    assert await past.result(timeout=10) == -1
    assert sorted(seen) == [-2, 5]


async def test_a_sleeping_run_survives_its_orchestrator(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """A sleeping run outlives the orchestrator that parked it: another one, opened
    later, wakes it when it is due."""
    ledger = Ledger()
    s = sleep_saga(ledger, duration=0.5)
    first = await orchestrator(s)
    run = await first.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.SLEEPING)
    await first.aclose()
    async with saga.Orchestrator(dsn, sagas=[s], poll_interval=0.1) as second:
        assert await second.get_run(run.id).result(timeout=10) == 2


# -- waits and signals ------------------------------------------------------------------------


async def test_a_signal_sent_while_the_run_waits_is_its_typed_result(
    orchestrator: OrchestratorFactory,
) -> None:
    """A waiting run holds no worker; the signal's payload becomes the wait's typed
    result, read by the next step; the history has wait_started, signal_received, woke."""
    ledger = Ledger()
    s, decision = approval_saga(ledger)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    info = await until_status(run, saga.RunStatus.WAITING)
    assert info.worker is None
    assert info.wait == "decision"
    assert await run.signal(decision, Decision(approved=True, by="ana")) is True
    assert await run.result(timeout=10) == "ana"
    history = await kinds(run)
    for earlier, later in [("wait_started", "signal_received"), ("signal_received", "woke")]:
        assert history.index(earlier) < history.index(later)


async def test_a_burst_of_signals_wakes_every_run_with_fewer_notifications(
    orchestrator: OrchestratorFactory, dsn: str
) -> None:
    """With the worker's polling effectively off (30 s), 40 runs parked at their wait,
    each sent its signal at once from a client: every run completes, so the signals that
    did not NOTIFY in their own statement were covered by a trailing NOTIFY sent after
    they committed; and the burst sent fewer NOTIFYs than signals (a NOTIFY makes its
    commit wait for the other commits' WAL flush, so one per signal capped a burst at
    the rate of fsyncs)."""
    s, decision = approval_saga(Ledger(), name="bursty")
    client = await orchestrator(s, concurrency=0, poll_interval=30)
    worker = await orchestrator(s, concurrency=64, poll_interval=0.05)
    runs = [await client.start(s, Job(n=n)) for n in range(40)]
    for run in runs:
        await until_status(run, saga.RunStatus.WAITING)
    await worker.aclose()  # parked: the next worker hears of signals by NOTIFY only
    await orchestrator(s, concurrency=64, poll_interval=30)
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener("saga_work", lambda *args: heard.append(args[3]))
        async with anyio.create_task_group() as tg:
            for n, run in enumerate(runs):
                tg.start_soon(run.signal, decision, Decision(approved=True, by=f"b{n}"))
        with anyio.fail_after(15):
            assert [await run.result() for run in runs] == [f"b{n}" for n in range(40)]
    finally:
        await listener.close()
    assert 1 <= len(heard) < len(runs), heard


async def test_signals_sent_at_once_share_commits_each_with_its_own_answer(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """40 signals sent at once from a client, to 30 parked runs (10 of them twice, and
    one to a run that does not exist), share transactions (group commit: their history
    rows were written by fewer transactions than runs), and each gets its own answer as
    if sent alone: every first signal is accepted, every repeat is a repeat, the unknown
    run is not found, and every run completes with its first signal's payload."""
    s, decision = approval_saga(Ledger(), name="grouped_signals")
    await orchestrator(s, concurrency=64)
    client = await open_client(s)
    runs = [await client.start(s, Job(n=n)) for n in range(30)]
    for run in runs:
        await until_status(run, saga.RunStatus.WAITING)
    answers: dict[tuple[int, int], Any] = {}

    async def send(n: int, attempt: int) -> None:
        by = f"b{n}" if attempt == 0 else f"again{n}"
        answers[n, attempt] = await runs[n].signal(decision, Decision(approved=True, by=by))

    async def unknown() -> None:  # (the store's call: a client looks the run up first)
        store = client._store
        assert store is not None
        payload = Decision(approved=True).model_dump_json()
        answers[-1, 0] = await store.send_signal(
            uuid7(), "decision", payload, (s.name, s.version, None)
        )

    async with anyio.create_task_group() as tg:
        for n in range(30):
            tg.start_soon(send, n, 0)
        for n in range(10):
            tg.start_soon(send, n, 1)
        tg.start_soon(unknown)
    with anyio.fail_after(15):
        assert [await run.result() for run in runs] == [f"b{n}" for n in range(30)]
    assert all(answers[n, 0] is True for n in range(30))
    assert all(answers[n, 1] is False for n in range(10))
    assert answers[-1, 0] is Delivery.NOT_FOUND
    transactions = await db.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM saga.events"
        " WHERE kind = 'signal_received' AND run_id = ANY($1)",
        [run.id for run in runs],
    )
    assert transactions < 30


async def test_runs_entering_their_wait_together_share_commits(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """40 runs reaching their wait at about the same time park in fewer transactions than
    runs (group commit, the wait's signal row marked in the same statement); one whose
    signal was sent before it parked is due at once and completes, the others wait."""
    gate = anyio.Event()
    s = saga.Saga("parking", input=Job)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        await gate.wait()
        return ctx.input.n

    decision = s.wait_for("decision", Decision, timeout=3600)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        return ctx.result(decision).by

    orch = await orchestrator(s, concurrency=64)
    runs = [await orch.start(s, Job(n=n)) for n in range(40)]
    assert await runs[0].signal(decision, Decision(approved=True, by="early")) is True
    await until_status(runs[-1], saga.RunStatus.RUNNING)
    gate.set()
    assert await runs[0].result(timeout=10) == "early"
    for run in runs[1:]:
        await until_status(run, saga.RunStatus.WAITING)
    parked = await db.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM saga.events WHERE kind = 'wait_started'"
    )
    assert parked < 40


async def test_a_signal_that_did_not_notify_is_followed_by_a_notification(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal sent within the notification window of an earlier one (here a refused
    signal, which wakes nothing) does not NOTIFY in its statement: a trailing NOTIFY
    follows its commit and wakes the idle worker (its polling effectively off)."""
    monkeypatch.setattr(saga._notify, "WINDOW", 0.5)
    s, decision = approval_saga(Ledger(), name="trailing")
    client = await orchestrator(s, concurrency=0, poll_interval=30)
    await orchestrator(s, concurrency=4, poll_interval=30)
    first, second = [await client.start(s, Job(n=n)) for n in range(2)]
    await until_status(first, saga.RunStatus.WAITING)
    await until_status(second, saga.RunStatus.WAITING)
    assert await first.signal(decision, Decision(approved=True, by="a")) is True
    assert await first.result(timeout=10) == "a"
    await anyio.sleep(0.6)  # the window of the signal above is over
    with pytest.raises(saga.InvalidRunStateError):  # opens a window, wakes nothing
        await first.signal(decision, Decision(approved=True, by="again"))
    assert await second.signal(decision, Decision(approved=True, by="b")) is True
    assert await second.result(timeout=10) == "b"


async def test_a_signal_sent_before_the_run_reaches_its_wait_is_kept(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """A signal sent (by name, as a dict, from a client) before any worker ran the run
    is kept and consumed when the run gets to its wait: it does not wait at all."""
    ledger = Ledger()
    s, _ = approval_saga(ledger)
    client = await open_client(s)
    run = await client.start(s, Job(n=1))
    assert await client.signal(run.id, "decision", {"approved": True, "by": "bo"}) is True
    await orchestrator(s)
    assert await run.result(timeout=10) == "bo"


async def test_the_first_signal_wins_and_a_repeat_changes_nothing(
    orchestrator: OrchestratorFactory,
) -> None:
    """A second signal of the same name is reported (False) and changes nothing, before
    and after the run consumed the first; once the run has ended, a signal is refused.
    (``finish`` is held until the repeats were sent: a run that ended first would refuse
    them, which the test must not leave to timing.)"""
    ledger = Ledger()
    gate = Gate("finish")
    s, decision = approval_saga(ledger, gate=gate)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    assert await run.signal(decision, Decision(approved=True, by="first")) is True
    assert await run.signal(decision, Decision(approved=False, by="second")) is False
    with anyio.fail_after(10):
        await gate.entered.wait()  # consumed
    assert await run.signal(decision, Decision(approved=False, by="third")) is False
    gate.release.set()
    assert await run.result(timeout=10) == "first"
    with pytest.raises(saga.InvalidRunStateError, match="has ended"):
        await run.signal(decision, Decision(approved=False, by="fourth"))


async def test_a_rejection_compensates_what_completed(orchestrator: OrchestratorFactory) -> None:
    """A payload the next step rejects rolls back the steps before the wait (the wait
    itself has nothing to undo)."""
    ledger = Ledger()
    s, decision = approval_saga(ledger)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=7))
    await run.signal(decision, {"approved": False})
    with pytest.raises(saga.RunCompensatedError, match="rejected"):
        await run.result(timeout=10)
    assert ledger.steps("compensation", run.id) == ["reserve"]


async def test_a_signal_to_an_ended_run_is_refused_and_recorded(
    orchestrator: OrchestratorFactory,
) -> None:
    """A signal to a run that has ended raises InvalidRunStateError, and the refusal is
    in the run's history."""
    ledger = Ledger()
    s, decision = approval_saga(ledger)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    await run.signal(decision, Decision(approved=True))
    await run.result(timeout=10)
    with pytest.raises(saga.InvalidRunStateError):
        await orch.signal(run.id, "decision", Decision(approved=True))
    refused = [e for e in await run.history() if e.kind == "signal_refused"]
    assert refused[-1].data == {"signal": "decision", "reason": "ended"}


# -- timeouts ---------------------------------------------------------------------------------


async def test_a_timed_out_wait_compensates_by_default(orchestrator: OrchestratorFactory) -> None:
    """Without its signal within the timeout (moved by saga.testing.advance), the run
    compensates what completed and ends compensated with saga.WaitTimedOut; a signal
    sent afterwards is refused (the wait was decided), never silently ignored."""
    ledger = Ledger()
    s, decision = approval_saga(ledger, timeout=48 * 3600)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=3))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, timedelta(hours=48))
    with pytest.raises(saga.RunCompensatedError) as caught:
        await run.result(timeout=10)
    assert caught.value.error is not None
    assert caught.value.error.type == "saga.WaitTimedOut"
    assert ledger.steps("compensation", run.id) == ["reserve"]
    assert "wait_timed_out" in await kinds(run)
    with pytest.raises(saga.InvalidRunStateError):
        await run.signal(decision, Decision(approved=True))


async def test_a_timed_out_wait_can_go_on_with_a_computed_value(
    orchestrator: OrchestratorFactory,
) -> None:
    """on_timeout=async fn: its value (from the context) is the wait's result and the
    run goes on."""
    ledger = Ledger()

    async def default(ctx: saga.Context[Job]) -> Decision:
        return Decision(approved=True, by=f"auto-{ctx.input.n}")

    s, _ = approval_saga(ledger, timeout=60, on_timeout=default)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=9))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, 60)
    assert await run.result(timeout=10) == "auto-9"


async def test_a_run_stopped_at_a_timed_out_wait_resumes_by_signal_or_retry(
    orchestrator: OrchestratorFactory,
) -> None:
    """on_timeout="stop": the run is stopped for an operator (RunStoppedError); the
    operator's signal resumes it; another run, retried, waits again with a fresh
    timeout."""
    ledger = Ledger()
    s, decision = approval_saga(ledger, timeout=60, on_timeout="stop")
    orch = await orchestrator(s)
    first = await orch.start(s, Job(n=1))
    second = await orch.start(s, Job(n=2))
    for run in (first, second):
        await until_status(run, saga.RunStatus.WAITING)
        await advance(orch, run, 60)
        with pytest.raises(saga.RunStoppedError):
            await run.result(timeout=10)
        info = await run.info()
        assert info.status is saga.RunStatus.STOPPED
        assert info.wait == "decision"
    assert await first.signal(decision, Decision(approved=True, by="ops")) is True
    assert await first.result(timeout=10) == "ops"
    await second.retry()
    info = await until_status(second, saga.RunStatus.WAITING)
    assert info.due_at is not None
    assert info.due_at > datetime.now(UTC) + timedelta(seconds=30)
    await second.signal(decision, Decision(approved=True, by="late"))
    assert await second.result(timeout=10) == "late"


# -- cancel -----------------------------------------------------------------------------------


@pytest.mark.parametrize("parked", ["sleep", "wait", "stopped"])
async def test_cancelling_a_parked_run_compensates_at_once(
    orchestrator: OrchestratorFactory, parked: str
) -> None:
    """Cancelling a sleeping, waiting or stopped run rolls back what completed at once,
    without waiting for its timer."""
    ledger = Ledger()
    if parked == "sleep":
        s = sleep_saga(ledger, duration=timedelta(days=7))
    else:
        s, _ = approval_saga(ledger, timeout=3600, on_timeout="stop")
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.SLEEPING, saga.RunStatus.WAITING)
    if parked == "stopped":
        await advance(orch, run, 3600)
        await until_status(run, saga.RunStatus.STOPPED)
    await run.cancel()
    with pytest.raises(saga.RunCancelledError):
        await run.result(timeout=10)
    assert len(ledger.steps("compensation", run.id)) == 1


async def test_pruning_a_run_that_waited_deletes_its_signals_too(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """prune() deletes a finished run's signal rows with the run, whether the signal was
    received or the wait timed out: nothing of a pruned run is left behind."""
    ledger = Ledger()
    s, decision = approval_saga(ledger, timeout=60)
    orch = await orchestrator(s)
    signalled = await orch.start(s, Job(n=1))
    await signalled.signal(decision, Decision(approved=True))
    timed_out = await orch.start(s, Job(n=2))
    await until_status(timed_out, saga.RunStatus.WAITING)
    await advance(orch, timed_out, 60)
    await signalled.result(timeout=10)
    with pytest.raises(saga.RunCompensatedError):
        await timed_out.result(timeout=10)
    assert await db.fetchval("SELECT count(*) FROM saga.signals") == 2
    await db.execute("UPDATE saga.runs SET finished_at = now() - interval '2 days'")
    pruned = await saga.prune(orch, older_than=timedelta(days=1))
    assert pruned.runs == 2
    assert await db.fetchval("SELECT count(*) FROM saga.signals") == 0


# -- the caller's transaction -----------------------------------------------------------------


@pytest.mark.parametrize("ending", ["commit", "rollback", "savepoint"])
async def test_start_and_signal_in_the_callers_transaction(
    orchestrator: OrchestratorFactory, pool: asyncpg.Pool, ending: str
) -> None:
    """start(conn=) and signal(conn=) write in the caller's transaction: on commit the
    run (and its signal) exist and a worker runs it; on rollback, or the rollback of a
    savepoint around them, nothing exists and nothing runs."""
    ledger = Ledger()
    s, decision = approval_saga(ledger)
    orch = await orchestrator(s)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        if ending == "savepoint":
            sp = conn.transaction()
            await sp.start()
            run = await orch.start(s, Job(n=1), key="order-1", conn=conn)
            await orch.signal(run.id, decision, Decision(approved=True), conn=conn)
            await sp.rollback()
        else:
            run = await orch.start(s, Job(n=1), key="order-1", conn=conn)
            await orch.signal(run.id, decision, Decision(approved=True), conn=conn)
        await anyio.sleep(0.3)
        assert not ledger.calls  # nothing runs before the commit
        await (tx.commit() if ending == "commit" else tx.rollback())
    if ending == "commit":
        assert await run.result(timeout=10) == "manager"
    else:
        with pytest.raises(saga.RunNotFoundError):
            await run.info()
        assert await pool.fetchval("SELECT count(*) FROM saga.signals") == 0


async def test_signal_by_key(orchestrator: OrchestratorFactory) -> None:
    """signal_key reaches the run of a saga started with that idempotency key; an
    unknown key is a clear error."""
    ledger = Ledger()
    s, decision = approval_saga(ledger)
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1), key="refund-7")
    assert await orch.signal_key(s, "refund-7", decision, Decision(approved=True)) is True
    assert await run.result(timeout=10) == "manager"
    with pytest.raises(saga.RunNotFoundError, match="refund-8"):
        await orch.signal_key("approval", "refund-8", "decision", {"approved": True})


# -- bad input ----------------------------------------------------------------------------------


async def test_bad_signals_are_refused_before_anything_is_written(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """An unknown signal name, an invalid or too large payload, a signal to an unknown
    run, a malformed run id: each a clear error naming what is wrong, and no signal row
    or history entry is written."""
    import uuid

    ledger = Ledger()
    s, decision = approval_saga(ledger)
    orch = await orchestrator(s, max_payload_bytes=200)
    run = await orch.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    before = await db.fetchval("SELECT count(*) FROM saga.events")
    with pytest.raises(saga.InvalidInputError, match="no wait for a signal named 'nope'"):
        await run.signal("nope", {"approved": True})
    with pytest.raises(saga.InvalidInputError, match="invalid payload for signal 'decision'"):
        await run.signal("decision", {"approved": "perhaps"})
    with pytest.raises(saga.PayloadTooLargeError):
        await run.signal(decision, Decision(approved=True, by="x" * 500))
    with pytest.raises(saga.RunNotFoundError):
        await orch.signal(uuid.uuid4(), "decision", {"approved": True})
    with pytest.raises(saga.ConfigurationError, match="not a run id"):
        await orch.signal("not-a-uuid", "decision", {"approved": True})
    assert await db.fetchval("SELECT count(*) FROM saga.signals WHERE payload IS NOT NULL") == 0
    assert await db.fetchval("SELECT count(*) FROM saga.events") == before


def test_bad_sleep_and_wait_declarations_are_refused() -> None:
    """A sleep or wait before any step, at the end, right after another, with a
    negative, zero, absurd or non-number duration, a non-positive timeout, a payload
    that is not a pydantic model, or an on_timeout that cannot work: a DefinitionError
    naming it, at definition time."""

    class D(BaseModel):
        ok: bool

    async def step(ctx: saga.Context[Job]) -> int:
        return 1

    s = saga.Saga("bad", input=Job)
    with pytest.raises(saga.DefinitionError, match="must follow a step"):
        s.sleep(5)
    with pytest.raises(saga.DefinitionError, match="must follow a step"):
        s.wait_for("d", D)
    s.step(name="a")(step)
    for duration in (-1, 0, float("nan"), float("inf"), 11 * 365 * 86400, "5"):
        with pytest.raises(saga.DefinitionError, match="sleep duration"):
            s.sleep(duration)  # type: ignore[arg-type]
    with pytest.raises(saga.DefinitionError, match="duration or until"):
        s.sleep()
    for timeout in (0, -3, timedelta(seconds=-1)):
        with pytest.raises(saga.DefinitionError, match="timeout of wait"):
            s.wait_for("d", D, timeout=timeout)
    with pytest.raises(saga.DefinitionError, match="pydantic model"):
        s.wait_for("d", dict)  # type: ignore[type-var]
    with pytest.raises(saga.DefinitionError, match="on_timeout"):
        s.wait_for("d", D, timeout=5, on_timeout="retry")  # type: ignore[arg-type]

    async def value(ctx: saga.Context[Job]) -> D:
        return D(ok=True)

    for without_timeout in (value, "stop"):
        with pytest.raises(saga.DefinitionError, match="on_timeout is given but there is no"):
            s.wait_for("d", D, on_timeout=without_timeout)
    s.wait_for("d", D, timeout=5)
    with pytest.raises(saga.DefinitionError, match="no step in between"):
        s.sleep(5)
    with pytest.raises(saga.DefinitionError, match="already has a wait named 'd'"):
        s.step(name="d")(step)
    s.step(name="b")(step)
    s.sleep(5)
    with pytest.raises(saga.DefinitionError, match="ends with"):
        s._freeze()  # what registering it with a client or orchestrator does


async def test_a_signal_blocked_behind_the_run_entering_its_wait_still_wakes_it(
    open_client: ClientFactory, pool: asyncpg.Pool
) -> None:
    """The race of a signal with the run entering its wait: the sender's statement starts
    while the transition that parks the run holds the run's row (simulated here by a
    transaction making the same change, committed once the sender is blocked). The
    signal must still see the run at its wait and make it due at once; else the run
    would sleep until its timeout."""
    ledger = Ledger()
    s, decision = approval_saga(ledger, timeout=3600)
    client = await open_client(s)  # executes nothing: the test plays the worker
    run = await client.start(s, Job(n=1))
    async with pool.acquire() as worker:
        tx = worker.transaction()
        await tx.start()
        await worker.execute(
            "UPDATE saga.runs SET status = 'waiting', wait_name = 'decision', "
            "step_name = 'finish', due_at = now() + interval '1 hour' WHERE id = $1",
            run.id,
        )
        await worker.execute(
            "INSERT INTO saga.signals (run_id, name, awaited_at) VALUES ($1, 'decision', now())",
            run.id,
        )
        async with anyio.create_task_group() as tg:
            sent: list[bool] = []

            async def send() -> None:
                sent.append(await client.signal(run.id, decision, Decision(approved=True)))

            tg.start_soon(send)
            await anyio.sleep(0.3)  # the sender is now waiting for the run's row
            assert not sent
            await tx.commit()
    assert sent == [True]
    info = await run.info()
    assert info.status is saga.RunStatus.WAITING
    assert info.due_at is not None
    assert info.due_at <= datetime.now(UTC) + timedelta(seconds=1)


@pytest.mark.parametrize("rolling_back", ["cancelled", "failed"])
async def test_a_signal_to_a_run_rolling_back_is_refused(
    orchestrator: OrchestratorFactory, rolling_back: str
) -> None:
    """A run being cancelled, or one whose step failed for good before its wait, will
    never consume a signal: sending one raises InvalidRunStateError (not a silent True)
    and the refusal is recorded with its reason."""
    ledger = Ledger()
    s, decision = approval_saga(ledger, timeout=3600)
    client = await orchestrator(s, concurrency=0)  # nothing runs: the state stays put
    run = await client.start(s, Job(n=1))
    if rolling_back == "cancelled":
        await run.cancel()
    else:
        await client._store_or_raise().pool.execute(  # private: the state under test
            "UPDATE saga.runs SET status = 'compensating' WHERE id = $1", run.id
        )
    with pytest.raises(saga.InvalidRunStateError, match="rolling back"):
        await run.signal(decision, Decision(approved=True))
    refused = [e for e in await run.history() if e.kind == "signal_refused"]
    assert refused[-1].data == {"signal": "decision", "reason": "rolling_back"}


async def test_a_run_stopped_at_one_wait_keeps_a_signal_for_a_later_one(
    orchestrator: OrchestratorFactory,
) -> None:
    """A stopped run is not over: a signal for a later wait, sent while the run is
    stopped at an earlier one, is kept (True) and consumed once the operator resumes the
    run and it gets there; the run completes without waiting again."""
    s = saga.Saga("two_waits", input=Job)

    async def noop(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    s.step(name="a")(noop)
    first = s.wait_for("first", Decision, timeout=60, on_timeout="stop")
    s.step(name="b")(noop)
    second = s.wait_for("second", Decision, timeout=3600)

    @s.step(name="c")
    async def c(ctx: saga.Context[Job]) -> str:
        return f"{ctx.result(first).by}+{ctx.result(second).by}"

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, 60)
    await until_status(run, saga.RunStatus.STOPPED)
    assert await run.signal(second, Decision(approved=True, by="later")) is True
    assert await run.signal(first, Decision(approved=True, by="ops")) is True
    assert await run.result(timeout=10) == "ops+later"


async def test_a_signal_cannot_resume_a_resolved_run_whose_key_went_to_another(
    orchestrator: OrchestratorFactory,
) -> None:
    """A keyed run stopped at its timed-out wait and resolved freed its key, and the next
    run of that key was admitted: a signal for the wait it is stopped at is refused
    (InvalidRunStateError saying so, `signal_refused` with reason `resolved` in its
    history), as its retry() is, and the run never runs again beside the key's new
    holder. It used to be accepted, and the run completed while the other held the key."""
    s = saga.Saga("keyed_wait", input=Job, concurrency_key=lambda job: "acct")

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    decision = s.wait_for("decision", Decision, timeout=60, on_timeout="stop")

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        return ctx.result(decision).by

    orch = await orchestrator(s)
    first = await orch.start(s, Job(n=1))
    await until_status(first, saga.RunStatus.WAITING)
    second = await orch.start(s, Job(n=2))
    await advance(orch, first, 60)
    await until_status(first, saga.RunStatus.STOPPED)
    await first.resolve(note="refunded by hand")
    await until_status(second, saga.RunStatus.WAITING)  # the key's holder now
    with pytest.raises(saga.InvalidRunStateError, match="resolved: resolving it freed"):
        await first.signal(decision, Decision(approved=True, by="late"))
    with pytest.raises(saga.InvalidRunStateError):
        await first.retry()
    refused = [e for e in await first.history() if e.kind == "signal_refused"]
    assert [e.data["reason"] for e in refused] == ["resolved"]
    assert (await first.info()).status is saga.RunStatus.STOPPED
    # The key's holder is untouched and goes on when signalled.
    assert await second.signal(decision, Decision(approved=True, by="ana")) is True
    assert await second.result(timeout=10) == "ana"


@pytest.mark.parametrize(
    ("returned", "outcome"),
    [
        ({"approved": True, "by": "auto"}, "auto"),
        ({"approved": "maybe"}, "ValidationError"),
    ],
)
async def test_an_on_timeout_function_may_return_the_payload_as_a_mapping(
    orchestrator: OrchestratorFactory, returned: dict[str, Any], outcome: str
) -> None:
    """The value an on_timeout function returns is taken as if it were the payload: a
    mapping is validated against the wait's model (as a signal's is), and the run goes
    on with the model; one that does not validate fails the wait, and the run rolls back
    naming the ValidationError. A mapping used to fail as a SerializationError."""
    s = saga.Saga("mapping_default", input=Job)

    @s.step(retry=FAST)
    async def reserve(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    async def default(ctx: saga.Context[Job]) -> Any:
        return returned

    decision = s.wait_for("decision", Decision, timeout=60, on_timeout=default)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        got = ctx.result(decision)
        assert isinstance(got, Decision)
        return got.by

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=2))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, 60)
    try:
        got: Any = await run.result(timeout=10)
    except saga.RunCompensatedError as exc:
        got = exc.error.type.rsplit(".", 1)[-1] if exc.error else None
    assert got == outcome


@pytest.mark.parametrize("operator", ["signal", "retry"])
async def test_past_the_pivot_a_failing_on_timeout_stops_the_run_at_its_wait(
    orchestrator: OrchestratorFactory, operator: str
) -> None:
    """Past the pivot, a wait whose on_timeout function raises stops the run at that
    wait (RunInfo.wait names it), as on_timeout="stop" does: the operator's signal
    resumes it, or retry() waits again (a fresh timeout, then a signal). It used to stop
    at the next step with no wait: the signal was refused, and a retry ran that step
    without the wait's result."""
    s = saga.Saga("pivot_wait", input=Job)

    @s.step(retry=FAST, pivot=True)
    async def pay(ctx: saga.Context[Job]) -> int:
        return ctx.input.n

    async def default(ctx: saga.Context[Job]) -> Decision:
        raise RuntimeError("decision service down")

    decision = s.wait_for("decision", Decision, timeout=60, on_timeout=default)

    @s.step(retry=FAST)
    async def finish(ctx: saga.Context[Job]) -> str:
        return ctx.result(decision).by

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    await until_status(run, saga.RunStatus.WAITING)
    await advance(orch, run, 60)
    with pytest.raises(saga.RunStoppedError, match="decision service down"):
        await run.result(timeout=10)
    info = await run.info()
    assert (info.wait, info.step) == ("decision", "finish")
    if operator == "retry":
        await run.retry()
        await until_status(run, saga.RunStatus.WAITING)
    assert await run.signal(decision, Decision(approved=True, by="ops")) is True
    assert await run.result(timeout=10) == "ops"


async def test_past_the_pivot_a_failing_until_stops_the_run_at_its_step(
    orchestrator: OrchestratorFactory,
) -> None:
    """Past the pivot, a sleep whose until() raises stops the run at the step before the
    sleep (not recorded completed: the history has its step_failed, no step_completed);
    the operator's retry() runs that step again, then until(), and the run sleeps. It
    used to stop at the step after the sleep, which a retry ran at once, skipping the
    sleep."""
    ledger = Ledger()
    until_calls: list[datetime] = []
    s = saga.Saga("pivot_sleep", input=Job)

    @s.step(retry=FAST, pivot=True)
    async def pay(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return ctx.input.n

    def until(ctx: saga.Context[Job]) -> datetime:
        until_calls.append(datetime.now(UTC))
        if len(until_calls) == 1:
            raise RuntimeError("calendar service down")
        return datetime.now(UTC) + timedelta(days=1)

    s.sleep(until=until)

    @s.step(retry=FAST)
    async def ship(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 1

    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    with pytest.raises(saga.RunStoppedError, match="calendar service down"):
        await run.result(timeout=10)
    info = await run.info()
    assert (info.step, info.wait) == ("pay", None)
    kinds = [(e.kind, e.step) for e in await run.history()]
    assert ("step_completed", "pay") not in kinds
    with pytest.raises(saga.InvalidRunStateError, match="reached its pivot step"):
        await run.cancel()  # at its pivot: nothing before it is undone
    await run.retry()
    info = await until_status(run, saga.RunStatus.SLEEPING)
    assert info.wait is not None
    assert len(until_calls) == 2
    assert ledger.steps("step") == ["pay", "pay"]
