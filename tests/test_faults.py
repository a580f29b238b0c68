"""saga.testing fault injection, and what each fault proves about the engine."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from saga import _write
from saga.testing import Faults, advance
from tests._sagas import Job, Ledger, fast, permanent, small_saga, transient
from tests.conftest import OrchestratorFactory

T = TypeVar("T")


def ledger_saga(effects: Ledger, name: str = "ledger") -> saga.Saga[Job]:
    """debit, credit, notify, each compensated, each applying its effect to ``effects``
    (an external service deduplicating by idempotency key); notify refuses a negative
    ``n`` for good. A step returns its idempotency key."""
    return small_saga(
        name,
        ["debit", "credit", "notify"],
        compensate=True,
        ledger=effects,
        fail={"notify": permanent("refused", when=lambda ctx: ctx.input.n < 0)},
        result=lambda ctx: ctx.idempotency_key,
        retry=fast(3),
        undo_retry=fast(3),
    )


async def test_crash_after_side_effect_reruns_the_step_once_more(
    orchestrator: OrchestratorFactory,
) -> None:
    """A worker dying between a step's side effect and its checkpoint loses nothing: the
    lease expires, the step runs again with the same idempotency key (two raw executions,
    net effect one), and the outcome is recorded once."""
    effects = Ledger()
    s = ledger_saga(effects)
    faults = Faults()
    faults.crash_after("credit")
    orch = await orchestrator(s, lease_seconds=0.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    assert await run.result(timeout=15) == f"{run.id}:step:notify"
    assert faults.fired["crash_after"] == 1
    assert effects.raw()[f"{run.id}:step:credit"] == 2
    assert all(v == 1 for v in effects.net.values())
    history = await run.history()
    assert [e.kind for e in history].count("step_completed") == 3
    assert "lease_expired" in [e.kind for e in history]


async def test_a_step_that_kills_its_worker_every_time_ends_compensated(
    orchestrator: OrchestratorFactory,
) -> None:
    """A crash counts as an attempt: a step whose worker dies on every attempt exhausts
    its attempts and the run is compensated instead of looping forever."""
    effects = Ledger()
    s = ledger_saga(effects)
    faults = Faults()
    faults.crash_after("credit", times=10)
    orch = await orchestrator(s, lease_seconds=0.3)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    with pytest.raises(saga.RunCompensatedError) as raised:
        await run.result(timeout=20)
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.AttemptLost"
    assert faults.fired["crash_after"] == 3
    assert effects.net == {f"{run.id}:step:debit": 0, f"{run.id}:step:credit": 1}


async def test_expired_lease_fences_out_the_old_attempt(
    orchestrator: OrchestratorFactory,
) -> None:
    """When a running step's lease expires and another attempt takes over, the old
    attempt's write is refused (logged as stale_write_refused) and changes nothing; the
    step's outcome is recorded once."""
    gate = anyio.Event()
    s = saga.Saga("fenced", input=Job)  # written out: the two attempts' interplay is the point
    attempts: list[int] = []

    @s.step()
    async def slow(ctx: saga.Context[Job]) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await gate.wait()  # the takeover happens while attempt 1 is here
        else:
            gate.set()
        return ctx.attempt

    faults = Faults()
    faults.expire_lease(slow)
    orch = await orchestrator(s, lease_seconds=30)
    faults.attach(orch)
    with capture_logs() as logs:
        run = await s.start(Job(n=1))
        assert await run.result(timeout=10) == 2
        with anyio.fail_after(5):
            while not any(e["event"] == "stale_write_refused" for e in logs):  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert attempts == [1, 2]
    history = await run.history()
    assert [e.kind for e in history].count("step_completed") == 1
    assert [e.attempt for e in history if e.kind == "step_completed"] == [2]


async def test_an_expired_lease_is_not_renewed_by_its_stalled_worker(
    orchestrator: OrchestratorFactory,
) -> None:
    """expire_lease stalls the worker's hold on the lease as well: its heartbeats (every
    0.2 s with a 0.6 s lease) no longer renew it, so another worker that claims only
    after several of them still takes the run over, and the stalled attempt's write is
    refused. (The heartbeat used to renew the expired lease: a claim that came after it
    found the run held, and the takeover never happened.)"""
    taken = anyio.Event()
    s = saga.Saga("stalled", input=Job)  # written out: the two attempts' interplay
    attempts: list[int] = []
    started = anyio.Event()

    @s.step(lease_seconds=0.6)
    async def slow(ctx: saga.Context[Job]) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            started.set()
            with anyio.move_on_after(8):
                await taken.wait()  # the takeover happens while attempt 1 is here
        else:
            taken.set()
        return ctx.attempt

    faults = Faults()
    faults.expire_lease(slow)
    first = await orchestrator(s, concurrency=1)
    faults.attach(first)
    run = await s.start(Job(n=1))
    with anyio.fail_after(5):
        await started.wait()
    await anyio.sleep(0.7)  # three of the first worker's heartbeats
    await orchestrator(s)
    assert await run.result(timeout=15) == 2
    assert attempts == [1, 2]
    history = await run.history()
    assert [e.attempt for e in history if e.kind == "step_completed"] == [2]


async def test_failing_compensation_is_retried_then_can_fail_the_run(
    orchestrator: OrchestratorFactory,
) -> None:
    """fail_compensation(times=2) is absorbed by retries (compensated); a permanent one
    leaves the run failed with the injected error recorded."""
    effects = Ledger()
    s = ledger_saga(effects)
    faults = Faults()
    orch = await orchestrator(s)
    faults.attach(orch)
    first = await s.start(Job(n=-1))
    faults.fail_compensation("credit", times=2, run_id=first.id)
    with pytest.raises(saga.RunCompensatedError):
        await first.result(timeout=10)
    assert effects.net[f"{first.id}:step:credit"] == 0

    second = await s.start(Job(n=-2))
    faults.fail_compensation("debit", permanent=True, run_id=second.id)
    with pytest.raises(saga.RunFailedError) as raised:
        await second.result(timeout=10)
    assert raised.value.compensation_error is not None
    assert raised.value.compensation_error.step == "debit"
    assert "InjectedFault" in raised.value.compensation_error.type
    assert effects.net[f"{second.id}:step:debit"] == 1  # the undo never happened: operator's turn


@pytest.mark.parametrize("committed", [True, False])
async def test_dropped_connection_at_commit_loses_and_doubles_nothing(
    orchestrator: OrchestratorFactory, committed: bool
) -> None:
    """Breaking the connection while checkpoints commit (with the commit applied or not)
    neither loses a step nor records one twice."""
    effects = Ledger()
    s = ledger_saga(effects)
    faults = Faults()
    for step in ("debit", "credit", "notify"):
        faults.drop_connection_at_commit(step, committed=committed)
    orch = await orchestrator(s)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    await run.result(timeout=15)
    assert faults.fired["drop_connection_at_commit"] == 3
    assert [e.kind for e in await run.history()].count("step_completed") == 3
    assert set(effects.raw().values()) == {1}


async def test_crash_during_rollback_resumes_the_rollback(
    orchestrator: OrchestratorFactory,
) -> None:
    """A worker dying after a compensation's effect but before its checkpoint: the
    rollback resumes at that compensation and still undoes every completed step, newest
    first."""
    effects = Ledger()
    s = ledger_saga(effects)
    faults = Faults()
    faults.crash_after("credit", compensation=True)
    orch = await orchestrator(s, lease_seconds=0.5)
    faults.attach(orch)
    run = await s.start(Job(n=-1))
    with pytest.raises(saga.RunCompensatedError):
        await run.result(timeout=15)
    assert effects.raw("compensation")[f"{run.id}:compensation:credit"] == 2
    assert effects.net == {
        f"{run.id}:step:debit": 0,
        f"{run.id}:step:credit": 0,
        f"{run.id}:step:notify": 1,
    }
    undone = [e.step for e in await run.history() if e.kind == "compensation_completed"]
    assert undone == ["credit", "debit"]


async def test_step_lease_is_renewed_at_its_own_pace(orchestrator: OrchestratorFactory) -> None:
    """A step with a short lease_seconds, running longer than that lease, keeps it through
    heartbeats: another orchestrator polling the same database never takes it over."""
    ledger = Ledger()

    def steady() -> saga.Saga[Job]:
        return small_saga(
            "steady",
            ["long_running"],
            ledger=ledger,
            delay=2,
            lease_seconds=0.6,
            retry=None,
            result=lambda _: 1,
        )

    s = steady()
    await orchestrator(s)
    await orchestrator(steady())
    run = await s.start(Job(n=1))
    assert await run.result(timeout=10) == 1
    assert ledger.attempts("long_running") == [1]


async def test_uncertain_write_that_committed_is_not_reported_stale(
    orchestrator: OrchestratorFactory,
) -> None:
    """A failure write whose reply is lost after it committed (releasing the lease) is
    resolved from the history as committed: its events are logged once, and it is not
    counted as a stale write even though the run has moved on."""
    s = small_saga(
        "unsure",
        ["flaky"],
        fail={"flaky": transient(1, ConnectionError, "first attempt fails")},
        retry=saga.Retry(max_attempts=2, initial_delay=0, jitter=0),
        result=lambda ctx: ctx.attempt,
    )
    faults = Faults()
    faults.drop_connection_at_commit("flaky", committed=True)
    # Polling every 10 ms, the worker reclaims the run (attempt 2) before the first
    # runner replays its write (50 ms later): the run has moved on when it re-reads.
    orch = await orchestrator(s, poll_interval=0.01)
    faults.attach(orch)
    with capture_logs() as logs:
        run = await s.start(Job(n=1))
        assert await run.result(timeout=10) == 2
        with anyio.fail_after(5):
            while not any(e["event"] == "ambiguous_commit_resolved" for e in logs):  # noqa: ASYNC110
                await anyio.sleep(0.01)
    resolved = [e for e in logs if e["event"] == "ambiguous_commit_resolved"]
    assert [e["committed"] for e in resolved] == [True]
    assert not [e for e in logs if e["event"] == "stale_write_refused"]
    failed = [e for e in logs if e["event"] == "step_failed"]
    assert [e["error_type"] for e in failed] == ["ConnectionError"]
    assert [e.kind for e in await run.history()].count("step_failed") == 1


async def test_a_fault_given_a_step_fires_in_that_saga_only(
    orchestrator: OrchestratorFactory,
) -> None:
    """Two sagas each with a step named "charge": a crash_after given saga A's step
    object crashes A's step, never B's (B's step runs once); given the bare name, the
    fault fires in whichever saga's "charge" runs first. A rule once matched the step's
    name only, so A's fault crashed B."""
    effects = Ledger()
    a = small_saga("fault_a", ["charge"], ledger=effects)
    b = small_saga("fault_b", ["charge"], ledger=effects)
    faults = Faults()
    faults.crash_after(a.get_step("charge"))
    orch = await orchestrator(a, b, lease_seconds=0.5)
    faults.attach(orch)
    run_b = await b.start(Job(n=1))
    assert await run_b.result(timeout=15) == "charge"
    assert faults.fired["crash_after"] == 0
    run_a = await a.start(Job(n=1))
    assert await run_a.result(timeout=15) == "charge"
    assert faults.fired["crash_after"] == 1
    assert effects.raw()[f"{run_b.id}:step:charge"] == 1
    assert effects.raw()[f"{run_a.id}:step:charge"] == 2
    c = small_saga("fault_c", ["charge"], ledger=effects)
    d = small_saga("fault_d", ["charge"], ledger=effects)
    by_name = Faults()
    by_name.crash_after("charge")
    by_name.attach(await orchestrator(c, d, lease_seconds=0.5))
    run_d = await d.start(Job(n=2))
    assert await run_d.result(timeout=15) == "charge"
    assert by_name.fired["crash_after"] == 1
    assert effects.raw()[f"{run_d.id}:step:charge"] == 2
    with pytest.raises(saga.ConfigurationError, match="a fault needs a step"):
        Faults().crash_after(42)  # type: ignore[arg-type]


async def test_advancing_the_timer_of_no_run_raises(
    orchestrator: OrchestratorFactory,
) -> None:
    """saga.testing.advance of a run id that exists nowhere raises RunNotFoundError (a
    test with a wrong id must not pass silently); a run with nothing to move returns
    None."""
    s = small_saga("advanced", 1)
    orch = await orchestrator(s)
    with pytest.raises(saga.RunNotFoundError):
        await advance(orch, uuid.uuid4(), 5)
    run = await orch.start(s, Job(n=1))
    await run.result(timeout=10)
    assert await advance(orch, run, 5) is None


async def test_an_outcome_is_written_however_long_the_database_is_away(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step with a single attempt succeeds, then its outcome's write finds the database
    unreachable eight times in a row (longer than the fixed retries): the worker goes on
    trying, and once the write lands the run completes, its attempt not charged (no
    lease expiry, no AttemptLost rollback). It used to give up after four retries (about
    4 s of an outage), and the lease's expiry rolled the run back. (Private: the delays
    are shortened, and the lease too, so the old way fails fast.)"""
    monkeypatch.setattr(_write, "_RETRY_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(_write, "_AWAY_DELAY", 0.05)
    effects = Ledger()
    s = small_saga("away", ["once"], ledger=effects, retry=saga.Retry(max_attempts=1))
    faults = Faults()
    faults.drop_connection_at_commit("once", committed=False, times=8)
    orch = await orchestrator(s, lease_seconds=1.5)
    faults.attach(orch)
    run = await s.start(Job(n=1))
    assert await run.result(timeout=15) == "once"
    assert faults.fired["drop_connection_at_commit"] == 8
    kinds = [e.kind for e in await run.history()]
    assert kinds.count("step_completed") == 1
    assert "lease_expired" not in kinds


async def test_a_write_the_database_refuses_is_not_tried_forever(
    orchestrator: OrchestratorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that reaches the database and is refused by it (an error other than the
    database being away) is tried a few times, then given up: the lease runs out and the
    attempt is retried elsewhere, never a loop. (Private: delays shortened.)"""
    monkeypatch.setattr(_write, "_RETRY_DELAYS", (0.01, 0.01))
    s = small_saga("refused_write", ["once"], retry=saga.Retry(max_attempts=2))
    refusals = []

    class Refusing(Faults):
        async def write(self, ctx: saga.Context[Any], write: Callable[[], Awaitable[T]]) -> T:
            if ctx.attempt == 1:
                refusals.append(ctx.attempt)
                raise saga.DatabaseError("refused") from asyncpg.DataError("no")
            return await write()

    orch = await orchestrator(s, lease_seconds=0.5)
    Refusing().attach(orch)
    run = await s.start(Job(n=1))
    assert await run.result(timeout=15) == "once"
    assert len(refusals) == 3  # the write and its two retries, then given up
    assert "lease_expired" in [e.kind for e in await run.history()]
