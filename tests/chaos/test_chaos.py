"""The chaos suite: several worker processes on one database, while the test SIGKILLs
and SIGSTOPs workers, terminates their backend connections and restarts PostgreSQL; at
the end every run ended exactly once, correctly, and no fenced-out write got through.

Size via the environment (``bash scripts/chaos.sh`` runs the full size):

- ``SAGA_CHAOS_RUNS``: runs to start (default 200, the CI size; full size >= 500)
- ``SAGA_CHAOS_WORKERS``: worker processes alive at any time (default 3, at least 3)
- ``SAGA_CHAOS_SEED``: the seed of everything random here (default: random; always
  printed, with the summary, so a failure can be replayed)
- ``SAGA_CHAOS_REPORT``: also write the summary JSON to this path

A share of the runs sleep, then wait for a signal that a signaller sends at a random
moment, twice, or never (``waits.py``). The worker processes and the chaos itself are in
``rig.py``, the invariants checked at the end in ``checks.py`` (and ``waits.py`` for the
waiting runs), the workers' program in ``worker.py``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from tests._harness import Server
from tests.chaos.checks import Started, check
from tests.chaos.rig import CONNECTION_ERRORS, Rig
from tests.chaos.sagas import LEDGER_DDL, WAIT_SAGA, ChaosInput, build_sagas
from tests.chaos.waits import draw_plan, signaller
from tests.chaos.worker import LEASE_SECONDS

RUNS = int(os.environ.get("SAGA_CHAOS_RUNS", "200"))
WORKERS = int(os.environ.get("SAGA_CHAOS_WORKERS", "3"))
_SEED_ENV = os.environ.get("SAGA_CHAOS_SEED", "")
# Generous on purpose: the test has its own deadlines; this only stops a hang.
TIMEOUT = 300 + 2 * RUNS

PERMANENT_COMPENSATION = "tests.chaos.sagas.ChaosPermanent"
WAIT_SHARE = 0.3  # of the runs: runs of chaos_wait (a sleep, then a wait for a signal)
# The faults each worker process injects through saga.testing (see worker.py).
FIRST_WORKER_FAULTS = {
    "expire_lease": {"s2": 2, "s3": 1},
    "crash_after": {"s3": 1},
    "crash_after_compensation": {"s1": 1},
    "drop_connection_committed": {"s1": 1},
    "drop_connection_uncommitted": {"s2": 1},
}
REPLACEMENT_FAULTS = {"expire_lease": {"s2": 1}}


def _seed() -> int:
    return int(_SEED_ENV) if _SEED_ENV else random.SystemRandom().randrange(2**31)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")


def _run_input(rng: random.Random) -> ChaosInput:
    profile = rng.random()
    if profile < 0.35:  # smooth: only transient failures
        p_transient, p_permanent = 0.15, 0.0
    elif profile < 0.75:  # bumpy
        p_transient, p_permanent = 0.3, 0.06
    else:  # doomed: most of these roll back
        p_transient, p_permanent = 0.2, 0.3
    return ChaosInput(
        seed=rng.randrange(2**62),
        p_transient=p_transient,
        p_permanent=p_permanent,
        p_comp_transient=0.25,
        p_comp_permanent=0.04,
        p_long=0.01,
        max_sleep_ms=80,
    )


def _schedule(rng: random.Random, window: float) -> list[tuple[float, str]]:
    """Chaos actions over the start window: at least one Postgres restart and two of each
    other kind, then random ones, about one every 2 s."""
    restarts = max(1, RUNS // 400)
    actions = ["restart"] * restarts + ["kill", "stop", "backends"] * 2
    slots = max(len(actions), int(window / 2.0))
    actions += rng.choices(["kill", "stop", "backends"], k=slots - len(actions))
    rng.shuffle(actions)
    return [(window * (i + 0.5) / slots + rng.uniform(-0.4, 0.4), a) for i, a in enumerate(actions)]


@pytest.mark.chaos
@pytest.mark.timeout(TIMEOUT)
async def test_chaos(dsn: str, tmp_path: Path, pg_server: Server) -> None:
    """Under SIGKILLed and SIGSTOPped workers, terminated backends and Postgres restarts,
    with random transient and permanent failures in steps and compensations: every run
    ends in exactly one terminal state, completed runs recorded each step once,
    compensated runs undid exactly their completed steps newest first, no write of a
    fenced-out attempt was committed (while such writes were attempted and refused), the
    external ledger's net effects match the outcomes, and no lease, advisory lock or open
    transaction is left behind. Runs that sleep and wait for a signal sent before,
    around or after the wait (or twice, or never) received at most one signal, the one
    a send was told was accepted; a signalled run never timed out, a timed-out one never
    ran the step after its wait, and that step only ever saw the payload received."""
    if WORKERS < 3:
        pytest.fail(f"SAGA_CHAOS_WORKERS must be at least 3, got {WORKERS}")
    seed = _seed()
    print(f"\nchaos: seed={seed} runs={RUNS} workers={WORKERS} logs={tmp_path}", flush=True)
    # Separate streams, so that the runs drawn do not depend on how the chaos interleaves.
    rng = random.Random(f"runs-{seed}")
    began = time.monotonic()
    rig = Rig(dsn, tmp_path, seed, random.Random(f"chaos-{seed}"), pg_server)
    sagas = build_sagas(seed)
    by_name = {s.name: s for s in sagas}
    started: dict[UUID, Started] = {}
    try:
        # Acknowledged commits must survive an immediate restart (the cluster is off).
        await pg_server.make_durable(dsn)
        setup = await asyncpg.connect(dsn)
        try:
            await setup.execute(LEDGER_DDL)
        finally:
            await setup.close()
        for i in range(WORKERS):
            rig.spawn(FIRST_WORKER_FAULTS if i < 3 else REPLACEMENT_FAULTS)
        with capture_logs():  # the client's own logs: not this test's subject
            async with saga.Client(dsn, sagas=sagas, poll_interval=0.2) as client:
                await _drive(rig, client, sagas, started, rng)
                settled = await _settle(rig, client, started)
                leftovers = await rig.leftovers() if settled else {}
                leftovers.pop("present", None)  # the open workers' presence: theirs
        await rig.stop_workers()
        after_stop = await rig.leftovers()
        await rig.close_admin()
        report = await check(rig, by_name, started)
    finally:
        await rig.close_admin()
        rig.cleanup()
    violations: list[str] = report.pop("violations")
    violating_runs: list[str] = report.pop("violating_runs")
    if not settled:
        violations.insert(0, "not every run reached a terminal state before the deadline")
    for name, value in {
        **leftovers,
        **{f"{k} after stop": v for k, v in after_stop.items()},
    }.items():
        if value:
            violations.append(f"{name}: {value}")
    if rig.stats.unexpected_exits:
        violations.append(f"workers exited unexpectedly: {rig.stats.unexpected_exits}")
    summary = {
        "seed": seed,
        "runs": len(started),
        **report,
        "workers": {"concurrent": WORKERS, "spawned": len(rig.workers)},
        "kills": len(rig.stats.kills),
        "stops": len(rig.stats.stops),
        "postgres_restarts": len(rig.stats.restarts),
        "backend_kills": {
            "rounds": rig.stats.backend_kill_rounds,
            "backends": rig.stats.backends_killed,
        },
        "operator_retries": rig.stats.operator_retries,
        "cancels_requested": rig.stats.cancels,
        "start_retries": rig.stats.start_retries,
        "leftovers": {**leftovers, **{f"{k}_after_stop": v for k, v in after_stop.items()}},
        "duration_s": round(time.monotonic() - began, 1),
        "logs": str(tmp_path),
        "violations": violations[:50],
    }
    if violations:
        print(f"\nruns behind the violations (all notable runs: {tmp_path}/notable_runs.txt):")
        print("\n\n".join(violating_runs[:5]))
    print("\n==================== chaos summary ====================")
    print(json.dumps(summary, indent=2, sort_keys=True))
    print("=======================================================", flush=True)
    _write_json(tmp_path / "chaos_summary.json", summary)
    if os.environ.get("SAGA_CHAOS_REPORT"):
        _write_json(Path(os.environ["SAGA_CHAOS_REPORT"]), summary)

    assert violations == [], f"seed={seed}: {len(violations)} violations, e.g. {violations[:10]}"
    assert summary["lost"] == 0
    assert summary["double_committed"] == 0
    assert summary["logs_by_event"]["stale_write_refused"] > 0, "fencing was never exercised"
    assert len(rig.stats.restarts) >= 1
    assert len(rig.stats.kills) >= 2
    assert len(rig.stats.stops) >= 2
    assert rig.stats.backends_killed >= 1
    by_state = summary["by_state"]
    assert by_state.get("completed", 0) > 0, by_state
    assert by_state.get("compensated", 0) > 0, by_state
    waits = summary["waits"]  # every path of a wait was taken
    for plan in ("never", "late"):  # timed out
        assert waits["by_plan"].get(plan, {}).get("compensated", 0) > 0, waits
    for plan in ("before", "later", "waiting"):
        assert waits["by_plan"].get(plan, {}).get("completed", 0) > 0, waits
    assert waits["timed_out"] > 0, waits
    assert waits["sends"].get("repeat", 0) + waits["sends"].get("ended", 0) > 0, waits
    assert waits["signal_before_wait"] > 0, waits
    assert waits["signal_after_wait"] > 0, waits


async def _drive(
    rig: Rig,
    client: saga.Client,
    sagas: list[saga.Saga[ChaosInput]],
    started: dict[UUID, Started],
    rng: random.Random,
) -> None:
    """Start the runs over a window while the chaos schedule runs, then wait for the
    chaos to end (every stopped worker continued)."""
    await rig.wait_ready(rig.workers)
    window = max(20.0, RUNS * 0.1)
    schedule = _schedule(rig.rng, window)
    async with anyio.create_task_group() as background:
        background.start_soon(_operator, rig, client)
        background.start_soon(_replace_crashed, rig)
        async with anyio.create_task_group() as work:
            work.start_soon(_start_runs, rig, client, sagas, started, rng, window, work)
            work.start_soon(_chaos, rig, schedule, work)
        background.cancel_scope.cancel()


async def _replace_crashed(rig: Rig) -> None:
    while True:
        for _ in rig.reap_unexpected():
            rig.spawn(REPLACEMENT_FAULTS)
        await anyio.sleep(0.3)


async def _start_runs(
    rig: Rig,
    client: saga.Client,
    sagas: list[saga.Saga[ChaosInput]],
    started: dict[UUID, Started],
    rng: random.Random,
    window: float,
    tg: Any,
) -> None:
    by_name = {s.name: s for s in sagas}
    plain = [s for s in sagas if s.name != WAIT_SAGA]
    t0 = anyio.current_time()
    for i in range(RUNS):
        await anyio.sleep(max(0.0, t0 + window * i / RUNS - anyio.current_time()))
        waits = rng.random() < WAIT_SHARE
        definition = by_name[WAIT_SAGA] if waits else rng.choice(plain)
        plan = draw_plan(rng) if waits else None
        inp = _run_input(rng)
        key = f"chaos-{rig.seed}-{i}"
        while True:  # a start that broke mid-restart is repeated with the same key
            try:
                handle = await client.start(definition, inp, key=key)
                break
            except saga.DatabaseError:
                rig.stats.start_retries += 1
                await anyio.sleep(0.2)
        started[handle.id] = Started(handle.id, definition.name, key, inp, plan)
        if plan is not None:
            tg.start_soon(signaller, rig, client, handle.id, plan)
        if rng.random() < 0.04:
            tg.start_soon(_cancel_later, rig, handle, rng.uniform(0, 0.6))


async def _cancel_later(rig: Rig, handle: saga.RunHandle, delay: float) -> None:
    await anyio.sleep(delay)
    for _ in range(100):
        try:
            await handle.cancel()
        except saga.InvalidRunStateError:
            return  # it ended first
        except saga.DatabaseError:
            await anyio.sleep(0.3)
            continue
        rig.stats.cancels += 1
        return


async def _operator(rig: Rig, client: saga.Client) -> None:
    """Retry runs whose compensation failed on purpose (ChaosPermanent), as an operator
    would; runs failed for another reason are left failed (and checked later)."""
    while True:
        await anyio.sleep(0.5)
        try:
            rows = await rig.query(
                "SELECT id FROM saga.runs WHERE status = 'failed'"
                " AND compensation_error->>'type' = $1",
                PERMANENT_COMPENSATION,
            )
            for row in rows:
                await client.get_run(row["id"]).retry()
                rig.stats.operator_retries += 1
        except (saga.DatabaseError, saga.InvalidRunStateError, *CONNECTION_ERRORS):
            continue


async def _chaos(rig: Rig, schedule: list[tuple[float, str]], tg: Any) -> None:
    t0 = anyio.current_time()
    for at, action in schedule:
        await anyio.sleep(max(0.0, t0 + at - anyio.current_time()))
        if action == "restart":
            await rig.restart_postgres()
        elif action == "backends":
            await rig.kill_backends()
        elif action == "kill":
            victim = rig.rng.choice(rig.alive())
            rig.kill(victim)
            rig.spawn(REPLACEMENT_FAULTS)
        elif action == "stop":
            # Keep at least two workers making progress: wait for an earlier stall to end.
            with anyio.move_on_after(15):
                while len(rig.running()) < 3:  # noqa: ASYNC110 - polling the children
                    await anyio.sleep(0.1)
            candidates = rig.running()
            if len(candidates) >= 3:
                seconds = LEASE_SECONDS * rig.rng.uniform(1.7, 3.0)
                tg.start_soon(rig.stall, rig.rng.choice(candidates), seconds)


async def _settle(rig: Rig, client: saga.Client, started: dict[UUID, Started]) -> bool:
    """Wait until every run is terminal and no failed run awaits the operator."""
    deadline = time.monotonic() + 120 + RUNS * 0.1
    async with anyio.create_task_group() as tg:
        tg.start_soon(_operator, rig, client)
        try:
            while time.monotonic() < deadline:
                rows = await rig.query(
                    "SELECT count(*) FILTER (WHERE status NOT IN"
                    "   ('completed', 'compensated', 'failed', 'cancelled')) AS active,"
                    " count(*) FILTER (WHERE status = 'failed'"
                    "   AND compensation_error->>'type' = $1) AS awaiting_operator,"
                    " count(*) AS total FROM saga.runs",
                    PERMANENT_COMPENSATION,
                )
                row = rows[0]
                done = row["total"] >= len(started) and not row["active"]
                if done and not row["awaiting_operator"]:
                    return True
                for _ in rig.reap_unexpected():
                    rig.spawn(REPLACEMENT_FAULTS)
                await anyio.sleep(0.3)
            return False
        finally:
            tg.cancel_scope.cancel()
