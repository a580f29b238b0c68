"""One vocabulary: every history kind any query writes is an EventKind, and the enums are
the only place statuses and kinds are spelled out."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga._model import EventKind, KeyState, Phase, RunStatus
from saga.testing import Faults, advance
from tests._sagas import small_saga
from tests.conftest import OrchestratorFactory

NOW = datetime(2026, 12, 5, tzinfo=UTC)
FAST = saga.Retry(max_attempts=2, initial_delay=0.01, max_delay=0.02)


class Job(BaseModel):
    n: int


async def test_an_unknown_event_kind_fails_the_write(db: asyncpg.Connection) -> None:
    """The guard every test database carries (tests/conftest.py): a history row of a kind
    EventKind does not know fails its statement, so any query writing one fails its test.
    A known kind is accepted."""
    with pytest.raises(asyncpg.RaiseError, match="unknown history event kind"):
        await db.execute("INSERT INTO saga.events (run_id, kind) VALUES (gen_random_uuid(), 'x')")
    await db.execute(
        "INSERT INTO saga.events (run_id, kind) VALUES (gen_random_uuid(), $1)",
        str(EventKind.RUN_STARTED),
    )


def test_the_queries_spell_only_known_kinds_and_statuses() -> None:
    """Every quoted lower_snake word in queries.sql that names a kind, a status or a
    phase is one of the enums' values: no query invents one of its own."""
    text = (resources.files("saga") / "sql" / "queries.sql").read_text("utf-8")
    words = set(re.findall(r"'([a-z]+(?:_[a-z]+)*)'", text))
    known = {str(k) for k in EventKind} | {str(s) for s in RunStatus} | {str(p) for p in Phase}
    known |= {str(k) for k in KeyState}
    # Literals that are neither: the fingerprint placeholder, jsonb keys, and so on.
    other = {"saga", "version", "key", "fingerprint", "counted", "kind", "step", "attempt"}
    other |= {"worker", "data", "unless_cancelled", "infinity", "signal", "reason"}
    other |= {"ended", "resolved", "wait_decided", "rolling_back"}  # why a signal was refused
    other |= {"limit", "delay"}  # a rate limit's wait
    other |= {"advisory"}  # pg_locks' lock type (the orchestrators present)
    other |= {"lock_timeout", "idle_in_transaction_session_timeout"}  # set_config'd settings
    other |= {"error"}  # the jsonb key of a history event's failure
    other |= {"on_give_up"}  # the jsonb key of run_stopped by a step's policy
    other |= {"failing"}  # the jsonb key of a children step's failure while it undoes
    other |= {"after"}  # the jsonb key of step_ready: the steps it waited on
    assert words - known - other == set()


def _every_kind_saga(undo_fails: list[bool]) -> saga.Saga[Job]:
    s = saga.Saga("vocabulary", input=Job)

    @s.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        if ctx.input.n == 3:
            await anyio.sleep(10)  # held until shutdown gives the lease back
        if ctx.input.n == 4 and ctx.attempt == 1:
            await anyio.sleep(0.3)  # while its lease is expired under it
        return 1

    @first.compensate(retry=saga.Retry(max_attempts=1))
    async def undo_first(ctx: saga.Context[Job], one: int) -> None:
        if undo_fails and undo_fails.pop():
            raise RuntimeError("undo failed")

    @s.step(retry=FAST)
    async def second(ctx: saga.Context[Job]) -> int:
        if ctx.input.n == 1:
            raise saga.PermanentError("no")
        if ctx.input.n == 2:
            await anyio.sleep(0.3)
        if ctx.attempt == 1 and ctx.input.n == 0:
            raise ConnectionError("once")
        return 2

    return s


class Go(BaseModel):
    ok: bool = True


def _parking_saga() -> tuple[saga.Saga[Job], saga.Wait[Go]]:
    """one -> sleep -> two -> wait "go" (stops on timeout) -> three."""
    s = saga.Saga("vocabulary_waits", input=Job)

    async def noop(ctx: saga.Context[Job]) -> int:
        return 0

    s.step(name="one")(noop)
    s.sleep(0.01)
    s.step(name="two")(noop)
    go = s.wait_for("go", Go, timeout=3600, on_timeout="stop")
    s.step(name="three")(noop)
    return s, go


async def test_every_kind_is_written_by_some_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """Runs that complete after a retry (and a graph's), fail and compensate, fail a
    compensation and are retried by an operator (or have it skipped), get cancelled,
    have a lease expire, sleep, get a signal before their wait, get one after they
    ended, time out at a wait and stop (and are resolved), and are given back at
    shutdown write every EventKind between them (and, through the guard, nothing
    else)."""
    # Popped from the end: the failed run's compensation fails, its retry works, the
    # cancelled run's works, the next failed run's fails and an operator skips it.
    undo_fails = [True, False, False, True]
    s = _every_kind_saga(undo_fails)
    waits, go = _parking_saga()
    graph = small_saga("graph", ["a", "b"], after={"b": []}, input=Job)  # step_ready
    child = small_saga("child", ["c"], input=Job)
    graph.children("kids", child, lambda ctx: [Job(n=0)], after=["a"])  # children_waiting
    # key_admitted: a keyed saga's run admitted at start
    keyed = small_saga("keyed", 1, input=Job, traffic={"concurrency_key": lambda job: "k"})
    # rate_limited: of two runs started together, the second waits for the bucket's
    # refill (up to 0.5 s). Run one after the other, at 20 per second, the second found
    # the token back whenever the first took over 50 ms (a loaded machine) and waited not.
    rated = saga.Saga("rated", input=Job)

    @rated.step(rate_limit=saga.RateLimit("two", per_second=2, burst=1))
    async def call(ctx: saga.Context[Job]) -> int:
        return 0

    faults = Faults()
    faults.expire_lease("first", times=1)
    orch = await orchestrator(s, waits, graph, child, rated, keyed, lease_seconds=0.6)
    faults.attach(orch)
    with anyio.fail_after(20):
        both = [await orch.start(rated, Job(n=n)) for n in range(2)]
        for handle in both:
            await handle.result()
        await (await orch.start(keyed, Job(n=0))).result()
        assert await (await orch.start(s, Job(n=4))).result() == 2
        assert faults.fired["expire_lease"] == 1
        await (await orch.start(graph, Job(n=0))).result()
        assert await (await orch.start(s, Job(n=0))).result() == 2
        failed = await orch.start(s, Job(n=1))
        with pytest.raises(saga.RunFailedError):
            await failed.result()
        await failed.retry()
        with pytest.raises(saga.RunCompensatedError):
            await failed.result()
        cancelled = await orch.start(s, Job(n=2))
        await anyio.sleep(0.1)
        await cancelled.cancel()
        with pytest.raises(saga.RunCancelledError):
            await cancelled.result()
        skipped = await orch.start(s, Job(n=1))
        with pytest.raises(saga.RunFailedError):
            await skipped.result()
        await skipped.skip_compensation(note="undone by hand", by="ops")
        with pytest.raises(saga.RunCompensatedError):
            await skipped.result()
        signalled = await orch.start(waits, Job(n=0))
        await signalled.signal(go, Go())  # received, kept for the wait
        await signalled.result()  # slept, woke, waited, woke
        with pytest.raises(saga.InvalidRunStateError):
            await signalled.signal(go, Go())  # refused: ended
        stopped = await orch.start(waits, Job(n=0))
        while (await stopped.info()).status is not saga.RunStatus.WAITING:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        await advance(orch, stopped, 3600)
        with pytest.raises(saga.RunStoppedError):
            await stopped.result()  # timed out, stopped
        await stopped.resolve(note="dealt with", by="ops")
    await orch.aclose()  # the next run must be held by the worker below
    async with saga.Orchestrator(
        dsn, sagas=[s], shutdown_timeout=0.05, poll_interval=0.05
    ) as worker:
        held = await worker.start(s, Job(n=3))
        with anyio.fail_after(10):
            while (await held.info()).worker is None:  # noqa: ASYNC110 - waiting for a claim
                await anyio.sleep(0.01)
    kinds = {r["kind"] for r in await db.fetch("SELECT DISTINCT kind FROM saga.events")}
    assert {str(k) for k in EventKind} - kinds == set()


def test_every_way_a_run_ends_unfinished_has_its_own_error() -> None:
    """``result()`` raises a distinct RunError subclass for each terminal status other
    than completed, carrying the run's id, status and errors; no status falls back to
    the bare RunError."""
    errors = saga.ErrorInfo(type="ValueError", message="no")
    seen: set[type[saga.RunError]] = set()
    for status in RunStatus.terminal():
        if status is RunStatus.COMPLETED:
            continue
        info = saga.RunInfo(
            id=uuid.uuid4(), saga="s", version=1, key=None, status=status, step=None,
            attempt=0, completed_steps=(), error=errors, compensation_error=None,
            cancel_requested=False, worker=None, created_at=NOW, updated_at=NOW,
            finished_at=NOW,
        )  # fmt: skip
        error = info.ended_error()
        assert type(error) is not saga.RunError
        assert isinstance(error, saga.RunError)
        assert (error.run_id, error.status, error.error) == (info.id, str(status), errors)
        assert str(status) in str(error)
        seen.add(type(error))
    assert len(seen) == len(RunStatus.terminal()) - 1


def test_the_readme_lists_every_history_event_kind() -> None:
    """README (API): "History event kinds: ..." names every kind a run's history can
    hold (EventKind), and no other: a user matching on `event.kind` sees them all.
    Before, `rate_limited` and `key_admitted` were missing from the list."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    listed = readme.split("History event kinds:", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == {str(k) for k in EventKind}
