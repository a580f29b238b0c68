"""An attempt given up for ignoring its timeout (README, Retries) frees its slot, but its
task still holds the run: what it does next is leased and renewed as usual, and a close
waits for it as for any running step."""

from __future__ import annotations

import time

import anyio
import pytest
from structlog.testing import capture_logs

import saga
from tests._sagas import Job, fast, ignore_cancellation_for
from tests.conftest import OrchestratorFactory

ONCE = saga.Retry(max_attempts=1)


async def test_a_given_up_attempt_that_ends_before_its_takeover_leaves_no_unrenewed_lease(
    orchestrator: OrchestratorFactory,
) -> None:
    """README "Retries": a step "still running `lease_seconds` after its timeout is given
    up (... its heartbeats stop, its worker slot is freed, another attempt takes over when
    its lease expires, and its own writes are refused)"; "Leasing": "A claim is a lease
    that expires by the database clock (`lease_seconds`, heartbeat every third of it)".

    Here the given-up attempt ends (TimeoutError, its last attempt) after it was given up
    but before its lease expired: its write is accepted and leases the compensation of
    the earlier step to the same task. That compensation, a well-behaved function that
    takes 3 s under a 1 s lease, is renewed by the heartbeats and runs once."""
    s = saga.Saga("given_up_then_compensates", input=Job)
    undo_calls: list[int] = []

    @s.step(retry=ONCE, lease_seconds=1)
    async def first(ctx: saga.Context[Job]) -> str:
        return "first"

    @first.compensate(retry=fast(3))
    async def undo_first(ctx: saga.Context[Job], result: str) -> None:
        undo_calls.append(ctx.attempt)
        await anyio.sleep(3)

    @s.step(retry=ONCE, timeout=0.2, lease_seconds=3)
    async def stubborn(ctx: saga.Context[Job]) -> str:
        # Given up at 0.2 + 3 s (plus up to a heartbeat); its lease runs out about 5.9 s
        # in at the earliest: it ends in between.
        return await ignore_cancellation_for(4.6)

    with capture_logs() as logs:
        await orchestrator(s, concurrency=4)
        run = await s.start(Job(n=1))
        with anyio.fail_after(30), pytest.raises(saga.RunCompensatedError):
            await run.result()
    assert [e["event"] for e in logs if e["event"] == "step_unresponsive"] == ["step_unresponsive"]
    expired = [e for e in logs if e["event"] == "lease_expired"]
    assert undo_calls == [1], f"compensation attempts {undo_calls}; lease_expired: {expired}"


async def test_a_close_returns_once_a_given_up_attempt_has_ended(dsn: str) -> None:
    """README "Runtime": "Leaving stops claiming, lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest"; "Retries": an attempt ignoring its
    timeout "is given up (... its worker slot is freed ...)".

    An attempt given up while its orchestrator drains (it ignores its 0.2 s timeout, and
    ends 3 s in) leaves nothing running once it ended: the close returns then, not at the
    12 s shutdown_timeout."""
    s = saga.Saga("given_up_while_draining", input=Job)
    started = anyio.Event()
    ended = anyio.Event()

    @s.step(retry=fast(3), timeout=0.2, lease_seconds=1)
    async def stubborn(ctx: saga.Context[Job]) -> str:
        if ctx.attempt > 1:
            return "again"
        started.set()
        try:
            return await ignore_cancellation_for(3)
        finally:
            ended.set()

    with capture_logs() as logs:
        orch = saga.Orchestrator(
            dsn, sagas=[s], poll_interval=0.2, shutdown_timeout=12, concurrency=4
        )
        async with orch:
            await s.start(Job(n=1))
            with anyio.fail_after(10):
                await started.wait()
            await anyio.sleep(0.3)
            began = time.monotonic()
        took = time.monotonic() - began
    assert ended.is_set()
    assert [e for e in logs if e["event"] == "step_unresponsive"], "premise: given up"
    assert took < 8, f"the close took {took:.1f} s; the given-up attempt ended about 3 s in"
