"""One throughput measurement ("window"): open the worker processes, start N runs (or
chains) through a client while they execute (waits: and once all are parked, wake them),
wait until every one has finished, close everything, check that every run ended as
expected, then read the counters."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import asyncpg

from benchmarks import _internals, _queue
from benchmarks._base import BenchmarkError
from benchmarks._cpu import CORES, CpuSample
from benchmarks._dbstats import WaitSampler, read_stats, wait_until_no_backends
from benchmarks._harness import Harness
from benchmarks._procs import WorkerProc
from benchmarks._sagas import ITEMS
from saga._db import channel

POLL_EVERY = 0.2  # seconds between completion polls
STALL_TIMEOUT = 60.0  # fail when nothing finishes for this long
HELD_SETTLE = 0.3  # after the held drain's workers opened: their peers' notices arrive

StartAll = Callable[[], Awaitable[None]]
# A client opens on a DSN and yields the function that starts every run.
Client = Callable[[str], AbstractAsyncContextManager[StartAll]]
# Entered around the measured part, with the worker processes (the profiler).
Hook = Callable[[Sequence[WorkerProc]], AbstractAsyncContextManager[None]]


@dataclasses.dataclass
class Measured:
    """N runs (or chains); time from the first start (drain: first claim) to the last
    finish, server clock."""

    runs: int
    items: int  # work items per run
    seconds: float
    p99_seconds: float
    commits: int  # Δ xact_commit over the window, minus our own statements
    write_xacts: int  # xid-assigning transactions, cluster-wide
    start_xacts: int  # the transactions that started the runs (group commit: fewer than runs)
    wal_syncs: int
    wal_bytes: int
    start_rate: float
    client_cpu: float  # seconds: this process (the client's starts, polling)
    worker_cpu: float  # seconds: the worker processes together
    worker_kernel: float  # seconds of worker_cpu spent in the kernel (stime)
    postgres_cpu: float  # seconds: the whole cluster
    idle_cpu: float  # seconds: idle, summed over cores
    wall: float  # seconds of the CPU window
    waits: str
    lease_expiries: int
    spans: dict[str, int]
    calls: dict[str, int]
    statements: str  # --statements: a markdown table, else ""

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds

    @property
    def commits_per_item(self) -> float:
        """Commits beyond the runs' starts, per work item (step or compensation)."""
        return (self.commits - self.start_xacts) / (self.items * self.runs)

    @property
    def writes_per_item(self) -> float:
        """Write transactions (xid assigned: the durable, WAL-flushing commits) beyond the
        runs' starts, per work item."""
        return (self.write_xacts - self.start_xacts) / (self.items * self.runs)

    @property
    def worker_ms_per_run(self) -> float:
        return 1000 * self.worker_cpu / self.runs

    @property
    def other_cpu(self) -> float:
        """Busy cores that are none of ours: the kernel, and any other load (noise)."""
        busy = self.client_cpu + self.worker_cpu + self.postgres_cpu + self.idle_cpu
        return CORES - busy / self.wall


#: How many transactions started the runs since $1: saga group-commits starts made at
#: about the same time, so one transaction may start many (events rows are never updated:
#: a run_started row's xmin is the transaction that started its run).
_START_XACTS = """
    SELECT count(DISTINCT xmin::text) FROM saga.events
    WHERE kind = 'run_started' AND at >= $1
"""


class Poller:
    """Our own connection to the measured database. Every statement on it is one
    transaction in pg_stat_database.xact_commit (connecting is one more), counted here and
    subtracted from the commits attributed to the workload."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.xacts = 1

    @classmethod
    async def connect(cls, dsn: str) -> Poller:
        return cls(await asyncpg.connect(dsn))

    async def fetchval(self, sql: str, *args: object) -> Any:
        self.xacts += 1
        return await self.conn.fetchval(sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record:
        self.xacts += 1
        row = await self.conn.fetchrow(sql, *args)
        assert row is not None
        return row

    async def wait_done(self, sql: str, target: int, *args: object) -> None:
        """Poll ``sql`` (a count) until it reaches ``target``; fail after a stall."""
        last, last_change = -1, time.monotonic()
        while (done := await self.fetchval(sql, *args)) < target:
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                raise BenchmarkError(
                    f"nothing finished for {STALL_TIMEOUT:.0f} s ({done}/{target})"
                )
            await anyio.sleep(POLL_EVERY)

    async def close(self) -> None:
        await self.conn.close()


@dataclasses.dataclass
class Parking:
    """A workload in two phases (waits): the client starts every run, then awaits
    ``parked`` before it wakes them (signals); the window sets it once ``count_sql``
    counts every run parked. Its time counts from the first signal received."""

    count_sql: str
    parked: anyio.Event = dataclasses.field(default_factory=anyio.Event)


@dataclasses.dataclass
class Workload:
    """What a window runs: ``kind`` is "queue" or a saga kind (benchmarks/_sagas.py)."""

    kind: str
    workers: Sequence[WorkerProc]
    open_cmd: dict[str, Any]
    client: Client
    runs: int
    drain: bool = False  # start every run first, then open the workers
    hook: Hook | None = None
    parking: Parking | None = None

    @property
    def timed_from(self) -> str:
        """The column of the span query (_internals.span_sql) the time counts from."""
        if self.drain:
            return "first_claim"
        return "first_signal" if self.parking else "first_start"


@dataclasses.dataclass
class _Cpu:
    sample: CpuSample
    workers: float
    kernel: float


async def window(h: Harness, db: str, dsn: str, w: Workload) -> Measured:
    """Measure ``w`` on the fresh database ``db`` (at ``dsn``)."""
    await h.checkpoint()
    await wait_until_no_backends(h.admin, db)
    if h.statements is not None:
        await h.statements.reset()
    before = await read_stats(h.admin, db)
    t0: dt.datetime = await h.admin.fetchval("SELECT clock_timestamp()")
    run = _Window(h, db, dsn, w)
    if w.drain:
        await run.start_everything()
    else:
        await run.open_workers()
    poller = await Poller.connect(dsn)
    try:
        if w.drain and w.kind != "queue":
            await run.open_held(poller)
        cpu0, cpu1 = await run.measured_part(poller, t0)
        closed = await run.close_workers()
        span_sql = _queue.SPAN if w.kind == "queue" else _internals.span_sql(w.kind)
        span = await poller.fetchrow(span_sql, t0)
        starts = w.runs if w.kind == "queue" else await poller.fetchval(_START_XACTS, t0)
    finally:
        await poller.close()
    if span["n"] != w.runs or span["ok"] != w.runs:
        raise BenchmarkError(
            f"{w.kind}: expected {w.runs} correctly finished runs, found {span['ok']} of "
            f"{span['n']}"
        )
    await wait_until_no_backends(h.admin, db)
    delta = await read_stats(h.admin, db) - before
    statements = await h.statements.table(db, w.runs) if h.statements is not None else ""
    first = span[w.timed_from]
    return Measured(
        runs=w.runs,
        items=ITEMS[w.kind],
        seconds=(span["last_done"] - first).total_seconds(),
        p99_seconds=(span["p99_done"] - first).total_seconds(),
        commits=delta.xact_commit - poller.xacts,
        write_xacts=delta.next_xid - run.held_xacts,
        start_xacts=int(starts),
        wal_syncs=delta.wal_sync,
        wal_bytes=delta.wal_lsn,
        start_rate=run.start_rate,
        client_cpu=cpu1.sample.python - cpu0.sample.python,
        worker_cpu=cpu1.workers - cpu0.workers,
        worker_kernel=cpu1.kernel - cpu0.kernel,
        postgres_cpu=cpu1.sample.postgres - cpu0.sample.postgres,
        idle_cpu=cpu1.sample.idle - cpu0.sample.idle,
        wall=cpu1.sample.wall - cpu0.sample.wall,
        waits=run.sampler.summary(3),
        lease_expiries=int(span["expiries"]),
        spans=_summed(closed, "spans"),
        calls=_summed(closed, "calls"),
        statements=statements,
    )


def _summed(replies: list[dict[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for reply in replies:
        for k, v in reply.get(key, {}).items():
            total[k] = total.get(k, 0) + v
    return total


class _Window:
    def __init__(self, h: Harness, db: str, dsn: str, w: Workload) -> None:
        self.h, self.db, self.dsn, self.w = h, db, dsn, w
        self.sampler = WaitSampler(h.sampler, db)
        self.start_rate = math.nan
        self.held: tuple[Poller, Any] | None = None  # see open_held
        self.held_xacts = 0  # write transactions while a held drain's workers opened

    async def open_workers(self) -> None:
        cmd = {**self.w.open_cmd, "dsn": self.dsn}
        async with anyio.create_task_group() as tg:
            for worker in self.w.workers:
                tg.start_soon(worker.call, cmd, "opened")

    async def close_workers(self) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = []

        async def close(worker: WorkerProc) -> None:
            replies.append(await worker.call({"cmd": "close"}, "closed"))

        async with anyio.create_task_group() as tg:
            for worker in self.w.workers:
                tg.start_soon(close, worker)
        return replies

    async def start_everything(self) -> None:
        """Drain: every run started (no worker open), before the window."""
        began = time.monotonic()
        async with self.w.client(self.dsn) as start_all:
            await start_all()
        self.start_rate = self.w.runs / (time.monotonic() - began)

    async def open_held(self, poller: Poller) -> None:
        """Saga drain: the workers open while the poller's transaction locks every
        pre-started run, so each worker process is open, idle and aware of its peers
        when the window begins; the transaction's end releases them all at once, and
        its NOTIFY wakes them (see ``_starting``). Opened on the runs, processes would
        begin one by one, as each connected: the window (from the first claim) would
        time the others' opening."""
        before = await read_stats(self.h.admin, self.db)
        held = poller.conn.transaction()
        await held.start()
        await poller.conn.execute("SELECT 1 FROM saga.runs FOR UPDATE")
        await poller.conn.execute(
            "SELECT pg_notify($1, $2)", channel("saga", "work"), f"bench_{self.w.kind}"
        )
        self.held = (poller, held)
        await self.open_workers()
        await anyio.sleep(HELD_SETTLE)
        # The write transactions of opening (each worker's own, and the held one) are
        # not the steps': the window's per-step figures leave them out, as its CPU does.
        self.held_xacts = (await read_stats(self.h.admin, self.db)).next_xid - before.next_xid

    def cpu(self) -> _Cpu:
        workers = self.w.workers
        return _Cpu(
            self.h.cpu(),
            sum(w.cpu_seconds() for w in workers),
            sum(w.kernel_seconds() for w in workers),
        )

    async def measured_part(self, poller: Poller, t0: dt.datetime) -> tuple[_Cpu, _Cpu]:
        """Start the runs (drain: open the workers; parking: once all are parked, let
        the client wake them) and wait until all are done."""
        done_sql, done_args = _internals.DONE_SINCE, [t0]
        if self.w.kind == "queue":
            done_sql, done_args = _queue.DONE, []
        async with contextlib.AsyncExitStack() as stack:
            start_all = None
            if not self.w.drain:
                start_all = await stack.enter_async_context(self.w.client(self.dsn))
            if self.w.hook is not None:
                await stack.enter_async_context(self.w.hook(self.w.workers))
            cpu0 = self.cpu()
            await self._release()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.sampler.run)
                tg.start_soon(self._starting, start_all)
                if self.w.parking is not None:
                    await poller.wait_done(self.w.parking.count_sql, self.w.runs)
                    self.w.parking.parked.set()
                await poller.wait_done(done_sql, self.w.runs, *done_args)
                cpu1 = self.cpu()
                tg.cancel_scope.cancel()
        return cpu0, cpu1

    async def _release(self) -> None:
        """End the held drain's transaction: the runs' locks go, its NOTIFY wakes every
        worker (before the window's tasks use the poller's connection)."""
        if self.held is not None:
            poller, held = self.held
            await held.commit()
            poller.xacts += 1

    async def _starting(self, start_all: StartAll | None) -> None:
        if self.held is not None:
            return  # the workers are open, and _release let them go
        if start_all is None:
            await self.open_workers()
            return
        began = time.monotonic()
        await start_all()
        self.start_rate = self.w.runs / (time.monotonic() - began)
