"""Throughput of saga on PostgreSQL, next to the commit ceiling of the same server.

    .venv/bin/python benchmarks/throughput.py [--dsn DSN] [--runs 10000]
        [--concurrency 16,64,256] [--repeats 1] [--output FILE]

Without ``--dsn`` a throwaway cluster with DURABLE settings (fsync, synchronous_commit and
full_page_writes on: the defaults) is created in a temporary folder, listening on a unix
socket only, and always stopped and deleted at exit. The script then

1. measures the ceiling with pgbench on the same server (one UPDATE per transaction, scale
   16, 1 and 16 clients; and UPDATE + pg_notify per transaction, 16 clients);
2. for each concurrency level, in a fresh database: starts N runs of a 3-step no-op saga
   with 32 concurrent starters while one orchestrator executes them ("start+run"), and, in
   another fresh database, inserts N runs first and times only the processing ("drain");
3. prints a markdown report (and writes it to ``--output``).

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import platform
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio
import asyncpg
from _common import (
    CORES,
    STEPS,
    BenchmarkError,
    Cluster,
    CpuSample,
    Input,
    WaitSampler,
    build_saga,
    children_cpu,
    configure_logging,
    find_pg_bindir_or_none,
    find_pgbench,
    fmt,
    git_commit,
    install_exit_handlers,
    load_average,
    machine,
    pgbench_call,
    read_stats,
    say,
    server_facts,
    wait_until_no_backends,
    with_database,
)

import saga

STARTERS = 32
POLL_EVERY = 0.2  # seconds between completion polls
STALL_TIMEOUT = 60.0  # fail when no run completes for this long
NOISY_OTHER_CPU = 0.3  # cores busy outside this process and the cluster: flag the row
PGBENCH_SCALE = 16
PGBENCH_SECONDS = 10
PGBENCH_SCRIPT = (
    f"\\set aid random(1, {PGBENCH_SCALE * 100000})\n"
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
)
# The same UPDATE plus a NOTIFY in its transaction, as saga's start and last transition do.
# A committing transaction that notified holds a cluster-wide lock through its WAL flush
# (PreCommit_Notify), so these commits cannot share an fsync: this is the ceiling for them.
PGBENCH_NOTIFY_SCRIPT = (
    f"\\set aid random(1, {PGBENCH_SCALE * 100000})\n"
    "BEGIN;\n"
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
    "SELECT pg_notify('bench', 'x');\n"
    "END;\n"
)


# -- pgbench -----------------------------------------------------------------------------


@dataclasses.dataclass
class PgbenchRun:
    label: str
    clients: int
    tps: float
    wal_syncs_per_xact: float
    postgres_cpu: float  # cores
    client_cpu: float  # cores used by pgbench itself


@dataclasses.dataclass
class PgbenchResult:
    runs: dict[str, PgbenchRun] = dataclasses.field(default_factory=dict)
    note: str = ""

    def tps(self, label: str) -> float:
        run = self.runs.get(label)
        return run.tps if run else float("nan")


async def run_pgbench(
    pgbench: str,
    conn_args: list[str],
    admin: asyncpg.Connection,
    database: str,
    postmaster: int | None,
) -> PgbenchResult:
    """Initialise scale 16, then one-UPDATE transactions for 10 s at 1 and 16 clients, and
    UPDATE+NOTIFY transactions at 16 clients."""
    result = PgbenchResult()
    started = time.monotonic()
    init = ["-i", "-q", "-s", str(PGBENCH_SCALE), *conn_args]
    await anyio.to_thread.run_sync(pgbench_call, pgbench, init, 300.0)
    say(f"pgbench -i -s {PGBENCH_SCALE}: {time.monotonic() - started:.1f} s")
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await admin.execute("CHECKPOINT")
    with tempfile.TemporaryDirectory() as work:
        plain, notify = Path(work) / "update.sql", Path(work) / "update_notify.sql"
        plain.write_text(PGBENCH_SCRIPT)
        notify.write_text(PGBENCH_NOTIFY_SCRIPT)
        for label, clients, script in (
            ("1 client", 1, plain),
            ("16 clients", 16, plain),
            ("16 clients, UPDATE + NOTIFY", 16, notify),
        ):
            args = ["-n", "-c", str(clients), "-j", str(min(clients, 2))]
            args += ["-T", str(PGBENCH_SECONDS), "-f", str(script), *conn_args]
            await wait_until_no_backends(admin, database)
            stats0 = await read_stats(admin, database)
            cpu0, child0 = CpuSample.take(postmaster), children_cpu()
            out = await anyio.to_thread.run_sync(
                pgbench_call, pgbench, args, PGBENCH_SECONDS + 60.0
            )
            wall = time.monotonic() - cpu0.wall
            child1 = children_cpu()
            # The backends have just exited: their CPU shows up in the postmaster's cutime
            # only once it has reaped them, so read after they are gone.
            await wait_until_no_backends(admin, database)
            cpu1 = CpuSample.take(postmaster)
            stats = await read_stats(admin, database) - stats0
            match = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
            if not match:
                raise BenchmarkError(f"could not find tps in pgbench output:\n{out}")
            run = PgbenchRun(
                label=label,
                clients=clients,
                tps=float(match[1]),
                wal_syncs_per_xact=stats.wal_sync / max(stats.xact_commit, 1),
                postgres_cpu=(cpu1.postgres - cpu0.postgres) / wall,
                client_cpu=(child1 - child0) / wall,
            )
            say(
                f"pgbench, {label}: {run.tps:,.0f} TPS, "
                f"{run.wal_syncs_per_xact:.2f} WAL fsyncs/xact, postgres "
                f"{run.postgres_cpu:.2f} / pgbench {run.client_cpu:.2f} cores"
            )
            result.runs[label] = run
    return result


# -- the saga being measured ---------------------------------------------------------------


# -- database statistics -----------------------------------------------------------------


class Statements:
    """--statements: which statements a run costs, from pg_stat_statements (a diagnostic:
    the extension adds overhead, so figures from such a run are not the headline ones)."""

    async def setup(self, admin: asyncpg.Connection) -> None:
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    async def reset(self, admin: asyncpg.Connection) -> None:
        await admin.execute("SELECT pg_stat_statements_reset()")

    async def collect(self, admin: asyncpg.Connection, database: str, runs: int) -> str:
        rows = await admin.fetch(
            r"""
            SELECT s.calls, s.total_exec_time, s.mean_exec_time,
                   left(regexp_replace(s.query, '\s+', ' ', 'g'), 90) AS query
            FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
            WHERE d.datname = $1
            ORDER BY s.calls DESC, s.total_exec_time DESC
            LIMIT 15
            """,
            database,
        )
        lines = [
            "| calls/run | mean ms | total ms | statement |",
            "| ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            query = r["query"].replace("|", "\\|")
            lines.append(
                f"| {r['calls'] / runs:.2f} | {r['mean_exec_time']:.3f} | "
                f"{r['total_exec_time']:,.0f} | `{query}` |"
            )
        return "\n".join(lines)


# -- one measurement ---------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    concurrency: int
    variant: str  # "start+run" or "drain"
    runs: int
    seconds: float  # first start (or worker open) to last completion, server clock
    commits_delta: int  # xact_commit of the measured window, own polls subtracted
    commits_total: int  # xact_commit per run including the start (drain: start phase too)
    write_xacts: int  # xid-assigning transactions, whole run lifecycle
    wal_bytes: int
    wal_syncs: int
    start_rate: float
    python_cpu: float
    postgres_cpu: float
    idle_cpu: float
    waits: str
    pool_size: int
    p99_seconds: float  # to the 99th percentile completion
    lease_expiries: int  # runs a worker had to take over after a lease ran out
    statements: str  # --statements: per-statement breakdown

    @property
    def other_cpu(self) -> float:
        """Busy cores that are neither this process nor the cluster: the kernel, and any
        other load on the machine (which makes the figures noisy)."""
        return CORES - self.idle_cpu - self.python_cpu - self.postgres_cpu

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.seconds

    @property
    def commits_per_step(self) -> float:
        # start+run: the window holds the N starts too; drain: it holds none.
        starts = self.runs if self.variant == "start+run" else 0
        return (self.commits_delta - starts) / (STEPS * self.runs)


async def _no_reset(conn: asyncpg.Connection) -> None:
    """--pool-size: like the orchestrator's own pool, no reset query on each release."""


class Bench:
    def __init__(
        self,
        base_dsn: str,
        runs: int,
        postmaster: int | None,
        tag: str,
        statements: Statements | None,
        pool_size: int | None = None,
    ) -> None:
        self.statements = statements
        self.pool_size = pool_size
        self.base_dsn = base_dsn
        self.runs = runs
        self.postmaster = postmaster
        self.tag = tag
        self.admin: asyncpg.Connection | None = None
        self.created: list[str] = []

    async def __aenter__(self) -> Bench:
        self.admin = await asyncpg.connect(self.base_dsn)
        if self.statements is not None:
            await self.statements.setup(self.admin)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.admin is not None
        with anyio.CancelScope(shield=True):
            for name in self.created:
                with contextlib.suppress(Exception):
                    await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await self.admin.close()

    async def fresh_database(self, label: str) -> tuple[str, str]:
        assert self.admin is not None
        name = f"saga_bench_{self.tag}_{label}"
        await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await self.admin.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        dsn = with_database(self.base_dsn, name)
        # Migrate with a separate, closed-again orchestrator so the schema's DDL is not
        # in the measured window.
        async with saga.Orchestrator(dsn, sagas=[build_saga()], concurrency=0):
            pass
        return name, dsn

    async def drop(self, name: str) -> None:
        assert self.admin is not None
        await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    async def checkpoint(self) -> None:
        assert self.admin is not None
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await self.admin.execute("CHECKPOINT")

    async def start_all(self, definition: saga.Saga[Input]) -> None:
        """N starts through 32 concurrent starter tasks."""
        numbers = iter(range(self.runs))

        async def starter() -> None:
            for i in numbers:  # the tasks share one iterator
                await definition.start(Input(i=i))

        async with anyio.create_task_group() as tg:
            for _ in range(STARTERS):
                tg.start_soon(starter)

    async def wait_completed(self, poll: asyncpg.Connection, counter: list[int]) -> None:
        last, last_change = -1, time.monotonic()
        while True:
            counter[0] += 1
            done = await poll.fetchval("SELECT count(*) FROM saga.runs WHERE status='completed'")
            if done >= self.runs:
                return
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                raise BenchmarkError(
                    f"no run completed for {STALL_TIMEOUT:.0f} s ({done}/{self.runs} done); "
                    f"statuses: {await self.statuses(poll)}"
                )
            await anyio.sleep(POLL_EVERY)

    async def statuses(self, conn: asyncpg.Connection) -> dict[str, int]:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM saga.runs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    async def verify(self, conn: asyncpg.Connection) -> None:
        statuses = await self.statuses(conn)
        if statuses != {"completed": self.runs}:
            raise BenchmarkError(f"expected {self.runs} completed runs, found {statuses}")
        bad = await conn.fetchval(
            "SELECT count(*) FROM saga.runs WHERE output::text <> '1' "
            "OR cardinality(completed_steps) <> $1",
            STEPS,
        )
        if bad:
            raise BenchmarkError(f"{bad} completed runs lack an output or a step")

    async def measure(self, concurrency: int, variant: str, repeat: int) -> Measurement:
        assert self.admin is not None
        admin = self.admin
        db, dsn = await self.fresh_database(f"c{concurrency}_{variant.replace('+', '_')}_{repeat}")
        definition = build_saga()
        await self.checkpoint()
        await wait_until_no_backends(admin, db)
        if self.statements is not None:
            await self.statements.reset(admin)
        before = await read_stats(admin, db)
        polls = [0]  # queries of ours on the database, subtracted from xact_commit
        sampler = WaitSampler(admin, db)
        start_rate = float("nan")
        window_base = before
        if variant == "drain":
            started = time.monotonic()
            async with saga.Orchestrator(dsn, sagas=[definition], concurrency=0):
                await self.start_all(definition)
            start_rate = self.runs / (time.monotonic() - started)
            await wait_until_no_backends(admin, db)
            window_base = await read_stats(admin, db)
        poll = await asyncpg.connect(dsn)  # connecting runs no transaction
        try:
            t0_server = await admin.fetchval("SELECT clock_timestamp()")
            cpu0 = CpuSample.take(self.postmaster)
            pool_size = max(4, min(concurrency + 2, 20))  # what Orchestrator opens itself
            target: str | asyncpg.Pool = dsn
            if self.pool_size:
                pool_size = self.pool_size
                target = await asyncpg.create_pool(
                    dsn, min_size=1, max_size=pool_size, reset=_no_reset
                )
            orch = saga.Orchestrator(
                target, sagas=[definition], concurrency=concurrency, poll_interval=0.5
            )
            async with contextlib.AsyncExitStack() as stack:
                if isinstance(target, asyncpg.Pool):
                    stack.push_async_callback(target.close)
                await stack.enter_async_context(orch)
                tg = await stack.enter_async_context(anyio.create_task_group())
                tg.start_soon(sampler.run)
                if variant == "start+run":
                    tg.start_soon(self.start_all, definition)
                await self.wait_completed(poll, polls)
                cpu1 = CpuSample.take(self.postmaster)
                tg.cancel_scope.cancel()
            polls[0] += 2  # verify(): two queries
            await self.verify(poll)
            span = await poll.fetchrow(
                """
                SELECT min(created_at) AS first_start, max(created_at) AS last_start,
                       max(finished_at) AS last_done,
                       percentile_disc(0.99) WITHIN GROUP (ORDER BY finished_at) AS p99_done,
                       (SELECT count(*) FROM saga.events WHERE kind = 'lease_expired')
                           AS expiries
                FROM saga.runs
                """
            )
            # connecting (1), preparing each of our 4 statements once (4), the last query
            polls[0] += 1 + 4 + 1
            if span is None:  # pragma: no cover - an aggregate always returns a row
                raise BenchmarkError("could not read the runs' time span")
        finally:
            await poll.close()
        await wait_until_no_backends(admin, db)
        after = await read_stats(admin, db)
        if variant == "start+run":
            first = span["first_start"]
            start_span = (span["last_start"] - first).total_seconds()
            start_rate = self.runs / start_span if start_span > 0 else float("nan")
        else:
            first = t0_server
        seconds = (span["last_done"] - first).total_seconds()
        p99_seconds = (span["p99_done"] - first).total_seconds()
        window = after - window_base
        whole = after - before
        wall = cpu1.wall - cpu0.wall
        m = Measurement(
            concurrency=concurrency,
            variant=variant,
            runs=self.runs,
            seconds=seconds,
            commits_delta=window.xact_commit - polls[0],
            commits_total=whole.xact_commit - polls[0],
            write_xacts=whole.next_xid,
            wal_bytes=whole.wal_lsn,
            wal_syncs=whole.wal_sync,
            start_rate=start_rate,
            python_cpu=(cpu1.python - cpu0.python) / wall,
            postgres_cpu=(cpu1.postgres - cpu0.postgres) / wall,
            idle_cpu=(cpu1.idle - cpu0.idle) / wall,
            waits=sampler.summary(),
            pool_size=pool_size,
            p99_seconds=p99_seconds,
            lease_expiries=span["expiries"],
            statements=await self.statements.collect(admin, db, self.runs)
            if self.statements
            else "",
        )
        if window.xact_rollback:
            say(f"note: {window.xact_rollback} rollbacks in the window")
        await self.drop(db)
        return m


# -- report ------------------------------------------------------------------------------------


def report(
    header: dict[str, str], pgb: PgbenchResult, results: list[Measurement], runs: int
) -> str:
    lines = ["# saga throughput", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    tps16 = pgb.tps("16 clients")
    tps1, tps_notify = pgb.tps("1 client"), pgb.tps("16 clients, UPDATE + NOTIFY")
    lines.append(
        f"- pgbench ceiling (one UPDATE per transaction, scale {PGBENCH_SCALE}, "
        f"{PGBENCH_SECONDS} s, same server, same sitting): **{fmt(tps1)} TPS at 1 client, "
        f"{fmt(tps16)} TPS at 16 clients**{pgb.note}; the same UPDATE plus a `pg_notify` in "
        f"its transaction, 16 clients: {fmt(tps_notify)} TPS"
    )
    for run in pgb.runs.values():
        lines.append(
            f"  - {run.label}: {fmt(run.tps)} TPS, {run.wal_syncs_per_xact:.2f} WAL "
            f"fsyncs per transaction; CPU: postgres {fmt(run.postgres_cpu, 2)} cores, pgbench "
            f"{run.client_cpu:.2f} cores"
        )
    lines.append(
        f"- workload: {runs:,} runs per row of a {STEPS}-step no-op saga (default retry), "
        f"{STARTERS} concurrent starters, poll_interval 0.5 s; a fresh database per row"
    )
    lines += [
        "",
        "| concurrency | variant | runs/s | steps/s | steps/s ÷ pgbench-16 TPS "
        "| commits/step | commits/run | runs/s to 99% done |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results:
        noisy = " †" if m.other_cpu > NOISY_OTHER_CPU else ""
        lines.append(
            f"| {m.concurrency} | {m.variant}{noisy} | {fmt(m.runs_per_s)} | "
            f"{fmt(STEPS * m.runs_per_s)} | {fmt(STEPS * m.runs_per_s / tps16, 2)} | "
            f"{fmt(m.commits_per_step, 2)} | {fmt(m.commits_total / m.runs, 2)} | "
            f"{fmt(0.99 * m.runs / m.p99_seconds)}{' ⚠' if m.lease_expiries else ''} |"
        )
    lines += [
        "",
        f"Details (per run unless stated; CPU in cores busy over the measured window, "
        f"{CORES} cores = {CORES:.2f}):",
        "",
        "| concurrency | variant | seconds (to 99%) | lease expiries | starts/s | pool "
        "| write xacts/run | WAL fsyncs/run | WAL bytes/run | python CPU | postgres CPU "
        "| other CPU | idle CPU | backend states (sampled) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for m in results:
        lines.append(
            f"| {m.concurrency} | {m.variant} | {m.seconds:.2f} ({m.p99_seconds:.2f}) | "
            f"{m.lease_expiries} | {fmt(m.start_rate)} | "
            f"{m.pool_size} | {m.write_xacts / m.runs:.2f} | {m.wal_syncs / m.runs:.2f} | "
            f"{fmt(m.wal_bytes / m.runs)} | {fmt(m.python_cpu, 2)} | {fmt(m.postgres_cpu, 2)} "
            f"| {fmt(m.other_cpu, 2)} | {fmt(m.idle_cpu, 2)} | {m.waits} |"
        )
    for m in results:
        if m.statements:
            lines += [
                "",
                f"Statements, concurrency {m.concurrency}, {m.variant}:",
                "",
                m.statements,
            ]
    lines += [
        "",
        "commits/step = (Δ pg_stat_database.xact_commit - N starts) / (3 N) over the measured "
        "window (drain: no starts in it); commits/run = all of a run's transactions including "
        "its start. xact_commit counts every transaction, read-only ones too (e.g. the "
        "listening backend reading the NOTIFY queue, or a pool's reset query); write "
        "xacts/run counts only transactions that wrote (xids assigned, cluster-wide). The "
        "benchmark's own polling queries are subtracted; the orchestrator's open/close "
        "(LISTEN, idle claims) is not. ⚠ = some runs waited for a lease to expire. "
        f"† = more than {NOISY_OTHER_CPU} cores were busy outside this process and the "
        "cluster (other load on the machine): the row is noisy.",
        "",
    ]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


async def bench_main(args: argparse.Namespace, dsn: str, cluster: Cluster | None) -> str:
    started = time.monotonic()
    load_before = load_average()
    version, settings = await server_facts(dsn)
    say(f"{version}; {settings}")
    tag = uuid.uuid4().hex[:6]

    pgb = PgbenchResult()
    pgbench = find_pgbench(cluster.bindir if cluster else find_pg_bindir_or_none())
    if args.skip_pgbench:
        pgb.note = " (skipped: --skip-pgbench)"
    elif pgbench is None:
        pgb.note = " (pgbench not found)"
    else:
        admin = await asyncpg.connect(dsn)
        pgdb = "pgbench" if cluster else f"saga_bench_{tag}_pgbench"
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{pgdb}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{pgdb}"')
            if cluster is not None:
                assert cluster.dir is not None
                conn_args = [
                    "-h",
                    str(cluster.dir),
                    "-p",
                    str(cluster.PORT),
                    "-U",
                    "postgres",
                    pgdb,
                ]
            else:
                conn_args = [with_database(dsn, pgdb)]
            pgb = await run_pgbench(
                pgbench, conn_args, admin, pgdb, cluster.postmaster_pid() if cluster else None
            )
        finally:
            # Dropped so its buffers and autovacuum do not weigh on the saga rows.
            with contextlib.suppress(Exception):
                await admin.execute(f'DROP DATABASE IF EXISTS "{pgdb}" WITH (FORCE)')
            await admin.close()

    results: list[Measurement] = []
    postmaster = cluster.postmaster_pid() if cluster else None
    statements = Statements() if args.statements else None
    bench = Bench(dsn, args.runs, postmaster, tag, statements, args.pool_size)
    async with bench:
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                for variant in ("start+run", "drain"):
                    m = await bench.measure(concurrency, variant, repeat)
                    say(
                        f"concurrency {concurrency:>3} {variant:<9}: {m.runs_per_s:,.0f} runs/s "
                        f"({m.seconds:.2f} s), {m.commits_per_step:.2f} commits/step, "
                        f"python {m.python_cpu:.2f} / postgres {m.postgres_cpu:.2f} cores"
                    )
                    results.append(m)

    header = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "Postgres": version + (" (throwaway cluster, unix socket)" if cluster else " (--dsn)"),
        "settings": settings,
        "Python": f"{platform.python_implementation()} {platform.python_version()}, "
        f"asyncpg {asyncpg.__version__}",
        "saga commit": git_commit(),
        "benchmark time": f"{time.monotonic() - started:.0f} s (load average before: "
        f"{load_before})",
    }
    experiments = [
        f"--pool-size {args.pool_size}" if args.pool_size else "",
        "--statements (pg_stat_statements loaded)" if args.statements else "",
    ]
    if any(experiments):
        header["EXPERIMENT, not the default configuration"] = " ".join(e for e in experiments if e)
    return report(header, pgb, results, args.runs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        help="postgresql:// URI of a server to use (default: a "
        "throwaway durable cluster); databases are created and dropped on it",
    )
    parser.add_argument("--runs", type=int, default=10_000, help="runs per measurement")
    parser.add_argument(
        "--concurrency",
        default="16,64,256",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        help="comma-separated orchestrator concurrency levels (default 16,64,256)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="repeat every level this often")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument(
        "--statements",
        action="store_true",
        help="diagnostic: load pg_stat_statements and report the statements each run costs "
        "(adds overhead; do not quote its throughput)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        help="experiment: give the worker orchestrator an application-owned asyncpg pool "
        "of this size, without a reset per release (default: the orchestrator's own pool, "
        "max(4, min(C + 2, 20)))",
    )
    parser.add_argument("--skip-pgbench", action="store_true", help="skip the pgbench ceiling")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeats < 1 or not args.concurrency:
        parser.error("--runs and --repeats must be >= 1, --concurrency non-empty")
    if any(c < 1 for c in args.concurrency):
        parser.error("concurrency levels must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    cluster: Cluster | None = None
    try:
        if args.dsn:
            dsn = args.dsn
        else:
            cluster = Cluster(preload="pg_stat_statements" if args.statements else None)
            install_exit_handlers(cluster.stop)
            say(f"starting a throwaway durable cluster ({cluster.bindir})")
            cluster.start()
            dsn = cluster.dsn
        text = anyio.run(bench_main, args, dsn, cluster)
    except BenchmarkError as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        if cluster is not None:
            cluster.stop()
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
