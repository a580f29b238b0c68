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
