"""Prune and concurrency keys no run uses any more: their rows go, the limit stays."""

from __future__ import annotations

import random
from collections import Counter
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Gate, Job, small_saga
from tests.conftest import OrchestratorFactory


async def _keys(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT key, key_limit FROM saga.key_slots")
    return {r["key"]: r["key_limit"] for r in rows}


@pytest.mark.timeout(60)
async def test_a_prune_deletes_the_keys_no_run_uses_and_keeps_those_in_use(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Operator API, prune): "Last, the concurrency keys no run holds or waits for
    any more go too (`keys`; a dry run counts those unused now)"; (Traffic control) "at
    most that many runs with the same key ... are active at once".

    Before, a key's row stayed for ever once used (one per account, order or customer
    ever seen). Five keys whose runs all completed are counted by a dry run, then go; the
    key a run holds and the key a run waits for stay; a key pruned is used again with its
    limit of 2 (two admitted, the third waits) and all its runs complete."""
    gate = Gate("s1", when=lambda ctx: ctx.input.n >= 100)
    s = small_saga(
        "keyed", 1, gate=gate,
        traffic={"concurrency_key": lambda job: f"k{job.n % 10}", "concurrency_limit": 2},
    )  # fmt: skip
    orch = await orchestrator(s, concurrency=8)
    with anyio.fail_after(45):
        for run in [await orch.start(s, Job(n=n)) for n in range(5)]:
            await run.result(timeout=10)
        busy = [await orch.start(s, Job(n=n)) for n in (108, 118, 128, 109)]  # k8 x3, k9
        await gate.entered.wait()
        assert await _keys(db) == {f"k{n}": 2 for n in (0, 1, 2, 3, 4, 8, 9)}
        counted = await saga.prune(orch, older_than=timedelta(0), dry_run=True)
        assert (counted.runs, counted.keys) == (5, 5)
        assert await _keys(db) == {f"k{n}": 2 for n in (0, 1, 2, 3, 4, 8, 9)}
        pruned = await saga.prune(orch, older_than=timedelta(0))
        assert (pruned.runs, pruned.keys) == (5, 0 + 5)
        assert await _keys(db) == {"k8": 2, "k9": 2}, "a key in use went, or an unused stayed"
        assert (await busy[2].info()).waiting_for_key  # k8's third run still waits
        again = [await orch.start(s, Job(n=n)) for n in (100, 110, 120)]  # k0, pruned
        await anyio.sleep(0.3)
        assert [(await r.info()).waiting_for_key for r in again] == [False, False, True]
        assert (await _keys(db))["k0"] == 2
        gate.release.set()
        for run in busy + again:
            assert (await run.result(timeout=10)) is not None
    assert (await saga.prune(orch, older_than=timedelta(0))).keys == 3  # k0, k8, k9


@pytest.mark.timeout(90)
async def test_keys_pruned_while_runs_take_and_free_them_keep_their_limit(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, dsn: str
) -> None:
    """README (Traffic control): "Admissions lock the key's row first and count its
    holders in a later statement, so the limit holds whatever the timing, and nothing can
    leak a slot"; (prune) the concurrency keys no run holds or waits for go.

    Prunes run back to back while 80 runs of four keys (limit 2) start, wait and end. A
    key's row deleted while a run took it (or released it) would come back with a limit
    of 1, or let a third run in: no sample of the steps ever sees three runs of a key at
    once, no sample of the table sees a key's limit other than 2, and every run
    completes once; the last prune leaves no key."""
    inside: Counter[str] = Counter()
    most: Counter[str] = Counter()
    done: list[int] = []

    def key(job: Job) -> str:
        return f"acct-{job.n % 4}"

    s = saga.Saga("busykeys", input=Job, concurrency_key=key, concurrency_limit=2)

    @s.step()
    async def work(ctx: saga.Context[Job]) -> int:
        k = key(ctx.input)
        inside[k] += 1
        most[k] = max(most[k], inside[k])
        try:
            await anyio.sleep(random.uniform(0.0, 0.03))
        finally:
            inside[k] -= 1
        done.append(ctx.input.n)
        return ctx.input.n

    orch = await orchestrator(s, concurrency=16)
    limits: set[int] = set()
    deleted = 0

    async def prune_all_the_time() -> None:
        nonlocal deleted
        conn = await asyncpg.connect(dsn)
        try:
            while True:
                deleted += (await saga.prune(orch, older_than=timedelta(days=1))).keys
                limits.update((await _keys(conn)).values())
        finally:
            conn.terminate()

    with anyio.fail_after(75):
        async with anyio.create_task_group() as tg:
            tg.start_soon(prune_all_the_time)
            runs = []
            for n in range(80):
                runs.append(await orch.start(s, Job(n=n)))
                if n % 8 == 7:
                    await anyio.sleep(random.uniform(0.0, 0.1))
            for run in runs:
                assert await run.result(timeout=30) == runs.index(run)
            tg.cancel_scope.cancel()
    assert max(most.values()) <= 2, f"more than the limit of a key at once: {most}"
    assert sorted(done) == list(range(80)), "a run ran twice or never"
    assert limits <= {2}, f"a key's row lost its definition's limit: {limits}"
    assert deleted > 0, "no prune ever found a key unused: the test proved nothing"
    await saga.prune(orch, older_than=timedelta(days=1))
    assert await _keys(db) == {}


@pytest.mark.timeout(60)
async def test_a_keyed_child_reverted_after_its_key_was_pruned_keeps_its_sagas_limit(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Operator API, prune): "Last, the concurrency keys no run holds or waits for
    any more go too ...: a key used again later starts afresh with its saga's
    `concurrency_limit`."; (Traffic control) "When a run with that key ends, the oldest
    waiting one ... is admitted" while fewer than the limit hold it.

    Two keyed children (same key, concurrency_limit=2) complete; their parent waits at a
    later step. A prune deletes the key (no run holds or waits for it). The parent's next
    step fails: both children are reverted, and queue for their key again. Before, the
    revert created the key's row afresh with a limit of 1 (not the saga's 2): only one
    child's compensation ran, the other stayed queued although one slot of two was
    free. Now the row gets the child saga's limit, and both compensations run at once."""
    undoing: list[int] = []
    go_undo = anyio.Event()
    both_undoing = anyio.Event()
    parent_waits = anyio.Event()
    parent_go = anyio.Event()

    child = saga.Saga("kchild", input=Job, concurrency_key=lambda job: "acct", concurrency_limit=2)

    @child.step()
    async def load(ctx: saga.Context[Any]) -> int:
        return ctx.input.n

    @load.compensate
    async def unload(ctx: saga.Context[Any], result: int) -> None:
        undoing.append(ctx.input.n)
        if len(undoing) == 2:
            both_undoing.set()
        await go_undo.wait()

    parent = saga.Saga("kparent", input=Job)
    kids = parent.children("kids", child, lambda ctx: [Job(n=0), Job(n=1)], after=[])

    @parent.step(after=[kids])
    async def boom(ctx: saga.Context[Any]) -> None:
        parent_waits.set()
        await parent_go.wait()
        raise saga.PermanentError("boom")

    orch = await orchestrator(parent, child, concurrency=8)
    run = await orch.start(parent, Job())
    try:
        with anyio.fail_after(40):
            await parent_waits.wait()
            pruned = await saga.prune(orch, older_than=timedelta(0))
            assert pruned.keys == 1, pruned
            assert await db.fetch("SELECT * FROM saga.key_slots") == []
            parent_go.set()
            with anyio.move_on_after(10):  # both compensations start at once
                await both_undoing.wait()
            rows = await db.fetch("SELECT key_limit FROM saga.key_slots")
            limits = [r["key_limit"] for r in rows]
            both = len(undoing)
            go_undo.set()
            with pytest.raises(saga.RunError):
                await run.result(timeout=20)
    finally:
        parent_go.set()
        go_undo.set()
    assert (both, limits) == (2, [2]), (
        f"after the prune, the reverted children's key came back with limit(s) {limits};"
        f" {both} of 2 compensations ran at once under concurrency_limit=2"
    )
