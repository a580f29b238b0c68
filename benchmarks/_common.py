"""Shared by the benchmarks (throughput.py, run.py): the throwaway durable cluster,
pgbench, CPU accounting from /proc, database statistics, the no-op saga, report helpers.

Importing this module puts the repository root first on ``sys.path``, so the benchmarks
measure this checkout whatever ``saga`` is installed.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))  # measure this checkout, whatever is installed

import anyio  # noqa: E402
import asyncpg  # noqa: E402
import structlog  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import saga  # noqa: E402

STEPS = 3
SAMPLE_EVERY = 0.1  # seconds between pg_stat_activity samples


class _Killable(Protocol):
    def kill(self) -> None: ...


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchmarkError(RuntimeError):
    pass


# -- the throwaway cluster -------------------------------------------------------------


def find_pg_bindir() -> Path:
    env = os.environ.get("SAGA_BENCH_PGBIN")
    if env:
        if not (Path(env) / "initdb").exists():
            raise BenchmarkError(f"SAGA_BENCH_PGBIN={env} has no initdb")
        return Path(env)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", str(p))],
    )
    if not found:
        raise BenchmarkError(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (Debian: apt-get "
            "install postgresql); or pass --dsn, or set SAGA_BENCH_PGBIN"
        )
    return found[-1].parent


class Cluster:
    """A durable-settings cluster in a temporary folder, unix socket only."""

    PORT = 5432  # no clash: the socket lives in our own folder

    def __init__(self, preload: str | None = None) -> None:
        self.preload = preload
        self.bindir = find_pg_bindir()
        self.is_root = os.geteuid() == 0
        self.dir: Path | None = None
        self.started = False

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.is_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(
            cmd, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            raise BenchmarkError(
                f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def start(self) -> None:
        # /tmp, not $TMPDIR: the socket path must stay under ~107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="saga-bench-pg.", dir="/tmp"))
        if self.is_root:
            shutil.chown(self.dir, user="postgres")
        self.dir.chmod(0o755)
        # --no-sync only skips initdb's final fsync of the new files; the server runs with
        # fsync on.
        self._pg(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        self.started = True
        opts = f"-h '' -k {self.dir} -p {self.PORT} -c shared_buffers=256MB -c max_connections=300"
        if self.preload:
            opts += f" -c shared_preload_libraries={self.preload}"
        self._pg(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.dir}&port={self.PORT}"

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Idempotent: stop the server (fast, then immediate) and delete the folder."""
        if self.dir is None:
            return
        if self.started:
            self.started = False
            pg_ctl = str(self.bindir / "pg_ctl")
            proc = self._pg(
                pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", check=False
            )
            if (
                proc.returncode != 0
                and self._pg(pg_ctl, "-D", str(self.data), "status", check=False).returncode == 0
            ):
                say("fast stop failed; stopping PostgreSQL with -m immediate")
                self._pg(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


# Child processes (pgbench, benchmark workers, the dummy OTLP receiver): killed by the
# signal handler, so that a SIGTERM never leaves one behind.
CHILDREN: set[_Killable] = set()


def install_exit_handlers(cleanup: Callable[[], None]) -> None:
    atexit.register(cleanup)

    def on_signal(signum: int, _frame: Any) -> None:
        for child in list(CHILDREN):  # else the event loop waits for pgbench's thread
            with contextlib.suppress(OSError):
                child.kill()
        raise SystemExit(128 + signum)  # unwinds through finally blocks, then atexit

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise BenchmarkError("--dsn must be a postgresql:// URI")
    return urlunsplit(parts._replace(path="/" + database))


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


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- CPU accounting (own cluster only) ----------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1  # /proc/stat's idle counts every online CPU


def stat_fields(pid: int | str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def postgres_cpu_seconds(postmaster: int) -> float:
    """Cumulative CPU of the whole cluster: the postmaster, its reaped children (cutime,
    cstime) and its live children. Backends do not fork, so this only grows, except that
    a backend which has exited but is not reaped yet is missing: read it while the
    backends are alive, or once they are all gone."""
    own = stat_fields(postmaster)
    if own is None:
        return float("nan")
    # after the ")": index 0 is field 3; utime=14, stime=15, cutime=16, cstime=17
    ticks = sum(int(own[i]) for i in (11, 12, 13, 14))
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = stat_fields(entry.name)
        if fields is not None and int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def machine_idle_seconds() -> float:
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(first[4]) + int(first[5])) / CLK_TCK  # idle + iowait, summed over cores


@dataclasses.dataclass
class CpuSample:
    wall: float
    python: float
    postgres: float
    idle: float

    @classmethod
    def take(cls, postmaster: int | None) -> CpuSample:
        return cls(
            wall=time.monotonic(),
            python=time.process_time(),
            postgres=postgres_cpu_seconds(postmaster) if postmaster else float("nan"),
            idle=machine_idle_seconds(),
        )


class Input(BaseModel):
    i: int


def build_saga() -> saga.Saga[Input]:
    bench = saga.Saga("bench_noop", input=Input)

    @bench.step()
    async def s1(ctx: saga.Context[Input]) -> int:
        return 1

    @bench.step()
    async def s2(ctx: saga.Context[Input]) -> int:
        return 1

    @bench.step()
    async def s3(ctx: saga.Context[Input]) -> int:
        return 1

    return bench


def build_compensation_saga() -> saga.Saga[Input]:
    """3 steps; the third fails permanently, so steps 2 and 1 are compensated (no-ops)."""
    bench = saga.Saga("bench_compensate", input=Input)

    @bench.step()
    async def s1(ctx: saga.Context[Input]) -> int:
        return 1

    @s1.compensate
    async def undo_s1(ctx: saga.Context[Input], result: int) -> None:
        return None

    @bench.step()
    async def s2(ctx: saga.Context[Input]) -> int:
        return 1

    @s2.compensate
    async def undo_s2(ctx: saga.Context[Input], result: int) -> None:
        return None

    @bench.step()
    async def s3(ctx: saga.Context[Input]) -> int:
        raise saga.PermanentError("benchmark: the third step fails for good")

    return bench


def build_gate_saga(gate: Callable[[], Awaitable[None]] | None = None) -> saga.Saga[Input]:
    """3 steps; the first awaits ``gate()`` (the memory benchmark holds runs in flight)."""
    bench = saga.Saga("bench_gate", input=Input)

    @bench.step()
    async def hold(ctx: saga.Context[Input]) -> int:
        if gate is not None:
            await gate()
        return 1

    @bench.step()
    async def s2(ctx: saga.Context[Input]) -> int:
        return 1

    @bench.step()
    async def s3(ctx: saga.Context[Input]) -> int:
        return 1

    return bench


SAGAS: dict[str, Callable[[], saga.Saga[Input]]] = {
    "noop": build_saga,
    "compensate": build_compensation_saga,
    "gate": build_gate_saga,
}


@dataclasses.dataclass
class DbStats:
    xact_commit: int
    xact_rollback: int
    next_xid: int  # cluster-wide: write transactions assign xids
    wal_lsn: int
    wal_sync: int  # cluster-wide WAL fsyncs (pg_stat_wal)

    def __sub__(self, other: DbStats) -> DbStats:
        return DbStats(
            *(getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self))
        )


async def wait_until_no_backends(admin: asyncpg.Connection, database: str) -> None:
    """Backends flush their pending statistics when they exit; an idle backend may hold
    them for up to 10 s. So counters are read only once every connection to the database
    is gone."""
    with anyio.move_on_after(15):
        while True:
            left = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
            )
            if not left:
                break
            await anyio.sleep(0.05)
    await anyio.sleep(0.3)


async def read_stats(admin: asyncpg.Connection, database: str) -> DbStats:
    async with admin.transaction():
        await admin.execute("SELECT pg_stat_clear_snapshot()")
        row = await admin.fetchrow(
            """
            SELECT d.xact_commit, d.xact_rollback,
                   pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next_xid,
                   pg_current_wal_lsn() - '0/0'::pg_lsn AS wal_lsn,
                   (SELECT wal_sync FROM pg_stat_wal) AS wal_sync
            FROM pg_stat_database d WHERE d.datname = $1
            """,
            database,
        )
    assert row is not None
    return DbStats(
        int(row["xact_commit"]),
        int(row["xact_rollback"]),
        int(row["next_xid"]),
        int(row["wal_lsn"]),
        int(row["wal_sync"]),
    )


class WaitSampler:
    """Samples what the database's backends are doing (from the admin connection, whose
    queries count against another database)."""

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self.admin = admin
        self.database = database
        self.counts: Counter[str] = Counter()
        self.samples = 0

    async def run(self) -> None:
        while True:
            rows = await self.admin.fetch(
                """
                SELECT CASE WHEN state = 'active'
                            THEN coalesce(wait_event_type || ':' || wait_event, 'CPU')
                            ELSE coalesce(state, '?') END AS what,
                       count(*) AS n
                FROM pg_stat_activity
                WHERE datname = $1 AND backend_type = 'client backend'
                GROUP BY 1
                """,
                self.database,
            )
            for row in rows:
                self.counts[row["what"]] += row["n"]
            self.samples += 1
            await anyio.sleep(SAMPLE_EVERY)

    def summary(self, top: int = 4) -> str:
        total = sum(self.counts.values())
        if not total:
            return "n/a"
        parts = [f"{what} {100 * n / total:.0f}%" for what, n in self.counts.most_common(top)]
        return ", ".join(parts)


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "saga"):
        commit += " + uncommitted changes in saga/"
    return commit


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        ram = f"{kib / 1024**2:.1f} GiB"
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, {ram} RAM"


def fmt(x: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.{digits}f}"


async def server_facts(dsn: str) -> tuple[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SELECT version()")
        rows = await conn.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1) ORDER BY name",
            [
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "wal_sync_method",
                "shared_buffers",
                "max_connections",
                "max_wal_size",
            ],
        )
    finally:
        await conn.close()
    settings = []
    for r in rows:
        value = r["setting"]
        if r["name"] == "shared_buffers":
            value = f"{int(value) * 8 // 1024}MB"
        elif r["name"] == "max_wal_size":
            value = f"{value}{r['unit'] or ''}"
        settings.append(f"{r['name']}={value}")
    durable = all(
        s in settings for s in ("fsync=on", "synchronous_commit=on", "full_page_writes=on")
    )
    label = "DURABLE" if durable else "NOT DURABLE (fast settings: not comparable)"
    return version.split(",")[0], f"{label}: {', '.join(settings)}"


def find_pg_bindir_or_none() -> Path | None:
    try:
        return find_pg_bindir()
    except BenchmarkError:
        return None


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),  # stdout is the report
    )
