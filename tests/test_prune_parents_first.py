"""A prune never leaves a parent without its children: a child saga's run goes with its
parent (in one day's transaction) or once its parent is gone, whatever this prune leaves
(a parent another transaction holds, a day it keeps); and whole-day prunes from several
processes at once do not fail on a day another one dropped."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from itertools import pairwise
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from saga._partitions import partition
from tests._sagas import Job, parked_saga, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory
from tests.test_partitions import _backdate, _past_day

pytestmark = pytest.mark.timeout(90)


class Chunk(BaseModel):
    i: int


def _family(undone: Counter[int]) -> tuple[saga.Saga[Job, int], saga.Saga[Chunk, int]]:
    """A parent whose children step starts two child runs (each with a compensation that
    counts its call in ``undone``), then a step that gives up and stops the run for an
    operator (on_give_up="stop")."""
    chunk = saga.Saga("chunk", input=Chunk)

    @chunk.step()
    async def load(ctx: saga.Context[Chunk]) -> int:
        return ctx.input.i

    @load.compensate
    async def unload(ctx: saga.Context[Chunk], value: int) -> None:
        undone[ctx.input.i] += 1

    parent = saga.Saga("imports", input=Job)

    @parent.step()
    async def split(ctx: saga.Context[Job]) -> list[int]:
        return [0, 1]

    loads = parent.children(
        "loads", chunk, lambda ctx: [Chunk(i=i) for i in ctx.result(split)], after=[split]
    )

    @parent.step(after=[loads], retry=saga.Retry(max_attempts=1, on_give_up="stop"))
    async def report(ctx: saga.Context[Job]) -> int:
        raise saga.PermanentError("look first")

    return parent, chunk


async def test_children_of_a_parent_whose_row_is_held_are_not_pruned_without_it(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README, Retention: "A child saga's run goes only with its parent ... or once its
    parent is gone"; DESIGN: "Nothing is ever silently skipped".

    A parent stopped for an operator after its children step completed; both children
    completed. While another transaction holds the parent's row, `prune(status=
    [completed, stopped])` skips the parent and keeps both children; the operator's
    cancel then undoes each child once. Before, the batch deleted the children (it judged
    their parent prunable without locking it): the cancel ended the parent `compensated`
    and neither child's compensation ever ran."""
    undone: Counter[int] = Counter()
    parent, chunk = _family(undone)
    orch = await orchestrator(parent, chunk)
    run = await orch.start(parent, Job())
    with anyio.fail_after(20), pytest.raises(saga.RunStoppedError):
        await run.result()
    children = {
        r["id"] for r in await db.fetch("SELECT id FROM saga.runs WHERE parent_id = $1", run.id)
    }
    assert len(children) == 2

    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM saga.runs WHERE id = $1 FOR UPDATE", run.id)
        with anyio.fail_after(30):
            await saga.prune(orch, older_than=timedelta(0), status=["completed", "stopped"])
        await tx.rollback()
    finally:
        await holder.close()

    parent_left = await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = $1", run.id)
    children_left = await db.fetchval(
        "SELECT count(*) FROM saga.runs WHERE id = ANY($1)", list(children)
    )
    assert (parent_left, children_left) == (1, 2)
    await run.cancel()
    with anyio.fail_after(20), pytest.raises(saga.RunError):
        await run.result()
    assert undone == Counter({0: 1, 1: 1})


async def test_a_whole_days_prune_survives_another_prune_dropping_a_day_it_listed(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """saga.prune: "Safe to run from several processes at once"; README, Retention: a
    day "that another prune dropped meanwhile, is left (to it)", the rest goes on.

    Three old days, each holding one run finished long ago. Another process's prune is
    dropping the oldest day (its day transaction, as saga/_partitions.py does it: lock
    the parents and the day's four partitions exclusively, DROP them, commit). This
    prune listed the days before, then counts that day's partition before locking it
    (`_counts` in `_prune_day`, outside the day's transaction): the table is gone, and
    the whole prune fails with `DatabaseError: pruning whole days failed:
    UndefinedTableError: relation "saga.runs_p..." does not exist`, leaving the two
    other days. (Seen without any emulation too: four real `saga.prune(whole_days=True)`
    at once over twelve old days fail this way about one time in three.)"""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick)
    runs = [await orch.start(quick, Job(n=i)) for i in range(3)]
    for r in runs:
        await r.result(timeout=20)
    days = []
    for k, r in enumerate(runs):
        days.append(await _past_day(dsn, 40 + k))
        await _backdate(db, r.id, 40 + k)
    oldest = min(days)
    tables = ("runs", "events", "watches", "signals")
    parts = ", ".join(f"saga.{partition(t, oldest)}" for t in tables)

    other = await asyncpg.connect(dsn)
    outcome: list[object] = []
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT pg_advisory_xact_lock(hashtext('saga.partitions:saga'))")
        await other.execute(
            "LOCK TABLE ONLY saga.runs, ONLY saga.events, ONLY saga.watches, ONLY saga.signals"
            " IN ACCESS EXCLUSIVE MODE"
        )
        await other.execute(f"LOCK TABLE {parts} IN ACCESS EXCLUSIVE MODE")

        async def prune() -> None:
            try:
                outcome.append(
                    await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)
                )
            except saga.SagaError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(prune)
            with anyio.fail_after(20):
                while True:  # this prune waits for the other's lock on the day
                    waiting = await db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                    if waiting:
                        break
                    await anyio.sleep(0.02)
            await other.execute(f"DROP TABLE {parts}")
            await tx.commit()
    finally:
        await other.close()

    assert not isinstance(outcome[0], Exception), outcome[0]
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


async def test_a_whole_days_prune_drops_children_whose_parents_day_it_leaves(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README, Retention: "A child saga's run goes only with its parent (in the same
    day's transaction) or once its parent is gone ...: a parent a prune leaves (... in a
    day kept ...) keeps its children".

    A parent stopped for an operator started 41 days ago (just before midnight UTC), its
    two children the next day. The parent's day is mostly kept (three runs still
    active), so `prune(whole_days=True, status=[completed, stopped])` leaves it, parent
    included, and the children's day with it; cancelling the parent undoes each child
    once. Before, the children's day was dropped whole (a child was judged by whether
    its parent could be pruned, not whether this prune removed it), and the cancel ended
    the parent `compensated` with neither child's compensation run."""
    undone: Counter[int] = Counter()
    parent, chunk = _family(undone)
    orch = await orchestrator(parent, chunk)
    run = await orch.start(parent, Job())
    with anyio.fail_after(20), pytest.raises(saga.RunStoppedError):
        await run.result()
    parked = parked_saga()
    client = await open_client(parked)
    actives = [await client.start(parked, Job(n=i)) for i in range(3)]
    children = [
        r["id"] for r in await db.fetch("SELECT id FROM saga.runs WHERE parent_id = $1", run.id)
    ]

    await _past_day(dsn, 41)
    await _past_day(dsn, 40)
    parent_id = await _backdate(db, run.id, 41)
    await db.execute("UPDATE saga.runs SET parent_id = $2 WHERE parent_id = $1", run.id, parent_id)
    for child in children:
        await _backdate(db, child, 40)
    for active in actives:
        await _backdate(db, active.id, 41)

    with anyio.fail_after(30):
        await saga.prune(
            orch, older_than=timedelta(days=30), status=["completed", "stopped"], whole_days=True
        )

    stopped = orch.get_run(parent_id)
    parent_left = await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = $1", parent_id)
    children_left = await db.fetchval(
        "SELECT count(*) FROM saga.runs WHERE parent_id = $1", parent_id
    )
    assert (parent_left, children_left) == (1, 2)
    await stopped.cancel()
    with anyio.fail_after(20), pytest.raises(saga.RunError):
        await stopped.result()
    assert undone == Counter({0: 1, 1: 1})


async def _chain(
    orch: saga.Orchestrator, quick: saga.Saga[Job], db: asyncpg.Connection, depth: int
) -> list[Any]:
    runs = [await orch.start(quick, Job(n=i)) for i in range(depth)]
    for r in runs:
        await r.result(timeout=20)
    ids = [r.id for r in runs]
    for parent, child in pairwise(ids):
        await db.execute("UPDATE saga.runs SET parent_id = $2 WHERE id = $1", child, parent)
    return ids


async def test_dry_run_counts_what_the_prune_then_deletes_for_a_deep_chain(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README, Operator API, prune: "`dry_run=True` counts what would go".

    A chain of six finished runs, each the child run of the one before, none in an old
    day (the row-by-row passes): the dry run counts the 6 that the prune then deletes (a
    child in a batch after its parent's). Before, the dry run looked three generations
    up and said 4."""
    quick = small_saga("quick", 1)
    orch = await orchestrator(quick)
    ids = await _chain(orch, quick, db, 6)
    with anyio.fail_after(30):
        dry = await saga.prune(orch, older_than=timedelta(0), dry_run=True)
        done = await saga.prune(orch, older_than=timedelta(0))
    left = await db.fetchval("SELECT count(*) FROM saga.runs WHERE id = ANY($1)", ids)
    assert (done.runs, left) == (6, 0)
    assert dry.runs == done.runs, (dry.runs, done.runs)


async def test_whole_days_dry_run_counts_a_child_whose_parent_s_earlier_day_goes(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README, Operator API, prune: "`dry_run=True` counts what would go (with
    `whole_days`, the whole days only)".

    A finished parent run started 41 days ago, its finished child run 40 days ago (the
    next UTC day). `prune(whole_days=True)` drops both days (the parent's first, then the
    child's, its parent gone), 2 runs, and the dry run counts both. Before, it counted
    the child's day as keeping the child (its parent still there), and said 1."""

    quick = small_saga("quick", 1)
    orch = await orchestrator(quick)
    parent = await orch.start(quick, Job(n=1))
    child = await orch.start(quick, Job(n=2))
    for r in (parent, child):
        await r.result(timeout=20)
    await _past_day(dsn, 41)
    await _past_day(dsn, 40)
    parent_id = await _backdate(db, parent.id, 41)
    child_id = await _backdate(db, child.id, 40)
    await db.execute("UPDATE saga.runs SET parent_id = $1 WHERE id = $2", parent_id, child_id)
    with anyio.fail_after(30):
        dry = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True, dry_run=True)
        done = await saga.prune(orch, older_than=timedelta(days=30), whole_days=True)
    left = await db.fetchval(
        "SELECT count(*) FROM saga.runs WHERE id = ANY($1)", [parent_id, child_id]
    )
    assert (done.runs, left) == (2, 0)
    assert dry.runs == done.runs, (dry.runs, done.runs)
