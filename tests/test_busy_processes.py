"""A process that is busy, not stalled: CPU-heavy steps block its event loop for about a
second at a time, several at once. Its leases (30 s by default, a heartbeat every third
of it) hold, and so do its transactions: saga's pools end a session idle in a
transaction only after 60 s (README, Runtime), longer than such a process leaves one.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import saga
from tests._sagas import Job

pytestmark = pytest.mark.timeout(60)

# The busy steps wait for the test's go (an anyio.Event of the test's loop), then block
# the event loop with CPU-heavy work in chunks of about a second.
_GO: list[anyio.Event] = []
_WAITING: list[int] = []

busy = saga.Saga("busy", input=Job)


@busy.step()
async def crunch(ctx: saga.Context[Job]) -> int:
    _WAITING.append(1)
    await _GO[0].wait()
    for _ in range(ctx.input.n):
        time.sleep(1.0)  # noqa: ASYNC251 - a CPU-heavy chunk: the loop is blocked for 1 s
        await anyio.lowlevel.checkpoint()  # then the others' turn
    return ctx.input.n


keyed = saga.Saga("busy_keyed", input=Job, concurrency_key=lambda j: "acct")


@keyed.step()
async def keyed_step(ctx: saga.Context[Job]) -> int:
    return ctx.input.n


plain = saga.Saga("busy_plain", input=Job)


@plain.step()
async def plain_step(ctx: saga.Context[Job]) -> int:
    return ctx.input.n


async def _busy_steps(orch: saga.Orchestrator, count: int, chunks: int) -> list[saga.RunHandle]:
    """``count`` busy runs, their steps started and waiting for the go."""
    _GO[:] = [anyio.Event()]
    _WAITING.clear()
    runs = [await orch.start(busy, Job(n=chunks)) for _ in range(count)]
    with anyio.fail_after(10):
        while len(_WAITING) < count:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    return runs


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", ["concurrency_key", "idempotency_key"])
async def test_a_busy_process_can_start_a_keyed_run(dsn: str, how: str) -> None:
    """README, Runtime: saga's pools end a session idle in a transaction after 60 s, so
    that a process that stalls does not hold its row locks; a busy one "is not cut off".

    An orchestrator (concurrency 12) runs 11 CPU-heavy steps that each block its event
    loop for 1 s; while they run, the app starts a keyed run (a concurrency key, or an
    idempotency key: the start locks the key, then inserts, in one transaction, which
    waits for the busy loop between its statements about 11 s). The start succeeds and
    its run completes. Before (a first value of 10 s), Postgres ended the session and
    `start()` raised DatabaseError although the database answered all along."""
    async with saga.Orchestrator(dsn, sagas=[busy, keyed, plain], concurrency=12) as orch:
        runs = await _busy_steps(orch, 11, 1)
        outcome: list[Any] = []

        async def start_keyed() -> None:
            try:
                if how == "concurrency_key":
                    outcome.append(await orch.start(keyed, Job(n=7)))
                else:
                    outcome.append(await orch.start(plain, Job(n=7), key="o-1"))
            except saga.DatabaseError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(start_keyed)
            await anyio.lowlevel.checkpoint()  # the start is under way: the busy steps go on
            _GO[0].set()
        for run in runs:
            await run.result(timeout=30)
        assert not isinstance(outcome[0], saga.DatabaseError), (
            f"a busy (not stalled) process's start() failed: {outcome[0]!r}"
        )
        assert await outcome[0].result(timeout=10) == 7
