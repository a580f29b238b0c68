"""The two throughput workloads every section builds on: N saga runs, or N queue chains,
started by a client in this process (32 concurrent starters) while worker processes
execute them (or before they open: drain; or by the worker's own orchestrator:
embedded)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg

import saga
from benchmarks import _queue
from benchmarks._base import say, start_concurrently
from benchmarks._harness import Harness
from benchmarks._procs import WorkerProc
from benchmarks._sagas import Input, Kind, build
from benchmarks._window import Client, Hook, Measured, Parking, StartAll, Workload, window

if TYPE_CHECKING:
    from benchmarks._otel import Tracing


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
    save_raw(h, label, m)
    return m


def embedded_client(worker: WorkerProc, runs: int) -> Client:
    """The embedded setup: the worker process's own orchestrator starts the runs (the
    ``start`` command, STARTERS tasks) while it executes them; this process only asks."""

    @contextlib.asynccontextmanager
    async def client(_dsn: str) -> AsyncIterator[StartAll]:
        async def start_all() -> None:
            await worker.call({"cmd": "start", "runs": runs}, "started", timeout=600)

        yield start_all

    return client


@dataclasses.dataclass(frozen=True)
class QueueRow:
    concurrency: int  # worker tasks in the one worker process
    batch: int | None = None  # jobs per claim (the batched queue); None: unbatched
    drain: bool = False
    runs: int | None = None  # default: --runs


async def measure_queue(h: Harness, row: QueueRow, label: str) -> Measured:
    runs = row.runs or h.opts.runs
    db, dsn = await h.database(label)
    await _queue.create_tables(dsn)
    workers = await h.ensure_workers(1)
    open_cmd = {"cmd": "open", "kind": "queue", "concurrency": row.concurrency, "batch": row.batch}
    workload = Workload("queue", workers, open_cmd, queue_client(runs), runs, row.drain)
    m = await window(h, db, dsn, workload)
    await h.drop(db)
    log_measured(label, m)
    save_raw(h, label, m)
    return m


def log_measured(label: str, m: Measured) -> None:
    say(
        f"{label}: {m.runs_per_s:,.0f} runs/s ({m.seconds:.2f} s), "
        f"{m.commits_per_item:.2f} commits/item, worker {m.worker_cpu / m.wall:.2f} / "
        f"client {m.client_cpu / m.wall:.2f} / postgres {m.postgres_cpu / m.wall:.2f} cores"
        + (f", {m.lease_expiries} lease expiries" if m.lease_expiries else "")
    )


def save_raw(h: Harness, label: str, m: Measured) -> None:
    """--raw: one JSON line per measurement, every counter (CPU seconds, WAL, commits)."""
    if h.opts.raw:
        line = {"label": label, "runs_per_s": m.runs_per_s, **dataclasses.asdict(m)}
        with open(h.opts.raw, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
