"""A deploy that changes a saga's ``concurrency_limit`` applies it to the runs of a key
that were queued before it.

README: at most ``concurrency_limit`` runs with the same key are active at once, "across
every worker and process, for their whole life". The key's row holds its limit, and a
start's admission wrote the starting process's limit there, but a release kept the
row's limit: runs queued under the old limit were admitted by it after the deploy,
until a new start of that key.
"""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Job
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(90)

RUNS = 9


class Overlap:
    """How many runs execute the step at once, at most (across every orchestrator of the
    process)."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def leave(self) -> None:
        self.now -= 1


def keyed(limit: int, overlap: Overlap) -> saga.Saga[Any]:
    s = saga.Saga(
        "key_deploy", input=Job, concurrency_key=lambda j: "acct", concurrency_limit=limit
    )

    @s.step()
    async def work(ctx: saga.Context[Job]) -> int:
        overlap.enter()
        try:
            await anyio.sleep(0.3)
        finally:
            overlap.leave()
        return ctx.input.n

    return s


@pytest.mark.parametrize(("before", "after"), [(3, 1), (1, 3)])
async def test_runs_queued_before_a_deploy_are_admitted_by_the_new_limit(
    open_client: ClientFactory,
    orchestrator: OrchestratorFactory,
    db: asyncpg.Connection,
    before: int,
    after: int,
) -> None:
    """The old web app (limit ``before``) starts 9 runs of one key: ``before`` are
    admitted, the rest queue. The new deploy's worker (the same saga with limit
    ``after``) executes them all: once the runs admitted before the deploy have ended,
    at most ``after`` run at once, and (raised) as many as ``after`` do; the key's row
    holds ``after``. Before, the queued runs were admitted by the old limit: 3 at once
    though every process alive declared 1, or 1 at a time though it declared 3."""
    old_overlap, new_overlap = Overlap(), Overlap()
    old = keyed(before, old_overlap)
    client = await open_client(old)
    runs = [await client.start(old, Job(n=i)) for i in range(RUNS)]
    await client.aclose()
    worker = await orchestrator(keyed(after, new_overlap), concurrency=8)
    with anyio.fail_after(60):
        for run in runs:
            await worker.get_run(run.id).result()
    limit = await db.fetchval("SELECT key_limit FROM saga.key_slots WHERE key = 'acct'")
    assert limit == after
    # The new worker ran all nine; ``before`` of them were admitted under the old limit
    # and ran together at first (at most max(before, after) at once).
    assert new_overlap.most == max(before, after)
    admitted = await db.fetch(
        "SELECT run_id, id FROM saga.events WHERE kind = 'key_admitted' ORDER BY id"
    )
    assert len(admitted) == RUNS


async def test_a_queued_runs_times_are_in_order(open_client: ClientFactory) -> None:
    """A run queued behind its key, and one admitted by its own start: ``updated_at`` is
    never before ``created_at`` (created_at is when the start's statement ran, and the
    admission's time was the start transaction's, earlier: a queued run was shown
    updated before it was created)."""
    s = keyed(1, Overlap())
    client = await open_client(s)
    first = await client.start(s, Job(n=1))
    queued = await client.start(s, Job(n=2))
    for run in (first, queued):
        info = await run.info()
        assert info.updated_at >= info.created_at, (info.created_at, info.updated_at)
    assert (await queued.info()).waiting_for_key


def keyed_deploy(limit: int, ran: list[int]) -> saga.Saga[Any]:
    s = saga.Saga(
        "key_resolve", input=Job, concurrency_key=lambda j: "acct", concurrency_limit=limit
    )

    @s.step(retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def work(ctx: saga.Context[Job]) -> int:
        ran.append(ctx.input.n)
        if ctx.input.n <= 3:
            raise saga.PermanentError("stop for an operator")
        await anyio.sleep(30)
        return ctx.input.n

    return s


async def test_an_operator_resolve_after_a_deploy_admits_by_the_deployed_limit(
    orchestrator: OrchestratorFactory, db: Any
) -> None:
    """README (keys): "A key's limit is the one the process admitting its runs declares:
    a start's, and a run's end's (the worker's definition), so a deploy that changes
    `concurrency_limit` applies it to the runs queued before it"; "`resolve()` frees the
    key".

    Old deploy (limit 3): runs 1-3 stop for an operator, holding the key; runs 4-8 queue.
    The old workers go; the new deploy declares a limit of 1. An operator resolves run 1
    through the new orchestrator: 2 runs (2, 3) still hold the key, so under the limit of 1
    that every running process declares nothing is admitted. Before, the resolve
    admitted by the key's stored limit (3, written by the old deploy's starts), and run 4
    ran while 2 others held the key (3 holders, limit 1)."""
    ran: list[int] = []
    old = await orchestrator(keyed_deploy(3, ran), concurrency=5)
    runs = [await old.start(old.definition("key_resolve", 1), Job(n=n)) for n in range(1, 9)]
    with anyio.fail_after(15):
        while await db.fetchval("SELECT count(*) FROM saga.runs WHERE status = 'stopped'") < 3:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    await old.aclose()
    new = await orchestrator(keyed_deploy(1, ran), concurrency=5)
    await anyio.sleep(0.5)
    assert sorted(ran) == [1, 2, 3]
    await new.resolve(runs[0].id, note="looked at it")
    await anyio.sleep(1.5)
    held = await db.fetch(
        "SELECT (input::jsonb->>'n')::int AS n, status FROM saga.runs "
        "WHERE key_state = 'held' ORDER BY 1"
    )
    assert sorted(ran) == [1, 2, 3], f"runs executed {sorted(ran)}"
    holders = [tuple(r) for r in held]
    assert holders == [(2, "stopped"), (3, "stopped")], f"holding the key: {holders}"
