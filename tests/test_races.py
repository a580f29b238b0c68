"""Races between several orchestrators (and clients) on one database, each repeated
many times, with the promises of DESIGN.md ("Semantics users rely on") checked from the
database afterwards: idempotent starts, first signal wins, cancels racing signals and
last steps, concurrency keys, operators racing, schedules, children, graphs, rate limits,
and prunes while runs execute."""

# The racers are closures defined in each repetition and awaited within it (B023 does
# not apply); their assertions run in the racing tasks themselves.
# ruff: noqa: B023, PT017, PT018

from __future__ import annotations

import contextlib
import itertools
import random
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import FAST, Job, Ledger, small_saga
from tests.conftest import ClientFactory, OrchestratorFactory

pytestmark = pytest.mark.timeout(240)

TERMINAL = ("completed", "compensated", "failed", "cancelled", "stopped")


async def _ended(run: saga.RunHandle, timeout: float = 30) -> saga.RunStatus:
    with anyio.fail_after(timeout):
        with contextlib.suppress(saga.RunError):
            await run.result()
    return (await run.info()).status


async def _no_stuck_runs(db: asyncpg.Connection) -> None:
    """No run is active with nothing that will ever move it: not terminal, no lease, and
    no due time (or due never, not waiting for a key nor for a signal)."""
    rows = await db.fetch(
        """SELECT id, status, due_at, key_state, graph, wait_name FROM saga.runs r
           WHERE status NOT IN ('completed', 'compensated', 'failed', 'cancelled', 'stopped')
             AND lease_owner IS NULL
             AND (due_at IS NULL OR (due_at = 'infinity' AND NOT graph
                                     AND key_state IS DISTINCT FROM 'queued'
                                     AND wait_name IS NULL))"""
    )
    assert not rows, f"stuck runs: {[dict(r) for r in rows]}"


async def _step_events_once(db: asyncpg.Connection) -> None:
    """Each step's step_completed (and each compensation_completed) at most once per run."""
    rows = await db.fetch(
        """SELECT run_id, kind, step, count(*) AS n FROM saga.events
           WHERE kind IN ('step_completed', 'compensation_completed')
           GROUP BY run_id, kind, step HAVING count(*) > 1"""
    )
    assert not rows, f"outcomes recorded more than once: {[dict(r) for r in rows]}"


# --------------------------------------------------------------------------------------
# Idempotent start


async def test_idempotent_start_racers_on_several_orchestrators_get_one_run(
    orchestrator: OrchestratorFactory,
    open_client: ClientFactory,
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
) -> None:
    """Idempotent start with a key returns the existing run even when callers race: 3
    orchestrators and 2 clients (some in their own transaction with conn=, some with
    require_same_input=False) start the same key at the same instant, 30 times; every
    racer gets the same run id, one run row and one run_started event per key."""
    s = small_saga("idem", 1)
    orchs = [await orchestrator(s) for _ in range(3)]
    clients = [await open_client(s) for _ in range(2)]
    starters: list[Any] = [*orchs, *clients]
    for i in range(30):
        key = f"k-{i}"
        go = anyio.Event()
        ids: list[uuid.UUID] = []
        created: list[bool] = []

        async def racer(n: int, go: anyio.Event = go, key: str = key) -> None:
            who = starters[n % len(starters)]
            await go.wait()
            if n % 3 == 0:
                async with pool.acquire() as conn, conn.transaction():
                    run = await who.start(s, Job(n=1), key=key, conn=conn)
            else:
                run = await who.start(s, Job(n=1), key=key, require_same_input=n % 2 == 0)
            ids.append(run.id)
            created.append(run.created)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(racer, n)
                await anyio.sleep(0.01)
                go.set()
        assert len(set(ids)) == 1, f"iteration {i}: {ids}"
        assert created.count(True) == 1, f"iteration {i}: created {created}"
        rows = await db.fetchval("SELECT count(*) FROM saga.runs WHERE idempotency_key = $1", key)
        assert rows == 1
        events = await db.fetchval(
            "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'run_started'", ids[0]
        )
        assert events == 1


async def test_idempotent_start_racers_with_different_inputs_get_one_run_or_a_conflict(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """Racing starts of one key with different inputs (require_same_input=True): exactly
    one creates the run; each other racer gets that run if its input is the winner's,
    else IdempotencyConflictError naming that run. 30 times, 2 orchestrators, 2 clients."""
    s = small_saga("idem2", 1)
    starters: list[Any] = [await orchestrator(s), await orchestrator(s)]
    starters += [await open_client(s), await open_client(s)]
    for i in range(30):
        key = f"k-{i}"
        go = anyio.Event()
        results: list[tuple[int, uuid.UUID | None, bool, uuid.UUID | None]] = []

        async def racer(n: int, go: anyio.Event = go, key: str = key) -> None:
            who = starters[n % len(starters)]
            await go.wait()
            try:
                run = await who.start(s, Job(n=n % 2), key=key)
            except saga.IdempotencyConflictError as exc:
                results.append((n % 2, None, False, exc.run_id))
            else:
                results.append((n % 2, run.id, run.created, None))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(racer, n)
                await anyio.sleep(0.01)
                go.set()
        winners = [r for r in results if r[2]]
        assert len(winners) == 1, results
        win_input, win_id = winners[0][0], winners[0][1]
        for inp, rid, _, conflict in results:
            if inp == win_input:
                assert rid == win_id, results
            else:
                assert rid is None and conflict == win_id, results
        assert (
            await db.fetchval("SELECT count(*) FROM saga.runs WHERE idempotency_key = $1", key) == 1
        )


# --------------------------------------------------------------------------------------
# Signals


class Note(BaseModel):
    sender: int


def signal_saga(name: str = "sig") -> tuple[saga.Saga[Job], Any]:
    s = saga.Saga(name, input=Job)

    @s.step()
    async def first(ctx: saga.Context[Job]) -> int:
        if ctx.input.n:
            await anyio.sleep(random.random() * 0.05)
        return 1

    note = s.wait_for("note", Note, timeout=600)

    @s.step()
    async def last(ctx: saga.Context[Job]) -> int:
        return ctx.result(note).sender

    return s, note


async def test_racing_signals_from_several_clients_first_wins_once(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """A signal sent before the run reaches its wait is kept and the first of a name
    wins: 3 orchestrators execute, 3 clients and the orchestrators send the same signal
    (each its own payload) at the same instant, while the run is starting, running its
    first step or parked at the wait. Exactly one send returns True, the run ends with
    that one's payload, and history has one signal_received. 40 times."""
    s, note = signal_saga()
    orchs = [await orchestrator(s) for _ in range(3)]
    senders: list[Any] = [*orchs, *[await open_client(s) for _ in range(3)]]
    for i in range(40):
        run = await orchs[i % 3].start(s, Job(n=1))
        await anyio.sleep(random.choice([0, 0.005, 0.02, 0.05, 0.1]))
        go = anyio.Event()
        answers: dict[int, bool] = {}

        async def send(n: int, go: anyio.Event = go, run: saga.RunHandle = run) -> None:
            await go.wait()
            try:
                answers[n] = await senders[n].signal(run.id, note, Note(sender=n))
            except saga.InvalidRunStateError as exc:  # a repeat once the run ended
                assert "has ended" in str(exc)
                answers[n] = False

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(len(senders)):
                    tg.start_soon(send, n)
                await anyio.sleep(0.01)
                go.set()
        winners = [n for n, ok in answers.items() if ok]
        assert len(winners) == 1, f"iteration {i}: {answers}"
        assert await run.result(timeout=30) == winners[0]
        received = await db.fetchval(
            "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'signal_received'",
            run.id,
        )
        assert received == 1
    await _step_events_once(db)


async def test_a_signal_racing_a_cancel_of_a_waiting_run_is_told_the_truth(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """Cancel by operators races safely with signals: a run parked at its wait gets a
    cancel from one client and a signal from another at the same instant. The run ends
    cancelled (its first step undone once), the last step never runs; a signal that
    returned True is in the history as signal_received, a refused one raised
    InvalidRunStateError and is signal_refused. 30 times over 2 orchestrators."""
    ledger = Ledger()
    s = saga.Saga("sigcancel", input=Job)

    @s.step()
    async def first(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 1

    @first.compensate
    async def undo_first(ctx: saga.Context[Job], value: int) -> None:
        ledger.record(ctx, value)

    note = s.wait_for("note", Note, timeout=600)

    @s.step()
    async def last(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        await anyio.sleep(0.05)
        return ctx.result(note).sender

    orchs = [await orchestrator(s) for _ in range(2)]
    a, b = await open_client(s), await open_client(s)
    for i in range(30):
        run = await orchs[i % 2].start(s, Job())
        with anyio.fail_after(15):
            while (await run.info()).status is not saga.RunStatus.WAITING:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        go = anyio.Event()
        outcome: dict[str, Any] = {}

        async def do_cancel(go: anyio.Event = go, run: saga.RunHandle = run) -> None:
            await go.wait()
            try:
                await a.cancel(run.id)
                outcome["cancel"] = True
            except saga.InvalidRunStateError:
                outcome["cancel"] = False

        async def do_signal(go: anyio.Event = go, run: saga.RunHandle = run) -> None:
            await go.wait()
            try:
                outcome["signal"] = await b.signal(run.id, note, Note(sender=1))
            except saga.InvalidRunStateError:
                outcome["signal"] = "refused"

        async with anyio.create_task_group() as tg:
            tg.start_soon(do_cancel)
            tg.start_soon(do_signal)
            await anyio.sleep(0.005 * (i % 4))
            go.set()
        status = await _ended(run)
        kinds = [e.kind for e in await run.history()]
        if outcome["cancel"]:
            # The cancel was accepted: the run must not run "last" and complete.
            assert status is saga.RunStatus.CANCELLED, (i, outcome, status, kinds)
            undos = list(ledger.of("compensation", run.id))
            assert len(undos) == 1, (i, outcome, ledger.trace(run.id))
        if outcome["signal"] is True:
            assert "signal_received" in kinds, (i, outcome, kinds)
        elif outcome["signal"] == "refused":
            assert "signal_refused" in kinds, (i, outcome, kinds)
    await _step_events_once(db)
    await _no_stuck_runs(db)


# --------------------------------------------------------------------------------------
# Cancel racing completion


async def test_cancel_racing_the_last_step_across_orchestrators_ends_consistently(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """Cancel races safely with running work: 3 orchestrators run 3-step runs while 2
    clients cancel them at random moments around the last step's end. A cancel that
    was accepted ends the run cancelled, with every completed step compensated exactly
    once, newest first; a refused one (InvalidRunStateError) means the run completed.
    The history agrees: no run_completed after a cancel_requested, the compensations'
    order is the reverse of the completions'. 60 runs."""
    ledger = Ledger()
    s = small_saga(
        "cancelrace", ["a", "b", "c"], compensate=True, ledger=ledger,
        delay=lambda: random.random() * 0.03,
    )  # fmt: skip
    orchs = [await orchestrator(s, concurrency=4) for _ in range(3)]
    clients = [await open_client(s) for _ in range(2)]
    accepted: dict[uuid.UUID, bool] = {}

    async def one(i: int) -> None:
        run = await orchs[i % 3].start(s, Job(n=i))
        await anyio.sleep(random.random() * 0.12)
        try:
            await clients[i % 2].cancel(run.id)
            accepted[run.id] = True
        except saga.InvalidRunStateError:
            accepted[run.id] = False

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, i)
    for run_id, ok in accepted.items():
        run = orchs[0].get_run(run_id)
        status = await _ended(run)
        events = await run.history()
        kinds = [e.kind for e in events]
        done = [e.step for e in events if e.kind == "step_completed"]
        undone = [e.step for e in events if e.kind == "compensation_completed"]
        if ok:
            assert status is saga.RunStatus.CANCELLED, (status, kinds)
            assert "run_completed" not in kinds, kinds
            assert undone == list(reversed(done)), (done, undone)
            calls = Counter(c.step for c in ledger.of("compensation", run_id))
            assert all(calls[st] == 1 for st in done), (calls, done)
        else:
            assert status is saga.RunStatus.COMPLETED, (status, kinds)
            assert "cancel_requested" not in kinds, kinds
    await _step_events_once(db)
    await _no_stuck_runs(db)


# --------------------------------------------------------------------------------------
# Concurrency keys


async def test_concurrency_limit_holds_under_racing_starts_cancels_and_failures(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """A saga can allow only N runs at a time per key, for their whole life: 3
    orchestrators; 2 clients and the orchestrators start 60 runs on 3 keys (limit 2) at
    the same instant, some fail and compensate, and cancels hit random runs while they
    wait, run or compensate. Every step and compensation records its interval: at no
    instant do more than 2 runs of one key execute; every run ends; nothing is left
    queued or held; no run is stuck."""
    intervals: list[tuple[str, uuid.UUID, float, float]] = []

    s = saga.Saga(
        "keyed", input=Job, concurrency_key=lambda job: f"acct-{job.n % 3}", concurrency_limit=2
    )

    async def work(ctx: saga.Context[Job]) -> None:
        t0 = time.monotonic()
        await anyio.sleep(random.random() * 0.02)
        intervals.append((f"acct-{ctx.input.n % 3}", ctx.run_id, t0, time.monotonic()))

    @s.step(retry=FAST)
    async def one(ctx: saga.Context[Job]) -> int:
        await work(ctx)
        return 1

    @one.compensate
    async def undo_one(ctx: saga.Context[Job], value: int) -> None:
        await work(ctx)

    @s.step(retry=FAST)
    async def two(ctx: saga.Context[Job]) -> int:
        await work(ctx)
        if ctx.input.fail:
            raise saga.PermanentError("no")
        return 2

    orchs = [await orchestrator(s, concurrency=8) for _ in range(3)]
    starters: list[Any] = [*orchs, await open_client(s), await open_client(s)]
    go = anyio.Event()
    runs: list[saga.RunHandle] = []

    async def start(i: int) -> None:
        await go.wait()
        run = await starters[i % len(starters)].start(s, Job(n=i, fail="x" if i % 4 == 0 else ""))
        runs.append(run)
        if i % 3 == 0:
            await anyio.sleep(random.random() * 0.3)
            with contextlib.suppress(saga.InvalidRunStateError):
                await starters[(i + 1) % len(starters)].cancel(run.id)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(start, i)
            await anyio.sleep(0.05)
            go.set()
        for run in runs:
            await _ended(run, 60)
    # At any instant, at most 2 runs of one key are executing something.
    for key in {k for k, *_ in intervals}:
        points: list[tuple[float, int, uuid.UUID]] = []
        for k, rid, t0, t1 in intervals:
            if k == key:
                points += [(t0, 1, rid), (t1, -1, rid)]
        active: Counter[uuid.UUID] = Counter()
        for t, d, rid in sorted(points, key=lambda p: (p[0], p[1])):
            active[rid] += d
            if active[rid] == 0:
                del active[rid]
            assert len(active) <= 2, f"{key}: {len(active)} runs at once at {t}"
    left = await db.fetchval(
        "SELECT count(*) FROM saga.runs WHERE key_state IN ('queued', 'held')"
        " AND status IN ('completed', 'compensated', 'cancelled')"
    )
    assert left == 0
    statuses = Counter([(await r.info()).status for r in runs])
    assert set(statuses) <= {
        saga.RunStatus.COMPLETED,
        saga.RunStatus.COMPENSATED,
        saga.RunStatus.CANCELLED,
    }, statuses
    await _step_events_once(db)
    await _no_stuck_runs(db)


# --------------------------------------------------------------------------------------
# Operators racing each other


async def test_operators_racing_on_a_failed_keyed_run_retry_or_resolve_never_both(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """Retry and resolve by operators race safely: a keyed run failed (its compensation
    gave up) holds its key while the next run waits. Two clients retry it and one
    resolves it at the same instant, 25 times. Either the resolve won (the key went to
    the next run, the failed run is never compensated again) or a retry won (one
    run_retried, the compensation runs again, still holding the key); the limit of one
    run per key is never exceeded and no run is stuck."""
    broken = {"on": True}
    running: dict[str, set[uuid.UUID]] = {}
    overlaps: list[Any] = []

    s = saga.Saga("opsrace", input=Job, concurrency_key=lambda job: f"k{job.n}")

    def enter(ctx: saga.Context[Job]) -> None:
        holders = running.setdefault(f"k{ctx.input.n}", set())
        holders.add(ctx.run_id)
        if len(holders) > 1:
            overlaps.append(set(holders))

    def leave(ctx: saga.Context[Job]) -> None:
        running.setdefault(f"k{ctx.input.n}", set()).discard(ctx.run_id)

    @s.step()
    async def debit(ctx: saga.Context[Job]) -> int:
        enter(ctx)
        await anyio.sleep(0.01)
        leave(ctx)
        return 1

    @debit.compensate(retry=saga.Retry(max_attempts=1))
    async def undo(ctx: saga.Context[Job], value: int) -> None:
        enter(ctx)
        await anyio.sleep(0.01)
        leave(ctx)
        if ctx.input.n >= 0 and broken["on"] and ctx.attempt == 1 and "first" in ctx.input.fail:
            raise RuntimeError("ledger down")

    @s.step()
    async def credit(ctx: saga.Context[Job]) -> int:
        if "first" in ctx.input.fail:
            raise saga.PermanentError("declined")
        return 2

    orchs = [await orchestrator(s) for _ in range(2)]
    c1, c2, c3 = await open_client(s), await open_client(s), await open_client(s)
    for i in range(25):
        broken["on"] = True
        failed = await orchs[0].start(s, Job(n=i, fail=f"first-{i}"))
        assert await _ended(failed) is saga.RunStatus.FAILED
        nxt = await orchs[1].start(s, Job(n=i, fail=f"next-{i}"))
        go = anyio.Event()
        outcome: dict[str, bool] = {}

        async def act(name: str, fn: Any, go: anyio.Event = go) -> None:
            await go.wait()
            try:
                await fn()
                outcome[name] = True
            except saga.InvalidRunStateError:
                outcome[name] = False

        broken["on"] = i % 2 == 0  # half the time the retried compensation fails again
        async with anyio.create_task_group() as tg:
            tg.start_soon(act, "retry1", lambda f=failed: c1.retry(f.id))
            tg.start_soon(act, "retry2", lambda f=failed: c2.retry(f.id))
            tg.start_soon(act, "resolve", lambda f=failed: c3.resolve(f.id, note="by hand"))
            await anyio.sleep(0.01)
            go.set()
        kinds = [e.kind for e in await failed.history()]
        assert kinds.count("run_retried") <= 1, (i, outcome, kinds)
        if outcome["resolve"] and not any(outcome.get(k) for k in ("retry1", "retry2")):
            assert (await nxt.info()).status is not None
        status = await _ended(failed)
        if broken["on"] is False or not outcome["resolve"]:
            pass
        # The next run must end (the key must not leak) unless the failed one still holds it.
        info = await failed.info()
        if info.status is not saga.RunStatus.FAILED or info.resolved:
            assert await _ended(nxt) is saga.RunStatus.COMPLETED, (i, outcome, status)
        else:
            await failed.resolve(note="cleanup")
            assert await _ended(nxt) is saga.RunStatus.COMPLETED, (i, outcome, status)
    assert not overlaps, overlaps
    await _step_events_once(db)
    await _no_stuck_runs(db)


# --------------------------------------------------------------------------------------
# Schedules


async def test_a_schedule_fires_once_per_slot_across_orchestrators_coming_and_going(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Schedules fire once per slot across all orchestrators, and every slot while one
    is up: a 1-second schedule held by 4 orchestrators that open and close at random
    (at least one always up) for ~8 s: each slot in between has exactly one run, and
    no slot in the window is missing."""
    s = small_saga("tick", 1)
    every = saga.Scheduled("tick", s, saga.Schedule.every(timedelta(seconds=1)), Job())

    async def member(seconds: float) -> None:
        async with saga.Orchestrator(
            dsn, sagas=[s], schedules=[every], poll_interval=0.2, shutdown_timeout=2.0
        ):
            await anyio.sleep(seconds)

    async def churn(k: int) -> None:
        end = time.monotonic() + 8
        while time.monotonic() < end:
            await member(random.random() * 1.5)
            await anyio.sleep(random.random() * 0.3)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(member, 9.5)  # always one up
            for k in range(3):
                tg.start_soon(churn, k)
    keys = [
        r[0]
        for r in await db.fetch(
            "SELECT idempotency_key FROM saga.runs WHERE saga_name = 'tick' ORDER BY created_at"
        )
    ]
    assert len(keys) == len(set(keys))
    assert len(keys) >= 7, keys
    from datetime import datetime

    times = sorted(datetime.fromisoformat(k.split(":", 2)[2]) for k in keys)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(g == 1 for g in gaps), (gaps, keys)


# --------------------------------------------------------------------------------------
# Graphs and child sagas, cancelled while they run on several orchestrators


async def test_cancelling_a_parent_while_its_children_finish_undoes_every_child_once(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """Compensating a children step compensates its children; cancel races safely with
    running work: 3 orchestrators run parents that fan out 4 child runs each; a client
    cancels each parent at a random moment while its children run and complete. The
    parent ends cancelled; every child that completed its step had it compensated
    exactly once, and no child ends completed (left un-undone) or active; the parent's
    split is undone once, after its children. 30 parents."""
    ledger = Ledger()
    child = small_saga(
        "child", ["load"], compensate=True, ledger=ledger, delay=lambda: random.random() * 0.05
    )
    parent = small_saga("parent", ["split"], compensate=True, ledger=ledger)
    parent.children("kids", child, lambda ctx: [Job(n=k) for k in range(4)], after=["split"])
    orchs = [await orchestrator(parent, child, concurrency=8) for _ in range(3)]
    client = await open_client(parent, child)
    runs: list[tuple[saga.RunHandle, bool]] = []

    async def one(i: int) -> None:
        run = await orchs[i % 3].start(parent, Job(n=i))
        await anyio.sleep(random.random() * 0.15)
        try:
            await client.cancel(run.id)
            runs.append((run, True))
        except saga.InvalidRunStateError:
            runs.append((run, False))

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
        for run, _ in runs:
            await _ended(run, 60)
    for run, cancelled in runs:
        status = (await run.info()).status
        kids = await db.fetch("SELECT id, status FROM saga.runs WHERE parent_id = $1", run.id)
        if cancelled:
            assert status is saga.RunStatus.CANCELLED, (status, ledger.trace(run.id))
            for kid in kids:
                did = ledger.steps("step", kid["id"])
                undid = ledger.steps("compensation", kid["id"])
                assert kid["status"] in ("cancelled", "compensated"), (
                    dict(kid),
                    did,
                    undid,
                    [e.kind for e in await orchs[0].history(kid["id"])],
                )
                done = await db.fetchval(
                    "SELECT count(*) FROM saga.events WHERE run_id = $1"
                    " AND kind = 'step_completed'",
                    kid["id"],
                )
                undone = await db.fetchval(
                    "SELECT count(*) FROM saga.events WHERE run_id = $1"
                    " AND kind = 'compensation_completed'",
                    kid["id"],
                )
                assert done == undone, (dict(kid), done, undone)
            split_undo = ledger.steps("compensation", run.id)
            assert split_undo.count("split") <= 1
        else:
            assert status is saga.RunStatus.COMPLETED
    await _step_events_once(db)
    await _no_stuck_runs(db)


async def test_cancelling_a_graph_run_across_orchestrators_undoes_in_reverse_dependency_order(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """A join runs exactly once; on cancel, for every edge a -> b, b is undone before a,
    each completed step once: a diamond (a -> b, c -> d) runs on 4 orchestrators while
    a client cancels at a random moment. 40 runs."""
    ledger = Ledger()
    s = small_saga(
        "diamond", ["a", "b", "c", "d"], compensate=True, ledger=ledger,
        after={"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]},
        delay=lambda: random.random() * 0.03,
    )  # fmt: skip
    orchs = [await orchestrator(s, concurrency=4) for _ in range(4)]
    client = await open_client(s)
    runs: list[tuple[saga.RunHandle, bool]] = []

    async def one(i: int) -> None:
        run = await orchs[i % 4].start(s, Job(n=i))
        await anyio.sleep(random.random() * 0.12)
        try:
            await client.cancel(run.id)
            runs.append((run, True))
        except saga.InvalidRunStateError:
            runs.append((run, False))

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
        for run, _ in runs:
            await _ended(run, 60)
    edges = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
    for run, cancelled in runs:
        events = await run.history()
        done = [e.step for e in events if e.kind == "step_completed"]
        undone = [e.step for e in events if e.kind == "compensation_completed"]
        started = [e.step for e in events if e.kind == "compensation_started"]
        assert done.count("d") <= 1
        status = (await run.info()).status
        if cancelled:
            assert status is saga.RunStatus.CANCELLED, status
            assert sorted(undone) == sorted(done), (done, undone)
            for x, y in edges:
                if x in undone and y in undone:
                    # y's compensation finished before x's started
                    assert undone.index(y) < started.index(x), (done, undone, started)
        else:
            assert status is saga.RunStatus.COMPLETED
    await _step_events_once(db)
    await _no_stuck_runs(db)


async def test_a_rate_limit_is_shared_by_every_orchestrator(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """A rate limit is shared by every worker: 3 orchestrators run 45 runs of a step
    limited to 10/s (burst 5). In any window of w seconds the step starts at most
    burst + 10 * w times, give or take the timer's jitter: one start more, and 50 ms of
    the window (tokens are timed by the database's clock; each worker's wait for its
    own starts from the reply, whose latency varies: once in CI, 20 starts fell in a
    window 0.3 ms short of the 1.4 s that admits them)."""
    starts: list[float] = []
    limit = saga.RateLimit("api", per_second=10, burst=5)
    s = saga.Saga("limited", input=Job)

    @s.step(rate_limit=limit)
    async def call(ctx: saga.Context[Job]) -> int:
        starts.append(time.monotonic())
        return 1

    orchs = [await orchestrator(s, concurrency=16) for _ in range(3)]
    runs = []
    async with anyio.create_task_group() as tg:

        async def go(i: int) -> None:
            runs.append(await orchs[i % 3].start(s, Job(n=i)))

        for i in range(45):
            tg.start_soon(go, i)
    with anyio.fail_after(60):
        for run in runs:
            await run.result()
    starts.sort()
    for i, t0 in enumerate(starts):
        for j in range(i, len(starts)):
            w = starts[j] - t0
            assert j - i + 1 <= 5 + 10 * (w + 0.05) + 1, (j - i + 1, w)


# --------------------------------------------------------------------------------------
# Pruning while runs execute


async def test_pruning_while_a_grandparent_runs_keeps_the_grandchildren_it_may_undo(
    orchestrator: OrchestratorFactory, open_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """Pruning races safely with running work, and nothing is silently skipped in a
    rollback: a child run "goes only with its parent" (saga.prune). A grandparent G
    starts a child P, which starts a grandchild C; C and P complete while G's last step
    still runs. A prune (older_than=0, the default statuses) at that moment must not
    delete C: P stays (its parent G is active) and G's rollback reverts P, whose rollback
    must undo C. Then G's last step fails for good: C's step is compensated once."""
    ledger = Ledger()
    proceed = anyio.Event()
    leaf = small_saga("leaf", ["load"], compensate=True, ledger=ledger)
    mid = small_saga("mid", ["prep"], compensate=True, ledger=ledger)
    mid.children("leaves", leaf, lambda ctx: [Job(n=1)], after=["prep"])
    top = saga.Saga("top", input=Job)

    @top.step(after=[])
    async def split(ctx: saga.Context[Job]) -> int:
        ledger.record(ctx)
        return 1

    @split.compensate
    async def undo_split(ctx: saga.Context[Job], value: int) -> None:
        ledger.record(ctx, value)

    mids = top.children("mids", mid, lambda ctx: [Job(n=1)], after=[split])

    @top.step(after=[mids])
    async def boom(ctx: saga.Context[Job]) -> int:
        await proceed.wait()
        raise saga.PermanentError("boom")

    orch = await orchestrator(top, mid, leaf)
    client = await open_client(top, mid, leaf)
    run = await orch.start(top, Job())
    with anyio.fail_after(20):
        while not await db.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM saga.events WHERE run_id = $1 AND kind = 'step_started'"
            " AND step = 'boom'",
            run.id,
        ):
            await anyio.sleep(0.02)
    leaf_runs = await db.fetch("SELECT id, status FROM saga.runs WHERE saga_name = 'leaf'")
    assert [r["status"] for r in leaf_runs] == ["completed"]
    pruned = await saga.prune(client, older_than=timedelta(0))
    left = await db.fetchval("SELECT count(*) FROM saga.runs WHERE saga_name = 'leaf'")
    proceed.set()
    with pytest.raises(saga.RunError):
        await run.result(timeout=30)
    undone = ledger.steps("compensation")
    mid_status = await db.fetchval("SELECT status FROM saga.runs WHERE saga_name = 'mid'")
    assert left == 1 and undone.count("load") == 1, (
        f"the grandchild was pruned ({pruned}) while its parent stays; then the rollback"
        f" undid {undone} (never load), mid ended {mid_status}, top"
        f" {(await run.info()).status}"
    )
