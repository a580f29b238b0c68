"""Cancel means cancel, and starting survives any cancellation of the caller."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Gate, Job, Ledger, permanent, small_saga
from tests.conftest import OrchestratorFactory

STEPS = ("reserve", "charge", "ship")


def gated_saga(gate: Gate | None = None, ledger: Ledger | None = None) -> saga.Saga[Job]:
    """reserve, charge, ship, each compensated; ``gate`` holds one of them."""
    return small_saga(
        "gated", STEPS, compensate=True, gate=gate, ledger=ledger, retry=None, undo_retry=None
    )


@pytest.mark.parametrize("lease_seconds", [0.6, 30.0], ids=["heartbeat sees it", "write sees it"])
@pytest.mark.parametrize("step", STEPS)
async def test_a_cancel_accepted_while_a_step_runs_compensates_that_step_too(
    orchestrator: OrchestratorFactory, step: str, lease_seconds: float
) -> None:
    """cancel() accepted while any step runs (the last one included) lets that step finish
    its attempt, then compensates every completed step, that one included, newest first,
    and the run ends cancelled; never completed. Either a heartbeat sees the cancel first
    (short lease) or only the step's own completion write does (30 s lease: no heartbeat
    in between)."""
    gate, ledger = Gate(step), Ledger()
    s = gated_saga(gate, ledger)
    orch = await orchestrator(s, lease_seconds=lease_seconds)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
        await run.cancel()
        if lease_seconds < 1:
            await anyio.sleep(lease_seconds)  # at least one heartbeat reads the cancel
        gate.release.set()
        with pytest.raises(saga.RunCancelledError):
            await run.result()
    done = list(STEPS[: STEPS.index(step) + 1])
    assert [c.value for c in ledger.of("compensation")] == list(reversed(done))
    kinds = [e.kind for e in await run.history()]
    assert "run_completed" not in kinds
    assert kinds[-1] == "run_cancelled"
    assert (await run.info()).completed_steps == tuple(done)


async def test_cancel_while_compensating_after_a_failure_changes_nothing_else(
    orchestrator: OrchestratorFactory,
) -> None:
    """As documented: a cancel accepted while the run already rolls back after a failure
    is recorded, and the rollback goes on to end compensated (not cancelled)."""
    ledger, gate = Ledger(), Gate("reserve", compensation=True)
    s = small_saga(
        "failing",
        ["reserve", "charge"],
        compensate={"reserve"},
        ledger=ledger,
        gate=gate,
        fail={"charge": permanent("declined")},
        retry=None,
        undo_retry=None,
    )
    orch = await orchestrator(s)
    run = await orch.start(s, Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
        await run.cancel()
        gate.release.set()
        with pytest.raises(saga.RunCompensatedError) as raised:
            await run.result()
    assert raised.value.error is not None
    assert raised.value.error.type == "saga.PermanentError"
    assert [(c.step, c.value) for c in ledger.of("compensation")] == [("reserve", "reserve")]
    assert "cancel_requested" in [e.kind for e in await run.history()]


async def _slow_inserts(db: asyncpg.Connection) -> None:
    """Make every INSERT into saga.runs take 0.2 s in the database, so that a cancellation
    of the caller lands while the statement executes (before it commits)."""
    await db.execute(
        """
        CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.2); RETURN NEW; END $$;
        CREATE TRIGGER slow_insert BEFORE INSERT ON saga.runs
            FOR EACH ROW EXECUTE FUNCTION public.slow_insert();
        """
    )


async def _wait_for(start: Awaitable[Any]) -> None:
    await asyncio.wait_for(start, 0.05)


async def _timeout(start: Awaitable[Any]) -> None:
    async with asyncio.timeout(0.05):
        await start


async def _task_cancel(start: Awaitable[Any]) -> None:
    async def call() -> None:
        await start

    task = asyncio.ensure_future(call())
    await asyncio.sleep(0.05)
    task.cancel()
    await task


async def _anyio_scope(start: Awaitable[Any]) -> None:
    # As with any shielded section, the insert's outcome is returned; the scope's
    # cancellation then lands at the caller's next checkpoint.
    with anyio.fail_after(0.05):
        await start
        await anyio.sleep(1)


CANCELLERS: dict[str, Callable[[Awaitable[Any]], Awaitable[None]]] = {
    "asyncio.wait_for": _wait_for,
    "asyncio.timeout": _timeout,
    "Task.cancel": _task_cancel,
    "anyio.fail_after": _anyio_scope,
}


@pytest.mark.parametrize("how", sorted(CANCELLERS))
async def test_start_cancelled_while_its_insert_is_in_flight_keeps_the_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, how: str
) -> None:
    """However the caller is cancelled (asyncio.wait_for, asyncio.timeout, Task.cancel,
    an anyio scope), a start() whose INSERT was sent still commits its run, exactly once:
    the caller sees its cancellation (or timeout), the run completes, and a retried start
    with the same key finds that run."""
    s = gated_saga()
    orch = await orchestrator(s)
    await _slow_inserts(db)
    started = anyio.current_time()
    with pytest.raises((asyncio.CancelledError, TimeoutError)):
        await CANCELLERS[how](orch.start(s, Job(n=1), key="k-1"))
    # The premise: the caller was cancelled at 0.05 s, and start() gave up its wait only
    # after the insert's 0.2 s (it waited for the outcome rather than abandon it).
    assert anyio.current_time() - started >= 0.2
    rows = await db.fetch("SELECT id FROM saga.runs WHERE idempotency_key = 'k-1'")
    assert len(rows) == 1
    again = await orch.start(s, Job(n=1), key="k-1")
    assert (again.id, again.created) == (rows[0]["id"], False)
    with anyio.fail_after(10):
        assert await again.result() == "ship"


async def test_start_cancelled_at_any_point_never_splits_or_duplicates_a_run(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """start() under asyncio.wait_for with timeouts from 0 to a few milliseconds: each key
    has at most one run, every committed run completes with a whole history, and those
    that did not commit can simply be started again."""
    s = gated_saga()
    orch = await orchestrator(s)
    keys = [f"w-{i}" for i in range(40)]
    for i, key in enumerate(keys):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(orch.start(s, Job(n=i), key=key), (i % 8) * 0.0005)
    counts = dict(
        await db.fetch(
            "SELECT idempotency_key, count(*) FROM saga.runs GROUP BY 1 ORDER BY 1",
        )
    )
    assert all(n == 1 for n in counts.values())
    with anyio.fail_after(20):
        for i, key in enumerate(keys):
            handle = await orch.start(s, Job(n=i), key=key)
            assert handle.created == (key not in counts)
            assert await handle.result() == "ship"
    assert await db.fetchval("SELECT count(DISTINCT idempotency_key) FROM saga.runs") == 40
    assert isinstance(handle.id, uuid.UUID)
