"""The two throughput workloads every section builds on: N saga runs, or N queue chains,
started by a client in this process (32 concurrent starters) while worker processes
execute them."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg

import saga
from benchmarks import _queue
from benchmarks._base import say
from benchmarks._harness import Harness
from benchmarks._procs import WorkerProc
from benchmarks._sagas import Input, Kind, build
from benchmarks._window import Client, Hook, Measured, Parking, StartAll, Workload, window

if TYPE_CHECKING:
    from benchmarks._otel import Tracing

STARTERS = 32  # concurrent start() tasks of the client


async def start_concurrently(runs: int, start_one: Callable[[int], Awaitable[object]]) -> None:
    """``start_one(i)`` for i in range(runs), by STARTERS tasks sharing one iterator."""
    numbers = iter(range(runs))

    async def starter() -> None:
        for i in numbers:
            await start_one(i)

    async with anyio.create_task_group() as tg:
        for _ in range(STARTERS):
            tg.start_soon(starter)


def saga_client(definition: saga.Saga[Input], runs: int, tracing: Tracing | None = None) -> Client:
    """A client-only orchestrator (concurrency=0) in this process, on its own pool."""

    @contextlib.asynccontextmanager
    async def client(dsn: str) -> AsyncIterator[StartAll]:
        async with saga.Orchestrator(
            dsn,
            sagas=[definition],
            concurrency=0,
            migrate=False,
            tracer_provider=tracing.tracer_provider if tracing else None,
            meter_provider=tracing.meter_provider if tracing else None,
        ) as orch:

            async def start_all() -> None:
                await start_concurrently(runs, lambda i: orch.start(definition, Input(i=i)))

            yield start_all

    return client


def queue_client(runs: int) -> Client:
    """Chains started on a pool of 4 connections (as the saga client's own pool)."""

    @contextlib.asynccontextmanager
    async def client(dsn: str) -> AsyncIterator[StartAll]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, reset=_queue.no_reset)
        try:

            async def start_all() -> None:
                await start_concurrently(runs, lambda i: _queue.start(pool, i))

            yield start_all
        finally:
            await pool.close()

    return client


@dataclasses.dataclass(frozen=True)
class Traced:
    """The tracing section's setup: the client's SDK, and worker processes of their own
    (the SDK is set up once per process) exporting to ``endpoint``."""

    client: Tracing
    endpoint: str
    workers: list[WorkerProc]


@dataclasses.dataclass(frozen=True)
class SagaRow:
    kind: Kind = "noop"
    concurrency: int = 64
    processes: int = 1
    drain: bool = False
    count_calls: bool = False  # count saga's Store calls in the worker (profile)
    runs: int | None = None  # default: --runs


async def measure_saga(
    h: Harness,
    row: SagaRow,
    label: str,
    *,
    database: tuple[str, str] | None = None,
    traced: Traced | None = None,
    hook: Hook | None = None,
    client: Client | None = None,
    parking: Parking | None = None,
) -> Measured:
    """One window of ``row`` on a fresh database (or on ``database``, kept); ``client``
    replaces the one that starts the runs (and, with ``parking``, wakes them)."""
    runs = row.runs or h.opts.runs
    db, dsn = database or await h.saga_database(label)
    workers = traced.workers if traced else await h.ensure_workers(row.processes)
    open_cmd: dict[str, Any] = {
        "cmd": "open",
        "kind": "saga",
        "saga": row.kind,
        "concurrency": row.concurrency,
        "tracing": {"endpoint": traced.endpoint} if traced else None,
        "count_calls": row.count_calls,
        "pool_size": h.opts.pool_size,
    }
    if client is None:
        client = saga_client(build(row.kind), runs, traced.client if traced else None)
    workload = Workload(row.kind, workers, open_cmd, client, runs, row.drain, hook, parking)
    m = await window(h, db, dsn, workload)
    if database is None:
        await h.drop(db)
    log_measured(label, m)
    return m


async def measure_queue(h: Harness, concurrency: int, label: str) -> Measured:
    db, dsn = await h.database(label)
    await _queue.create_tables(dsn)
    workers = await h.ensure_workers(1)
    open_cmd = {"cmd": "open", "kind": "queue", "concurrency": concurrency}
    workload = Workload("queue", workers, open_cmd, queue_client(h.opts.runs), h.opts.runs)
    m = await window(h, db, dsn, workload)
    await h.drop(db)
    log_measured(label, m)
    return m


def log_measured(label: str, m: Measured) -> None:
    say(
        f"{label}: {m.runs_per_s:,.0f} runs/s ({m.seconds:.2f} s), "
        f"{m.commits_per_item:.2f} commits/item, worker {m.worker_cpu / m.wall:.2f} / "
        f"client {m.client_cpu / m.wall:.2f} / postgres {m.postgres_cpu / m.wall:.2f} cores"
        + (f", {m.lease_expiries} lease expiries" if m.lease_expiries else "")
    )
