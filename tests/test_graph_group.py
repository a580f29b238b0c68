"""Group commit of graph items: items of steps in parallel that finish at about the same
time are written in one transaction, each fenced by its own lease token, one run's items
decided one after the other, and an uncertain commit resolved item by item."""

from __future__ import annotations

from functools import partial
from typing import Any
from uuid import UUID

import anyio
import asyncpg
import pytest

from saga import _graph_plan
from saga._graph_plan import Finished, GraphChange, GraphRun
from saga._graph_runner import _first_event
from saga._held import Lease
from saga._hooks import Hooks
from saga._log import Outage, logger
from saga._model import Phase
from saga._store import Store
from saga._transition import Succeeded
from saga._write import COMMITTED, Writer
from tests._sagas import Job, small_saga
from tests.test_group_commit import lose_first_answer, slow_first_write

pytestmark = pytest.mark.timeout(60)

#: a, then b, c and d at once, then e once all three completed.
FAN = {"b": ["a"], "c": ["a"], "d": ["a"], "e": ["b", "c", "d"]}
fan = small_saga("grouped_fan", ["a", "b", "c", "d", "e"], after=FAN)
DEFS = [(fan.name, fan.version, fan.fingerprint)]
STEP = Phase.STEP


def succeeded(step: str, slots: int = 0) -> Any:
    """The plan's decision for ``step`` completed; up to ``slots`` new items leased here."""
    done = Finished(step, STEP, 1, Succeeded(f'"{step}"'))
    return partial(_graph_plan.after_item, fan, done=done, lease_for=lambda s: 30.0, slots=slots)


async def first_items(store: Store, orchestrator: Any, n: int) -> list[tuple[UUID, int]]:
    """``n`` runs of the fan-out, started; their first items (``a``) claimed by w1."""
    orch = await orchestrator(fan, concurrency=0)
    for i in range(n):
        await orch.start(fan, Job(n=i))
    items = await store.claim_items("w1", n, 30.0, DEFS)
    assert len(items) == n
    assert {i.step_name for i in items} == {"a"}
    return [(item.run_id, item.lease_token) for item in items]


async def in_one_batch(store: Store, writes: list[Any]) -> list[Any]:
    """Run ``writes`` (no-argument coroutine functions) at once: the others queue behind
    the first, which goes alone or (made ready in the same turn of the event loop) leads
    them in one batch; their outcomes (or exceptions), in order."""
    hold = anyio.Event()
    slow_first_write(store._graphs, hold)
    outcomes: list[Any] = [None] * len(writes)

    async def one(i: int) -> None:
        try:
            outcomes[i] = await writes[i]()
        except Exception as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(writes)):
            tg.start_soon(one, i)
        await anyio.sleep(0.05)
        hold.set()
    return outcomes


async def test_items_of_many_runs_share_one_commit_and_a_stale_token_fails_alone(
    store: Store, orchestrator: Any, db: asyncpg.Connection
) -> None:
    """Twelve runs' first items finish together: all but the first go in one batch, one
    transaction (their history rows share a transaction id). The two whose lease token
    is stale are refused alone: nothing of them is written, the others move on."""
    runs = await first_items(store, orchestrator, 12)
    stale = {runs[3][0], runs[7][0]}
    writes = [
        partial(
            store.graph_write,
            "w1",
            (run_id, "a", STEP),
            token - 1 if run_id in stale else token,
            succeeded("a"),
        )
        for run_id, token in runs
    ]
    outcomes = await in_one_batch(store, writes)
    assert store._graphs.batches == 1
    assert store._graphs.batched >= 11  # all but at most the first, in one batch
    for (run_id, _), outcome in zip(runs, outcomes, strict=True):
        items = await db.fetch(
            "SELECT step FROM saga.items WHERE run_id = $1 ORDER BY step", run_id
        )
        completed = await db.fetchval("SELECT completed_steps FROM saga.runs WHERE id = $1", run_id)
        if run_id in stale:
            assert outcome is None
            assert [i["step"] for i in items] == ["a"]
            assert completed == []
        else:
            change, _ = outcome
            assert change.completed_step == "a"
            assert [i["step"] for i in items] == ["b", "c", "d"]
            assert completed == ["a"]
    batched = [r for r, _ in runs[1:] if r not in stale]
    transactions = await db.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM saga.events"
        " WHERE run_id = ANY($1) AND kind = 'step_completed'",
        batched,
    )
    assert transactions == 1


async def test_one_runs_branches_in_a_batch_are_decided_one_after_the_other(
    store: Store, orchestrator: Any, db: asyncpg.Connection
) -> None:
    """b, c and d of one run finish together and go in one batch: each one's plan sees
    the branches written before it, so exactly one of them (the last) creates the join,
    once, and the run holds every result."""
    [(run_id, token)] = await first_items(store, orchestrator, 1)
    written = await store.graph_write("w1", (run_id, "a", STEP), token, succeeded("a", 3))
    assert written is not None
    leased = {step: t for step, _, t in written[1].leased}
    assert sorted(leased) == ["b", "c", "d"]
    seen: list[tuple[str, ...]] = []

    def watching(step: str) -> Any:
        decide = succeeded(step)

        def spy(run: GraphRun) -> GraphChange:
            seen.append(run.completed)
            change: GraphChange = decide(run)
            return change

        return spy

    writes = [
        partial(store.graph_write, "w1", (run_id, step, STEP), leased[step], watching(step))
        for step in ("b", "c", "d")
    ]
    outcomes = await in_one_batch(store, writes)
    assert store._graphs.batched >= 2  # c and d together, b too or alone before them
    assert seen == [("a",), ("a", "b"), ("a", "b", "c")]
    joins = [o[0] for o in outcomes if any(n.step == "e" for n in o[0].new)]
    assert len(joins) == 1
    assert joins[0].completed_step == "d"
    row = await db.fetchrow(
        "SELECT completed_steps, results::text AS results FROM saga.runs WHERE id = $1", run_id
    )
    assert row["completed_steps"] == ["a", "b", "c", "d"]
    assert all(f'"{s}"' in row["results"] for s in "abcd")
    items = await db.fetch("SELECT step FROM saga.items WHERE run_id = $1", run_id)
    assert [i["step"] for i in items] == ["e"]


async def test_a_plan_that_raises_fails_its_item_alone(
    store: Store, orchestrator: Any, db: asyncpg.Connection
) -> None:
    """An item whose decision raises gets that exception, and nothing of it is written;
    the other items of its batch are written."""
    runs = await first_items(store, orchestrator, 4)

    def broken(run: GraphRun) -> GraphChange:
        raise ValueError("the plan failed")

    writes = [
        partial(
            store.graph_write,
            "w1",
            (run_id, "a", STEP),
            token,
            broken if i == 2 else succeeded("a"),
        )
        for i, (run_id, token) in enumerate(runs)
    ]
    outcomes = await in_one_batch(store, writes)
    assert isinstance(outcomes[2], ValueError)
    for i, (run_id, _) in enumerate(runs):
        completed = await db.fetchval("SELECT completed_steps FROM saga.runs WHERE id = $1", run_id)
        assert completed == ([] if i == 2 else ["a"])
        if i != 2:
            assert outcomes[i][0].completed_step == "a"


async def test_a_batch_the_server_refused_is_written_item_by_item(
    store: Store, orchestrator: Any
) -> None:
    """A batch the server answered with an error (here: a deadlock, which rolled it back)
    is written again one item at a time: every item is written once."""
    runs = await first_items(store, orchestrator, 5)
    batch = store._graphs._batch
    refused = 0

    async def deadlocked(writes: Any) -> Any:
        nonlocal refused
        refused += 1
        raise asyncpg.DeadlockDetectedError("deadlock detected")

    store._graphs._batch = deadlocked
    writes = [
        partial(store.graph_write, "w1", (run_id, "a", STEP), token, succeeded("a"))
        for run_id, token in runs
    ]
    outcomes = await in_one_batch(store, writes)
    store._graphs._batch = batch
    assert refused == 1
    assert all(o is not None and o[0].completed_step == "a" for o in outcomes)


async def test_an_uncertain_batch_commit_is_resolved_item_by_item(
    store: Store, orchestrator: Any, db: asyncpg.Connection
) -> None:
    """A batch that committed but whose answer was lost: each writer replays its item
    (refused: the item is written already), finds its outcome in the run's history, and
    reports it committed; each item's completion is in the history once."""
    runs = await first_items(store, orchestrator, 6)
    lost = lose_first_answer(store._graphs)
    writer = Writer(store, "w1", Hooks(), Outage("w1"))
    first = Finished("a", STEP, 1, Succeeded('"a"'))
    event = _first_event(first)
    log = logger.bind(test="graph group")
    writes = [
        partial(
            writer.write_graph,
            (run_id, "a", STEP),
            Lease(run_id, token, 30.0, item=("a", STEP)),
            succeeded("a"),
            event,
            None,
            log,
        )
        for run_id, token in runs
    ]
    outcomes = await in_one_batch(store, writes)
    assert lost.is_set()
    assert outcomes[1:] == [COMMITTED] * 5
    assert outcomes[0] is COMMITTED or outcomes[0][0].completed_step == "a"  # (alone)
    for run_id, _ in runs:
        assert (
            await db.fetchval(
                "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'step_completed'",
                run_id,
            )
            == 1
        )
