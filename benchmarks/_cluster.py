"""The throwaway durable cluster: initdb into a temporary folder, start with the default
(durable) settings on a unix socket only, always stop and delete."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from benchmarks._base import BenchmarkError, say


def find_pg_bindir() -> Path:
    """``$SAGA_BENCH_PGBIN``, else the newest ``/usr/lib/postgresql/*/bin``."""
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


def find_pg_bindir_or_none() -> Path | None:
    try:
        return find_pg_bindir()
    except BenchmarkError:
        return None


def with_database(dsn: str, database: str) -> str:
    """The same server, another database."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise BenchmarkError("--dsn must be a postgresql:// URI")
    return urlunsplit(parts._replace(path="/" + database))


INITDB_FLAGS = ("--auth=trust", "-U", "postgres", "--no-sync")


class Cluster:
    """A durable-settings cluster in a temporary folder, unix socket only. As root the
    server runs as ``postgres`` (Postgres refuses to run as root)."""

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

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.dir}&port={self.PORT}"

    def conn_args(self, database: str) -> list[str]:
        """libpq command-line arguments (pgbench) to reach ``database``."""
        return ["-h", str(self.dir), "-p", str(self.PORT), "-U", "postgres", database]

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.is_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(
            cmd, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
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
        initdb = str(self.bindir / "initdb")
        # --no-sync only skips initdb's final fsync of the new files; the server runs with
        # fsync on.
        self._pg(initdb, "-D", str(self.data), "-E", "UTF8", "--locale=C.UTF-8", *INITDB_FLAGS)
        self.started = True
        opts = f"-h '' -k {self.dir} -p {self.PORT} -c shared_buffers=256MB -c max_connections=300"
        if self.preload:
            opts += f" -c shared_preload_libraries={self.preload}"
        log = str(self.dir / "server.log")
        pg_ctl = str(self.bindir / "pg_ctl")
        self._pg(pg_ctl, "-D", str(self.data), "-l", log, "-w", "-t", "60", "-o", opts, "start")

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
            pg_ctl, data = str(self.bindir / "pg_ctl"), str(self.data)
            proc = self._pg(pg_ctl, "-D", data, "-m", "fast", "-w", "-t", "30", "stop", check=False)
            if (
                proc.returncode != 0
                and self._pg(pg_ctl, "-D", data, "status", check=False).returncode == 0
            ):
                say("fast stop failed; stopping PostgreSQL with -m immediate")
                self._pg(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
