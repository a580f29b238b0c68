"""The benchmark suite: saga against the commit ceiling of the same Postgres, same sitting.

    .venv/bin/python benchmarks/run.py [--dsn DSN] [--repeats 3] [--runs 3000]
        [--only ceiling,queue,saga,compensation,latency,scale,memory,tracing]
        [--output benchmarks/RESULTS.md]

Without ``--dsn`` it provisions a throwaway cluster with DURABLE settings (fsync,
synchronous_commit, full_page_writes on) on a unix socket, and always stops and deletes it.
Then, in one sitting on that one server, it measures

1. ceiling: pgbench single-UPDATE and single-INSERT transactions at 1, 4 and 16 clients;
2. queue: a hand-written asyncpg SKIP LOCKED jobs table running 3-step chains (the "no
   framework" reference), concurrency 1, 16, 64;
3. saga: 3-step no-op sagas at orchestrator concurrency 1, 16, 64 in 1 and 2 worker
   processes, runs started meanwhile by a client (concurrency=0) in this process;
4. compensation: 3-step sagas whose third step fails permanently, 2 compensations;
5. latency: start() and start-to-result() at a fixed 20 runs/s;
6. scale: throughput with 1,000,000 finished runs in the tables versus empty tables, and
   EXPLAIN of the claim query at that size;
7. memory: peak RSS of a worker process holding 10,000 runs in flight;
8. tracing: throughput with the OpenTelemetry SDK exporting (OTLP/HTTP) versus without;

prints a markdown report and writes it to ``benchmarks/RESULTS.md`` (when every section
ran) or ``--output``. See benchmarks/README.md for the method and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
import asyncpg
from _common import (
    CHILDREN,
    CLK_TCK,
    CORES,
    REPO,
    SAGAS,
    BenchmarkError,
    Cluster,
    CpuSample,
    DbStats,
    Input,
    WaitSampler,
    configure_logging,
    find_pg_bindir_or_none,
    find_pgbench,
    git_commit,
    install_exit_handlers,
    load_average,
    machine,
    pgbench_call,
    read_stats,
    say,
    server_facts,
    stat_fields,
    wait_until_no_backends,
    with_database,
)
from _worker import QUEUE_DDL, QUEUE_START, Tracing

import saga
from saga._store import Store

HERE = Path(__file__).resolve().parent
WORKER_PY = HERE / "_worker.py"
DEFAULT_OUTPUT = HERE / "RESULTS.md"
SECTIONS = (
    "ceiling",
    "queue",
    "saga",
    "compensation",
    "latency",
    "scale",
    "memory",
    "tracing",
    "profile",
)

STARTERS = 32  # concurrent start() tasks of the client
POLL_EVERY = 0.2  # seconds between completion polls
STALL_TIMEOUT = 60.0  # fail when nothing finishes for this long
NOISY_OTHER_CPU = 0.3  # cores busy outside our processes and the cluster
CONCURRENCY = (1, 16, 64)
PROCESSES = (1, 2)
HEADLINE = (64, 1)  # (concurrency, worker processes) of the compensation/scale/tracing rows
PGBENCH_SCALE = 16
PGBENCH_CLIENTS = (1, 4, 16)
CEILING_CLIENTS = 16  # the ratio denominator: single-UPDATE TPS at 16 clients
METRIC_INTERVAL_MS = 5000
PYSPY_RATE = 250  # samples per second
LATE_CLAIM = 0.020  # seconds: a first claim this late means the run missed a wake-up
PYSPY_CANDIDATES = ("/tmp/pyspy-venv/bin/py-spy", "/tmp/pyspy/bin/py-spy")

PGBENCH_SCRIPTS = {
    "UPDATE": (
        f"\\set aid random(1, {PGBENCH_SCALE * 100000})\n"
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
    ),
    "INSERT": (
        f"\\set aid random(1, {PGBENCH_SCALE * 100000})\n"
        "\\set delta random(-5000, 5000)\n"
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
        "VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);\n"
    ),
}

# Work items per run (steps, plus compensations on the compensation path).
ITEMS = {"noop": 3, "compensate": 5, "gate": 3, "queue": 3}
# What a correctly finished run looks like, per saga.
FINISHED_OK = {
    "noop": "status = 'completed' AND output::text = '1' AND cardinality(completed_steps) = 3",
    "compensate": "status = 'compensated' AND error->>'type' = 'saga.PermanentError'",
    "gate": "status = 'completed' AND output::text = '1'",
}


# -- statistics ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stat:
    """Median, min and max over the repeats."""

    med: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, digits: int = 0, unit: str = "") -> str:
        if math.isnan(self.med):
            return "n/a"
        if self.n == 1:
            return f"{self.med:,.{digits}f}{unit}"
        return f"{self.med:,.{digits}f}{unit} ({self.lo:,.{digits}f}-{self.hi:,.{digits}f})"

    def ratio(self, other: float, digits: int = 2) -> str:
        """This figure divided by ``other``: median (min-max)."""
        if math.isnan(self.med) or not other or math.isnan(other):
            return "n/a"
        if self.n == 1:
            return f"{self.med / other:.{digits}f}"
        return (
            f"{self.med / other:.{digits}f} ({self.lo / other:.{digits}f}-"
            f"{self.hi / other:.{digits}f})"
        )


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- processes -----------------------------------------------------------------------------


def process_cpu_seconds(pid: int, kernel_only: bool = False) -> float:
    """utime + stime of a process (or stime only), in seconds."""
    fields = stat_fields(pid)
    if fields is None:
        return math.nan
    if kernel_only:
        return int(fields[12]) / CLK_TCK
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"no {key} in /proc/{pid}/status")


def _open_log(log: Path | None) -> Any:
    return open(log or os.devnull, "ab")


def _spawn_quiet(cmd: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    CHILDREN.add(proc)
    return proc


class WorkerProc:
    """A benchmarks/_worker.py subprocess (see its docstring for the protocol)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log: Path | None = None

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n" + "\n".join(tail) if tail else ""

    @classmethod
    async def spawn(cls, *args: str, log: Path | None = None) -> WorkerProc:
        """Start a worker; its stderr (structlog and logging at WARNING) goes to ``log``:
        the compensation path logs a warning per failed step, which would flood a
        terminal."""
        with _open_log(log) as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER_PY),
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        CHILDREN.add(proc)
        worker = cls(proc)
        worker.log = log
        return worker

    async def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, event: str | None, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            with anyio.fail_after(timeout):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        code = await self.proc.wait()
                        raise BenchmarkError(
                            f"worker {self.pid} exited with {code}{self.log_tail()}"
                        )
                    msg: dict[str, Any] = json.loads(line)
                    if msg.get("event") == "error":
                        raise BenchmarkError(
                            f"worker {self.pid}: {msg['message']}{self.log_tail()}"
                        )
                    if event is None or msg.get("event") == event:
                        return msg
        except TimeoutError:
            raise BenchmarkError(f"worker {self.pid}: no {event!r} in {timeout:.0f} s") from None

    async def call(self, cmd: dict[str, Any], event: str, timeout: float = 120.0) -> dict[str, Any]:
        await self.send(cmd)
        return await self.expect(event, timeout)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def kernel_seconds(self) -> float:
        return process_cpu_seconds(self.pid, kernel_only=True)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            with anyio.fail_after(30):
                await self.proc.wait()
        except TimeoutError:
            say(f"worker {self.pid} did not exit; killing it")
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        CHILDREN.discard(self.proc)


# -- measured database access -------------------------------------------------------------


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

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.xacts += 1
        return await self.conn.fetchval(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record:
        self.xacts += 1
        row = await self.conn.fetchrow(sql, *args)
        assert row is not None
        return row

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.xacts += 1
        return await self.conn.fetch(sql, *args)

    async def wait_done(self, sql: str, target: int, *args: Any) -> None:
        last, last_change = -1, time.monotonic()
        while True:
            done = await self.fetchval(sql, *args)
            if done >= target:
                return
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
class Measured:
    """One throughput measurement: N runs (or chains) started by the client while the
    workers executed them; time from the first start to the last finish (server clock)."""

    runs: int
    items: int  # work items per run
    seconds: float
    p99_seconds: float
    commits: int  # Δ xact_commit over the window, minus our own statements
    write_xacts: int  # xid-assigning transactions, cluster-wide
    wal_syncs: int
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

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds

    @property
    def commits_per_item(self) -> float:
        """Commits beyond the runs' starts, per work item (step or compensation)."""
        return (self.commits - self.runs) / (self.items * self.runs)

    @property
    def writes_per_item(self) -> float:
        """Write transactions (xid assigned: the durable, WAL-flushing commits) beyond the
        runs' starts, per work item."""
        return (self.write_xacts - self.runs) / (self.items * self.runs)

    @property
    def worker_ms_per_run(self) -> float:
        return 1000 * self.worker_cpu / self.runs

    @property
    def other_cpu(self) -> float:
        busy = self.client_cpu + self.worker_cpu + self.postgres_cpu + self.idle_cpu
        return CORES - busy / self.wall


# -- py-spy ----------------------------------------------------------------------------------

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
AREAS = (
    ("/saga/", "saga"),
    ("/asyncpg/", "asyncpg"),
    ("/pydantic", "pydantic"),
    ("/anyio/", "anyio"),
    ("/asyncio/", "asyncio (event loop)"),
    ("/selectors.py", "asyncio (event loop)"),
    ("/opentelemetry/", "opentelemetry"),
    ("/google/protobuf/", "opentelemetry (protobuf)"),
    ("/requests/", "opentelemetry (HTTP export)"),
    ("/urllib3/", "opentelemetry (HTTP export)"),
    ("/http/client.py", "opentelemetry (HTTP export)"),
    ("/structlog/", "structlog"),
    ("/json/", "json"),
    ("/uuid.py", "uuid"),
    ("/benchmarks/", "benchmark harness"),
    ("/threading.py", "threading"),
)


def frame_area(file: str) -> str:
    for needle, area in AREAS:
        if needle in file:
            return area
    return "other"


def short_file(file: str) -> str:
    """A path relative to site-packages, the repository or the standard library."""
    for marker in ("/site-packages/", f"{REPO}/", "/lib/python3."):
        if marker in file:
            rest = file.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3." else rest
    return file


def summarize_pyspy(path: Path, seconds: float) -> dict[str, Any]:
    """From py-spy's raw (collapsed) stacks: samples by library of the innermost frame,
    the hottest functions by own time, and the saga functions by inclusive time."""
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for raw in stack.split(";"):
            match = FRAME.match(raw)
            frames.append((match["func"], match["file"]) if match else (raw, ""))
        func, file = frames[-1]
        own[f"{func} ({short_file(file)})"] += n
        areas[frame_area(file)] += n
        for key in {f"{f} ({short_file(fl)})" for f, fl in frames if "/saga/" in fl}:
            inclusive[key] += n
    return {
        "samples": total,
        "busy": total / (PYSPY_RATE * seconds) if seconds else math.nan,
        "areas": areas.most_common(),
        "own": own.most_common(12),
        "saga": inclusive.most_common(12),
    }


def find_py_spy(explicit: str | None) -> str | None:
    for candidate in (
        explicit,
        os.environ.get("SAGA_BENCH_PYSPY"),
        shutil.which("py-spy"),
        *PYSPY_CANDIDATES,
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


# -- the suite -------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    runs: int
    repeats: int
    sections: tuple[str, ...]
    pgbench_seconds: int
    latency_rate: float
    latency_seconds: float
    scale_runs: int
    scale_events: int | None
    memory_runs: int
    py_spy: str | None = None


class Suite:
    def __init__(self, base_dsn: str, cluster: Cluster | None, opts: Options) -> None:
        self.base_dsn = base_dsn
        self.cluster = cluster
        self.opts = opts
        self.postmaster = cluster.postmaster_pid() if cluster else None
        self.tag = uuid.uuid4().hex[:6]
        self.admin: asyncpg.Connection | None = None
        self.sampler_conn: asyncpg.Connection | None = None
        self.created: list[str] = []
        self.workers: list[WorkerProc] = []
        self.results: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.fingerprint = saga_fingerprint()
        self.commit = git_commit()
        self.logdir = Path(tempfile.mkdtemp(prefix="saga-bench-logs."))
        atexit.register(shutil.rmtree, self.logdir, True)  # also after SIGTERM
        self.spawned = 0

    async def spawn(self, *args: str) -> WorkerProc:
        if saga_fingerprint() != self.fingerprint:
            raise BenchmarkError(
                "saga/ changed while the benchmark ran (a new worker process would run other "
                "code than this one): run it again"
            )
        self.spawned += 1
        return await WorkerProc.spawn(*args, log=self.logdir / f"worker{self.spawned}.log")

    # -- plumbing --------------------------------------------------------------------------

    @property
    def a(self) -> asyncpg.Connection:
        assert self.admin is not None
        return self.admin

    async def __aenter__(self) -> Suite:
        self.admin = await asyncpg.connect(self.base_dsn)
        self.sampler_conn = await asyncpg.connect(self.base_dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            for worker in self.workers:
                await worker.stop()
            self.workers.clear()
            for name in list(self.created):
                with contextlib.suppress(Exception):
                    await self.a.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for conn in (self.sampler_conn, self.admin):
                if conn is not None:
                    await conn.close()
            shutil.rmtree(self.logdir, ignore_errors=True)

    async def database(self, label: str) -> tuple[str, str]:
        name = f"saga_bench_{self.tag}_{label}"
        await self.a.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await self.a.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name, with_database(self.base_dsn, name)

    async def saga_database(self, label: str) -> tuple[str, str]:
        """A fresh database with saga's schema (migrated by an orchestrator closed again)."""
        db, dsn = await self.database(label)
        sagas = [build() for build in SAGAS.values()]
        async with saga.Orchestrator(dsn, sagas=sagas, concurrency=0):
            pass
        return db, dsn

    async def drop(self, name: str) -> None:
        await self.a.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    async def checkpoint(self) -> None:
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await self.a.execute("CHECKPOINT")

    async def ensure_workers(self, n: int) -> list[WorkerProc]:
        while len(self.workers) < n:
            self.workers.append(await self.spawn())
        return self.workers[:n]

    def cpu(self) -> CpuSample:
        return CpuSample.take(self.postmaster)

    # -- one throughput window ---------------------------------------------------------------

    async def window(
        self,
        *,
        db: str,
        dsn: str,
        kind: str,
        workers: Sequence[WorkerProc],
        open_cmd: dict[str, Any],
        client: Callable[
            [str], contextlib.AbstractAsyncContextManager[Callable[[], Awaitable[None]]]
        ],
        runs: int,
        drain: bool = False,
        hook: Callable[[Sequence[WorkerProc]], contextlib.AbstractAsyncContextManager[Any]]
        | None = None,
    ) -> Measured:
        """Open the workers, start ``runs`` through ``client`` while they execute, wait
        until every run finished, close everything, then read the counters.

        ``drain``: start every run first (no worker open), then open the workers and time
        from the first claim to the last finish. ``hook`` is entered around the measured
        part (the profiler)."""
        admin = self.a
        await self.checkpoint()
        await wait_until_no_backends(admin, db)
        before = await read_stats(admin, db)
        t0 = await admin.fetchval("SELECT clock_timestamp()")
        start_rate = [math.nan]

        async def open_workers() -> None:
            await asyncio.gather(*(w.call({**open_cmd, "dsn": dsn}, "opened") for w in workers))

        async def close_workers() -> list[dict[str, Any]]:
            return list(
                await asyncio.gather(*(w.call({"cmd": "close"}, "closed") for w in workers))
            )

        if kind == "queue":
            done_sql = "SELECT count(*) FROM jobs WHERE step = 3 AND status = 'done'"
            done_args: tuple[Any, ...] = ()
        else:
            # runs_finished_at (partial, finished runs only) keeps this cheap at 1M rows.
            done_sql = "SELECT count(*) FROM saga.runs WHERE due_at IS NULL AND finished_at >= $1"
            done_args = (t0,)
        assert self.sampler_conn is not None
        sampler = WaitSampler(self.sampler_conn, db)
        if drain:
            began = time.monotonic()
            async with client(dsn) as start_everything:
                await start_everything()
            start_rate[0] = runs / (time.monotonic() - began)
        else:
            await open_workers()
        poller = await Poller.connect(dsn)
        try:
            async with contextlib.AsyncExitStack() as stack:
                start_all: Callable[[], Awaitable[None]] | None = None
                if not drain:
                    start_all = await stack.enter_async_context(client(dsn))
                if hook is not None:
                    await stack.enter_async_context(hook(workers))
                cpu0, w0 = self.cpu(), sum(w.cpu_seconds() for w in workers)
                k0 = sum(w.kernel_seconds() for w in workers)

                async def starting() -> None:
                    if start_all is None:
                        await open_workers()
                        return
                    began = time.monotonic()
                    await start_all()
                    start_rate[0] = runs / (time.monotonic() - began)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(sampler.run)
                    tg.start_soon(starting)
                    await poller.wait_done(done_sql, runs, *done_args)
                    cpu1, w1 = self.cpu(), sum(w.cpu_seconds() for w in workers)
                    k1 = sum(w.kernel_seconds() for w in workers)
                    tg.cancel_scope.cancel()
            closed = await close_workers()
            spans: dict[str, int] = {}
            calls: dict[str, int] = {}
            for reply in closed:
                for key, into in (("spans", spans), ("calls", calls)):
                    for k, v in reply.get(key, {}).items():
                        into[k] = into.get(k, 0) + v
            span = await poller.fetchrow(*self._span_query(kind, t0))
        finally:
            await poller.close()
        if span["n"] != runs or span["ok"] != runs:
            raise BenchmarkError(
                f"{kind}: expected {runs} correctly finished runs, found {span['ok']} of "
                f"{span['n']}"
            )
        await wait_until_no_backends(admin, db)
        after = await read_stats(admin, db)
        delta: DbStats = after - before
        first = span["first_claim"] if drain else span["first_start"]
        return Measured(
            runs=runs,
            items=ITEMS[kind],
            seconds=(span["last_done"] - first).total_seconds(),
            p99_seconds=(span["p99_done"] - first).total_seconds(),
            commits=delta.xact_commit - poller.xacts,
            write_xacts=delta.next_xid,
            wal_syncs=delta.wal_sync,
            start_rate=start_rate[0],
            client_cpu=cpu1.python - cpu0.python,
            worker_cpu=w1 - w0,
            worker_kernel=k1 - k0,
            postgres_cpu=cpu1.postgres - cpu0.postgres,
            idle_cpu=cpu1.idle - cpu0.idle,
            wall=cpu1.wall - cpu0.wall,
            waits=sampler.summary(3),
            lease_expiries=int(span["expiries"]),
            spans=spans,
            calls=calls,
        )

    def _span_query(self, kind: str, t0: dt.datetime) -> tuple[str, dt.datetime]:
        if kind == "queue":
            return (
                """
                SELECT min(created_at) FILTER (WHERE step = 1) AS first_start,
                       max(finished_at) FILTER (WHERE step = 3) AS last_done,
                       percentile_disc(0.99) WITHIN GROUP (ORDER BY finished_at)
                           FILTER (WHERE step = 3) AS p99_done,
                       count(*) FILTER (WHERE step = 1) AS n,
                       count(*) FILTER (WHERE step = 3 AND status = 'done' AND result = '1')
                           AS ok,
                       0 AS expiries
                FROM jobs WHERE created_at >= $1
                """,
                t0,
            )
        return (
            f"""
            WITH r AS (SELECT * FROM saga.runs WHERE created_at >= $1)
            SELECT min(created_at) AS first_start, max(finished_at) AS last_done,
                   percentile_disc(0.99) WITHIN GROUP (ORDER BY finished_at) AS p99_done,
                   count(*) AS n, count(*) FILTER (WHERE {FINISHED_OK[kind]}) AS ok,
                   (SELECT count(*) FROM saga.events e JOIN r ON e.run_id = r.id
                    WHERE e.kind = 'lease_expired') AS expiries,
                   (SELECT min(e.at) FROM saga.events e JOIN r ON e.run_id = r.id
                    WHERE e.kind = 'step_started') AS first_claim
            FROM r
            """,
            t0,
        )

    def saga_client(
        self, definition: saga.Saga[Input], runs: int, tracing: Tracing | None = None
    ) -> Callable[[str], contextlib.AbstractAsyncContextManager[Callable[[], Awaitable[None]]]]:
        """A client-only orchestrator (concurrency=0) in this process, starting ``runs``
        runs with STARTERS concurrent tasks."""

        @contextlib.asynccontextmanager
        async def client(dsn: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
            providers: dict[str, Any] = {}
            if tracing is not None:
                providers = {
                    "tracer_provider": tracing.tracer_provider,
                    "meter_provider": tracing.meter_provider,
                }
            async with saga.Orchestrator(
                dsn, sagas=[definition], concurrency=0, migrate=False, **providers
            ) as orch:

                async def start_all() -> None:
                    numbers = iter(range(runs))

                    async def starter() -> None:
                        for i in numbers:  # the tasks share one iterator
                            await orch.start(definition, Input(i=i))

                    async with anyio.create_task_group() as tg:
                        for _ in range(STARTERS):
                            tg.start_soon(starter)

                yield start_all

        return client

    def queue_client(
        self, runs: int
    ) -> Callable[[str], contextlib.AbstractAsyncContextManager[Callable[[], Awaitable[None]]]]:
        @contextlib.asynccontextmanager
        async def client(dsn: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
            async def no_reset(_conn: asyncpg.Connection) -> None:
                pass

            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, reset=no_reset)
            try:

                async def start_all() -> None:
                    numbers = iter(range(runs))

                    async def starter() -> None:
                        for i in numbers:
                            await pool.execute(QUEUE_START, i, json.dumps({"i": i}))

                    async with anyio.create_task_group() as tg:
                        for _ in range(STARTERS):
                            tg.start_soon(starter)

                yield start_all
            finally:
                await pool.close()

        return client

    async def measure_saga(
        self,
        name: str,
        concurrency: int,
        processes: int,
        label: str,
        *,
        database: tuple[str, str] | None = None,
        tracing: tuple[Tracing, dict[str, Any], list[WorkerProc]] | None = None,
        drain: bool = False,
        count_calls: bool = False,
        hook: Callable[[Sequence[WorkerProc]], contextlib.AbstractAsyncContextManager[Any]]
        | None = None,
        runs: int | None = None,
    ) -> Measured:
        runs = runs or self.opts.runs
        db, dsn = database or await self.saga_database(label)
        workers = (tracing[2] if tracing else None) or await self.ensure_workers(processes)
        definition = SAGAS[name]()
        open_cmd: dict[str, Any] = {
            "cmd": "open",
            "kind": "saga",
            "saga": name,
            "concurrency": concurrency,
            "tracing": tracing[1] if tracing else None,
            "count_calls": count_calls,
        }
        m = await self.window(
            db=db,
            dsn=dsn,
            kind=name,
            workers=workers,
            open_cmd=open_cmd,
            client=self.saga_client(definition, runs, tracing[0] if tracing else None),
            runs=runs,
            drain=drain,
            hook=hook,
        )
        if database is None:
            await self.drop(db)
        self.log_measured(label, m)
        return m

    async def measure_queue(self, concurrency: int, label: str) -> Measured:
        db, dsn = await self.database(label)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(QUEUE_DDL)
        finally:
            await conn.close()
        workers = await self.ensure_workers(1)
        m = await self.window(
            db=db,
            dsn=dsn,
            kind="queue",
            workers=workers,
            open_cmd={"cmd": "open", "kind": "queue", "concurrency": concurrency},
            client=self.queue_client(self.opts.runs),
            runs=self.opts.runs,
        )
        await self.drop(db)
        self.log_measured(label, m)
        return m

    def log_measured(self, label: str, m: Measured) -> None:
        say(
            f"{label}: {m.runs_per_s:,.0f} runs/s ({m.seconds:.2f} s), "
            f"{m.commits_per_item:.2f} commits/item, worker {m.worker_cpu / m.wall:.2f} / "
            f"client {m.client_cpu / m.wall:.2f} / postgres {m.postgres_cpu / m.wall:.2f} cores"
            + (f", {m.lease_expiries} lease expiries" if m.lease_expiries else "")
        )

    # -- sections ------------------------------------------------------------------------------

    async def ceiling(self) -> None:
        pgbench = find_pgbench(self.cluster.bindir if self.cluster else find_pg_bindir_or_none())
        if pgbench is None:
            self.notes.append("pgbench not found: no ceiling, no ratios")
            return
        db, dsn = await self.database("pgbench")
        if self.cluster is not None:
            conn_args = ["-h", str(self.cluster.dir), "-p", str(Cluster.PORT), "-U", "postgres", db]
        else:
            conn_args = [dsn]
        began = time.monotonic()
        await anyio.to_thread.run_sync(
            pgbench_call, pgbench, ["-i", "-q", "-s", str(PGBENCH_SCALE), *conn_args], 600.0
        )
        say(f"pgbench -i -s {PGBENCH_SCALE}: {time.monotonic() - began:.1f} s")
        await self.checkpoint()
        tps: dict[tuple[str, int], list[float]] = {}
        latency: dict[tuple[str, int], list[float]] = {}
        seconds = self.opts.pgbench_seconds
        with tempfile.TemporaryDirectory(prefix="saga-bench-") as work:
            for repeat in range(self.opts.repeats):
                for script_name, script in PGBENCH_SCRIPTS.items():
                    path = Path(work) / f"{script_name}.sql"
                    path.write_text(script)
                    for clients in PGBENCH_CLIENTS:
                        await wait_until_no_backends(self.a, db)
                        args = ["-n", "-c", str(clients), "-j", str(min(clients, 2))]
                        args += ["-T", str(seconds), "-f", str(path), *conn_args]
                        out = await anyio.to_thread.run_sync(
                            pgbench_call, pgbench, args, seconds + 60.0
                        )
                        found = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
                        lat = re.search(r"^latency average = ([\d.]+) ms", out, re.MULTILINE)
                        if not found or not lat:
                            raise BenchmarkError(f"no tps/latency in pgbench output:\n{out}")
                        tps.setdefault((script_name, clients), []).append(float(found[1]))
                        latency.setdefault((script_name, clients), []).append(float(lat[1]))
                        say(
                            f"pgbench {script_name} {clients:>2} clients (repeat {repeat + 1}): "
                            f"{float(found[1]):,.0f} TPS, {float(lat[1]):.3f} ms"
                        )
        await self.drop(db)  # its buffers and autovacuum must not weigh on what follows
        self.results["ceiling"] = {"tps": tps, "latency": latency}

    def ceiling_tps(self, script: str = "UPDATE", clients: int = CEILING_CLIENTS) -> float:
        tps = self.results.get("ceiling", {}).get("tps", {}).get((script, clients))
        return Stat.of(tps).med if tps else math.nan

    def commit_ms(self) -> float:
        lat = self.results.get("ceiling", {}).get("latency", {}).get(("UPDATE", 1))
        return Stat.of(lat).med if lat else math.nan

    async def throughput(self) -> None:
        """The queue reference and the saga matrix, interleaved repeat by repeat."""
        do_queue = "queue" in self.opts.sections
        do_saga = "saga" in self.opts.sections
        queue: dict[int, list[Measured]] = {}
        sagas: dict[tuple[int, int], list[Measured]] = {}
        drains: dict[tuple[int, int], list[Measured]] = {}
        for repeat in range(self.opts.repeats):
            for c in CONCURRENCY if do_queue else ():
                m = await self.measure_queue(c, f"queue_c{c}_r{repeat}")
                queue.setdefault(c, []).append(m)
            for p in PROCESSES if do_saga else ():
                for c in CONCURRENCY:
                    m = await self.measure_saga("noop", c, p, f"saga_p{p}_c{c}_r{repeat}")
                    sagas.setdefault((c, p), []).append(m)
            for p in PROCESSES if do_saga else ():
                c = HEADLINE[0]
                m = await self.measure_saga("noop", c, p, f"drain_p{p}_c{c}_r{repeat}", drain=True)
                drains.setdefault((c, p), []).append(m)
        if do_queue:
            self.results["queue"] = queue
        if do_saga:
            self.results["saga"] = sagas
            self.results["drain"] = drains

    async def compensation(self) -> None:
        c, p = HEADLINE
        rows: list[Measured] = []
        for repeat in range(self.opts.repeats):
            rows.append(await self.measure_saga("compensate", c, p, f"comp_c{c}_r{repeat}"))
        self.results["compensation"] = rows

    async def latency(self) -> None:
        """20 runs/s for 20 s; each run awaited by its own task with result()."""
        variants: dict[str, list[dict[str, list[float]]]] = {}
        for repeat in range(self.opts.repeats):
            for variant in ("in-process", "client + 1 worker process"):
                samples = await self.latency_once(variant, len(variants), repeat)
                variants.setdefault(variant, []).append(samples)
        self.results["latency"] = variants

    async def latency_once(self, variant: str, index: int, repeat: int) -> dict[str, list[float]]:
        db, dsn = await self.saga_database(f"latency_{index}_r{repeat}")
        definition = SAGAS["noop"]()
        rate, seconds = self.opts.latency_rate, self.opts.latency_seconds
        starts: list[float] = []
        e2e: list[float] = []
        ids: list[uuid.UUID] = []
        late: list[float] = []
        in_process = variant == "in-process"
        workers: list[WorkerProc] = []
        if not in_process:
            workers = await self.ensure_workers(1)
            await workers[0].call(
                {"cmd": "open", "kind": "saga", "saga": "noop", "dsn": dsn, "concurrency": 32},
                "opened",
            )
        # Orchestrator defaults (concurrency 32, poll_interval 1 s); the client-only variant
        # executes nothing here.
        orch = saga.Orchestrator(
            dsn, sagas=[definition], migrate=False, concurrency=32 if in_process else 0
        )
        try:
            async with orch:

                async def one(i: int, record: bool) -> None:
                    t0 = time.perf_counter()
                    handle = await orch.start(definition, Input(i=i))
                    t1 = time.perf_counter()
                    await handle.result(timeout=60)
                    t2 = time.perf_counter()
                    if record:
                        starts.append(t1 - t0)
                        e2e.append(t2 - t1)
                        ids.append(handle.id)

                warmup = int(rate)  # one second, not recorded
                total = warmup + int(rate * seconds)
                async with anyio.create_task_group() as tg:
                    began = anyio.current_time()
                    for i in range(total):
                        due = began + i / rate
                        await anyio.sleep_until(due)
                        late.append(anyio.current_time() - due)
                        tg.start_soon(one, i, i >= warmup)
        finally:
            for w in workers:
                await w.call({"cmd": "close"}, "closed")
        conn = await asyncpg.connect(dsn)
        try:
            server = await conn.fetch(
                """
                SELECT extract(epoch FROM r.finished_at - r.created_at)::float8 AS s,
                       extract(epoch FROM c.at - r.created_at)::float8 AS claim
                FROM saga.runs r
                JOIN LATERAL (SELECT min(at) AS at FROM saga.events e
                              WHERE e.run_id = r.id AND e.kind = 'step_started') c ON true
                WHERE r.id = ANY($1)
                """,
                ids,
            )
        finally:
            await conn.close()
        await self.drop(db)
        out = {
            "start": starts,
            "e2e": e2e,
            "server": [r["s"] for r in server],
            "claim": [r["claim"] for r in server],
            "late": late,
        }
        say(
            f"latency {variant} (repeat {repeat + 1}): start-to-result p50 "
            f"{1000 * pct(e2e, 0.5):.1f} ms, p99 {1000 * pct(e2e, 0.99):.1f} ms, max "
            f"{1000 * max(e2e):.1f} ms; start() p50 {1000 * pct(starts, 0.5):.2f} ms; "
            f"created-to-finished p50 {1000 * pct(out['server'], 0.5):.1f} ms"
        )
        return out

    async def scale(self) -> None:
        c, p = HEADLINE
        big_db, big_dsn = await self.saga_database("scale_1m")
        load = await self.load_finished_runs(big_dsn)
        explain = await self.explain_claim(big_dsn)
        empty: list[Measured] = []
        big: list[Measured] = []
        for repeat in range(self.opts.repeats):
            empty.append(await self.measure_saga("noop", c, p, f"scale_empty_r{repeat}"))
            big.append(
                await self.measure_saga(
                    "noop", c, p, f"scale_1m_r{repeat}", database=(big_db, big_dsn)
                )
            )
        await self.drop(big_db)
        self.results["scale"] = {"empty": empty, "big": big, "load": load, "explain": explain}

    async def load_finished_runs(self, dsn: str) -> dict[str, Any]:
        """Bulk-insert finished runs and their events with INSERT ... SELECT generate_series,
        cloned from one real run of the no-op saga (so every column is what saga writes),
        indexes dropped during the load and rebuilt after it; then VACUUM ANALYZE."""
        n = self.opts.scale_runs
        definition = SAGAS["noop"]()
        async with saga.Orchestrator(dsn, sagas=[definition], concurrency=1, migrate=False) as o:
            template = (await o.start(definition, Input(i=0))).id
            await (o.get_run(template)).result(timeout=30)
        conn = await asyncpg.connect(dsn)
        timings: dict[str, float] = {}
        try:
            real_events = await conn.fetchval(
                "SELECT count(*) FROM saga.events WHERE run_id = $1", template
            )
            per_run = min(self.opts.scale_events or real_events, real_events)
            began = time.monotonic()
            await conn.execute("SET maintenance_work_mem = '256MB'")
            indexes = await conn.fetch(
                """
                SELECT i.indexrelid::regclass::text AS name, i.indrelid::regclass::text AS tbl,
                       pg_get_indexdef(i.indexrelid) AS def, c.conname
                FROM pg_index i
                LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype = 'p'
                WHERE i.indrelid IN ('saga.runs'::regclass, 'saga.events'::regclass)
                """
            )
            async with conn.transaction():
                for ix in indexes:
                    if ix["conname"]:
                        await conn.execute(
                            f'ALTER TABLE {ix["tbl"]} DROP CONSTRAINT "{ix["conname"]}"'
                        )
                    else:
                        await conn.execute(f"DROP INDEX {ix['name']}")
                t = time.monotonic()
                # Every column as the template run has it, but these (the column list is
                # read from the table, so a schema change cannot silently skip a column).
                override = {
                    "id": "gen_random_uuid()",
                    "idempotency_key": "NULL",
                    "input": "jsonb_build_object('i', g)::text",
                    "due_at": "NULL",
                    "lease_owner": "NULL",
                    "cancel_requested": "false",
                    "released": "false",
                    "created_at": "at",
                    "updated_at": "at + d",
                    "finished_at": "at + d",
                }
                columns = [
                    r["column_name"]
                    for r in await conn.fetch(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = 'saga' AND table_name = 'runs' "
                        "ORDER BY ordinal_position"
                    )
                ]
                values = ", ".join(override.get(c, f"t.{c}") for c in columns)
                await conn.execute(
                    f"""
                    INSERT INTO saga.runs ({", ".join(columns)})
                    SELECT {values}
                    FROM saga.runs t,
                         generate_series(1, $2) AS g,
                         LATERAL (SELECT now() - interval '30 days' + g * interval '2 s' AS at,
                                         t.finished_at - t.created_at AS d) x
                    WHERE t.id = $1
                    """,
                    template,
                    n,
                )
                timings["runs insert"] = time.monotonic() - t
                t = time.monotonic()
                await conn.execute(
                    """
                    INSERT INTO saga.events (run_id, at, kind, step, attempt, worker, data)
                    SELECT r.id, r.created_at + (e.at - t.created_at), e.kind, e.step,
                           e.attempt, e.worker, e.data
                    FROM saga.runs r
                    CROSS JOIN (SELECT * FROM saga.events WHERE run_id = $1
                                ORDER BY id LIMIT $2) e
                    CROSS JOIN (SELECT created_at FROM saga.runs WHERE id = $1) t
                    WHERE r.id <> $1
                    """,
                    template,
                    per_run,
                )
                timings["events insert"] = time.monotonic() - t
                t = time.monotonic()
                for ix in indexes:
                    await conn.execute(ix["def"])
                    if ix["conname"]:
                        await conn.execute(
                            f'ALTER TABLE {ix["tbl"]} ADD CONSTRAINT "{ix["conname"]}" '
                            f"PRIMARY KEY USING INDEX {ix['name'].split('.')[-1]}"
                        )
                timings["index rebuild"] = time.monotonic() - t
            t = time.monotonic()
            await conn.execute("VACUUM ANALYZE saga.runs")
            await conn.execute("VACUUM ANALYZE saga.events")
            timings["VACUUM ANALYZE"] = time.monotonic() - t
            t = time.monotonic()
            await self.checkpoint()
            timings["CHECKPOINT"] = time.monotonic() - t
            sizes = await conn.fetchrow(
                """
                SELECT (SELECT count(*) FROM saga.runs) AS runs,
                       (SELECT count(*) FROM saga.events) AS events,
                       pg_size_pretty(pg_total_relation_size('saga.runs')) AS runs_size,
                       pg_size_pretty(pg_total_relation_size('saga.events')) AS events_size
                """
            )
            assert sizes is not None
        finally:
            await conn.close()
        total = time.monotonic() - began
        say(
            f"loaded {sizes['runs']:,} finished runs ({sizes['runs_size']}) and "
            f"{sizes['events']:,} events ({sizes['events_size']}) in {total:.0f} s: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        )
        return {
            "runs": sizes["runs"],
            "events": sizes["events"],
            "runs_size": sizes["runs_size"],
            "events_size": sizes["events_size"],
            "per_run": per_run,
            "real_events": real_events,
            "seconds": total,
            "timings": timings,
        }

    async def explain_claim(self, dsn: str) -> dict[str, str]:
        """EXPLAIN of saga's claim statement on the loaded tables: the custom plan with
        ANALYZE (1,000 due runs inserted first; everything rolled back), and the generic
        plan a prepared statement may switch to."""
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            claim = Store(pool)._q["claim"]
            definition = SAGAS["noop"]()
            fp = definition.fingerprint
            params = ("bench-explain", 64, 30.0, ["bench_noop"], [1], [fp])
            async with pool.acquire() as conn:
                tr = conn.transaction()
                await tr.start()
                try:
                    await conn.execute(
                        """
                        INSERT INTO saga.runs (id, saga_name, saga_version, fingerprint,
                                               input, step_name, due_at)
                        SELECT gen_random_uuid(), 'bench_noop', 1, $1,
                               jsonb_build_object('i', g)::text, 's1', now() - interval '1 s'
                        FROM generate_series(1, 1000) g
                        """,
                        fp,
                    )
                    rows = await conn.fetch(
                        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + claim, *params
                    )
                    custom = "\n".join(r[0] for r in rows)
                finally:
                    await tr.rollback()
                await conn.execute("SET plan_cache_mode = force_generic_plan")
                await conn.execute(
                    "PREPARE bench_claim(text, int, float8, text[], int[], text[]) AS " + claim
                )
                rows = await conn.fetch(
                    "EXPLAIN (COSTS OFF) EXECUTE bench_claim('bench-explain', 64, 30, "
                    f"'{{bench_noop}}', '{{1}}', '{{{fp}}}')"
                )
                generic = "\n".join(r[0] for r in rows)
                await conn.execute("DEALLOCATE bench_claim")
                await conn.execute("RESET plan_cache_mode")
        finally:
            await pool.close()
        return {"custom": custom, "generic": generic}

    async def memory(self) -> None:
        rows = []
        for repeat in range(self.opts.repeats):
            rows.append(await self.memory_once(repeat))
        self.results["memory"] = rows

    async def memory_once(self, repeat: int) -> dict[str, float]:
        """A fresh worker process with Orchestrator(concurrency=N) and a saga whose first
        step awaits an asyncio.Event: the client starts N runs, the worker claims them all
        and N steps wait at once; RSS is read from /proc/<pid>/status (VmRSS, VmHWM)."""
        n = self.opts.memory_runs
        db, dsn = await self.saga_database(f"memory_r{repeat}")
        worker = await self.spawn()
        try:
            began = time.monotonic()
            await worker.call(
                {
                    "cmd": "open",
                    "kind": "saga",
                    "saga": "gate",
                    "dsn": dsn,
                    "concurrency": n,
                    "gate_target": n,
                },
                "opened",
            )
            idle_rss = status_kib(worker.pid, "VmRSS")
            definition = SAGAS["gate"]()
            client = self.saga_client(definition, n)
            async with client(dsn) as start_all:
                await start_all()
            await worker.expect("gate_full", timeout=300)
            held_rss = status_kib(worker.pid, "VmRSS")
            held_hwm = status_kib(worker.pid, "VmHWM")
            poller = await Poller.connect(dsn)
            try:
                running = await poller.fetchval(
                    "SELECT count(*) FROM saga.runs WHERE status = 'running' AND lease_owner "
                    "IS NOT NULL"
                )
                await worker.call({"cmd": "release"}, "released")
                await poller.wait_done(
                    "SELECT count(*) FROM saga.runs WHERE status = 'completed'", n
                )
            finally:
                await poller.close()
            peak = status_kib(worker.pid, "VmHWM")
            await worker.call({"cmd": "close"}, "closed")
            seconds = time.monotonic() - began
        finally:
            await worker.stop()
        await self.drop(db)
        row = {
            "idle_mib": idle_rss / 1024,
            "held_mib": held_rss / 1024,
            "held_hwm_mib": held_hwm / 1024,
            "peak_mib": peak / 1024,
            "kib_per_run": (held_rss - idle_rss) / n,
            "running": float(running),
            "seconds": seconds,
        }
        say(
            f"memory (repeat {repeat + 1}): {running:,} runs in flight: RSS "
            f"{row['idle_mib']:.0f} MiB idle -> {row['held_mib']:.0f} MiB held "
            f"({row['kib_per_run']:.1f} KiB/run), peak {row['peak_mib']:.0f} MiB"
        )
        return row

    async def tracing(self) -> None:
        """Alternately untraced (the shared workers, which never load the SDK) and traced
        (worker processes of their own, with the SDK set up once per process)."""
        c, p = HEADLINE
        receiver = await self.spawn("receiver")
        traced_workers: list[WorkerProc] = []
        try:
            hello = await receiver.expect(None, timeout=30)
            spec: dict[str, Any] = {
                "endpoint": f"http://127.0.0.1:{hello['port']}",
                "metric_interval_ms": METRIC_INTERVAL_MS,
            }
            parent_tracing = Tracing(spec["endpoint"], METRIC_INTERVAL_MS)
            traced_workers = [await self.spawn() for _ in range(p)]
            plain: list[Measured] = []
            traced: list[Measured] = []
            profile: dict[str, dict[str, Any]] = {}
            profiled: Measured | None = None
            try:
                for repeat in range(self.opts.repeats):
                    plain.append(await self.measure_saga("noop", c, p, f"trace_off_r{repeat}"))
                    traced.append(
                        await self.measure_saga(
                            "noop",
                            c,
                            p,
                            f"trace_on_r{repeat}",
                            tracing=(parent_tracing, spec, traced_workers),
                        )
                    )
                if self.opts.py_spy and "profile" in self.opts.sections:
                    profiled = await self.measure_saga(
                        "noop",
                        c,
                        p,
                        "trace_profile",
                        tracing=(parent_tracing, spec, traced_workers),
                        hook=self.pyspy_hook(profile, client=False),
                    )
            finally:
                client_spans = parent_tracing.flush()
                parent_tracing.tracer_provider.shutdown()
                parent_tracing.meter_provider.shutdown()
                for worker in traced_workers:  # they flush and shut down their SDK at exit
                    await worker.stop()
        finally:
            await receiver.stop()
        self.results["tracing"] = {
            "plain": plain,
            "traced": traced,
            "client": client_spans,
            "profile": profile,
            "profiled": profiled,
        }

    def pyspy_hook(
        self, into: dict[str, dict[str, Any]], client: bool = True
    ) -> Callable[[Sequence[WorkerProc]], contextlib.AbstractAsyncContextManager[Any]]:
        """py-spy (``record --nonblocking``, raw) on the first worker process and on this
        process while the window runs; summaries land in ``into``."""
        exe = self.opts.py_spy
        assert exe is not None

        @contextlib.asynccontextmanager
        async def hook(workers: Sequence[WorkerProc]) -> AsyncIterator[None]:
            targets = {"worker process": workers[0].pid}
            if client:
                targets["client (benchmark process)"] = os.getpid()
            recorders: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
            for name, pid in targets.items():
                path = self.logdir / f"pyspy-{pid}-{time.monotonic_ns()}.txt"
                cmd = [exe, "record", "--nonblocking", "--full-filenames", "--pid", str(pid)]
                cmd += ["--format", "raw"]
                cmd += ["--rate", str(PYSPY_RATE), "--output", str(path)]
                proc = _spawn_quiet(cmd)
                recorders[name] = (proc, path)
            began = time.monotonic()
            try:
                yield
            finally:
                seconds = time.monotonic() - began
                for name, (proc, path) in recorders.items():
                    proc.send_signal(signal.SIGINT)
                    try:
                        _, err = await anyio.to_thread.run_sync(proc.communicate, None, 30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        err = b"timed out"
                    CHILDREN.discard(proc)
                    if not path.exists():
                        self.notes.append(f"py-spy on {name} failed: {err.decode()[-300:]}")
                        continue
                    into[name] = summarize_pyspy(path, seconds)

        return hook

    async def profile(self) -> None:
        """Where the time goes: the throughput row once more (its figures are not used
        above) with saga's Store calls counted in the worker and, when py-spy is available,
        py-spy sampling the worker process and this process; at concurrency 64 and 1."""
        rows: dict[str, tuple[Measured, dict[str, dict[str, Any]]]] = {}
        for c in (HEADLINE[0], 1):
            profiles: dict[str, dict[str, Any]] = {}
            hook = self.pyspy_hook(profiles) if self.opts.py_spy else None
            m = await self.measure_saga(
                "noop",
                c,
                1,
                f"profile_c{c}",
                count_calls=True,
                hook=hook,
                runs=self.opts.runs if c > 1 else max(1, self.opts.runs // 3),
            )
            rows[f"saga, 1 process x {c}"] = (m, profiles)
        if not self.opts.py_spy:
            self.notes.append(
                "py-spy not found (--py-spy, $SAGA_BENCH_PYSPY, PATH, /tmp/pyspy-venv): the "
                "profile shows Store call counts only"
            )
        self.results["profile"] = rows

    async def run(self) -> None:
        sections = self.opts.sections
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("ceiling", self.ceiling),
            ("queue+saga", self.throughput),
            ("compensation", self.compensation),
            ("latency", self.latency),
            ("scale", self.scale),
            ("memory", self.memory),
            ("tracing", self.tracing),
            ("profile", self.profile),
        ]
        for name, fn in steps:
            wanted = any(s in sections for s in name.split("+"))
            if not wanted:
                continue
            began = time.monotonic()
            say(f"== {name}")
            await fn()
            self.timings[name] = time.monotonic() - began


# -- report ----------------------------------------------------------------------------------


def saga_fingerprint() -> str:
    """A hash of saga's sources: the workers import saga when they start, so a change
    during the run would mix versions."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "saga").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".sql"):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def versions() -> str:
    import importlib.metadata as md

    def v(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    return (
        f"{platform.python_implementation()} {platform.python_version()}; asyncpg "
        f"{asyncpg.__version__}, anyio {v('anyio')}, pydantic {v('pydantic')}, structlog "
        f"{v('structlog')}, opentelemetry-sdk {v('opentelemetry-sdk')}, "
        f"opentelemetry-exporter-otlp-proto-http {v('opentelemetry-exporter-otlp-proto-http')}"
    )


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


class Report:
    def __init__(self, suite: Suite, header: dict[str, str]) -> None:
        self.s = suite
        self.r = suite.results
        self.o = suite.opts
        self.header = header
        self.ceiling = suite.ceiling_tps()
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def render(self) -> str:
        self.add("# saga benchmark results", "")
        self.add(
            "Generated by `.venv/bin/python benchmarks/run.py` (see benchmarks/README.md); do "
            "not edit by hand.",
            "",
        )
        self.add(*(f"- {k}: {v}" for k, v in self.header.items()))
        self.add("")
        self.targets()
        self.ceiling_section()
        self.throughput_section()
        self.compensation_section()
        self.latency_section()
        self.scale_section()
        self.memory_section()
        self.tracing_section()
        self.profile_section()
        self.method_section()
        return "\n".join(self.lines) + "\n"

    # -- figures the targets need ---------------------------------------------------------------

    def saga_rows(self) -> dict[tuple[int, int], list[Measured]]:
        rows: dict[tuple[int, int], list[Measured]] = self.r.get("saga", {})
        return rows

    def best_single_process(self) -> tuple[int, Stat] | None:
        rows = {
            c: Stat.of([m.runs_per_s for m in ms])
            for (c, p), ms in self.saga_rows().items()
            if p == 1
        }
        if not rows:
            return None
        c = max(rows, key=lambda k: rows[k].med)
        return c, rows[c]

    @staticmethod
    def mixed_verdict(ok: dict[tuple[int, int], bool]) -> str:
        """met / missed over (concurrency, processes) rows, naming the rows that differ."""
        if all(ok.values()):
            return verdict(True)
        if not any(ok.values()):
            return verdict(False)
        missed = ", ".join(f"{p} x {c}" for (c, p), good in sorted(ok.items()) if not good)
        return f"{verdict(True)} except {verdict(False)} at {missed} (processes x concurrency)"

    def targets(self) -> None:
        self.add("## Targets", "")
        self.add(
            "Reported against, not asserted. Figures are median (min-max) over the repeats.",
            "",
            "| target | measured | verdict |",
            "| --- | --- | --- |",
        )
        best = self.best_single_process()
        drains = {c: ms for (c, p), ms in self.r.get("drain", {}).items() if p == 1}
        if best is not None:
            c, st = best
            figures = [f"{st.fmt()} runs/s started and run meanwhile (concurrency {c}, best)"]
            verdicts = [f"{verdict(st.med >= 1000)} started and run meanwhile"]
            for dc, ms in drains.items():
                dst = Stat.of([m.runs_per_s for m in ms])
                figures.append(f"{dst.fmt()} runs/s draining pre-started runs (concurrency {dc})")
                verdicts.append(f"{verdict(dst.med >= 1000)} draining")
            self.add(
                "| ≥ 1,000 runs/s of 3-step no-op sagas in one (worker) process | "
                + "; ".join(figures)
                + f" | {'; '.join(verdicts)} |"
            )
        rows = self.saga_rows()
        if rows:
            writes = {k: Stat.of([m.writes_per_item for m in ms]) for k, ms in rows.items()}
            alls = {k: Stat.of([m.commits_per_item for m in ms]) for k, ms in rows.items()}
            worst = max(writes, key=lambda k: writes[k].med)
            head = HEADLINE if HEADLINE in writes else worst
            self.add(
                "| ≤ ~1 commit per step on the happy path (read as ≤ 1.1 durable commits) | "
                f"write commits/step {writes[head].fmt(2)} at {head[1]} process x {head[0]}, "
                f"worst row {writes[worst].fmt(2)} ({worst[1]} process(es) x {worst[0]}); all "
                f"transactions incl. read-only ones: {alls[head].fmt(2)} at {head[1]} x "
                f"{head[0]}, up to {max(st.med for st in alls.values()):.2f} | "
                f"{self.mixed_verdict({k: st.med <= 1.1 for k, st in writes.items()})} |"
            )
        for variant, reps in self.r.get("latency", {}).items():
            p50 = Stat.of([pct(s["e2e"], 0.5) * 1000 for s in reps])
            p99 = Stat.of([pct(s["e2e"], 0.99) * 1000 for s in reps])
            self.add(
                f"| p50 start-to-result ≤ 10 ms at {self.o.latency_rate:g} runs/s | "
                f"{p50.fmt(1, ' ms')} ({variant}) | {verdict(p50.med <= 10)} |",
                f"| p99 start-to-result ≤ 30 ms at {self.o.latency_rate:g} runs/s | "
                f"{p99.fmt(1, ' ms')} ({variant}) | {verdict(p99.med <= 30)} |",
            )
        scale = self.r.get("scale")
        if scale:
            e = Stat.of([m.runs_per_s for m in scale["empty"]])
            b = Stat.of([m.runs_per_s for m in scale["big"]])
            ratio = b.med / e.med
            self.add(
                f"| throughput at {scale['load']['runs']:,} finished runs within 10 % of empty "
                f"| {ratio:.2f} x empty ({b.fmt()} vs {e.fmt()} runs/s) | "
                f"{verdict(ratio >= 0.9)} |",
            )
            uses = (
                "runs_due" in scale["explain"]["custom"]
                and "runs_due" in (scale["explain"]["generic"])
            )
            self.add(
                f"| claim uses the partial index runs_due at that size | "
                f"{'yes' if uses else 'NO'} (custom and generic plan) | {verdict(uses)} |"
            )
        self.add("")

    # -- sections ------------------------------------------------------------------------------

    def ceiling_section(self) -> None:
        c = self.r.get("ceiling")
        if not c:
            return
        self.add(
            "## Ceiling: pgbench on the same server",
            "",
            f"One statement per transaction, scale {PGBENCH_SCALE}, {self.o.pgbench_seconds} s "
            f"per run, `-j min(clients, 2)`, median (min-max) of {self.o.repeats} repeats. "
            f"Ratios below divide by the single-UPDATE TPS at {CEILING_CLIENTS} clients "
            f"(**{self.ceiling:,.0f} TPS**).",
            "",
            "| transaction | clients | TPS | latency avg |",
            "| --- | ---: | ---: | ---: |",
        )
        for (script, clients), tps in c["tps"].items():
            lat = Stat.of(c["latency"][(script, clients)])
            self.add(
                f"| single {script} | {clients} | {Stat.of(tps).fmt()} | {lat.fmt(3, ' ms')} |"
            )
        self.add("")

    def tp_row(self, label: str, ms: list[Measured], vs: float | None = None) -> str:
        rps = Stat.of([m.runs_per_s for m in ms])
        items = ms[0].items
        steps = Stat.of([items * m.runs_per_s for m in ms])
        cpi = Stat.of([m.commits_per_item for m in ms])
        wpi = Stat.of([m.writes_per_item for m in ms])
        wcpu = Stat.of([m.worker_ms_per_run for m in ms])
        pg = statistics.median(m.postgres_cpu / m.wall for m in ms)
        wc = statistics.median(m.worker_cpu / m.wall for m in ms)
        cc = statistics.median(m.client_cpu / m.wall for m in ms)
        other = max(m.other_cpu for m in ms)
        noisy = " †" if other > NOISY_OTHER_CPU else ""
        warn = " ⚠" if any(m.lease_expiries for m in ms) else ""
        vs_txt = rps.ratio(vs) if vs else "-"
        return (
            f"| {label}{noisy}{warn} | {rps.fmt()} | {steps.fmt()} | "
            f"{steps.ratio(self.ceiling)} | {vs_txt} | {wpi.fmt(2)} | {cpi.fmt(2)} | "
            f"{wcpu.fmt(2)} | "
            f"{wc:.2f} / {cc:.2f} / {pg:.2f} | {ms[len(ms) // 2].waits} |"
        )

    TP_HEAD = (
        "| workload | runs/s | steps/s | steps/s ÷ ceiling | runs/s ÷ queue (same concurrency) "
        "| write commits/step | all commits/step | worker CPU ms/run "
        "| CPU cores: workers / client / postgres | backend states (sampled) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    )

    def throughput_section(self) -> None:
        queue: dict[int, list[Measured]] = self.r.get("queue", {})
        sagas = self.saga_rows()
        if not queue and not sagas:
            return
        self.add(
            "## Throughput: 3-step no-op chains",
            "",
            f"{self.o.runs:,} runs per measurement, started by a client in the benchmark "
            f"process ({STARTERS} concurrent starters, 4 connections) while the worker "
            f"process(es) execute them; runs/s = N / (first start to last finish, server "
            f"clock). Median (min-max) of {self.o.repeats} repeats, interleaved; a fresh "
            "database per measurement. write commits/step = (write transactions - N starts) / "
            "3N, write transactions = those assigned a transaction id (they write WAL and wait "
            "for its flush), cluster-wide; all commits/step = (Δ pg_stat_database.xact_commit - "
            "N starts - the benchmark's own queries) / 3N, which also counts read-only "
            "transactions: empty claims, and the one each listening backend runs to read a "
            "NOTIFY.",
            "",
            *self.TP_HEAD,
        )
        for c, ms in sorted(queue.items()):
            self.add(self.tp_row(f"queue (no framework), 1 process x {c}", ms))
        qmed = {c: Stat.of([m.runs_per_s for m in ms]).med for c, ms in queue.items()}
        for (c, p), ms in sorted(sagas.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            self.add(
                self.tp_row(f"saga, {p} process{'es' if p > 1 else ''} x {c}", ms, qmed.get(c))
            )
        drains: dict[tuple[int, int], list[Measured]] = self.r.get("drain", {})
        for (c, p), ms in sorted(drains.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            self.add(self.tp_row(f"saga drain, {p} process{'es' if p > 1 else ''} x {c}", ms))
        self.add(
            "",
            "Concurrency = the orchestrator's `concurrency` per worker process (queue: worker "
            "tasks); both use a pool of max(4, min(C + 2, 20)) connections per process. "
            "÷ queue compares with the queue at the same concurrency (1 process). "
            'Client = this process starting runs. "drain": the runs are all started first, '
            "then the worker process(es) open; runs/s = N / (first claim to last finish), so "
            "no start competes for the CPU or the database (commits/step still subtracts the "
            "N starts from the whole window). † = more than "
            f"{NOISY_OTHER_CPU} cores busy outside our processes and the cluster (noisy); "
            "⚠ = some run waited for a lease to expire.",
            "",
        )
        details = [(f"queue x {c}", ms) for c, ms in sorted(queue.items())]
        details += [
            (f"saga {p}p x {c}", ms)
            for (c, p), ms in sorted(sagas.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ]
        details += [
            (f"saga drain {p}p x {c}", ms)
            for (c, p), ms in sorted(drains.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ]
        self.add(
            "Details (medians; write xacts = transactions that wrote, cluster-wide):",
            "",
            "| workload | write xacts/run | WAL fsyncs/run | starts/s | s to 99 % / 100 % |",
            "| --- | ---: | ---: | ---: | ---: |",
        )
        for label, ms in details:
            med = statistics.median
            self.add(
                f"| {label} | {med(m.write_xacts / m.runs for m in ms):.2f} | "
                f"{med(m.wal_syncs / m.runs for m in ms):.2f} | "
                f"{med(m.start_rate for m in ms):,.0f} | "
                f"{med(m.p99_seconds for m in ms):.2f} / {med(m.seconds for m in ms):.2f} |"
            )
        self.add("")

    def compensation_section(self) -> None:
        rows: list[Measured] | None = self.r.get("compensation")
        if not rows:
            return
        c, p = HEADLINE
        happy = self.saga_rows().get(HEADLINE)
        happy_med = Stat.of([m.runs_per_s for m in happy]).med if happy else math.nan
        rps = Stat.of([m.runs_per_s for m in rows])
        self.add(
            "## Compensation path",
            "",
            "3-step sagas whose third step raises `saga.PermanentError`; steps 1 and 2 have "
            "(no-op) compensations, so a run is 3 steps + 2 compensations = 5 work items and "
            f"ends `compensated`. {p} worker process x {c}, same method as above.",
            "",
            *self.TP_HEAD,
            self.tp_row(f"compensation, {p} process x {c}", rows).replace("| steps/s", "| items/s"),
            "",
            f"Runs/s relative to the happy path at the same settings: {rps.ratio(happy_med)}; "
            f'"steps/s" here counts the 5 work items, "commits/step" is per work item.',
            "",
        )

    def latency_section(self) -> None:
        lat: dict[str, list[dict[str, list[float]]]] | None = self.r.get("latency")
        if not lat:
            return
        commit = self.s.commit_ms()
        self.add(
            "## Latency at a fixed rate",
            "",
            f"{self.o.latency_rate:g} runs/s for {self.o.latency_seconds:g} s (after 1 s of "
            "warm-up, not recorded) per repeat; each run is started on schedule and awaited by "
            "its own task with `run.result()`. start-to-result = from `start()` returning to "
            "`result()` returning; created-to-finished = the run's `finished_at - created_at` "
            "(server clock); created-to-first-claim = until its first `step_started` event. "
            "Orchestrator defaults (concurrency 32, poll_interval 1 s). "
            f"Per-repeat percentiles, median (min-max) of {self.o.repeats} repeats; x commit = "
            f"÷ the pgbench single-UPDATE latency at 1 client ({commit:.3f} ms).",
            "",
            "| setup | figure | p50 | p99 | max | p50 x commit |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        )
        for variant, reps in lat.items():
            for key, name in (
                ("e2e", "start-to-result"),
                ("start", "`start()`"),
                ("server", "created-to-finished"),
                ("claim", "created-to-first-claim"),
            ):
                p50 = Stat.of([1000 * pct(r[key], 0.5) for r in reps])
                p99 = Stat.of([1000 * pct(r[key], 0.99) for r in reps])
                mx = Stat.of([1000 * max(r[key]) for r in reps])
                self.add(
                    f"| {variant} | {name} | {p50.fmt(2)} | {p99.fmt(2)} | {mx.fmt(1)} | "
                    f"{p50.ratio(commit, 1)} |"
                )
        for variant, reps in lat.items():
            share = Stat.of(
                [100 * sum(x >= LATE_CLAIM for x in r["claim"]) / len(r["claim"]) for r in reps]
            )
            self.add(
                f"| {variant} | runs first claimed ≥ {1000 * LATE_CLAIM:.0f} ms after "
                f"created | {share.fmt(1, ' %')} | | | |"
            )
        self.add(
            "",
            f"A first claim {1000 * LATE_CLAIM:.0f} ms or more after the start means the run "
            "missed its wake-up: the worker's claim ran without seeing it as claimable (for "
            "example while another statement held the run's row lock: the claim skips locked "
            "rows) and nothing woke the claim loop again until the next start's NOTIFY (50 ms "
            f"later at {self.o.latency_rate:g} runs/s) or `poll_interval`.",
        )
        late = max(max(r["late"]) for reps in lat.values() for r in reps)
        self.add(
            "",
            f"All times in ms. Samples per repeat: {len(next(iter(lat.values()))[0]['e2e'])}; "
            f"the scheduler started every run within {1000 * late:.1f} ms of its slot. "
            '"client + 1 worker process": this process only starts and waits (`concurrency=0`), '
            "a worker process executes (concurrency 32).",
            "",
        )

    def scale_section(self) -> None:
        scale = self.r.get("scale")
        if not scale:
            return
        load = scale["load"]
        c, p = HEADLINE
        e = scale["empty"]
        self.add(
            "## Scale: 1,000,000 finished runs",
            "",
            f"{load['runs']:,} finished runs ({load['runs_size']} with indexes) and "
            f"{load['events']:,} events ({load['events_size']}) were bulk-inserted with "
            "`INSERT ... SELECT generate_series`, cloned from one real run of the no-op saga "
            "(status completed, due_at NULL, finished_at set, every column as saga writes it), "
            f"{load['per_run']} events per run (a real run has {load['real_events']}), indexes "
            "dropped during the load and rebuilt after, then `VACUUM ANALYZE` and `CHECKPOINT`: "
            f"{load['seconds']:.0f} s ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in load["timings"].items())
            + f"). Then the same measurement ({p} process x {c}) alternately on a fresh empty "
            f"database and on the loaded one, {self.o.repeats} times each.",
            "",
            *self.TP_HEAD,
            self.tp_row("empty tables", e),
            self.tp_row(f"{load['runs']:,} finished runs", scale["big"]),
            "",
            'Claim statement (`Store._q["claim"]`) on the loaded tables, custom plan with '
            "`EXPLAIN (ANALYZE, BUFFERS)` (1,000 due runs inserted first in the same, "
            "rolled-back transaction; limit 64):",
            "",
            "```",
            scale["explain"]["custom"],
            "```",
            "",
            "Generic plan (`plan_cache_mode = force_generic_plan`, as a prepared statement may "
            "use after five executions):",
            "",
            "```",
            scale["explain"]["generic"],
            "```",
            "",
        )

    def memory_section(self) -> None:
        rows = self.r.get("memory")
        if not rows:
            return
        n = self.o.memory_runs

        def st(key: str, digits: int = 0, unit: str = "") -> str:
            return Stat.of([r[key] for r in rows]).fmt(digits, unit)

        self.add(
            f"## Memory: {n:,} runs in flight in one worker process",
            "",
            f"A fresh worker process opens `Orchestrator(concurrency={n:,})` (pool of 20 "
            "connections) with a saga whose first step awaits an `asyncio.Event`; the client "
            f"starts {n:,} runs; once all {n:,} first steps are waiting, RSS is read from "
            "`/proc/<pid>/status`; then the event is set and every run completes. Median "
            f"(min-max) of {self.o.repeats} repeats, a fresh process each.",
            "",
            "| figure | value |",
            "| --- | ---: |",
            f"| runs leased and waiting at the reading | {st('running')} |",
            f"| RSS, orchestrator open and idle | {st('idle_mib', 0, ' MiB')} |",
            f"| RSS with {n:,} runs in flight | {st('held_mib', 0, ' MiB')} |",
            f"| per run in flight | {st('kib_per_run', 1, ' KiB')} |",
            f"| peak RSS (VmHWM) over the whole cycle | {st('peak_mib', 0, ' MiB')} |",
            f"| seconds for the cycle (start, hold, complete {n:,}) | {st('seconds', 1)} |",
            "",
        )

    def tracing_section(self) -> None:
        t = self.r.get("tracing")
        if not t:
            return
        c, p = HEADLINE
        plain, traced = t["plain"], t["traced"]
        off = Stat.of([m.runs_per_s for m in plain])
        on = Stat.of([m.runs_per_s for m in traced])
        cpu_off = Stat.of([m.worker_ms_per_run for m in plain])
        cpu_on = Stat.of([m.worker_ms_per_run for m in traced])
        spans: dict[str, int] = {}
        for m in traced:
            for k, v in m.spans.items():
                spans[k] = spans.get(k, 0) + v
        overhead = 100 * (1 - on.med / off.med)
        cpu_overhead = 100 * (cpu_on.med / cpu_off.med - 1)
        client = t["client"]
        self.add(
            "## Tracing overhead",
            "",
            "Traced: the worker process(es) and the client each run the OpenTelemetry SDK as an "
            "application would: `TracerProvider` + `BatchSpanProcessor` (SDK defaults: queue "
            "2,048 spans, batches of 512, every 5 s) + `OTLPSpanExporter` (OTLP/HTTP, protobuf), "
            f"and a `MeterProvider` with a `PeriodicExportingMetricReader` every "
            f"{METRIC_INTERVAL_MS / 1000:g} s + `OTLPMetricExporter`, all passed as "
            "`tracer_provider=`/`meter_provider=`; they export to a dummy OTLP/HTTP receiver "
            "on 127.0.0.1 (a separate process that reads each request and answers 200). "
            f"Untraced: no providers (the API's no-ops). {p} process x {c}, alternating, "
            f"{self.o.repeats} times each.",
            "",
            *self.TP_HEAD,
            self.tp_row("untraced", plain),
            self.tp_row("traced", traced, off.med),
            "",
            f"**Throughput overhead: {overhead:.1f} %** (median runs/s traced ÷ untraced = "
            f"{on.med / off.med:.2f}; range of the ratio {on.ratio(off.med)}). Worker CPU per "
            f"run: {cpu_off.fmt(2)} ms untraced vs {cpu_on.fmt(2)} ms traced "
            f"(**+{cpu_overhead:.0f} %**). Worker spans: {spans.get('ended', 0):,} ended, "
            f"{spans.get('exported', 0):,} exported, "
            f"{spans.get('ended', 0) - spans.get('exported', 0):,} not exported (dropped by a "
            f"full queue), {spans.get('export_failures', 0)} failed exports; client: "
            f"{client['ended']:,} ended, {client['exported']:,} exported.",
            "",
        )

    def cpu_budget(self) -> None:
        """CPU per run of the co-located processes, and the throughput those CPU costs
        allow on this machine's cores if nothing else limited it."""
        rows: list[tuple[str, list[Measured]]] = []
        queue = self.r.get("queue", {}).get(HEADLINE[0])
        if queue:
            rows.append((f"queue, 1 process x {HEADLINE[0]}", queue))
        saga_row = self.saga_rows().get(HEADLINE)
        if saga_row:
            rows.append((f"saga, 1 process x {HEADLINE[0]}", saga_row))
        drain = self.r.get("drain", {}).get(HEADLINE)
        if drain:
            rows.append((f"saga drain, 1 process x {HEADLINE[0]}", drain))
        traced = self.r.get("tracing", {}).get("traced")
        if traced:
            rows.append((f"saga traced, 1 process x {HEADLINE[0]}", traced))
        if not rows:
            return
        self.add(
            "CPU per run (ms, medians) of every process involved, and the runs/s those costs "
            f"would allow if the {CORES} cores were the only limit (= {CORES} x 1000 / total):",
            "",
            "| workload | worker (of which kernel) | client | postgres | total | idle cores "
            "| CPU-bound runs/s | measured |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        )
        med = statistics.median
        for label, ms in rows:
            w = med(1000 * m.worker_cpu / m.runs for m in ms)
            k = med(1000 * m.worker_kernel / m.runs for m in ms)
            c = med(1000 * m.client_cpu / m.runs for m in ms)
            pg = med(1000 * m.postgres_cpu / m.runs for m in ms)
            idle = med(m.idle_cpu / m.wall for m in ms)
            total = w + c + pg
            self.add(
                f"| {label} | {w:.2f} ({k:.2f}) | {c:.2f} | {pg:.2f} | {total:.2f} | "
                f"{idle:.2f} | {CORES * 1000 / total:,.0f} | "
                f"{med(m.runs_per_s for m in ms):,.0f} |"
            )
        self.add(
            "",
            "Client CPU covers the starts (and, in the drain row, only polling: the starts ran "
            "before the window); postgres CPU covers the whole cluster.",
            "",
        )

    def profile_section(self) -> None:
        prof: dict[str, tuple[Measured, dict[str, dict[str, Any]]]] | None = self.r.get("profile")
        if not prof:
            return
        self.add(
            "## Where the time goes",
            "",
            "The throughput row run once more (not part of the figures above), with saga's "
            "`Store` calls counted in the worker process (a wrapper, benchmark-only) and "
            f"py-spy (`record --nonblocking`, {PYSPY_RATE} Hz) sampling the worker process and "
            "the benchmark process; 'busy' = samples / (rate x seconds): the share of time the "
            "process was not idle in the event loop's `select` (running, or runnable and "
            "waiting for a CPU).",
            "",
        )
        self.cpu_budget()
        self.add("Store calls per run, counted in the worker process:", "")
        keys = [
            "claim",
            "claimed items",
            "empty claims",
            "transition",
            "heartbeat",
            "census",
            "count_unclaimable",
        ]
        self.add(
            "| row | runs/s | write / all commits per step | " + " | ".join(keys) + " |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |",
        )
        for label, (m, _) in prof.items():
            cells = " | ".join(f"{m.calls.get(k, 0) / m.runs:.3f}" for k in keys)
            self.add(f"| {label} | {m.runs_per_s:,.0f} | {m.commits_per_item:.2f} | {cells} |")
        self.add(
            "",
            "A run's commits beyond its start: its claims (one per claim statement, shared "
            "by the runs it leased; empty claims commit too) plus one transition per step.",
            "",
        )
        profiles = [
            (label, name, p, m) for label, (m, ps) in prof.items() for name, p in ps.items()
        ]
        tracing = self.r.get("tracing", {})
        if tracing.get("profiled") is not None:
            profiles += [
                (f"saga traced, 1 process x {HEADLINE[0]}", name, p, tracing["profiled"])
                for name, p in tracing["profile"].items()
            ]
        if profiles:
            self.add(
                "py-spy counts a thread as busy while it runs *or waits for a CPU*. On 2 shared "
                "cores the worker is often preempted right after the `send()` that wakes a "
                "Postgres backend, so samples pile up in `_SelectorSocketTransport.write`: "
                "that is mostly waiting for a CPU, not work (compare 'busy' with the CPU the "
                "process really used, from /proc, and with its small kernel share above).",
                "",
            )
        for label, name, p, m in profiles:
            if not p["samples"]:
                continue
            total = p["samples"]
            used = (m.worker_cpu if name.startswith("worker") else m.client_cpu) / m.wall
            areas = ", ".join(
                f"{a} {100 * n / total:.0f}%" for a, n in p["areas"] if n / total >= 0.01
            )
            self.add(
                f"**{label}, {name}**: busy {100 * p['busy']:.0f}% ({total:,} samples), CPU "
                f"used {used:.2f} cores. Own time by library: {areas}.",
                "",
                "| hottest functions (own time) | % | saga functions (inclusive) | % |",
                "| --- | ---: | --- | ---: |",
            )
            for i in range(max(len(p["own"]), len(p["saga"]))):
                own = p["own"][i] if i < len(p["own"]) else ("", 0)
                inc = p["saga"][i] if i < len(p["saga"]) else ("", 0)
                self.add(
                    f"| `{own[0]}` | {100 * own[1] / total:.1f} | "
                    f"{'`' + inc[0] + '`' if inc[0] else ''} | "
                    f"{(f'{100 * inc[1] / total:.1f}' if inc[0] else '')} |"
                )
            self.add("")

    def method_section(self) -> None:
        timings = ", ".join(f"{k} {v:.0f} s" for k, v in self.s.timings.items())
        self.add(
            "## Method and caveats",
            "",
            "- One sitting, one cluster, one machine: the benchmark process, the worker "
            "processes and Postgres share the same cores (co-located figures).",
            f"- Durable settings as listed above. Section times: {timings}.",
            "- Medians of the repeats; (min-max) beside them. Run counts are small "
            f"({self.o.runs:,} runs per throughput measurement) to keep the suite short; "
            "figures vary about ±10-15 % between sittings here.",
            "- The saga rows use orchestrator defaults apart from `concurrency` and "
            "`migrate=False` (the schema is migrated before the window).",
            *(f"- {note}" for note in self.s.notes),
            "",
        )


# -- main --------------------------------------------------------------------------------------


async def suite_main(opts: Options, dsn: str, cluster: Cluster | None) -> str:
    started = time.monotonic()
    load_before = load_average()
    version, settings = await server_facts(dsn)
    say(f"{version}; {settings}")
    async with Suite(dsn, cluster, opts) as suite:
        await suite.run()
    header = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "Postgres": version + (" (throwaway cluster, unix socket)" if cluster else " (--dsn)"),
        "settings": settings,
        "versions": versions(),
        "saga commit": suite.commit
        + (
            ""
            if saga_fingerprint() == suite.fingerprint
            else " (WARNING: saga/ changed during the run)"
        ),
        "suite time": f"{time.monotonic() - started:.0f} s (load average before: {load_before}, "
        f"after: {load_average()})",
        "defaults changed": ", ".join(
            f"{k}={v}"
            for k, v in dataclasses.asdict(opts).items()
            if v != dataclasses.asdict(DEFAULTS)[k] and k != "py_spy"
        )
        or "none",
        "py-spy": opts.py_spy or "not found (no profile samples)",
    }
    return Report(suite, header).render()


DEFAULTS = Options(
    runs=3000,
    repeats=3,
    sections=SECTIONS,
    pgbench_seconds=5,
    latency_rate=20.0,
    latency_seconds=20.0,
    scale_runs=1_000_000,
    scale_events=None,
    memory_runs=10_000,
)


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    d = DEFAULTS
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", help="postgresql:// URI (default: a throwaway durable cluster)")
    parser.add_argument("--runs", type=int, default=d.runs, help="runs per throughput row")
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument("--pgbench-seconds", type=int, default=d.pgbench_seconds)
    parser.add_argument("--latency-rate", type=float, default=d.latency_rate)
    parser.add_argument("--latency-seconds", type=float, default=d.latency_seconds)
    parser.add_argument("--scale-runs", type=int, default=d.scale_runs)
    parser.add_argument(
        "--scale-events",
        type=int,
        default=d.scale_events,
        help="events per loaded run (default: as many as a real run has)",
    )
    parser.add_argument("--memory-runs", type=int, default=d.memory_runs)
    parser.add_argument(
        "--py-spy",
        help="py-spy executable for the profile section (default: $SAGA_BENCH_PYSPY, PATH, "
        f"then {', '.join(PYSPY_CANDIDATES)})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"write the report here (default: {DEFAULT_OUTPUT.relative_to(HERE.parent)} when "
        "every section runs, else nowhere)",
    )
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.runs < 1 or args.repeats < 1:
        parser.error("--runs and --repeats must be >= 1")
    opts = Options(
        runs=args.runs,
        repeats=args.repeats,
        sections=sections,
        pgbench_seconds=args.pgbench_seconds,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds,
        scale_runs=args.scale_runs,
        scale_events=args.scale_events,
        memory_runs=args.memory_runs,
        py_spy=find_py_spy(args.py_spy),
    )
    return opts, args


def exit_code(exc: BaseException) -> int | None:
    """The code of a SystemExit (our SIGTERM/SIGHUP handler), also inside task groups."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            code = exit_code(inner)
            if code is not None:
                return code
    return None


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    configure_logging()
    cluster: Cluster | None = None
    try:
        if args.dsn:
            dsn = args.dsn
            install_exit_handlers(lambda: None)  # SIGTERM still kills the worker processes
        else:
            cluster = Cluster()
            install_exit_handlers(cluster.stop)
            say(f"starting a throwaway durable cluster ({cluster.bindir})")
            cluster.start()
            dsn = cluster.dsn
        text = anyio.run(suite_main, opts, dsn, cluster)
    except BenchmarkError as exc:
        say(f"FAILED: {exc}")
        return 1
    except BaseException as exc:
        code = exit_code(exc)
        if code is None:
            raise
        say(f"interrupted: exit {code}; everything started is stopped and removed")
        return code
    finally:
        if cluster is not None:
            cluster.stop()
    print(text)
    output = args.output or (DEFAULT_OUTPUT if set(opts.sections) == set(SECTIONS) else None)
    if output is not None:
        output.write_text(text)
        say(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
