"""Facts for the report's header: machine, load, versions, the saga commit, and the
server's settings as read back from it (DURABLE only when fsync, synchronous_commit and
full_page_writes are on)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

import asyncpg

from benchmarks._base import REPO

SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
    "max_connections",
    "max_wal_size",
)
DURABLE = ("fsync=on", "synchronous_commit=on", "full_page_writes=on")


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "saga"):
        commit += " + uncommitted changes in saga/"
    return commit


def saga_fingerprint() -> str:
    """A hash of saga's sources: the workers import saga when they start, so a change
    during the run would mix versions."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "saga").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".sql"):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


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


def versions() -> str:
    def v(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    return (
        f"{platform.python_implementation()} {platform.python_version()}; asyncpg "
        f"{v('asyncpg')}, anyio {v('anyio')}, pydantic {v('pydantic')}, structlog "
        f"{v('structlog')}, opentelemetry-sdk {v('opentelemetry-sdk')}, "
        f"opentelemetry-exporter-otlp-proto-http {v('opentelemetry-exporter-otlp-proto-http')}"
    )


async def server_facts(dsn: str) -> tuple[str, str]:
    """The server's version, and its settings labelled DURABLE or NOT DURABLE."""
    conn = await asyncpg.connect(dsn)
    try:
        version: str = await conn.fetchval("SELECT version()")
        rows = await conn.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1) ORDER BY name",
            list(SETTINGS),
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
    durable = all(s in settings for s in DURABLE)
    label = "DURABLE" if durable else "NOT DURABLE (fast settings: not comparable)"
    return version.split(",")[0], f"{label}: {', '.join(settings)}"
