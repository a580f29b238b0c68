"""The chaos suite's rig: worker processes (``tests/chaos/worker.py``, started and
signalled through tests._harness) and the chaos done to them and to the database
(SIGKILL, SIGSTOP, terminated backends, crash restarts of PostgreSQL)."""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from saga._db import queries
from tests._harness import Child, Children, Server

CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


@dataclass
class Worker:
    name: str
    child: Child
    log: Path  # its JSON-lines log (its raw output is in <name>.out)
    stopped: bool = False
    killed: bool = False


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


class Rig:
    """The worker processes and the chaos done to them and to the database."""

    def __init__(self, dsn: str, tmp: Path, seed: int, rng: random.Random, server: Server) -> None:
        self.dsn = dsn
        self.tmp = tmp
        self.seed = seed
        self.rng = rng
        self.server = server
        self.children = Children(tmp)
        self.workers: list[Worker] = []
        self.stats = Stats()
        self._admin: asyncpg.Connection | None = None
        self._lock = anyio.Lock()

    # -- processes (sync: starting and signalling are instant) --------------------------

    def spawn(self, faults: dict[str, dict[str, int]]) -> Worker:
        name = f"w{len(self.workers)}"
        log = self.tmp / f"{name}.jsonl"
        argv = [self.dsn, name, str(self.seed), str(log), json.dumps(faults)]
        child = self.children.python("-m", "tests.chaos.worker", *argv, name=name)
        worker = Worker(name, child, log)
        self.workers.append(worker)
        return worker

    def alive(self) -> list[Worker]:
        return [w for w in self.workers if w.child.alive]

    def running(self) -> list[Worker]:
        return [w for w in self.alive() if not w.stopped]

    def kill(self, worker: Worker) -> None:
        worker.killed = True
        self.stats.kills.append((time.time(), worker.name))
        worker.child.kill()  # instant, even for a stopped process

    def reap_unexpected(self) -> list[Worker]:
        """Workers that exited without being told to (a crash): recorded, replaced."""
        dead = [w for w in self.workers if not w.killed and not w.child.alive and not w.stopped]
        for w in dead:
            w.killed = True  # handled
            self.stats.unexpected_exits.append(f"{w.name} rc={w.child.returncode}")
        return dead

    def cleanup(self) -> None:
        """Leave nothing running: continue, kill and reap every child still alive."""
        self.children.close()

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
        worker.child.pause()
        try:
            await anyio.sleep(seconds)
        finally:
            worker.child.resume()
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
        began = time.time()
        await self.server.crash_restart()
        self.stats.restarts.append((began, time.time()))
        if self._admin is not None:  # dead; the next query reconnects
            self._admin.terminate()
            self._admin = None

    # -- readiness, shutdown, what is left --------------------------------------------

    async def wait_ready(self, workers: list[Worker]) -> None:
        with anyio.fail_after(60):
            while True:
                logs = read_logs(workers)
                ready = {e["proc"] for e in logs if e["event"] == "chaos_worker_ready"}
                if all(w.name in ready for w in workers):
                    return
                for w in workers:
                    assert w.child.alive, f"worker {w.name} died at startup: see {w.log}"
                await anyio.sleep(0.1)

    async def stop_workers(self) -> None:
        """SIGTERM every worker; each must shut down cleanly (exit code 0)."""
        await self.wait_ready(self.alive())  # a worker still starting has no SIGTERM handler
        alive = self.alive()
        for w in alive:
            w.child.resume()
            w.child.send(signal.SIGTERM)
        with anyio.fail_after(60):
            while any(w.child.alive for w in alive):  # noqa: ASYNC110 - polling children
                await anyio.sleep(0.1)
        for w in alive:
            if w.child.returncode != 0:
                self.stats.unexpected_exits.append(
                    f"{w.name} exited {w.child.returncode} on SIGTERM"
                )

    async def leftovers(self) -> dict[str, int]:
        """Leases, advisory locks and open transactions left in the test database. The
        presence marks of the workers still open (one shared advisory lock each, see
        saga._store_peers) are theirs, not leftovers: they are counted apart."""
        row = (
            await self.query(
                "SELECT"
                " (SELECT count(*) FROM saga.runs WHERE lease_owner IS NOT NULL) AS leases,"
                " (SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                "   WHERE l.locktype = 'advisory' AND d.datname = current_database())"
                "   AS advisory_locks,"
                " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                "   AND state LIKE 'idle in transaction%') AS idle_in_transaction"
            )
        )[0]
        present = (await self.query(queries("saga")["presence_count"]))[0][0]
        return {**row, "advisory_locks": row["advisory_locks"] - present, "present": present}


def read_logs(workers: list[Worker]) -> list[dict[str, Any]]:
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
