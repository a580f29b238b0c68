"""The chaos suite: several worker processes on one database, while the test SIGKILLs
and SIGSTOPs workers, terminates their backend connections and restarts PostgreSQL; at
the end every run ended exactly once, correctly, and no fenced-out write got through.

Size via the environment (``bash scripts/chaos.sh`` runs the full size):

- ``SAGA_CHAOS_RUNS``: runs to start (default 200, the CI size; full size >= 500)
- ``SAGA_CHAOS_WORKERS``: worker processes alive at any time (default 3, at least 3)
- ``SAGA_CHAOS_SEED``: the seed of everything random here (default: random; always
  printed, with the summary, so a failure can be replayed)
- ``SAGA_CHAOS_REPORT``: also write the summary JSON to this path
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from tests.chaos.sagas import LEDGER_DDL, ChaosInput, build_sagas, describe

RUNS = int(os.environ.get("SAGA_CHAOS_RUNS", "200"))
WORKERS = int(os.environ.get("SAGA_CHAOS_WORKERS", "3"))
_SEED_ENV = os.environ.get("SAGA_CHAOS_SEED", "")
LEASE_SECONDS = 1.5  # as in tests/chaos/worker.py
# Generous on purpose: the test has its own deadlines; this only stops a hang.
TIMEOUT = 300 + 2 * RUNS

REPO_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("completed", "compensated", "failed", "cancelled")
TERMINAL_EVENTS = {f"run_{s}" for s in TERMINAL}
OUTCOME_EVENTS = {
    "step_completed": "step_started",
    "step_failed": "step_started",
    "compensation_completed": "compensation_started",
    "compensation_failed": "compensation_started",
}
PERMANENT_COMPENSATION = "tests.chaos.sagas.ChaosPermanent"
LOG_COUNTERS = (
    "stale_write_refused",
    "step_cancelled_lease_lost",
    "compensation_cancelled_lease_lost",
    "lease_expired",
    "lease_lost",
    "simulated_crash",
    "ambiguous_commit_resolved",
    "database_unavailable",
    "database_available",
    "internal_error",
    "orchestrator_crashed",
)
# The faults each worker process injects through saga.testing (see worker.py).
FIRST_WORKER_FAULTS = {
    "expire_lease": {"s2": 2, "s3": 1},
    "crash_after": {"s3": 1},
    "crash_after_compensation": {"s1": 1},
    "drop_connection_committed": {"s1": 1},
    "drop_connection_uncommitted": {"s2": 1},
}
REPLACEMENT_FAULTS = {"expire_lease": {"s2": 1}}
# Once a saga bug (fixed): a cancelled run's compensation attempts had no
# compensation_started event. Kept as a switch so a regression can be triaged quickly.
TOLERATE_MISSING_COMPENSATION_STARTS_AFTER_CANCEL = False
CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


def _seed() -> int:
    return int(_SEED_ENV) if _SEED_ENV else random.SystemRandom().randrange(2**31)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    output: Any  # the file its stdout/stderr go to
    stopped: bool = False
    killed: bool = False


@dataclass
class Started:
    run_id: UUID
    saga: str
    key: str
    input: ChaosInput


@dataclass
class Stats:
    kills: list[tuple[float, str]] = field(default_factory=list)
    stops: list[tuple[str, float, float]] = field(default_factory=list)  # worker, from, to
    restarts: list[tuple[float, float]] = field(default_factory=list)
    backend_kill_rounds: int = 0
    backends_killed: int = 0
    operator_retries: int = 0
    cancels: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    start_retries: int = 0


def _pdeathsig() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None


_PRCTL = _pdeathsig()  # looked up here: the child between fork and exec only calls it


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it if this test process dies, so that no
    worker outlives a test run that was itself killed."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Rig:
    """The worker processes and the chaos done to them and to the database."""

    def __init__(self, dsn: str, tmp: Path, seed: int, rng: random.Random) -> None:
        self.dsn = dsn
        self.tmp = tmp
        self.seed = seed
        self.rng = rng
        self.workers: list[Worker] = []
        self.stats = Stats()
        self.database = urlsplit(dsn).path.lstrip("/")
        self._admin: asyncpg.Connection | None = None
        self._lock = anyio.Lock()

    # -- processes (sync: starting and signalling are instant) --------------------------

    def spawn(self, faults: dict[str, dict[str, int]]) -> Worker:
        name = f"w{len(self.workers)}"
        log = self.tmp / f"{name}.jsonl"
        output = (self.tmp / f"{name}.out").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.chaos.worker",
                self.dsn,
                name,
                str(self.seed),
                str(log),
                json.dumps(faults),
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        worker = Worker(name, proc, log, output)
        self.workers.append(worker)
        return worker

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def running(self) -> list[Worker]:
        return [w for w in self.alive() if not w.stopped]

    def kill(self, worker: Worker) -> None:
        worker.killed = True
        self.stats.kills.append((time.time(), worker.name))
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)  # instant after SIGKILL, even for a stopped process

    def reap_unexpected(self) -> list[Worker]:
        """Workers that exited without being told to (a crash): recorded, replaced."""
        dead = [
            w for w in self.workers if not w.killed and w.proc.poll() is not None and not w.stopped
        ]
        for w in dead:
            w.killed = True  # handled
            self.stats.unexpected_exits.append(f"{w.name} rc={w.proc.returncode}")
        return dead

    def cleanup(self) -> None:
        """Leave nothing running: continue, kill and reap every child still alive."""
        for w in self.workers:
            if w.proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):  # raced with its exit
                        w.proc.send_signal(sig)
            try:
                w.proc.wait(timeout=10)
            finally:
                w.output.close()

    # -- chaos ------------------------------------------------------------------------

    async def admin(self) -> asyncpg.Connection:
        if self._admin is None or self._admin.is_closed():
            self._admin = await asyncpg.connect(self.dsn)
        return self._admin

    async def query(self, sql: str, *args: object, deadline: float = 90) -> list[asyncpg.Record]:
        """A read through connection losses (this connection may be a chaos victim too)."""
        end = time.monotonic() + deadline
        while True:
            try:
                async with self._lock:  # one connection, shared by the test's tasks
                    conn = await self.admin()
                    return await conn.fetch(sql, *args)
            except CONNECTION_ERRORS:
                if self._admin is not None:
                    self._admin.terminate()
                    self._admin = None
                if time.monotonic() > end:
                    raise
                await anyio.sleep(0.2)

    async def close_admin(self) -> None:
        if self._admin is not None and not self._admin.is_closed():
            await self._admin.close()
        self._admin = None

    async def stall(self, worker: Worker, seconds: float) -> None:
        """SIGSTOP for longer than the lease, then SIGCONT: its work is taken over."""
        worker.stopped = True
        began = time.time()
        worker.proc.send_signal(signal.SIGSTOP)
        try:
            await anyio.sleep(seconds)
        finally:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGCONT)
            worker.stopped = False
            self.stats.stops.append((worker.name, began, time.time()))

    async def kill_backends(self) -> None:
        rows = await self.query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        pids = [r["pid"] for r in rows]
        if not pids:
            return
        victims = self.rng.sample(pids, k=max(1, int(len(pids) * self.rng.uniform(0.3, 0.7))))
        killed = await self.query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n"
            " FROM unnest($1::int[]) AS pid",
            victims,
        )
        self.stats.backend_kill_rounds += 1
        self.stats.backends_killed += killed[0]["n"]

    async def restart_postgres(self) -> None:
        pg_ctl, pgdata = os.environ["SAGA_TEST_PGCTL"], os.environ["SAGA_TEST_PGDATA"]
        # -l is required: without a log file the new postmaster keeps our pipes open.
        log = os.path.join(os.path.dirname(pgdata), "restart.log")
        began = time.time()
        result = await anyio.run_process(
            [pg_ctl, "-D", pgdata, "-m", "immediate", "-w", "-t", "60", "-l", log, "restart"],
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        self.stats.restarts.append((began, time.time()))
        if self._admin is not None:  # dead; the next query reconnects
            self._admin.terminate()
            self._admin = None


def _read_logs(workers: list[Worker]) -> list[dict[str, Any]]:
    entries = []
    for w in workers:
        if not w.log.exists():
            continue
        for line in w.log.read_text("utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed worker may be cut
                continue
    return entries


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, "utf-8")


def _describe_run(
    run: asyncpg.Record,
    history: list[asyncpg.Record],
    execs: list[asyncpg.Record],
    problems: list[str],
) -> str:
    lines = [f"run {run['id']} {run['saga_name']} {run['status']}"]
    lines += [f"  ! {p}" for p in problems]
    lines += [
        f"  {e['id']:>7} {e['kind']:<24} {e['step'] or '':<4} {e['attempt'] or '':<3}"
        f" {e['worker'] or ''} {e['data'] or ''}"
        for e in history
    ]
    lines += [
        f"  exec {x['at']:%H:%M:%S.%f} {x['kind']:<12} {x['step']:<4} {x['attempt']:<3}"
        f" {x['worker']:<4} {x['action']:<14} {x['outcome']}"
        for x in execs
    ]
    return "\n".join(lines)


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


def _percentiles(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0}
    return {
        "samples": len(samples),
        "median_s": round(statistics.median(samples), 3),
        "max_s": round(max(samples), 3),
    }


@pytest.mark.chaos
@pytest.mark.timeout(TIMEOUT)
async def test_chaos(dsn: str, tmp_path: Path) -> None:
    """Under SIGKILLed and SIGSTOPped workers, terminated backends and Postgres restarts,
    with random transient and permanent failures in steps and compensations: every run
    ends in exactly one terminal state, completed runs recorded each step once,
    compensated runs undid exactly their completed steps newest first, no write of a
    fenced-out attempt was committed (while such writes were attempted and refused), the
    external ledger's net effects match the outcomes, and no lease, advisory lock or open
    transaction is left behind."""
    if not (os.environ.get("SAGA_TEST_PGCTL") and os.environ.get("SAGA_TEST_PGDATA")):
        pytest.skip("needs the server control of scripts/test.sh (SAGA_TEST_PGCTL/PGDATA)")
    if WORKERS < 3:
        pytest.fail(f"SAGA_CHAOS_WORKERS must be at least 3, got {WORKERS}")
    seed = _seed()
    print(f"\nchaos: seed={seed} runs={RUNS} workers={WORKERS} logs={tmp_path}", flush=True)
    # Separate streams, so that the runs drawn do not depend on how the chaos interleaves.
    rng = random.Random(f"runs-{seed}")
    began = time.monotonic()
    rig = Rig(dsn, tmp_path, seed, random.Random(f"chaos-{seed}"))
    sagas = build_sagas(seed)
    by_name = {s.name: s for s in sagas}
    started: dict[UUID, Started] = {}
    try:
        setup = await asyncpg.connect(dsn)
        try:
            # Acknowledged commits must survive an immediate restart (the cluster is off).
            await setup.execute(f"ALTER DATABASE {rig.database} SET synchronous_commit = on")
            await setup.execute(LEDGER_DDL)
        finally:
            await setup.close()
        for i in range(WORKERS):
            rig.spawn(FIRST_WORKER_FAULTS if i < 3 else REPLACEMENT_FAULTS)
        with capture_logs():  # the client's own logs: not this test's subject
            async with saga.Orchestrator(
                dsn, sagas=sagas, concurrency=0, poll_interval=0.2
            ) as client:
                await _drive(rig, client, sagas, started, rng)
                settled = await _settle(rig, client, started)
                leftovers = await _leftovers(rig) if settled else {}
        await _stop_workers(rig)
        after_stop = await _leftovers(rig)
        await rig.close_admin()
        report = await _check(rig, by_name, started)
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


async def _drive(
    rig: Rig,
    client: saga.Orchestrator,
    sagas: list[saga.Saga[ChaosInput]],
    started: dict[UUID, Started],
    rng: random.Random,
) -> None:
    """Start the runs over a window while the chaos schedule runs, then wait for the
    chaos to end (every stopped worker continued)."""
    await _wait_ready(rig, rig.workers)
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


async def _wait_ready(rig: Rig, workers: list[Worker]) -> None:
    with anyio.fail_after(60):
        while True:
            ready = {e["proc"] for e in _read_logs(workers) if e["event"] == "chaos_worker_ready"}
            if all(w.name in ready for w in workers):
                return
            for w in workers:
                assert w.proc.poll() is None, f"worker {w.name} died at startup: see {w.log}"
            await anyio.sleep(0.1)


async def _start_runs(
    rig: Rig,
    client: saga.Orchestrator,
    sagas: list[saga.Saga[ChaosInput]],
    started: dict[UUID, Started],
    rng: random.Random,
    window: float,
    tg: Any,
) -> None:
    t0 = anyio.current_time()
    for i in range(RUNS):
        await anyio.sleep(max(0.0, t0 + window * i / RUNS - anyio.current_time()))
        definition = rng.choice(sagas)
        inp = _run_input(rng)
        key = f"chaos-{rig.seed}-{i}"
        while True:  # a start that broke mid-restart is repeated with the same key
            try:
                handle = await client.start(definition, inp, key=key)
                break
            except saga.DatabaseError:
                rig.stats.start_retries += 1
                await anyio.sleep(0.2)
        started[handle.id] = Started(handle.id, definition.name, key, inp)
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


async def _operator(rig: Rig, client: saga.Orchestrator) -> None:
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


async def _settle(rig: Rig, client: saga.Orchestrator, started: dict[UUID, Started]) -> bool:
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


async def _leftovers(rig: Rig) -> dict[str, int]:
    """Leases, advisory locks and open transactions left in the test database."""
    row = (
        await rig.query(
            "SELECT"
            " (SELECT count(*) FROM saga.runs WHERE lease_owner IS NOT NULL) AS leases,"
            " (SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            "   WHERE l.locktype = 'advisory' AND d.datname = current_database())"
            "   AS advisory_locks,"
            " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            "   AND state LIKE 'idle in transaction%') AS idle_in_transaction"
        )
    )[0]
    return dict(row)


async def _stop_workers(rig: Rig) -> None:
    """SIGTERM every worker; each must shut down cleanly (exit code 0)."""
    await _wait_ready(rig, rig.alive())  # a worker still starting has no SIGTERM handler
    alive = rig.alive()
    for w in alive:
        w.proc.send_signal(signal.SIGCONT)
        w.proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(60):
        while any(w.proc.poll() is None for w in alive):  # noqa: ASYNC110 - polling children
            await anyio.sleep(0.1)
    for w in alive:
        if w.proc.returncode != 0:
            rig.stats.unexpected_exits.append(f"{w.name} exited {w.proc.returncode} on SIGTERM")


async def _check(
    rig: Rig, by_name: dict[str, saga.Saga[ChaosInput]], started: dict[UUID, Started]
) -> dict[str, Any]:
    """Read runs, histories, the ledger and the worker logs; return the report, with the
    list of invariant violations."""
    runs = {
        r["id"]: r
        for r in await rig.query(
            "SELECT id, saga_name, status, completed_steps, error::text AS error,"
            " compensation_error::text AS compensation_error, cancel_requested, lease_owner"
            " FROM saga.runs"
        )
    }
    events: dict[UUID, list[asyncpg.Record]] = defaultdict(list)
    for e in await rig.query(
        "SELECT run_id, id, kind, step, attempt, worker, data::text AS data"
        " FROM saga.events ORDER BY run_id, id"
    ):
        events[e["run_id"]].append(e)
    execs: dict[UUID, list[asyncpg.Record]] = defaultdict(list)
    for x in await rig.query("SELECT * FROM chaos_exec ORDER BY at"):
        execs[x["run_id"]].append(x)
    ledger = {r["key"]: r for r in await rig.query("SELECT * FROM chaos_ledger")}

    violations: list[str] = []
    by_state: Counter[str] = Counter()
    lost = double = late = orphans = known_gaps = 0
    dump: list[str] = []
    violating: list[str] = []
    for run_id, info in started.items():
        run = runs.get(run_id)
        if run is None:
            violations.append(f"{run_id}: started but not in saga.runs")
            lost += 1
            continue
        status = run["status"]
        by_state[status] += 1
        if status not in TERMINAL:
            lost += 1
            violations.append(f"{run_id}: not terminal ({status})")
            continue
        problems, doubles, gaps = _check_run(
            by_name[info.saga], run, events[run_id], execs[run_id], ledger
        )
        double += doubles
        known_gaps += gaps
        violations += [f"{run_id} ({info.saga}, {status}): {p}" for p in problems]
        if problems or gaps or any(x["outcome"] == "late" for x in execs[run_id]):
            dump.append(_describe_run(run, events[run_id], execs[run_id], problems))
            if problems:
                violating.append(dump[-1])
        late += sum(1 for x in execs[run_id] if x["outcome"] == "late")
        orphans += sum(1 for x in execs[run_id] if x["outcome"] == "orphan")
    if dump:  # histories behind violations, known gaps and late effects, to read
        _write_text(rig.tmp / "notable_runs.txt", "\n\n".join(dump))
    if set(runs) - set(started):
        violations.append(f"runs nobody started: {sorted(map(str, set(runs) - set(started)))}")

    effects: Counter[str] = Counter(
        x["key"]
        for rows in execs.values()
        for x in rows
        if x["action"] == "effect" and x["outcome"] in ("applied", "late")
    )
    logs = _read_logs(rig.workers)
    counts = Counter(e["event"] for e in logs)
    for bad in ("internal_error", "orchestrator_crashed"):
        if counts[bad]:
            violations.append(f"workers logged {counts[bad]} x {bad}")
    recovery = []
    for killed_at, name in rig.stats.kills:
        taken = [
            e["ts"] - killed_at
            for e in logs
            if e["event"] == "lease_expired"
            and e.get("previous_worker") == name
            and e["proc"] != name
            and e["ts"] >= killed_at
        ]
        if taken:
            recovery.append(min(taken))
    expiries = _attribute_lease_expiries(rig.stats, logs)
    last_fired = {e["proc"]: e["fired"] for e in logs if e["event"] == "chaos_faults_fired"}
    fired: Counter[str] = Counter()
    for counts_of_one in last_fired.values():
        fired.update(counts_of_one)
    return {
        "by_state": dict(sorted(by_state.items())),
        "lost": lost,
        "double_committed": double,
        "stale_writes_refused": counts["stale_write_refused"],
        "duplicate_executions_absorbed": sum(n - 1 for n in effects.values()),
        "late_effects_refused_by_ledger": late,
        "orphan_compensations": orphans,
        "known_history_gaps": known_gaps,
        "recovery_after_kill": _percentiles(recovery),
        "lease_expiries_by_cause": expiries,
        "logs_by_event": {k: counts[k] for k in LOG_COUNTERS},
        "saga_testing_faults_fired": dict(sorted(fired.items())),
        "sagas": describe(list(by_name.values())),
        "violations": violations,
        "violating_runs": violating,
    }


def _attribute_lease_expiries(stats: Stats, logs: list[dict[str, Any]]) -> dict[str, int]:
    """Why leases expired: each lease_expired a worker logged, put down to the chaos that
    explains it (``other``: a live, running worker lost a lease, e.g. to an
    expire_lease fault taken over by another worker, or a heartbeat starved of CPU)."""
    killed = {name: at for at, name in stats.kills}
    crashed = {
        (e["proc"], e.get("run_id")): e["ts"] for e in logs if e["event"] == "simulated_crash"
    }
    causes: Counter[str] = Counter()
    for e in logs:
        if e["event"] != "lease_expired":
            continue
        ts, previous = e["ts"], e.get("previous_worker")
        if previous in killed and killed[previous] <= ts:
            cause = "sigkill"
        elif any(w == previous and a <= ts <= b + LEASE_SECONDS + 1 for w, a, b in stats.stops):
            cause = "sigstop"
        elif crashed.get((previous, e.get("run_id")), ts + 1) <= ts:
            cause = "simulated_crash"
        elif any(a - LEASE_SECONDS <= ts <= b + LEASE_SECONDS + 2 for a, b in stats.restarts):
            cause = "postgres_restart"
        elif previous == e["proc"]:  # mostly the expire_lease faults
            cause = "reclaimed_by_its_own_worker"
        else:
            cause = "other"
        causes[cause] += 1
    return dict(sorted(causes.items()))


def _check_run(
    definition: saga.Saga[ChaosInput],
    run: asyncpg.Record,
    history: list[asyncpg.Record],
    execs: list[asyncpg.Record],
    ledger: dict[str, asyncpg.Record],
) -> tuple[list[str], int, int]:
    """The invariants of one terminal run: (violations, doubly recorded items, known
    history gaps)."""
    problems: list[str] = []
    status = run["status"]
    kinds = [e["kind"] for e in history]
    if not kinds or kinds[0] != "run_started" or kinds.count("run_started") != 1:
        problems.append(f"history does not start with one run_started: {kinds[:3]}")

    # Exactly one terminal state: the history's terminal events, apart from failures an
    # operator retried, are one, the last event, and match the status.
    ends = [k for k in kinds if k in TERMINAL_EVENTS or k == "run_retried"]
    retried = ends.count("run_retried")
    if ends != ["run_failed", "run_retried"] * retried + [f"run_{status}"]:
        problems.append(f"terminal events {ends} for status {status}")
    if kinds and kinds[-1] != f"run_{status}":
        problems.append(f"last event is {kinds[-1]}, not run_{status}")

    # Each step completed at most once, in definition order, as the row says.
    completed = [e["step"] for e in history if e["kind"] == "step_completed"]
    names = [s.name for s in definition.steps]
    doubles = len(completed) - len(set(completed))
    if completed != names[: len(completed)]:
        problems.append(f"step_completed events {completed} are not a prefix of {names}")
    if list(run["completed_steps"]) != completed:
        problems.append(f"completed_steps {run['completed_steps']} != history {completed}")
    undone = [e["step"] for e in history if e["kind"] == "compensation_completed"]
    doubles += len(undone) - len(set(undone))
    plan = [n for n in reversed(completed) if definition.get_step(n).compensation is not None]
    if status == "completed":
        if completed != names:
            problems.append(f"completed with steps {completed}")
        if undone or "run_compensating" in kinds:
            problems.append("a completed run compensated something")
    elif status in ("compensated", "cancelled"):
        if undone != plan:
            problems.append(f"compensations {undone}, expected exactly {plan}")
        error = json.loads(run["error"]) if run["error"] else None
        if status == "compensated" and (error is None or error["step"] != names[len(completed)]):
            problems.append(f"compensated with error {error}, but {len(completed)} steps completed")
        if status == "cancelled" and not run["cancel_requested"]:
            problems.append("cancelled without a cancel request")
    elif status == "failed":
        comp_error = json.loads(run["compensation_error"] or "null")
        if undone != plan[: len(undone)] or comp_error is None:
            problems.append(f"failed with compensations {undone} of {plan}, error {comp_error}")
        else:
            last = [
                e
                for e in history
                if e["kind"] == "compensation_failed" and e["step"] == comp_error["step"]
            ]
            attempts = definition.get_step(comp_error["step"]).compensation
            assert attempts is not None
            if not last or last[-1]["attempt"] < attempts.retry.max_attempts:
                problems.append(f"failed before exhausting compensation attempts: {comp_error}")

    # Fencing: an outcome is written by the attempt that holds the lease, so the latest
    # start of that item before it is the same attempt on the same worker.
    latest: dict[tuple[str, str], asyncpg.Record] = {}
    gaps = 0
    for e in history:
        if e["kind"] == "run_retried":
            latest.clear()  # an operator's retry starts the attempts afresh
        elif e["kind"] in ("step_started", "compensation_started"):
            latest[(e["kind"], e["step"])] = e
        elif e["kind"] in OUTCOME_EVENTS:
            start = latest.get((OUTCOME_EVENTS[e["kind"]], e["step"]))
            held = None if start is None else (start["attempt"], start["worker"])
            if held == (e["attempt"], e["worker"]):
                continue
            if (
                TOLERATE_MISSING_COMPENSATION_STARTS_AFTER_CANCEL
                and run["cancel_requested"]
                and e["kind"].startswith("compensation_")
                and (held is None or held[0] < e["attempt"])
            ):
                gaps += 1  # saga's known gap: no newer start recorded, so nothing to compare
                continue
            problems.append(
                f"{e['kind']} {e['step']} attempt {e['attempt']} by {e['worker']}, but the "
                f"latest start was {held}"
            )

    # The ledger: each recorded outcome comes from a real execution that applied its
    # effect; compensations undid what the recorded attempt did; net effects match.
    run_id = run["id"]
    finished = {
        e["step"]: (e["attempt"], e["worker"]) for e in history if e["kind"] == "step_completed"
    }
    for e in history:
        if e["kind"] not in ("step_completed", "compensation_completed"):
            continue
        kind = "step" if e["kind"] == "step_completed" else "compensation"
        if not any(
            x["kind"] == kind
            and x["step"] == e["step"]
            and (x["attempt"], x["worker"]) == (e["attempt"], e["worker"])
            and x["action"] == "effect"
            and x["outcome"] == "applied"
            for x in execs
        ):
            problems.append(f"{e['kind']} {e['step']} attempt {e['attempt']}: no applied effect")
    step_attempts: Counter[tuple[str, int]] = Counter()
    for x in execs:
        if x["action"] == "bad_result":
            problems.append(f"{x['step']} attempt {x['attempt']} saw a wrong earlier result")
        if x["outcome"] == "orphan":
            problems.append(f"compensation of {x['step']} undid an effect that never happened")
        if x["kind"] == "step":
            step_attempts[(x["step"], x["attempt"])] += 1
            if x["outcome"] == "late" and finished.get(x["step"]) == (x["attempt"], x["worker"]):
                problems.append(f"the recorded attempt of {x['step']} was refused by the ledger")
        elif x["action"] == "effect":
            if x["target"] != f"{run_id}:step:{x['step']}":
                problems.append(f"compensation of {x['step']} got the result of {x['target']}")
            if (x["result_attempt"], x["result_worker"]) != finished.get(x["step"]):
                problems.append(
                    f"compensation of {x['step']} got the result of attempt "
                    f"{x['result_attempt']} on {x['result_worker']}, recorded: "
                    f"{finished.get(x['step'])}"
                )
    reused = [k for k, n in step_attempts.items() if n > 1]
    if reused:
        problems.append(f"one attempt number executed more than once: {reused}")
    for name in completed:
        entry = ledger.get(f"{run_id}:step:{name}")
        has_comp = definition.get_step(name).compensation is not None
        expected = 0 if name in undone else 1
        if entry is None or entry["net"] != expected:
            problems.append(f"ledger net effect of {name}: {entry and entry['net']} != {expected}")
        if status in ("compensated", "cancelled") and has_comp and name not in undone:
            problems.append(f"{name} was never compensated")
    return problems, doubles, gaps
