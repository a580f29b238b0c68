"""The sitting every section measures in: one server, an admin connection to it, the
databases and worker processes the sections create (all removed at the end), the
options, and notes for the report."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import anyio
import asyncpg

import saga
from benchmarks._base import BenchmarkError
from benchmarks._cluster import Cluster, find_pg_bindir_or_none, with_database
from benchmarks._cpu import CpuSample
from benchmarks._dbstats import Statements
from benchmarks._facts import saga_fingerprint
from benchmarks._options import Options
from benchmarks._procs import WorkerProc


class Harness:
    """Open with ``async with``; everything it created is gone after it."""

    def __init__(self, base_dsn: str, cluster: Cluster | None, opts: Options) -> None:
        self.base_dsn = base_dsn
        self.cluster = cluster
        self.opts = opts
        self.postmaster = cluster.postmaster_pid() if cluster else None
        self.bindir: Path | None = cluster.bindir if cluster else find_pg_bindir_or_none()
        self.tag = uuid.uuid4().hex[:6]
        self._admin: asyncpg.Connection | None = None
        self._sampler: asyncpg.Connection | None = None
        self.statements: Statements | None = None
        self.created: list[str] = []
        self.workers: list[WorkerProc] = []
        self.notes: list[str] = []
        self.fingerprint = saga_fingerprint()
        self.logdir = Path(tempfile.mkdtemp(prefix="saga-bench-logs."))
        atexit.register(shutil.rmtree, self.logdir, True)  # also after SIGTERM
        self.spawned = 0

    @property
    def admin(self) -> asyncpg.Connection:
        """A connection to the server's default database: counters are read from it, so
        its own queries never count against the measured database."""
        assert self._admin is not None, "use the harness in `async with`"
        return self._admin

    @property
    def sampler(self) -> asyncpg.Connection:
        """A second admin connection, for the pg_stat_activity sampler."""
        assert self._sampler is not None, "use the harness in `async with`"
        return self._sampler

    async def __aenter__(self) -> Harness:
        self._admin = await asyncpg.connect(self.base_dsn)
        self._sampler = await asyncpg.connect(self.base_dsn)
        if self.opts.statements:
            self.statements = Statements(self._admin)
            await self.statements.setup()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            for worker in self.workers:
                await worker.stop()
            self.workers.clear()
            for name in list(self.created):
                with contextlib.suppress(Exception):
                    await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for conn in (self._sampler, self._admin):
                if conn is not None:
                    await conn.close()
            shutil.rmtree(self.logdir, ignore_errors=True)

    async def spawn(self, *args: str) -> WorkerProc:
        """A new worker process (see benchmarks/_worker.py), logging to the log folder."""
        if saga_fingerprint() != self.fingerprint:
            raise BenchmarkError(
                "saga/ changed while the benchmark ran (a new worker process would run other "
                "code than this one): run it again"
            )
        self.spawned += 1
        return await WorkerProc.spawn(*args, log=self.logdir / f"worker{self.spawned}.log")

    async def ensure_workers(self, n: int) -> list[WorkerProc]:
        """The first ``n`` shared worker processes (spawned when missing)."""
        while len(self.workers) < n:
            self.workers.append(await self.spawn())
        return self.workers[:n]

    async def database(self, label: str) -> tuple[str, str]:
        """A fresh, empty database: its name and DSN."""
        name = f"saga_bench_{self.tag}_{label}"
        await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await self.admin.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name, with_database(self.base_dsn, name)

    async def saga_database(self, label: str) -> tuple[str, str]:
        """A fresh database with saga's schema (migrated before anything is measured)."""
        db, dsn = await self.database(label)
        await saga.migrate(dsn)
        return db, dsn

    async def drop(self, name: str) -> None:
        await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    async def checkpoint(self) -> None:
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await self.admin.execute("CHECKPOINT")

    def cpu(self) -> CpuSample:
        return CpuSample.take(self.postmaster)
