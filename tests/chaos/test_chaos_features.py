"""Crash chaos across the newer capabilities.

Three ``saga worker`` processes run this module's ``SAGAS`` (graph sagas with a fan-out
and joins, a children step, keyed child sagas with a sleep, a rate-limited step and a
signal wait, pivot sagas with a sleep and transiently failing steps, compensations that
fail transiently) while the test SIGKILLs one at random moments and starts a
replacement, sends the signals the runs wait for (before, around and after their wait,
sometimes twice), and samples the concurrency keys' holders. Afterwards it checks what
README/DESIGN promise. Seeds are printed: ``SAGA_CHAOS_SEED=<seed>`` replays the same runs
and kill schedule (not the same interleavings).

The module doubles as the workers' target (``saga worker tests.chaos.test_chaos_features:SAGAS``):
steps write their effects to the ``mix_exec`` table through ``SAGA_DSN``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import saga

# --------------------------------------------------------------------------------------
# The sagas (imported by the worker processes too)
# --------------------------------------------------------------------------------------


class Acct(BaseModel):
    acct: str
    fail: str = ""
    tag: str = ""


class Go(BaseModel):
    nonce: str


class Order(BaseModel):
    accts: list[str]
    fail: str = ""
    tag: str = ""


class Deal(BaseModel):
    fail: str = ""
    tag: str = ""


STEP = saga.Retry(max_attempts=12, initial_delay=0.05, max_delay=0.3)
COMP = saga.Retry(max_attempts=12, initial_delay=0.05, max_delay=0.3)
BANK = saga.RateLimit("mix_bank", per_second=8, burst=2)

EXEC_DDL = """
CREATE TABLE mix_exec (
    id       bigserial PRIMARY KEY,
    run_id   uuid NOT NULL,
    saga     text NOT NULL,
    step     text NOT NULL,
    kind     text NOT NULL,      -- step | compensation
    attempt  integer NOT NULL,
    pid      integer NOT NULL,
    acct     text,
    t0       float8 NOT NULL,    -- time.time() when the call began
    t1       float8 NOT NULL,    -- when its effect was recorded
    note     text
);
"""

_pools: dict[int, asyncpg.Pool] = {}


async def _pool() -> asyncpg.Pool:
    loop = id(asyncio.get_running_loop())
    if loop not in _pools:
        _pools[loop] = await asyncpg.create_pool(
            os.environ["SAGA_DSN"],
            min_size=1,
            max_size=4,
            server_settings={"application_name": "mixtest-effects"},  # never terminated
        )
    return _pools[loop]


async def _effect(ctx: saga.Context[Any], note: str | None = None) -> None:
    """The step's (or compensation's) external effect: some work, then a row."""
    t0 = time.time()
    await asyncio.sleep(random.uniform(0.03, 0.25))
    acct = getattr(ctx.input, "acct", None)
    pool = await _pool()
    await pool.execute(
        "INSERT INTO mix_exec (run_id, saga, step, kind, attempt, pid, acct, t0, t1, note)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        ctx.run_id,
        ctx.saga,
        ctx.step,
        "compensation" if ctx.is_compensation else "step",
        ctx.attempt,
        os.getpid(),
        acct,
        t0,
        time.time(),
        note,
    )


async def _flaky_undo(ctx: saga.Context[Any]) -> None:
    """A compensation that fails transiently: attempt 1 fails before its effect,
    attempt 2 after it (the service deduplicates by key), later ones succeed."""
    if ctx.attempt == 1:
        await asyncio.sleep(0.02)
        raise ConnectionError("transient, before the effect")
    await _effect(ctx)
    if ctx.attempt == 2:
        raise ConnectionError("transient, after the effect")


# mix_child: one at a time per account; c1 (undone, flakily), a sleep, c2 (rate
# limited, undone), a wait for the signal "go", c3 (fails for good when fail == "c3").
child = saga.Saga("mix_child", input=Acct, concurrency_key=lambda a: a.acct, concurrency_limit=1)


@child.step(retry=STEP)
async def c1(ctx: saga.Context[Acct]) -> str:
    await _effect(ctx)
    return "c1"


@c1.compensate(retry=COMP)
async def undo_c1(ctx: saga.Context[Acct], result: str) -> None:
    await _flaky_undo(ctx)


child.sleep(0.2)


@child.step(retry=STEP, rate_limit=BANK)
async def c2(ctx: saga.Context[Acct]) -> str:
    await _effect(ctx)
    return "c2"


@c2.compensate(retry=COMP)
async def undo_c2(ctx: saga.Context[Acct], result: str) -> None:
    await _effect(ctx)


go = child.wait_for("go", Go, timeout=timedelta(seconds=300))


@child.step(retry=STEP)
async def c3(ctx: saga.Context[Acct]) -> str:
    nonce = ctx.result(go).nonce
    if ctx.input.fail == "c3":
        raise saga.PermanentError("c3 refused")
    await _effect(ctx, note=nonce)
    return nonce


# mix_graph: g_a and g_b at the start; kids (children of mix_child, one per account) after
# g_a; the join g_join after g_b and kids; g_final after g_join (fails for good when
# fail == "final"; fail == "kid" makes the second child fail).
graph = saga.Saga("mix_graph", input=Order)


@graph.step(retry=STEP, after=[])
async def g_a(ctx: saga.Context[Order]) -> str:
    await _effect(ctx)
    return "a"


@g_a.compensate(retry=COMP)
async def undo_g_a(ctx: saga.Context[Order], result: str) -> None:
    await _flaky_undo(ctx)


@graph.step(retry=STEP, after=[])
async def g_b(ctx: saga.Context[Order]) -> str:
    await _effect(ctx)
    return "b"


@g_b.compensate(retry=COMP)
async def undo_g_b(ctx: saga.Context[Order], result: str) -> None:
    await _flaky_undo(ctx)


def _kid_inputs(ctx: saga.Context[Order]) -> list[Acct]:
    return [
        Acct(acct=a, fail="c3" if ctx.input.fail == "kid" and i == 1 else "", tag=ctx.input.tag)
        for i, a in enumerate(ctx.input.accts)
    ]


kids = graph.children("kids", child, _kid_inputs, max_children=5, after=[g_a])


@graph.step(retry=STEP, after=[g_b, kids])
async def g_join(ctx: saga.Context[Order]) -> int:
    got = ctx.result(kids)
    await _effect(ctx, note=json.dumps(got))
    return len(got)


@g_join.compensate(retry=COMP)
async def undo_g_join(ctx: saga.Context[Order], result: int) -> None:
    await _flaky_undo(ctx)


@graph.step(retry=STEP, after=[g_join])
async def g_final(ctx: saga.Context[Order]) -> int:
    if ctx.input.fail == "final":
        raise saga.PermanentError("final refused")
    await _effect(ctx)
    return ctx.result(g_join)


# mix_pivot: p1 (undone, flakily), p1b (fails for good when fail == "pre"; undone), the
# pivot p2, a sleep, p3 (fails transiently twice), p4 (fails for good when fail == "p4":
# the run stops for an operator).
deal = saga.Saga("mix_pivot", input=Deal)


@deal.step(retry=STEP)
async def p1(ctx: saga.Context[Deal]) -> str:
    await _effect(ctx)
    return "p1"


@p1.compensate(retry=COMP)
async def undo_p1(ctx: saga.Context[Deal], result: str) -> None:
    await _flaky_undo(ctx)


@deal.step(retry=STEP)
async def p1b(ctx: saga.Context[Deal]) -> str:
    if ctx.input.fail == "pre":
        raise saga.PermanentError("pre refused")
    await _effect(ctx)
    return "p1b"


@p1b.compensate(retry=COMP)
async def undo_p1b(ctx: saga.Context[Deal], result: str) -> None:
    await _effect(ctx)


@deal.step(retry=STEP, pivot=True)
async def p2(ctx: saga.Context[Deal]) -> str:
    await _effect(ctx)
    return "p2"


deal.sleep(0.2)


@deal.step(retry=STEP)
async def p3(ctx: saga.Context[Deal]) -> str:
    if ctx.attempt <= 2:
        raise ConnectionError("transient")
    await _effect(ctx)
    return "p3"


@deal.step(retry=STEP)
async def p4(ctx: saga.Context[Deal]) -> str:
    if ctx.input.fail == "p4":
        raise saga.PermanentError("p4 refused")
    await _effect(ctx)
    return "p4"


# mix_timed: t1 (undone), a wait for "go" with a short timeout that compensates, t2.
timed = saga.Saga("mix_timed", input=Deal)


@timed.step(retry=STEP)
async def t1(ctx: saga.Context[Deal]) -> str:
    await _effect(ctx)
    return "t1"


@t1.compensate(retry=COMP)
async def undo_t1(ctx: saga.Context[Deal], result: str) -> None:
    await _flaky_undo(ctx)


timed_go = timed.wait_for("go", Go, timeout=1.5, on_timeout="compensate")


@timed.step(retry=STEP)
async def t2(ctx: saga.Context[Deal]) -> str:
    nonce = ctx.result(timed_go).nonce
    await _effect(ctx, note=nonce)
    return nonce


# mix_fallback: f0, a sleep until a time computed from the data, f1, a wait for "go"
# whose timeout goes on with a computed value, f2.
fallback = saga.Saga("mix_fallback", input=Deal)


@fallback.step(retry=STEP)
async def f0(ctx: saga.Context[Deal]) -> float:
    await _effect(ctx)
    return time.time()


async def _wake_at(ctx: saga.Context[Deal]) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ctx.result(f0) + 0.3, UTC)


fallback.sleep(until=_wake_at)


@fallback.step(retry=STEP)
async def f1(ctx: saga.Context[Deal]) -> str:
    await _effect(ctx)
    return "f1"


async def _on_timeout(ctx: saga.Context[Deal]) -> Go:
    await asyncio.sleep(random.uniform(0.0, 0.2))
    return Go(nonce="timeout")


fallback_go = fallback.wait_for("go", Go, timeout=1.5, on_timeout=_on_timeout)


@fallback.step(retry=STEP)
async def f2(ctx: saga.Context[Deal]) -> str:
    nonce = ctx.result(fallback_go).nonce
    await _effect(ctx, note=nonce)
    return nonce


SAGAS: list[saga.Saga[Any]] = [child, graph, deal, timed, fallback]

GRAPH_EDGES = {"kids": ["g_a"], "g_join": ["g_b", "kids"], "g_final": ["g_join"]}
COMPENSATED = {
    "mix_child": ["c1", "c2"],
    "mix_graph": ["g_a", "g_b", "kids", "g_join"],
    "mix_pivot": ["p1", "p1b"],
    "mix_timed": ["t1"],
    "mix_fallback": [],
}
AFTER_WAIT = {"mix_child": "c3", "mix_timed": "t2", "mix_fallback": "f2"}
TERMINAL = ("completed", "compensated", "failed", "cancelled", "stopped")

# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------

WORKER_OPTIONS = (
    "--concurrency",
    os.environ.get("SAGA_CHAOS_CONCURRENCY", "8"),
    "--lease-seconds",
    os.environ.get("SAGA_CHAOS_LEASE", "1"),
    "--poll-interval",
    "0.2",
)
TARGET = "tests.chaos.test_chaos_features:SAGAS"
BACKEND_SHARE = float(os.environ.get("SAGA_CHAOS_BACKENDS", "0.25"))
RUNS = int(os.environ.get("SAGA_CHAOS_RUNS", "60"))
KILL_EVERY = float(os.environ.get("SAGA_CHAOS_KILL_EVERY", "1.0"))  # mean seconds


@dataclass
class Send:
    nonce: str
    outcome: str = ""


@dataclass
class Sent:
    sends: list[Send] = field(default_factory=list)


@dataclass
class World:
    seed: int
    rng: random.Random
    client: saga.Client
    db: asyncpg.Connection
    dsn: str
    expected: dict[uuid.UUID, tuple[str, str]] = field(default_factory=dict)  # saga, fail
    signals: dict[uuid.UUID, Sent] = field(default_factory=lambda: defaultdict(Sent))
    key_violations: list[str] = field(default_factory=list)
    samples: int = 0
    kills: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    cancels: dict[uuid.UUID, str] = field(default_factory=dict)  # run -> accepted | refused
    backend_kills: int = 0
    cancel_at: dict[uuid.UUID, float] = field(default_factory=dict)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def q(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.lock:
            return await self.db.fetch(sql, *args)


async def _send(w: World, run_id: uuid.UUID) -> None:
    sent = Send(uuid.uuid4().hex)
    w.signals[run_id].sends.append(sent)
    try:
        accepted = await w.client.signal(run_id, "go", Go(nonce=sent.nonce))
    except saga.InvalidRunStateError as exc:
        sent.outcome = f"refused: {exc}"
    else:
        sent.outcome = "accepted" if accepted else "repeat"


async def _signal_one(w: World, run_id: uuid.UUID, rng: random.Random) -> None:
    plan = rng.choice(["now", "delay", "waiting"])
    if plan == "delay":
        await anyio.sleep(rng.uniform(0, 1.5))
    elif plan == "waiting":
        with anyio.move_on_after(40):
            while True:
                rows = await w.q("SELECT status FROM saga.runs WHERE id = $1", run_id)
                if rows[0]["status"] in ("waiting", *TERMINAL):
                    break
                await anyio.sleep(0.1)
        await anyio.sleep(rng.uniform(0, 0.3))
    await _send(w, run_id)
    if rng.random() < 0.3:
        await anyio.sleep(rng.uniform(0, 0.5))
        await _send(w, run_id)


async def _signal_timed(w: World, run_id: uuid.UUID, rng: random.Random) -> None:
    await anyio.sleep(rng.uniform(0.3, 3.5))
    await _send(w, run_id)
    if rng.random() < 0.3:
        await anyio.sleep(rng.uniform(0, 0.5))
        await _send(w, run_id)


async def _signal_children(w: World, parent: uuid.UUID, rng: random.Random, tg: Any) -> None:
    seen: set[uuid.UUID] = set()
    with anyio.move_on_after(60):
        while True:
            rows = await w.q("SELECT id FROM saga.runs WHERE parent_id = $1 ORDER BY id", parent)
            for r in rows:
                if r["id"] not in seen:
                    seen.add(r["id"])
                    tg.start_soon(_signal_one, w, r["id"], random.Random(rng.random()))
            status = (await w.q("SELECT status FROM saga.runs WHERE id = $1", parent))[0][0]
            if status in TERMINAL:
                return
            await anyio.sleep(0.1)


async def _cancel_later(w: World, run_id: uuid.UUID, delay: float) -> None:
    await anyio.sleep(delay)
    try:
        await w.client.get_run(run_id).cancel(by="chaos")
    except saga.InvalidRunStateError as exc:
        w.cancels[run_id] = f"refused: {exc}"
    else:
        w.cancels[run_id] = "accepted"
        w.cancel_at[run_id] = time.time()


async def _sample_keys(w: World) -> None:
    """At most concurrency_limit (1) runs of a key are active at any time."""
    conn = await asyncpg.connect(w.dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT concurrency_key AS k,"
                " count(*) FILTER (WHERE key_state = 'held') AS held,"
                " count(*) FILTER (WHERE key_state = 'held' OR (key_state <> 'queued'"
                "   AND status IN ('running', 'sleeping', 'waiting', 'compensating')))"
                "   AS active,"
                " array_agg(id::text || ':' || status || ':' || coalesce(key_state, '-'))"
                "   AS runs"
                " FROM saga.runs WHERE concurrency_key IS NOT NULL AND due_at IS NOT NULL"
                " GROUP BY concurrency_key"
            )
            w.samples += 1
            for r in rows:
                if r["held"] > 1 or r["active"] > 1:
                    w.key_violations.append(
                        f"key {r['k']}: held={r['held']} active={r['active']} {r['runs']}"
                    )
            await anyio.sleep(0.02)
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def _chaos(w: World, children: Any, dsn: str, rng: random.Random, seconds: float) -> None:
    end = anyio.current_time() + seconds
    n = 0
    while anyio.current_time() < end:
        await anyio.sleep(rng.uniform(0.5, 1.5) * KILL_EVERY)
        alive = [c for c in children.started if c.alive]
        if not alive:
            continue
        if rng.random() < BACKEND_SHARE:  # dropped connections: the workers' backends
            await w.q(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name NOT LIKE 'mixtest%'"
            )
            w.backend_kills += 1
            continue
        many = 3 if rng.random() < 0.1 else 2 if rng.random() < 0.2 else 1
        victims = rng.sample(alive, k=min(len(alive), many))
        for victim in victims:
            victim.kill()
            w.kills.append(time.time())
            n += 1
            children.saga_worker(dsn, TARGET, *WORKER_OPTIONS, name=f"r{n}")


def _expected_status(saga_name: str, fail: str) -> set[str]:
    if saga_name == "mix_timed":
        return {"completed", "compensated"}  # refined by the signals (see _verify)
    if saga_name == "mix_fallback":
        return {"completed"}
    if saga_name == "mix_child":
        return {"compensated"} if fail == "c3" else {"completed"}
    if saga_name == "mix_graph":
        return {"compensated"} if fail in ("final", "kid") else {"completed"}
    return {"p4": {"stopped"}, "pre": {"compensated"}}.get(fail, {"completed"})


@pytest.mark.timeout(150)
async def test_mixed_sagas_survive_sigkilled_workers(
    dsn: str, children: Any, open_client: Any, db: asyncpg.Connection
) -> None:
    """README: "A crash, a deploy or a dropped connection loses nothing ... any
    orchestrator picks up what a dead one left"; "a join starts **exactly once**";
    "Steps run at least once; outcomes are recorded exactly once"; "Compensations then
    run in **reverse dependency order**: for every edge a -> b, b's compensation finishes
    before a's starts"; "at most that many runs with the same key ... are active at once,
    across every worker and process, for their whole life, compensation included ...
    nothing can leak a slot"; "A signal sent before the run reaches its wait is kept, and
    consumed when it gets there. The first signal of a name wins"; "Attempts beyond the
    limit are delayed, never failed"; "once it completed, nothing before it is ever
    compensated"; children: "Started once ... a retried step ... never starts a second
    child", "A child that ends compensated ... fails the step for good ... once its
    siblings are undone", "Compensating the step ... rolls back the completed ones
    (... they end `cancelled`)".

    Proves, under SIGKILLed and restarted workers: every run (and child run) ends in the
    documented state within a bound after the last kill; every step completes at most
    once (exactly once in a completed run), from an execution that really ran; each
    join is made ready once; compensations run once each in reverse (dependency) order
    and nothing before a pivot is undone after it; no key ever has two active runs; every
    accepted signal is the one its run received and the step after the wait saw; each
    children step started exactly one child per item."""
    seed = int(os.environ.get("SAGA_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\nmixed chaos seed={seed} (replay: SAGA_CHAOS_SEED={seed})", flush=True)
    rng = random.Random(f"runs-{seed}")
    chaos_rng = random.Random(f"chaos-{seed}")
    await db.execute(EXEC_DDL)
    for n in range(3):
        children.saga_worker(dsn, TARGET, *WORKER_OPTIONS, name=f"w{n}")
    for c in children.started:
        await c.wait_ready(timeout=30)
    mine = dsn + "&application_name=mixtest"  # the test's connections: never terminated
    client = saga.Client(mine, sagas=SAGAS, poll_interval=0.2)
    await client.__aenter__()
    w = World(seed, rng, client, await asyncpg.connect(mine), mine)
    accts = [f"acct-{i}" for i in range(8)]
    problems: list[str] = []
    try:
        async with anyio.create_task_group() as bg:
            bg.start_soon(_sample_keys, w)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_chaos, w, children, dsn, chaos_rng, 16.0)
                for i in range(RUNS):
                    await anyio.sleep(rng.uniform(0.02, 0.3) * 60 / RUNS)
                    kind = rng.choice(["child", "graph", "graph", "pivot", "timed", "fallback"])
                    tag = f"{seed}-{i}"
                    if kind == "child":
                        fail = rng.choice(["", "", "c3"])
                        h = await client.start(
                            child, Acct(acct=rng.choice(accts), fail=fail, tag=tag)
                        )
                        w.expected[h.id] = ("mix_child", fail)
                        if rng.random() < 0.15:
                            tg.start_soon(_cancel_later, w, h.id, rng.uniform(0, 2.5))
                        tg.start_soon(_signal_one, w, h.id, random.Random(rng.random()))
                    elif kind == "graph":
                        fail = rng.choice(["", "", "final", "kid"])
                        picked = rng.sample(accts, k=rng.choice([2, 3]))
                        h = await client.start(graph, Order(accts=picked, fail=fail, tag=tag))
                        w.expected[h.id] = ("mix_graph", fail)
                        if rng.random() < 0.15:
                            tg.start_soon(_cancel_later, w, h.id, rng.uniform(0, 2.5))
                        tg.start_soon(_signal_children, w, h.id, random.Random(rng.random()), tg)
                    elif kind in ("timed", "fallback"):
                        d = timed if kind == "timed" else fallback
                        h = await client.start(d, Deal(tag=tag))
                        w.expected[h.id] = (d.name, "")
                        if rng.random() < 0.85:
                            tg.start_soon(_signal_timed, w, h.id, random.Random(rng.random()))
                    else:
                        fail = rng.choice(["", "", "pre", "p4"])
                        h = await client.start(deal, Deal(fail=fail, tag=tag))
                        w.expected[h.id] = ("mix_pivot", fail)
                        if rng.random() < 0.25:
                            tg.start_soon(_cancel_later, w, h.id, rng.uniform(0, 1.0))
            last_kill = max(w.kills) if w.kills else time.time()
            # No run stuck: everything ends within a bound after the last kill.
            with anyio.move_on_after(45) as settle:
                while True:
                    n = await w.q(
                        "SELECT count(*) FROM saga.runs WHERE status NOT IN"
                        " ('completed', 'compensated', 'failed', 'cancelled', 'stopped')"
                    )
                    if n[0][0] == 0:
                        break
                    await anyio.sleep(0.2)
            if settle.cancelled_caught:
                rows = await w.q(
                    "SELECT id, saga_name, status, step_name, wait_name, key_state, due_at,"
                    " lease_owner FROM saga.runs WHERE status NOT IN"
                    " ('completed', 'compensated', 'failed', 'cancelled', 'stopped')"
                )
                problems.append(
                    f"{len(rows)} runs not ended {time.time() - last_kill:.0f}s after the last"
                    f" kill: {[dict(r) for r in rows[:6]]}"
                )
            bg.cancel_scope.cancel()
        problems += await _verify(w)
    finally:
        await w.db.close()
        await client.aclose()
    print(
        f"mixed chaos: runs={len(w.expected)} kills={len(w.kills)} key samples={w.samples}"
        f" signals={sum(len(s.sends) for s in w.signals.values())}"
        f" backend_kills={w.backend_kills} {w.stats}",
        flush=True,
    )
    assert w.kills != [], "the chaos killed nobody"
    named = {rid for rid in getattr(w, "dump", {}) if any(str(rid) in p for p in problems)}
    for rid in sorted(named)[:5]:  # the histories and executions of the runs named
        problems.append(f"=== {rid}")
        problems += [
            f"  {e['id']} {e['kind']} {e['step']} {e['attempt']} {e['worker']} {e['data']}"
            for e in w.dump[rid]  # type: ignore[attr-defined]
        ]
        problems += [
            f"  exec {x['step']} {x['kind']} {x['attempt']} pid={x['pid']}"
            f" {x['t0']:.3f}-{x['t1']:.3f} {x['note']}"
            for x in w.execs[rid]  # type: ignore[attr-defined]
        ]
    assert problems == [], f"seed={seed}: {len(problems)} broken promises:\n" + "\n".join(
        problems[:200]
    )


async def _verify(w: World) -> list[str]:
    problems: list[str] = list(dict.fromkeys(w.key_violations))[:10]
    runs = {r["id"]: r for r in await w.q("SELECT * FROM saga.runs")}
    events: dict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
    for e in await w.q(
        "SELECT run_id, id, kind, step, attempt, worker, data::text AS data"
        " FROM saga.events ORDER BY run_id, id"
    ):
        events[e["run_id"]].append(e)
    execs: dict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
    for x in await w.q("SELECT * FROM mix_exec ORDER BY t0"):
        execs[x["run_id"]].append(x)
    sigrows = {r["run_id"]: r for r in await w.q("SELECT * FROM saga.signals")}

    # Expected states of the child runs, from their parents'.
    expected: dict[uuid.UUID, set[str]] = {}
    for rid, (name, fail) in w.expected.items():
        if w.cancels.get(rid) == "accepted":
            can_fail = fail in ("c3", "kid", "final", "pre")
            expected[rid] = {"cancelled", "compensated"} if can_fail else {"cancelled"}
        else:
            expected[rid] = _expected_status(name, fail)
    by_parent: dict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
    for r in runs.values():
        if r["parent_id"] is not None:
            by_parent[r["parent_id"]].append(r)
    for rid, (name, fail) in w.expected.items():
        if name != "mix_graph":
            continue
        order = Order.model_validate_json(runs[rid]["input"])
        kids_of = by_parent.get(rid, [])
        # The step's own attempts (not its undo, once the run compensates) start every
        # item's child before they wait or complete; a run cancelled while its first
        # attempt was starting them undoes those started, and starts no more (an attempt
        # after the cancel waits for those: children_waiting "of" fewer), nor does a step
        # whose last attempt's worker died (it waits for those started, then fails with
        # saga.AttemptLost).
        forward = []
        for e in events[rid]:
            if e["kind"] in ("run_compensating", "cancel_requested"):
                break
            forward.append(e)
        if any(
            e["kind"] == "step_failed"
            and e["step"] == "kids"
            and "saga.AttemptLost" in str(e["data"])
            for e in events[rid]
        ):
            forward = [e for e in forward if e["kind"] != "children_waiting"]
        reached = any(
            e["kind"] in ("step_completed", "children_waiting") and e["step"] == "kids"
            for e in forward
        )
        accts = Counter(Acct.model_validate_json(k["input"]).acct for k in kids_of)
        if (reached and len(kids_of) != len(order.accts)) or len(kids_of) > len(order.accts):
            problems.append(f"{rid}: {len(kids_of)} child runs for {len(order.accts)} items")
        if any(n > 1 for n in accts.values()) or not set(accts) <= set(order.accts):
            problems.append(f"{rid}: child runs {dict(accts)} for items {order.accts}")
        for k in kids_of:
            kin = Acct.model_validate_json(k["input"])
            if w.cancels.get(rid) == "accepted":
                expected[k["id"]] = (
                    {"cancelled", "compensated"} if kin.fail == "c3" else {"cancelled"}
                )
            elif fail == "":
                expected[k["id"]] = {"completed"}
            elif fail == "final":
                expected[k["id"]] = {"cancelled"}
            else:
                expected[k["id"]] = {"compensated"} if kin.fail == "c3" else {"cancelled"}

    for rid, exp in expected.items():
        run = runs.get(rid)
        if run is None:
            problems.append(f"{rid}: lost")
            continue
        name, status = run["saga_name"], run["status"]
        label = f"{rid} ({name}, {status})"
        if status not in exp:
            problems.append(f"{label}: expected {sorted(exp)}; error={run['error']}")
        hist = events[rid]
        kinds = [e["kind"] for e in hist]
        ends = [k for k in kinds if k in {f"run_{s}" for s in TERMINAL}]
        # A completed child undone by its parent's rollback ends cancelled after it
        # completed (documented).
        rolled_back = run["parent_id"] is not None and ends == ["run_completed", "run_cancelled"]
        if status in TERMINAL and ends != [f"run_{status}"] and not rolled_back:
            problems.append(f"{label}: terminal events {ends}")
        completed = [e["step"] for e in hist if e["kind"] == "step_completed"]
        dup = [s for s, n in Counter(completed).items() if n > 1]
        if dup:
            problems.append(f"{label}: step_completed more than once for {dup}")
        undone_events = [e for e in hist if e["kind"] == "compensation_completed"]
        undone = [e["step"] for e in undone_events]
        if [s for s, n in Counter(undone).items() if n > 1]:
            problems.append(f"{label}: compensation_completed more than once: {undone}")
        # Every recorded completion comes from an execution that ran (same attempt).
        for e in hist:
            if e["kind"] not in ("step_completed", "compensation_completed"):
                continue
            if e["step"] == "kids":
                continue
            kind = "step" if e["kind"] == "step_completed" else "compensation"
            if not any(
                x["step"] == e["step"] and x["kind"] == kind and x["attempt"] == e["attempt"]
                for x in execs[rid]
            ):
                problems.append(
                    f"{label}: {e['kind']} {e['step']} attempt {e['attempt']}"
                    " without an execution of that attempt"
                )
        if status == "completed":
            want = {
                "mix_child": ["c1", "c2", "c3"],
                "mix_graph": ["g_a", "g_b", "kids", "g_join", "g_final"],
                "mix_pivot": ["p1", "p1b", "p2", "p3", "p4"],
                "mix_timed": ["t1", "t2"],
                "mix_fallback": ["f0", "f1", "f2"],
            }[name]
            if sorted(completed) != sorted(want):
                problems.append(f"{label}: completed steps {completed}")
            if undone:
                problems.append(f"{label}: completed but undid {undone}")
        if status in ("compensated", "cancelled"):
            plan = [s for s in completed if s in COMPENSATED[name]]
            if sorted(undone) != sorted(plan):
                problems.append(f"{label}: undid {undone}, completed {completed}")
            if name == "mix_graph":
                first: dict[tuple[str, str], int] = {}
                for i, e in enumerate(hist):
                    first.setdefault((e["kind"], e["step"]), i)
                for b, deps in GRAPH_EDGES.items():
                    for a in deps:
                        done_b = first.get(("compensation_completed", b))
                        start_a = first.get(("compensation_started", a))
                        if done_b is not None and start_a is not None and start_a < done_b:
                            problems.append(f"{label}: undo of {a} started before {b}'s ended")
            elif undone != list(reversed(plan)):
                problems.append(f"{label}: undid {undone}, not reverse of {plan}")
        # Fencing: an outcome is written by the attempt holding the lease, i.e. the
        # latest start of that item (same attempt, same worker).
        latest: dict[tuple[str, str], asyncpg.Record] = {}
        for e in hist:
            if e["kind"] in ("step_started", "compensation_started"):
                latest[(e["kind"], e["step"])] = e
            elif (
                e["kind"]
                in (
                    "step_completed",
                    "step_failed",
                    "compensation_completed",
                    "compensation_failed",
                )
                and e["step"] != "kids"
            ):
                phase = "step_started" if e["kind"].startswith("step") else ("compensation_started")
                start = latest.get((phase, e["step"]))
                held = None if start is None else (start["attempt"], start["worker"])
                if held != (e["attempt"], e["worker"]):
                    problems.append(
                        f"{label}: {e['kind']} {e['step']} attempt {e['attempt']}"
                        f" by {e['worker']}, latest start {held}"
                    )
        if rid in w.cancel_at:  # no new step starts once the cancel is recorded
            # (but one whose attempt began before it and was cut short, by a killed
            # worker, runs again to its end: README, cancel())
            cut_short = _running_at_cancel(hist)
            late = [
                f"{x['step']}#{x['attempt']} +{x['t0'] - w.cancel_at[rid]:.2f}s"
                for x in execs[rid]
                if x["kind"] == "step"
                and x["t0"] > w.cancel_at[rid] + 0.6
                and x["step"] not in cut_short
            ]
            if late:
                problems.append(f"{label}: steps began after the cancel was accepted: {late}")
        if w.cancels.get(rid) == "accepted" and name == "mix_pivot" and "p2" in completed:
            problems.append(f"{label}: a cancel was accepted, yet the pivot p2 completed")
        if name == "mix_pivot" and "p2" in completed and undone:
            problems.append(f"{label}: undid {undone} after the pivot completed")
        if name == "mix_graph":
            ready = sum(1 for e in hist if e["kind"] == "step_ready" and e["step"] == "g_join")
            if ready > 1:
                problems.append(f"{label}: the join was made ready {ready} times")
            starts = [
                i
                for i, e in enumerate(hist)
                if e["kind"] == "step_started" and e["step"] == "g_join"
            ]
            if starts:
                for dep in ("g_b", "kids"):
                    done = [
                        i
                        for i, e in enumerate(hist)
                        if e["kind"] == "step_completed" and e["step"] == dep
                    ]
                    if not done or done[0] > starts[0]:
                        problems.append(f"{label}: the join started before {dep} completed")
        # Rate-limited step: delayed, never failed.
        c2_failed = [e for e in hist if e["kind"] == "step_failed" and e["step"] == "c2"]
        if c2_failed:
            problems.append(
                f"{label}: the rate-limited step failed: {[e['data'] for e in c2_failed]}"
            )
        # Signals: the accepted one is the one received, and the one c3 saw.
        if name in AFTER_WAIT:
            after_wait = AFTER_WAIT[name]
            sends = w.signals.get(rid, Sent()).sends
            accepted = [s.nonce for s in sends if s.outcome == "accepted"]
            row = sigrows.get(rid)
            got = json.loads(row["payload"])["nonce"] if row and row["payload"] else None
            if len(accepted) > 1:
                problems.append(f"{label}: {len(accepted)} sends accepted")
            if accepted and accepted[0] != got:
                problems.append(f"{label}: accepted signal {accepted[0]}, received {got}")
            if any(s.outcome == "repeat" for s in sends) and got is None:
                problems.append(f"{label}: a send was told 'repeat' but nothing was received")
            if any(s.outcome == "" for s in sends):
                problems.append(f"{label}: a send got no answer")
            seen = {
                x["note"] for x in execs[rid] if x["step"] == after_wait and x["kind"] == "step"
            }
            timed_out = "wait_timed_out" in kinds
            if name == "mix_fallback" and got is None:
                got = "timeout"
            if seen - {got}:
                problems.append(f"{label}: {after_wait} saw {seen}, received {got}")
            if accepted and timed_out:
                problems.append(
                    f"{label}: signal {accepted[0]} was accepted, yet the wait"
                    f" timed out; sends {sends}"
                )
            if name == "mix_timed" and accepted and status != "completed":
                problems.append(
                    f"{label}: signal accepted, run not completed; error {run['error']}"
                )
            if name == "mix_timed" and not accepted and status != "compensated":
                problems.append(f"{label}: no signal accepted, yet {status}")
            if status == "completed" and w.cancels.get(rid) == "accepted":
                problems.append(f"{label}: completed after an accepted cancel")
            if status == "completed" and got is None:
                problems.append(f"{label}: completed without a signal")
            if sends and not accepted and status == "completed" and name != "mix_fallback":
                problems.append(f"{label}: completed, but no send was accepted: {sends}")
    w.stats = {
        "by_status": dict(Counter(f"{r['saga_name']}:{r['status']}" for r in runs.values())),
        "lease_expired": sum(
            1 for es in events.values() for e in es if e["kind"] == "lease_expired"
        ),
        "rate_limited": sum(1 for es in events.values() for e in es if e["kind"] == "rate_limited"),
        "key_admitted": sum(1 for es in events.values() for e in es if e["kind"] == "key_admitted"),
        "re_executed_steps": sum(
            n - 1
            for xs in execs.values()
            for n in Counter((x["step"], x["kind"]) for x in xs).values()
            if n > 1
        ),
        "signal_before_wait": sum(
            1
            for r in sigrows.values()
            if r["received_at"] and r["awaited_at"] and r["received_at"] < r["awaited_at"]
        ),
        "cancels": dict(Counter(v.split(":")[0] for v in w.cancels.values())),
    }
    w.dump = {rid: events[rid] for rid in runs}  # type: ignore[attr-defined]
    w.execs = execs  # type: ignore[attr-defined]
    # No two runs of one key executed at once (executions that recorded their effect).
    by_acct: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for rows in execs.values():
        for x in rows:
            if x["acct"]:
                by_acct[x["acct"]].append(x)
    for acct, xs in by_acct.items():
        xs.sort(key=lambda x: x["t0"])
        for i, x in enumerate(xs):
            for y in xs[i + 1 :]:
                if y["t0"] >= x["t1"]:
                    break
                if y["run_id"] != x["run_id"]:
                    problems.append(
                        f"{acct}: {x['step']}/{x['kind']} of {x['run_id']} and "
                        f"{y['step']}/{y['kind']} of {y['run_id']} ran at the same time"
                    )
    return problems


def _running_at_cancel(hist: list[asyncpg.Record]) -> set[str]:
    """The steps whose attempt had begun and recorded no outcome when the run's cancel
    was recorded."""
    running: set[str] = set()
    for e in hist:
        if e["kind"] == "cancel_requested":
            break
        if e["kind"] == "step_started":
            running.add(e["step"])
        elif e["kind"] in ("step_completed", "step_failed", "sleep_started", "wait_started"):
            running.discard(e["step"])
    return running
