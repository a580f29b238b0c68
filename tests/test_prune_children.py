"""Prune and child sagas: a child saga's run is never deleted while its parent stays
(still running, or finished but not pruned), in either of prune's passes (whole days,
row by row) or their dry runs; with its parent, it goes in the same prune."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import Job
from tests.conftest import OrchestratorFactory
from tests.test_partitions import _backdate, _past_day

pytestmark = pytest.mark.timeout(60)


class Chunk(BaseModel):
    i: int


@dataclass
class Imports:
    """A parent whose children step starts two children: child 0 ends at once, child 1
    holds until :attr:`release` is set. ``calls`` counts each child's step (its side
    effect)."""

    calls: Counter[int] = field(default_factory=Counter)
    slow_entered: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)

    def sagas(self) -> tuple[saga.Saga[Job, list[int]], saga.Saga[Chunk, int]]:
        chunk = saga.Saga("chunk", input=Chunk)

        @chunk.step()
        async def load(ctx: saga.Context[Chunk]) -> int:
            self.calls[ctx.input.i] += 1
            if ctx.input.i == 1:
                self.slow_entered.set()
                await self.release.wait()
            return ctx.input.i

        parent = saga.Saga("imports", input=Job)

        @parent.step()
        async def split(ctx: saga.Context[Job]) -> list[int]:
            return [0, 1]

        loads = parent.children(
            "loads", chunk, lambda ctx: [Chunk(i=i) for i in ctx.result(split)], after=[split]
        )

        @parent.step(after=[loads])
        async def report(ctx: saga.Context[Job]) -> list[int]:
            return list(ctx.result(loads))

        return parent, chunk


async def _first_child_done(db: asyncpg.Connection, imports: Imports) -> uuid.UUID:
    """Wait until child 1 holds and child 0 completed; returns child 0's run id."""
    with anyio.fail_after(10):
        await imports.slow_entered.wait()
        while True:
            done: uuid.UUID | None = await db.fetchval(
                "SELECT id FROM saga.runs WHERE saga_name = 'chunk' AND status = 'completed'"
            )
            if done is not None:
                return done
            await anyio.sleep(0.05)


async def test_a_finished_child_of_a_running_parent_survives_the_row_by_row_prune(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A parent waiting for its slowest child keeps its finished children, however old:
    prune (and its dry run) leaves child 0 while the parent runs, so the parent's step
    does not start it again when child 1 ends: child 0's step ran once, and the result
    lists both children."""
    imports = Imports()
    parent, chunk = imports.sagas()
    orch = await orchestrator(parent, chunk)
    run = await orch.start(parent, Job())
    child = await _first_child_done(db, imports)
    await db.execute(
        "UPDATE saga.runs SET finished_at = now() - interval '2 days' WHERE id = $1", child
    )

    dry = await saga.prune(orch, older_than=timedelta(days=1), dry_run=True)
    pruned = await saga.prune(orch, older_than=timedelta(days=1), batch_size=1)

    assert (dry.runs, pruned.runs) == (0, 0)
    assert await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", child) == "completed"
    imports.release.set()
    assert await run.result(timeout=20) == [0, 1]
    assert imports.calls == Counter({0: 1, 1: 1})


async def test_a_finished_child_in_an_old_day_survives_the_whole_day_prune(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """Whole days too: a day holding only a finished child whose parent still runs is
    neither dropped nor compacted away (nor counted by the dry run), and the parent ends
    with both children's results, child 0's step run once. Once the parent is old enough
    too, one prune takes the parent and then both children (the old day's child row by
    row, in a batch after its parent's: a child never goes before its parent)."""
    imports = Imports()
    parent, chunk = imports.sagas()
    orch = await orchestrator(parent, chunk)
    run = await orch.start(parent, Job())
    child = await _first_child_done(db, imports)
    await _past_day(dsn, 40)
    child = await _backdate(db, child, 40)

    dry = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True, dry_run=True)
    pruned = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)

    assert (dry.runs, dry.days, pruned.runs, pruned.days) == (0, 0, 0, 0)
    assert await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", child) == "completed"
    imports.release.set()
    assert await run.result(timeout=20) == [0, 1]
    assert imports.calls == Counter({0: 1, 1: 1})

    await db.execute(
        "UPDATE saga.runs SET finished_at = finished_at - interval '40 days' "
        "WHERE saga_name IN ('imports', 'chunk') AND id <> $1",
        child,
    )
    gone = await saga.prune(orch, older_than=timedelta(days=30), batch_size=1)
    assert (gone.runs, gone.days) == (3, 0)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


async def test_children_go_with_their_parent_whatever_the_batch_order(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A finished parent and its finished children all go in one prune, one run per
    batch (a child may come before its parent), and the dry run counts them all."""
    imports = Imports()
    imports.release.set()
    parent, chunk = imports.sagas()
    orch = await orchestrator(parent, chunk)
    run = await orch.start(parent, Job())
    assert await run.result(timeout=20) == [0, 1]
    await db.execute("UPDATE saga.runs SET finished_at = finished_at - interval '2 days'")

    dry = await saga.prune(orch, older_than=timedelta(days=1), dry_run=True)
    gone = await saga.prune(orch, older_than=timedelta(days=1), batch_size=1)

    assert (dry.runs, gone.runs) == (3, 3)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


async def test_a_chain_of_nested_children_goes_only_after_its_top(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Five finished runs nested as child of child (top -> c1 -> c2 -> c3 -> c4), all
    ended 40 days ago, but the top still running: a prune deletes none of them, however
    deep (a run four levels down is kept while anything above it stays). Once the top
    has ended too, prunes take the whole chain (the deepest once the chain above it is
    gone), and nothing of it is left."""
    from tests._sagas import small_saga

    quick = small_saga("nested", 1)
    orch = await orchestrator(quick)
    runs = [await orch.start(quick, Job(n=i)) for i in range(5)]
    for run in runs:
        await run.result(timeout=20)
    ids = [await _backdate(db, run.id, 40) for run in runs]
    for parent, child in itertools.pairwise(ids):
        await db.execute(
            "UPDATE saga.runs SET parent_id = $2, parent_step = 's1' WHERE id = $1", child, parent
        )
    await db.execute(  # the top runs again (as if retried): its descendants stay
        "UPDATE saga.runs SET status = 'running', due_at = now() + interval '1 hour',"
        " finished_at = NULL WHERE id = $1",
        ids[0],
    )
    gone = await saga.prune(orch, older_than=timedelta(days=30))
    assert gone.runs == 0
    await db.execute(
        "UPDATE saga.runs SET status = 'completed', due_at = NULL,"
        " finished_at = now() - interval '40 days' WHERE id = $1",
        ids[0],
    )
    pruned = 0
    for _ in range(5):
        pruned += (await saga.prune(orch, older_than=timedelta(days=30))).runs
    assert pruned == 5
    assert await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = ANY($1)", ids) == 0
