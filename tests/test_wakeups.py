"""No wake-up is lost: 500 runs in two real worker processes, each sent its signal at a
random moment around the time it reaches its wait (before, at the same moment, after),
with a 60 s timeout. Every run ends within seconds of its signal, none times out, none
receives two. The same while workers are SIGKILLed and restarted.

The signal's sender, the transition entering the wait and the claim deciding it each
lock the run row, then write the signal row with INSERT ... ON CONFLICT: whichever
commits second sees the other. A lost wake-up would leave a run waiting until its
timeout (60 s, then compensated); a doubled one would run ``finish`` with a second
payload. Each run's payload carries a nonce, and ``finish`` records every execution
with the nonce it saw (``wakeup_effects``), so both show.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import pytest

import saga
from tests._harness import Child, Children
from tests._wakeup_saga import EFFECTS, TIMEOUT_SECONDS, Go, Wake, wakeup
from tests.conftest import ClientFactory

RUNS = 500
#: Runs are started evenly over this window, each signalled at its own random moment.
WINDOW = 5.0
#: How long the step before the wait takes, per run: a uniform draw in this range (ms).
PREPARE_MS = (10, 250)
#: A share of the runs gets a second signal (another nonce): it must change nothing.
REPEAT_SHARE = 0.1
LEASE_SECONDS = 1.5  # the SIGKILL variant's: killed runs are taken over this fast
WORKER_OPTIONS = ("--concurrency", "32", "--poll-interval", "0.5", "--shutdown-timeout", "10")


@dataclass
class Sent:
    """One run as the test drove it."""

    run_id: uuid.UUID
    nonce: str
    repeat: str | None = None  # what a second signal got: "repeat", "ended"


def worker(children: Children, dsn: str, name: str, lease: float) -> Child:
    return children.saga_worker(
        dsn,
        "tests._wakeup_saga:wakeup",
        "--worker-id",
        name,
        "--lease-seconds",
        str(lease),
        *WORKER_OPTIONS,
        name=name,
    )


async def drive(client: saga.Client, rng: random.Random) -> list[Sent]:
    """Start RUNS runs evenly over WINDOW; each is sent its signal after a random delay
    drawn around the time its first step takes (so the signal lands before, about when,
    or after the run reaches its wait), and some a second one."""
    sent: list[Sent] = []
    t0 = anyio.current_time()

    async def one(i: int, prepare_ms: int, delay: float, repeat_delay: float | None) -> None:
        await anyio.sleep(max(0.0, t0 + WINDOW * i / RUNS - anyio.current_time()))
        run = await client.start(wakeup, Wake(n=i, prepare_ms=prepare_ms))
        item = Sent(run.id, uuid.uuid4().hex)
        sent.append(item)
        await anyio.sleep(delay)
        assert await client.signal(run.id, "go", Go(nonce=item.nonce)) is True
        if repeat_delay is not None:
            await anyio.sleep(repeat_delay)
            try:
                accepted = await client.signal(run.id, "go", Go(nonce="second-" + item.nonce))
            except saga.InvalidRunStateError as exc:
                item.repeat = "ended" if "has ended" in str(exc) else str(exc)
            else:
                assert accepted is False, "a second signal was accepted"
                item.repeat = "repeat"

    async with anyio.create_task_group() as tg:
        for i in range(RUNS):
            prepare_ms = rng.randint(*PREPARE_MS)
            # Claiming takes some ms, then the step prepare_ms: the run reaches its wait
            # near prepare_ms after its start. The delay straddles that moment.
            delay = rng.uniform(0, 2 * prepare_ms / 1000 + 0.1)
            # A second signal at once (the run is rarely done) or a little later.
            repeat = rng.choice([0.0, rng.uniform(0, 0.3)])
            tg.start_soon(
                one, i, prepare_ms, delay, repeat if rng.random() < REPEAT_SHARE else None
            )
    return sent


async def until_ended(db: asyncpg.Connection, runs: int, timeout: float) -> None:
    """Wait until ``runs`` runs ended (or the deadline: the check then says which not)."""
    with anyio.move_on_after(timeout):
        while (  # noqa: ASYNC110 - polling the database
            await db.fetchval("SELECT count(*) FROM saga.runs WHERE finished_at IS NOT NULL") < runs
        ):
            await anyio.sleep(0.2)


def _stats(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"median {statistics.median(ordered):.3f} s, p99 {p99:.3f} s, max {ordered[-1]:.3f} s"


async def check(
    db: asyncpg.Connection, sent: list[Sent], bound: float, finish_runs_once: bool
) -> dict[str, Any]:
    """Every run completed with its own nonce, woke once, never timed out, ended within
    ``bound`` seconds of its signal; returns the figures."""
    by_id = {s.run_id: s for s in sent}
    assert len(by_id) == RUNS
    runs = {r["id"]: r for r in await db.fetch("SELECT * FROM saga.runs")}
    signals = {
        r["run_id"]: r
        for r in await db.fetch("SELECT * FROM saga.signals")  # one per run: one wait
    }
    kinds: dict[uuid.UUID, Counter[str]] = defaultdict(Counter)
    refusals: list[tuple[uuid.UUID, Any]] = []
    for e in await db.fetch("SELECT run_id, kind, data::text AS data FROM saga.events"):
        kinds[e["run_id"]][e["kind"]] += 1
        if e["kind"] == "signal_refused":
            refusals.append((e["run_id"], json.loads(e["data"])))
    effects: dict[uuid.UUID, list[str]] = defaultdict(list)
    for x in await db.fetch("SELECT run_id, nonce FROM wakeup_effects"):
        effects[x["run_id"]].append(x["nonce"])

    not_completed = {rid: r["status"] for rid, r in runs.items() if r["status"] != "completed"}
    assert set(runs) == set(by_id)
    assert not not_completed, (
        f"{len(not_completed)} runs did not complete ({Counter(not_completed.values())}), "
        f"e.g. {list(not_completed)[:5]}"
    )
    problems: list[str] = []
    latency: list[float] = []
    wake: list[float] = []
    before = after = close = 0
    for rid, item in by_id.items():
        run, sig, seen = runs[rid], signals[rid], kinds[rid]
        if json.loads(run["output"]) != item.nonce:
            problems.append(f"{rid}: output {run['output']}, sent {item.nonce}")
        if json.loads(sig["payload"]) != {"nonce": item.nonce}:
            problems.append(f"{rid}: signal row holds {sig['payload']}")
        once = {"wait_started": 1, "signal_received": 1, "woke": 1, "wait_timed_out": 0}
        if {k: seen[k] for k in once} != once:
            problems.append(f"{rid}: history {dict(seen)}")
        if set(effects[rid]) != {item.nonce}:
            problems.append(f"{rid}: finish saw {effects[rid]}, sent {item.nonce}")
        if finish_runs_once and len(effects[rid]) != 1:
            problems.append(f"{rid}: finish ran {len(effects[rid])} times")
        latency.append((run["finished_at"] - sig["received_at"]).total_seconds())
        both = max(sig["received_at"], sig["awaited_at"])
        wake.append((run["finished_at"] - both).total_seconds())
        gap = (sig["received_at"] - sig["awaited_at"]).total_seconds()
        before += gap < 0
        after += gap >= 0
        close += abs(gap) < 0.01
    # A second signal is refused, recorded only once the run had ended.
    repeats = Counter(s.repeat for s in sent if s.repeat)
    assert set(repeats) <= {"repeat", "ended"}, repeats
    assert all(data == {"signal": "go", "reason": "ended"} for _, data in refusals), refusals
    assert len(refusals) == repeats["ended"]
    assert problems == [], f"{len(problems)} problems, e.g. {problems[:10]}"
    slow = sorted(latency)[-5:]
    assert max(latency) <= bound, f"signal -> end over {bound} s: slowest {slow}"
    # The premise: the signals really did land on both sides of the wait.
    assert before >= RUNS // 10, (before, after)
    assert after >= RUNS // 10, (before, after)
    return {
        "signal_to_end": _stats(latency),
        "wait_and_signal_to_end": _stats(wake),
        "signal_before_wait": before,
        "signal_after_wait": after,
        "within_10ms_of_wait": close,
        "second_signals": dict(repeats),
        "finish_executions": sum(map(len, effects.values())),
    }


def report(title: str, figures: dict[str, Any], began: float) -> None:
    print(f"\n{title} ({time.monotonic() - began:.1f} s):")
    for name, value in figures.items():
        print(f"  {name}: {value}")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_500_signals_racing_their_waits_each_wake_their_run_once(
    dsn: str, db: asyncpg.Connection, open_client: ClientFactory, children: Children
) -> None:
    """500 runs across 2 `saga worker` processes, each signalled at a random moment
    before, about when or after it reaches its 60 s wait: every run completes (none
    times out) within 5 s of its signal, its wait woke once with the payload sent (the
    per-run nonce round-trips to the step after the wait, which ran once), and a second
    signal is a repeat (False) or refused once the run ended, changing nothing."""
    assert TIMEOUT_SECONDS > 30 + WINDOW  # a lost wake-up cannot hide behind its timeout
    began = time.monotonic()
    seed = random.SystemRandom().randrange(2**31)
    print(f"\nwakeups: seed={seed}")
    await db.execute(EFFECTS)
    workers = [worker(children, dsn, f"w{i}", 30.0) for i in range(2)]
    for w in workers:
        await w.wait_ready(timeout=30)
    client = await open_client(wakeup)
    sent = await drive(client, random.Random(seed))
    await until_ended(db, RUNS, timeout=30)
    figures = await check(db, sent, bound=5.0, finish_runs_once=True)
    report(f"{RUNS} runs, 2 workers", figures, began)
    for w in workers:
        assert await w.stop(timeout=30) == 0, w.output[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_500_signals_racing_their_waits_while_workers_are_sigkilled(
    dsn: str, db: asyncpg.Connection, open_client: ClientFactory, children: Children
) -> None:
    """The same 500 runs while one of the 2 worker processes is SIGKILLed three times
    during the signals (and replaced; leases of 1.5 s): every run completes, none times
    out, each within lease + 5 s of its signal; each woke once, and every execution of
    the step after the wait (a killed one is executed again) saw the payload sent."""
    began = time.monotonic()
    seed = random.SystemRandom().randrange(2**31)
    print(f"\nwakeups under SIGKILL: seed={seed}")
    rng = random.Random(f"kills-{seed}")  # the runs draw from their own stream
    await db.execute(EFFECTS)
    workers = [worker(children, dsn, f"w{i}", LEASE_SECONDS) for i in range(2)]
    for w in workers:
        await w.wait_ready(timeout=30)
    client = await open_client(wakeup)
    kills: list[str] = []

    async def kill_and_replace() -> None:
        for k in range(3):
            await anyio.sleep(WINDOW / 4 + rng.uniform(-0.3, 0.3))
            victim = max(
                (w for w in workers if w.alive), key=lambda w: "ready: " in w.output
            )  # a ready one, so that it really held work
            victim.kill()
            kills.append(victim.log.stem)
            workers.remove(victim)
            workers.append(worker(children, dsn, f"w{2 + k}", LEASE_SECONDS))

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_and_replace)
        sent = await drive(client, random.Random(seed))
    await until_ended(db, RUNS, timeout=30)
    killed_runs = await db.fetchval(
        "SELECT count(DISTINCT run_id) FROM saga.events WHERE kind = 'lease_expired'"
    )
    figures = await check(db, sent, bound=LEASE_SECONDS + 5.0, finish_runs_once=False)
    report(
        f"{RUNS} runs, 2 workers, {len(kills)} SIGKILLs",
        {**figures, "killed": kills, "runs_taken_over_after_a_kill": killed_runs},
        began,
    )
    assert len(kills) == 3
    assert killed_runs > 0  # the premise: the kills hit runs in flight
    for w in workers:
        await w.wait_ready(timeout=30)
        assert await w.stop(timeout=30) == 0, w.output[-3000:]
