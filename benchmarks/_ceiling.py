"""The ceiling: what the same server commits per second with pgbench, one statement per
transaction, in the same sitting. Every throughput figure is quoted against it."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import anyio

from benchmarks._base import CHILDREN, BenchmarkError, say
from benchmarks._cpu import CpuSample, children_cpu
from benchmarks._dbstats import read_stats, wait_until_no_backends
from benchmarks._harness import Harness
from benchmarks._stat import Stat

SCALE = 16
CLIENTS = (1, 4, 16)
CEILING_CLIENTS = 16  # the ratio denominator: single-UPDATE TPS at 16 clients
_AID = f"\\set aid random(1, {SCALE * 100000})\n"
SCRIPTS = {
    "UPDATE": _AID + "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n",
    "INSERT": (
        _AID + "\\set delta random(-5000, 5000)\n"
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
        "VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);\n"
    ),
    # The UPDATE plus a NOTIFY in its transaction, as saga's start and last transition do.
    # A committing transaction that notified holds a cluster-wide lock through its WAL
    # flush (PreCommit_Notify), so these commits cannot share an fsync.
    "UPDATE + NOTIFY": (
        _AID + "BEGIN;\n"
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
        "SELECT pg_notify('bench', 'x');\nEND;\n"
    ),
}
# (script, clients) in the order they run, every repeat.
RUNS = [(s, c) for s in ("UPDATE", "INSERT") for c in CLIENTS] + [("UPDATE + NOTIFY", 16)]


@dataclasses.dataclass
class PgbenchRun:
    tps: float
    latency_ms: float
    wal_syncs_per_xact: float
    postgres_cores: float  # the whole cluster
    pgbench_cores: float


@dataclasses.dataclass
class Ceiling:
    runs: dict[tuple[str, int], list[PgbenchRun]] = dataclasses.field(default_factory=dict)

    def stat(self, key: tuple[str, int], field: str) -> Stat:
        return Stat.of([getattr(r, field) for r in self.runs.get(key, [])])

    @property
    def tps(self) -> float:
        """The ratio denominator: single-UPDATE TPS at 16 clients (median)."""
        return self.stat(("UPDATE", CEILING_CLIENTS), "tps").med

    @property
    def commit_ms(self) -> float:
        """The single-UPDATE latency at 1 client (median)."""
        return self.stat(("UPDATE", 1), "latency_ms").med


def find_pgbench(bindir: Path | None) -> str | None:
    if bindir is not None and (bindir / "pgbench").exists():
        return str(bindir / "pgbench")
    return shutil.which("pgbench")


def pgbench_call(pgbench: str, args: list[str], timeout: float) -> str:
    with subprocess.Popen(
        [pgbench, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        CHILDREN.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchmarkError(f"pgbench {' '.join(args)} timed out") from None
        finally:
            CHILDREN.discard(proc)
    if proc.returncode != 0:
        raise BenchmarkError(f"pgbench {' '.join(args)} failed:\n{err[-2000:]}")
    return out


async def measure(h: Harness) -> Ceiling | None:
    """``pgbench -i -s 16``, then every script of RUNS for --pgbench-seconds each, the
    repeats interleaved; None (and a note) without pgbench."""
    pgbench = find_pgbench(h.bindir)
    if pgbench is None:
        h.notes.append("pgbench not found: no ceiling, no ratios")
        return None
    db, dsn = await h.database("pgbench")
    conn_args = h.cluster.conn_args(db) if h.cluster is not None else [dsn]
    began = time.monotonic()
    init = ["-i", "-q", "-s", str(SCALE), *conn_args]
    await anyio.to_thread.run_sync(pgbench_call, pgbench, init, 600.0)
    say(f"pgbench -i -s {SCALE}: {time.monotonic() - began:.1f} s")
    await h.checkpoint()
    ceiling = Ceiling()
    with tempfile.TemporaryDirectory(prefix="saga-bench-") as work:
        for name, script in SCRIPTS.items():
            (Path(work) / f"{name}.sql").write_text(script)
        for repeat in range(h.opts.repeats):
            for script, clients in RUNS:
                path = Path(work) / f"{script}.sql"
                run = await _one(h, pgbench, db, [*_args(h, clients, path), *conn_args])
                ceiling.runs.setdefault((script, clients), []).append(run)
                say(
                    f"pgbench {script} {clients:>2} clients (repeat {repeat + 1}): "
                    f"{run.tps:,.0f} TPS, {run.latency_ms:.3f} ms, "
                    f"{run.wal_syncs_per_xact:.2f} WAL fsyncs/xact"
                )
    await h.drop(db)  # its buffers and autovacuum must not weigh on what follows
    return ceiling


def _args(h: Harness, clients: int, script: Path) -> list[str]:
    seconds = str(h.opts.pgbench_seconds)
    return ["-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", seconds, "-f", str(script)]


async def _one(h: Harness, pgbench: str, db: str, args: list[str]) -> PgbenchRun:
    await wait_until_no_backends(h.admin, db)
    stats0 = await read_stats(h.admin, db)
    cpu0, child0 = h.cpu(), children_cpu()
    timeout = h.opts.pgbench_seconds + 60.0
    out = await anyio.to_thread.run_sync(pgbench_call, pgbench, args, timeout)
    wall = time.monotonic() - cpu0.wall
    child1 = children_cpu()
    # The backends have just exited: their CPU shows up in the postmaster's cutime only
    # once it has reaped them, so read after they are gone.
    await wait_until_no_backends(h.admin, db)
    cpu1 = CpuSample.take(h.postmaster)
    stats = await read_stats(h.admin, db) - stats0
    tps = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
    lat = re.search(r"^latency average = ([\d.]+) ms", out, re.MULTILINE)
    if not tps or not lat:
        raise BenchmarkError(f"no tps/latency in pgbench output:\n{out}")
    return PgbenchRun(
        tps=float(tps[1]),
        latency_ms=float(lat[1]),
        wal_syncs_per_xact=stats.wal_sync / max(stats.xact_commit, 1),
        postgres_cores=(cpu1.postgres - cpu0.postgres) / wall,
        pgbench_cores=(child1 - child0) / wall,
    )


def render(c: Ceiling, seconds: int, repeats: int) -> list[str]:
    lines = [
        "## Ceiling: pgbench on the same server",
        "",
        f"One statement per transaction, scale {SCALE}, {seconds} s per run, "
        f"`-j min(clients, 2)`, median (min-max) of {repeats} repeats. Ratios below divide "
        f"by the single-UPDATE TPS at {CEILING_CLIENTS} clients (**{c.tps:,.0f} TPS**). "
        "UPDATE + NOTIFY: the same UPDATE and a `pg_notify` in one transaction, as saga's "
        "start and last transition; such commits hold a cluster-wide lock through their "
        "WAL flush, so they cannot share an fsync.",
        "",
        "| transaction | clients | TPS | latency avg | WAL fsyncs/xact | CPU cores: "
        "postgres / pgbench |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in c.runs:
        script, clients = key
        pg = c.stat(key, "postgres_cores").med
        pgb = c.stat(key, "pgbench_cores").med
        lines.append(
            f"| single {script} | {clients} | {c.stat(key, 'tps').fmt()} | "
            f"{c.stat(key, 'latency_ms').fmt(3, ' ms')} | "
            f"{c.stat(key, 'wal_syncs_per_xact').fmt(2)} | "
            f"{'n/a' if math.isnan(pg) else f'{pg:.2f}'} / {pgb:.2f} |"
        )
    lines.append("")
    return lines
