"""README "In your transaction" against live workers: callers' transactions that hold
runs' rows hold up no other run (keyed runs' ends, rate-limited steps), a caller's type
codecs do not matter, savepoints, shutdowns and killed workers. The tests not marked as
checks failed before the fixes of the same commit (found by review; "Observed" is what
happened then)."""

# ruff: noqa: ASYNC110, PT018

from __future__ import annotations

import contextlib
import os
from uuid import UUID

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga
from tests._sagas import FAST, Gate, Job

pytestmark = pytest.mark.timeout(120)


class Go(BaseModel):
    ok: bool = True


async def _status(db: asyncpg.Connection, run_id: UUID) -> str:
    return await db.fetchval("SELECT status FROM saga.runs WHERE id = $1", run_id)


async def _until(db: asyncpg.Connection, run_id: UUID, status: str, seconds: float) -> bool:
    with anyio.move_on_after(seconds):
        while await _status(db, run_id) != status:
            await anyio.sleep(0.05)
        return True
    return False


def _keyed_then_gated(gate: Gate) -> saga.Saga[Job]:
    """A keyed saga (key per input n): ``pre`` -> wait ``go`` -> ``last`` (passes gate)."""
    s = saga.Saga("keyed", input=Job, concurrency_key=lambda j: f"acct-{j.n}", concurrency_limit=1)

    @s.step(retry=FAST)
    async def pre(ctx: saga.Context[Job]) -> int:
        return 0

    s.wait_for("go", Go)

    @s.step(retry=FAST)
    async def last(ctx: saga.Context[Job]) -> int:
        await gate.pass_through(ctx)
        return 1

    return s


def _plain_gated(gate: Gate) -> saga.Saga[Job]:
    s = saga.Saga("plain", input=Job)

    @s.step(retry=FAST)
    async def only(ctx: saga.Context[Job]) -> int:
        await gate.pass_through(ctx)
        return 7

    return s


async def test_held_keyed_runs_ends_hold_up_another_runs_write(orchestrator, dsn, db) -> None:
    """README, "In your transaction": "A signal locks the run's row until your transaction
    ends ... the workers' writes of that run wait for it. No other run's do: ... the held
    run's write goes again alone, waiting for the lock by itself (on at most a quarter of
    the connections; past that, it tries again from time to time without one)".

    A worker (concurrency 21: its statement pool has 20 connections) runs 20 keyed runs
    and one plain run P. Callers' transactions each send one keyed run a signal (`conn=`)
    and stay open; the keyed runs' last steps return. Observed: each keyed run's end waits
    for its row on a connection of its own, with no quarter limit (saga/_store.py: the
    `child or keyed` terminal path), so all 20 connections wait for the callers, and P,
    whose step then returns, is not written: it stays `running` until the callers commit.
    """
    kgate, pgate = Gate("last"), Gate("only")
    keyed, plain = _keyed_then_gated(kgate), _plain_gated(pgate)
    orch = await orchestrator(keyed, plain, concurrency=21, lease_seconds=60)
    p = await plain.start(Job(n=0))
    with anyio.fail_after(10):
        await pgate.entered.wait()
    runs = [await keyed.start(Job(n=i)) for i in range(20)]
    with anyio.fail_after(20):
        for r in runs:
            while await _status(db, r.id) != "waiting":
                await anyio.sleep(0.05)
    for r in runs:
        assert await orch.signal(r.id, "go", Go())
    with anyio.fail_after(20):
        while kgate.held < 20:
            await anyio.sleep(0.05)
    callers = [await asyncpg.connect(dsn) for _ in runs]
    p_done = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            for c, r in zip(callers, runs, strict=True):
                await stack.enter_async_context(c.transaction())
                # a repeat of the signal: recorded once already, refused as a repeat, but
                # the run's row is locked till the caller's transaction ends
                assert not await orch.signal(r.id, "go", Go(), conn=c)
            kgate.release.set()  # the 20 keyed runs end: their writes wait for the rows
            await anyio.sleep(1.5)
            pgate.release.set()  # P's step returns; its write should not wait for anyone
            p_done = await _until(db, p.id, "completed", 6)
    finally:
        for c in callers:
            await c.close()
    for r in runs:
        assert await r.result(timeout=30) == 1
    assert await p.result(timeout=30) == 7
    assert p_done, "run P's write waited for callers' transactions holding other runs' rows"


async def test_closing_a_worker_waits_for_a_callers_transaction_holding_a_keyed_run(  # (a check)
    orchestrator, dsn, db
) -> None:
    """README, Orchestrator: leaving "lets running steps finish for up to
    `shutdown_timeout`, then cancels the rest and releases their leases ... (a claim, a
    heartbeat or a step's write in flight is let finish first, 5 s at most ...; a run
    whose row another transaction holds at that moment, such as a caller's transaction
    sending it a signal, is not waited for: its lease expires)".

    A keyed run's last step returns while a caller's transaction (a signal sent with
    `conn=`) holds its row for 15 s; the worker (shutdown_timeout 2 s) is closed then.
    Observed: the close waits for the caller's transaction (the keyed end's write waits
    for the row on its own connection, outside the flights the close bounds)."""
    kgate = Gate("last")
    keyed = _keyed_then_gated(kgate)
    orch = await orchestrator(keyed, lease_seconds=3, shutdown_timeout=2.0)
    run = await keyed.start(Job(n=1))
    with anyio.fail_after(10):
        while await _status(db, run.id) != "waiting":
            await anyio.sleep(0.05)
    assert await orch.signal(run.id, "go", Go())
    with anyio.fail_after(10):
        await kgate.entered.wait()
    caller = await asyncpg.connect(dsn)
    took = None
    try:
        async with caller.transaction():
            assert not await orch.signal(run.id, "go", Go(), conn=caller)
            kgate.release.set()
            await anyio.sleep(0.5)  # the keyed run's end now waits for the row
            async with anyio.create_task_group() as tg:

                async def close() -> None:
                    nonlocal took
                    t0 = anyio.current_time()
                    await orch.aclose()
                    took = anyio.current_time() - t0

                tg.start_soon(close)
                with anyio.move_on_after(15):
                    while took is None:
                        await anyio.sleep(0.05)
                # the caller's transaction commits only after 15 s (or after the close)
    finally:
        await caller.close()
    assert took is not None and took < 9, f"close took {took} s (caller held 15 s)"
    # another worker finishes the run, and the key is free for the next run of that key
    kgate2 = Gate("never")
    keyed2 = _keyed_then_gated(kgate2)
    orch2 = await orchestrator(keyed2, lease_seconds=3)
    assert await orch2.get_run(run.id).result(timeout=20) == 1
    nxt = await orch2.start(keyed2, Job(n=1))
    with anyio.fail_after(10):
        while await _status(db, nxt.id) != "waiting":
            await anyio.sleep(0.05)


def _limited(name: str, limit: saga.RateLimit, steps_seen: list[UUID]) -> saga.Saga[Job]:
    """``limited`` (takes a token of ``limit``) -> wait ``go`` -> ``after``."""
    s = saga.Saga(name, input=Job)

    @s.step(retry=FAST, rate_limit=limit)
    async def limited(ctx: saga.Context[Job]) -> int:
        steps_seen.append(ctx.run_id)
        return 1

    s.wait_for("go", Go)

    @s.step(retry=FAST)
    async def after(ctx: saga.Context[Job]) -> int:
        return 2

    return s


async def _waiting_on_locks(db: asyncpg.Connection) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'"
    )


async def test_held_rate_limited_runs_hold_up_another_runs_token(orchestrator, dsn, db) -> None:
    """README, Traffic control, rate limits: "The bucket's row is held for that one
    statement only: the `rate_limited` event is written after it, so a caller's
    transaction holding one run's row holds up no other run's token." And "In your
    transaction": the workers' writes of a held run wait for it; "No other run's do".

    20 runs of a worker (concurrency 21) wait for a token of limit `slow` (in debt) while
    callers' transactions hold their rows (each sent the run a signal with `conn=`, for
    its later wait). Each `rate_limited` event waits for its run's row on a connection of
    the orchestrator's operator pool (saga/_store_sched.py rate_limited: `self.pool`, no
    quarter limit), which fills it (20 connections); `rate_take` uses that pool too. A
    run Q of another saga with its own limit `fast` (never in debt) then cannot take its
    token: Q stays before its step until the callers commit."""
    seen: list[UUID] = []
    slow = saga.RateLimit("slow", per_second=0.2, burst=1)
    fast = saga.RateLimit("fast", per_second=1000, burst=1000)
    rl, other = _limited("rl", slow, seen), _limited("other", fast, seen)
    orch = await orchestrator(rl, other, concurrency=21, lease_seconds=60)
    bucket = await asyncpg.connect(dsn)
    callers = [await asyncpg.connect(dsn) for _ in range(20)]
    q_ran = False
    try:
        # The bucket of `slow` exists, empty, and is held for a moment: the 20 attempts
        # line up on it (the state their takes reach anyway: in debt, each waits).
        await bucket.execute(
            "INSERT INTO saga.rate_limits VALUES ('slow', 0, clock_timestamp(), 0.2, 1)"
        )
        tx = bucket.transaction()
        await tx.start()
        await bucket.execute("SELECT 1 FROM saga.rate_limits WHERE name = 'slow' FOR UPDATE")
        runs = [await rl.start(Job(n=i)) for i in range(20)]
        with anyio.fail_after(20):
            while await _waiting_on_locks(db) < 19:  # (the pool has one more in use)
                await anyio.sleep(0.05)
        async with contextlib.AsyncExitStack() as stack:
            for c, r in zip(callers, runs, strict=True):
                await stack.enter_async_context(c.transaction())
                assert await orch.signal(r.id, "go", Go(), conn=c)  # kept for the wait
            await tx.commit()  # the takes return (a delay each): rate_limited waits
            await anyio.sleep(1.0)
            q = await other.start(Job(n=99))
            with anyio.move_on_after(6):
                while q.id not in seen:
                    await anyio.sleep(0.05)
                q_ran = True
    finally:
        for c in callers:
            await c.close()
        await bucket.close()
    assert q_ran, "run Q's token waited for callers' transactions holding other runs' rows"


async def test_a_uuid_codec_on_the_callers_connection_changes_the_run_id(orchestrator, dsn) -> None:
    """README, "In your transaction": "Your connection's type codecs do not matter (a
    `json`/`jsonb` codec your pool's `init` registers, say)", and its example returns
    `run.id` as a `uuid.UUID` (`place_order(...) -> uuid.UUID`).

    A caller's connection whose pool `init` decodes `uuid` as `str` (a common codec) starts
    a run with `conn=`. Observed: `run.id` is a `str` (the id is read back through the
    caller's codec: saga/_store.py start_run returns `row["id"]`), so it is not equal to
    the same run's id from `info()`, and is not the documented `uuid.UUID`."""
    import uuid

    gate = Gate("nothing")
    plain = _plain_gated(gate)
    orch = await orchestrator(plain)
    conn = await asyncpg.connect(dsn)
    await conn.set_type_codec("uuid", encoder=str, decoder=str, schema="pg_catalog", format="text")
    try:
        async with conn.transaction():
            run = await orch.start(plain, Job(n=1), conn=conn, key="codec-1")
        async with conn.transaction():  # the same key: the existing run, found
            again = await orch.start(plain, Job(n=1), conn=conn, key="codec-1")
    finally:
        await conn.close()
    assert await run.result(timeout=10) == 7
    info = await run.info()
    assert isinstance(run.id, uuid.UUID), f"run.id is {type(run.id).__name__}"
    assert isinstance(again.id, uuid.UUID), f"run.id is {type(again.id).__name__}"
    assert info.id == run.id == again.id


async def test_a_signal_in_a_rolled_back_savepoint_holds_nothing(
    orchestrator, dsn, db
) -> None:  # (a check)
    """README, "In your transaction": "On rollback (or the rollback of a savepoint around
    the call) nothing exists and no worker is woken". A signal sent (`conn=`) inside a
    savepoint rolled back, the caller's transaction still open: the run's write is not
    held (it parks at its wait), and nothing of the signal exists after the commit."""
    gate = Gate("first")
    s = saga.Saga("sp", input=Job)

    @s.step(retry=FAST)
    async def first(ctx: saga.Context[Job]) -> int:
        await gate.pass_through(ctx)
        return 1

    s.wait_for("go", Go)

    @s.step(retry=FAST)
    async def second(ctx: saga.Context[Job]) -> int:
        return 2

    orch = await orchestrator(s, lease_seconds=60)
    run = await s.start(Job(n=1))
    with anyio.fail_after(10):
        await gate.entered.wait()
    caller = await asyncpg.connect(dsn)
    parked = False
    try:
        async with caller.transaction():
            with contextlib.suppress(RuntimeError):
                async with caller.transaction():  # a savepoint
                    assert await orch.signal(run.id, "go", Go(), conn=caller)
                    raise RuntimeError("roll the savepoint back")
            gate.release.set()
            parked = await _until(db, run.id, "waiting", 5)
    finally:
        await caller.close()
    assert parked
    await anyio.sleep(0.5)
    assert await _status(db, run.id) == "waiting"
    kinds = [e.kind for e in await run.history()]
    assert "signal_received" not in kinds


class Spot(BaseModel):
    """Input of the `killed` saga: a folder where its step leaves marks."""

    folder: str


def _killed_saga() -> saga.Saga[Spot]:
    """``work`` (marks `started-N`, waits for the file `release`) -> wait ``go`` ->
    ``after``: for a worker in another process, killed while its write waits."""
    from pathlib import Path

    s = saga.Saga("killed", input=Spot)

    @s.step(retry=saga.Retry(max_attempts=3, initial_delay=0.01, max_delay=0.05))
    async def work(ctx: saga.Context[Spot]) -> int:
        folder = Path(ctx.input.folder)
        (folder / f"started-{ctx.attempt}-{os.getpid()}").touch()
        while not (folder / "release").exists():
            await anyio.sleep(0.02)
        return 1

    s.wait_for("go", Go)

    @s.step()
    async def after(ctx: saga.Context[Spot]) -> int:
        return 2

    return s


KILLED_SAGAS = [_killed_saga()]


async def test_a_worker_killed_while_its_write_waits_leaves_a_recoverable_run(  # (a check)
    orchestrator, dsn, db, children, tmp_path
) -> None:
    """README, "In your transaction": the held run's write waits for the caller's lock
    (holding the run's advisory lock); a crash "loses nothing". A `saga worker` process
    whose write of `work`'s outcome waits for a caller's transaction (a signal with
    `conn=`) is SIGKILLed; the caller commits 4 s later (past the 2 s lease). Another
    worker then finishes the run: nothing is stuck, `work` ran once."""
    worker = children.saga_worker(
        dsn, "tests.test_caller_transactions:KILLED_SAGAS", "--lease-seconds", "2", "--no-migrate"
    )
    await worker.wait_ready()
    client = saga.Client(dsn, sagas=KILLED_SAGAS)
    async with client:
        run = await client.start(KILLED_SAGAS[0], Spot(folder=str(tmp_path)))
        with anyio.fail_after(20):
            while not list(tmp_path.glob("started-*")):
                await anyio.sleep(0.05)
        caller = await asyncpg.connect(dsn)
        try:
            async with caller.transaction():
                assert await client.signal(run.id, "go", Go(), conn=caller)
                (tmp_path / "release").touch()
                with anyio.fail_after(10):  # the worker's write now waits for the row
                    while not await db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l"
                        " ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted"
                        " WHERE a.wait_event_type = 'Lock' AND a.datname = current_database()"
                    ):
                        await anyio.sleep(0.05)
                worker.kill()  # its write waits, holding the run's advisory lock
                await anyio.sleep(4.0)
        finally:
            await caller.close()
        await orchestrator(*KILLED_SAGAS, lease_seconds=2)
        assert await run.result(timeout=30) == 2
        history = [e.kind for e in await run.history()]
    assert len(list(tmp_path.glob("started-*"))) == 1, history
