"""One at a time per business key: runs with the same key never overlap, for their whole
life including compensation, across workers and processes, through crashes and dropped
connections; the others wait in start order, costing no claim; slots are never leaked.
And priorities: higher priority work is claimed first."""

from __future__ import annotations

import contextlib
import itertools
import random
import uuid
from datetime import datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._sagas import Fail, Gate, Job, Ledger, permanent, small_saga
from tests._traffic_sagas import transfers
from tests.conftest import Children, ClientFactory, OrchestratorFactory

ONE_AT_A_TIME = {"concurrency_key": lambda job: f"account-{job.n}"}


async def _ended(run: saga.RunHandle) -> saga.RunStatus:
    with anyio.fail_after(20):
        with contextlib.suppress(saga.RunError):
            await run.result()
    return (await run.info()).status


async def test_same_key_runs_wait_in_start_order(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Three runs of account 1 and one of account 2: the first of account 1 runs, the
    other two wait (pending, waiting_for_key, due never: no claim reads them) while the
    account-2 run goes on at once; released one by one they run in start order."""
    gate = Gate("s1", when=lambda ctx: ctx.input.n == 1)
    ledger = Ledger()
    s = small_saga("pay", 1, gate=gate, ledger=ledger, traffic=ONE_AT_A_TIME)
    orch = await orchestrator(s, concurrency=8)
    first = await orch.start(s, Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    second, third = await orch.start(s, Job(n=1)), await orch.start(s, Job(n=1))
    other = await orch.start(s, Job(n=2))
    assert await _ended(other) is saga.RunStatus.COMPLETED
    for run in (second, third):
        info = await run.info()
        assert info.status is saga.RunStatus.PENDING
        assert info.waiting_for_key
        assert info.concurrency_key == "account-1"
        due = await db.fetchval("SELECT due_at = 'infinity' FROM saga.runs WHERE id = $1", run.id)
        assert due is True
    assert not (await first.info()).waiting_for_key
    gate.release.set()
    for run in (first, second, third):
        assert await _ended(run) is saga.RunStatus.COMPLETED
    order = [
        r[0]
        for r in await db.fetch(
            "SELECT run_id FROM saga.events WHERE kind = 'step_started' AND run_id = ANY($1)"
            " ORDER BY id",
            [first.id, second.id, third.id],
        )
    ]
    assert order == [first.id, second.id, third.id]


async def test_a_limit_of_two_admits_two(orchestrator: OrchestratorFactory) -> None:
    """concurrency_limit=2: five runs of one key, at most two are ever admitted at once
    (the others wait), and all complete."""
    gate = Gate("s1")
    s = small_saga(
        "two", 1, gate=gate, traffic={"concurrency_key": lambda job: "k", "concurrency_limit": 2}
    )
    orch = await orchestrator(s, concurrency=8)
    runs = [await orch.start(s, Job()) for _ in range(5)]
    await anyio.sleep(0.3)
    waiting = [(await r.info()).waiting_for_key for r in runs]
    assert waiting == [False, False, True, True, True]
    assert gate.held == 2
    gate.release.set()
    for run in runs:
        assert await _ended(run) is saga.RunStatus.COMPLETED


async def test_the_key_is_held_through_compensation_and_a_failed_run(
    orchestrator: OrchestratorFactory,
) -> None:
    """A run that fails compensates while holding its key; one whose compensation gives
    up (failed) keeps it: the next run waits until an operator resolves the failed one.
    A resolved keyed run released its key and cannot be retried or cancelled."""
    undo_broken = [True]
    s = small_saga(
        "move", ["debit", "credit"], compensate={"debit"},
        fail={"credit": permanent("no", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={"debit": saga_fail(lambda: undo_broken[0])},
        undo_retry=saga.Retry(max_attempts=1), traffic={"concurrency_key": lambda job: "acct"},
    )  # fmt: skip
    orch = await orchestrator(s, concurrency=8)
    failing = await orch.start(s, Job(n=1))
    waiting = await orch.start(s, Job(n=2))
    assert await _ended(failing) is saga.RunStatus.FAILED
    await anyio.sleep(0.3)
    assert (await waiting.info()).waiting_for_key
    await failing.resolve(note="fixed the ledger by hand")
    assert await _ended(waiting) is saga.RunStatus.COMPLETED
    with pytest.raises(saga.InvalidRunStateError):
        await failing.retry()


async def test_pruning_a_failed_run_that_holds_its_key_lets_the_queue_go_on(
    orchestrator: OrchestratorFactory,
) -> None:
    """A failed run (its compensation gave up) holds its key, and a second run waits
    for it. Pruning that excludes failed runs leaves both as they are; pruning the failed
    run frees its key as resolve() does: the waiting run is admitted and completes. The
    queue once waited for a holder that no longer existed, until the next start."""
    s = small_saga(
        "pruned_holder", ["debit", "credit"], compensate={"debit"},
        fail={"credit": permanent("no", when=lambda ctx: ctx.input.n == 1)},
        fail_undo={"debit": saga_fail(lambda: True)},
        undo_retry=saga.Retry(max_attempts=1), traffic={"concurrency_key": lambda job: "acct"},
    )  # fmt: skip
    orch = await orchestrator(s, concurrency=8)
    failing = await orch.start(s, Job(n=1))
    assert await _ended(failing) is saga.RunStatus.FAILED
    waiting = await orch.start(s, Job(n=2))
    await anyio.sleep(0.3)
    assert (await saga.prune(orch, older_than=timedelta(0))).runs == 0
    assert (await waiting.info()).waiting_for_key
    pruned = await saga.prune(orch, older_than=timedelta(0), status=["failed"])
    assert pruned.runs == 1
    assert await _ended(waiting) is saga.RunStatus.COMPLETED
    with pytest.raises(saga.RunNotFoundError):
        await failing.info()


async def test_a_key_holder_crossing_the_cutoff_during_a_prune_is_not_deleted_holding_it(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Two failed runs hold their keys (acct-1, acct-2); a run waits behind acct-1's.
    acct-2's holder finished long ago, acct-1's 0.5 s short of the prune's age limit.
    Freeing acct-2's key is held 1 s (a trigger), so acct-1's holder crosses the limit
    during the prune. The prune used to free keys against one instant and delete against
    a later one: acct-1's holder was deleted still holding its key, and the run behind it
    waited for ever. Every pass now uses one cutoff: acct-1's holder stays, its key held,
    and a later prune frees it and lets the queue go on."""
    s = small_saga(
        "crossing", ["debit", "credit"], compensate={"debit"},
        fail={"credit": permanent("no", when=lambda ctx: ctx.input.n < 3)},
        fail_undo={"debit": saga_fail(lambda: True)},
        undo_retry=saga.Retry(max_attempts=1),
        traffic={"concurrency_key": lambda job: f"acct-{min(job.n, 2) if job.n < 3 else 1}"},
    )  # fmt: skip
    orch = await orchestrator(s, concurrency=8)
    crossing = await orch.start(s, Job(n=1))
    old = await orch.start(s, Job(n=2))
    assert await _ended(crossing) is saga.RunStatus.FAILED
    assert await _ended(old) is saga.RunStatus.FAILED
    waiting = await orch.start(s, Job(n=3))  # acct-1, behind the crossing holder
    await db.execute(
        "UPDATE saga.runs SET finished_at = now() - interval '2 days' WHERE id = $1", old.id
    )
    await db.execute(
        "UPDATE saga.runs SET finished_at = now() - interval '1 day' + interval '0.5 s' "
        "WHERE id = $1",
        crossing.id,
    )
    await db.execute(
        """
        CREATE FUNCTION public.slow_release() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;
        CREATE TRIGGER slow_release BEFORE UPDATE ON saga.runs FOR EACH ROW
            WHEN (OLD.key_state = 'held' AND NEW.key_state = 'released')
            EXECUTE FUNCTION public.slow_release();
        """
    )
    pruned = await saga.prune(orch, older_than=timedelta(days=1), status=["failed"])
    assert pruned.runs == 1  # the old holder only
    assert (await crossing.info()).status is saga.RunStatus.FAILED
    assert (await waiting.info()).waiting_for_key
    await db.execute("DROP TRIGGER slow_release ON saga.runs")
    assert (await saga.prune(orch, older_than=timedelta(days=1), status=["failed"])).runs == 1
    assert await _ended(waiting) is saga.RunStatus.COMPLETED


def saga_fail(broken: Any) -> Fail:
    """A compensation failure while ``broken()`` says so."""
    return Fail(saga.PermanentError, "undo broken", None, lambda ctx: broken())


async def test_a_queued_run_cancelled_never_runs(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """Cancelling a run still waiting for its key ends it cancelled without running a
    step, and takes no slot from the runs behind it."""
    gate = Gate("s1")
    ledger = Ledger()
    s = small_saga("c", 1, gate=gate, ledger=ledger, traffic={"concurrency_key": lambda j: "k"})
    orch = await orchestrator(s, concurrency=8)
    holder = await orch.start(s, Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    queued, behind = await orch.start(s, Job(n=2)), await orch.start(s, Job(n=3))
    await queued.cancel(note="not needed")
    assert await _ended(queued) is saga.RunStatus.CANCELLED
    assert (await behind.info()).waiting_for_key
    gate.release.set()
    assert await _ended(holder) is saga.RunStatus.COMPLETED
    assert await _ended(behind) is saga.RunStatus.COMPLETED
    assert {c.run_id for c in ledger.calls} == {holder.id, behind.id}


async def test_bad_traffic_settings_are_refused(
    open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """At definition: a priority outside 0-100, a limit below 1, a key that is not a
    function, a keyed graph saga. At start: a key function returning something other
    than a non-empty str, or raising, a priority outside 0-100, or a priority for a
    saga that declares none: InvalidInputError and nothing is written."""
    for options, message in [
        ({"priority": -1}, "priority"),
        ({"priority": 101}, "priority"),
        ({"priority": True}, "priority"),
        ({"concurrency_key": lambda j: "k", "concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_key": "account"}, "concurrency_key must be a function"),
    ]:
        with pytest.raises(saga.DefinitionError, match=message):
            saga.Saga("bad", input=Job, **options)
    graph = small_saga("g", ["a", "b"], after={"b": []}, traffic={"concurrency_key": lambda j: "k"})
    with pytest.raises(saga.DefinitionError, match="not supported yet"):
        await open_client(graph)
    keys: list[Any] = [None, "", 42, "x" * 201, "a\x00b"]
    s = small_saga("keyed", 1, traffic={"concurrency_key": lambda job: keys[job.n]})
    boom = small_saga("boom", 1, traffic={"concurrency_key": lambda job: 1 / 0})
    client = await open_client(s, boom)
    for n in range(len(keys)):
        with pytest.raises(saga.InvalidInputError, match="concurrency key"):
            await client.start(s, Job(n=n))
    with pytest.raises(saga.InvalidInputError, match="ZeroDivisionError"):
        await client.start(boom, Job())
    ranked = small_saga("ranked", 1, traffic={"priority": 0})
    plain = small_saga("plain", 1)
    client2 = await open_client(ranked, plain)
    for bad in (-1, 101, 1.5):
        with pytest.raises(saga.InvalidInputError, match="priority must be"):
            await client2.start(ranked, Job(), priority=bad)
    with pytest.raises(saga.InvalidInputError, match="'plain' has no priorities"):
        await client2.start(plain, Job(), priority=5)
    assert await db.fetchval("SELECT count(*) FROM saga.runs") == 0


async def test_higher_priority_work_is_claimed_first(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """200 low-priority runs are queued before 5 urgent ones (priority 10) and one
    worker of concurrency 1 starts: the urgent ones are claimed before any of the
    backlog still due (after at most the one claim in flight)."""
    s = small_saga("bulk", 1, traffic={"priority": lambda job: 10 if job.n >= 1000 else 0})
    client = await open_client(s)
    backlog = [await client.start(s, Job(n=n)) for n in range(200)]
    urgent = [await client.start(s, Job(n=1000 + n)) for n in range(5)]
    assert (await urgent[0].info()).priority == 10
    await orchestrator(s, concurrency=1)
    with anyio.fail_after(30):
        for run in urgent:
            await run.result()
    started = [
        r[0]
        for r in await db.fetch(
            "SELECT run_id FROM saga.events WHERE kind = 'step_started' ORDER BY id"
        )
    ]
    urgent_ids = {r.id for r in urgent}
    first_urgent = [i for i, run_id in enumerate(started) if run_id in urgent_ids]
    assert max(first_urgent) <= len(urgent) + 1  # the claim in flight, then the urgent five
    assert backlog[0].id in started or len(started) < 200


@pytest.mark.timeout(180)
async def test_no_two_same_key_runs_overlap_through_crashes(
    children: Children, open_client: ClientFactory, dsn: str, db: asyncpg.Connection
) -> None:
    """3 worker processes, 200 runs on 10 accounts (some fail and compensate): one
    worker is SIGKILLed twice and restarted, and the workers' database connections are
    terminated twice. Every run ends; for every account, the histories of its runs
    (first step or compensation started, to the run's end) never overlap; no slot is
    leaked (nothing held or queued at the end)."""
    target = "tests._traffic_sagas:transfers"
    options = ("--concurrency", "16", "--lease-seconds", "2", "--poll-interval", "0.2")
    for n in range(3):
        children.saga_worker(dsn, target, *options, name=f"w{n}")
    for child in children.started:
        await child.wait_ready()
    client = await open_client(transfers)
    for n in range(200):
        await client.start(transfers, Job(n=n))
    await client.aclose()  # from here on, every connection but this test's is a worker's
    rng = random.Random(7)
    active = "SELECT count(*) FROM saga.runs WHERE due_at IS NOT NULL"
    for round_ in range(2):
        await anyio.sleep(rng.uniform(0.2, 0.6))
        assert await db.fetchval(active) > 0  # the chaos happens while runs are active
        victim = children.started[0] if round_ == 0 else children.started[-1]
        victim.kill()
        children.saga_worker(dsn, target, *options, name=f"restarted{round_}")
        await anyio.sleep(rng.uniform(0.3, 1.0))
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with anyio.fail_after(120):
        while await db.fetchval(active):  # noqa: ASYNC110 - the workers are other processes
            await anyio.sleep(0.2)
    statuses = {r[0] for r in await db.fetch("SELECT DISTINCT status FROM saga.runs")}
    assert statuses <= {"completed", "compensated"}
    spans = await db.fetch(
        """
        SELECT r.concurrency_key AS key, r.id,
               min(e.at) FILTER (WHERE e.kind IN ('step_started', 'compensation_started'))
                   AS first, max(e.at) AS last
        FROM saga.runs r JOIN saga.events e ON e.run_id = r.id
        GROUP BY r.concurrency_key, r.id
        """
    )
    by_key: dict[str, list[tuple[datetime, datetime, uuid.UUID]]] = {}
    for row in spans:
        by_key.setdefault(row["key"], []).append((row["first"], row["last"], row["id"]))
    assert len(by_key) == 10
    for key, intervals in by_key.items():
        intervals.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(intervals):
            assert end <= start, f"{key}: runs {a} and {b} overlap"
    left = "SELECT count(*) FROM saga.runs WHERE key_state IN ('held', 'queued')"
    assert await db.fetchval(left) == 0


async def test_an_orchestrator_limited_to_a_lane(
    orchestrator: OrchestratorFactory, open_client: ClientFactory
) -> None:
    """Orchestrator(lanes=["urgent"]) executes only the sagas of that lane: a run of
    the default lane stays pending (another orchestrator runs it), an urgent one
    completes; a lane no saga uses, or an empty list, is a ConfigurationError."""
    urgent = small_saga("reset_password", 1, traffic={"lane": "urgent"})
    bulk = small_saga("backfill", 1)
    own = await orchestrator(urgent, bulk, lanes=["urgent"])
    assert own.lanes == {"urgent"}
    waiting = await own.start(bulk, Job())
    assert await _ended(await own.start(urgent, Job())) is saga.RunStatus.COMPLETED
    await anyio.sleep(0.3)
    assert (await waiting.info()).status is saga.RunStatus.PENDING
    await orchestrator(bulk)  # the default lane's workers
    assert await _ended(waiting) is saga.RunStatus.COMPLETED
    for lanes, message in ((["nightly"], "used by no saga"), ([], "non-empty")):
        with pytest.raises(saga.ConfigurationError, match=message):
            saga.Orchestrator("postgresql://x", sagas=[urgent, bulk], lanes=lanes)
    with pytest.raises(saga.DefinitionError, match="lane"):
        saga.Saga("x", input=Job, lane="not a name")


async def _write_transactions(
    orch: saga.Orchestrator, s: saga.Saga[Any], db: asyncpg.Connection, runs: int
) -> int:
    """Transaction ids assigned (write transactions, cluster-wide) while ``runs`` runs
    are started and run one after the other."""
    next_xid = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    before = await db.fetchval(next_xid)
    for n in range(runs):
        await (await orch.start(s, Job(n=n))).result(timeout=10)
    return int(await db.fetchval(next_xid) - before)


async def test_a_keyed_saga_pays_no_extra_commit(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """40 runs of a 2-step saga with a concurrency key (each its own key, so none waits)
    cost the same write transactions as 40 runs without one, give or take the database's
    own (far below the one extra commit per run the contract allows): the admission and
    the release are statements of the start's and of the final transition's
    transactions."""
    plain = small_saga("plain", 2)
    keyed = small_saga("keyed", 2, traffic={"concurrency_key": lambda job: f"k{job.n}"})
    orch = await orchestrator(plain, keyed, concurrency=1)
    await _write_transactions(orch, plain, db, 3)  # warm up (prepared statements, pools)
    await _write_transactions(orch, keyed, db, 3)
    without = await _write_transactions(orch, plain, db, 40)
    with_key = await _write_transactions(orch, keyed, db, 40)
    # About 5 write transactions a run either way; a few more or less come from the
    # database itself (autoanalyze, a heartbeat), far below one more per run.
    assert with_key - without < 40 // 4, (without, with_key)
