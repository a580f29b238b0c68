"""What the server counts: transactions, xids, WAL, what the backends wait for, and (the
``--statements`` diagnostic) pg_stat_statements.

All read from an admin connection to another database, so that the reading does not count
against the measured one.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import anyio
import asyncpg

SAMPLE_EVERY = 0.1  # seconds between pg_stat_activity samples


@dataclasses.dataclass
class DbStats:
    xact_commit: int
    xact_rollback: int
    next_xid: int  # cluster-wide: write transactions assign xids
    wal_lsn: int  # cluster-wide WAL bytes
    wal_sync: int  # cluster-wide WAL fsyncs (pg_stat_wal)

    def __sub__(self, other: DbStats) -> DbStats:
        return DbStats(
            self.xact_commit - other.xact_commit,
            self.xact_rollback - other.xact_rollback,
            self.next_xid - other.next_xid,
            self.wal_lsn - other.wal_lsn,
            self.wal_sync - other.wal_sync,
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
    """Samples what the database's client backends are doing, every 0.1 s."""

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self.admin = admin
        self.database = database
        self.counts: Counter[str] = Counter()

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
            await anyio.sleep(SAMPLE_EVERY)

    def summary(self, top: int = 3) -> str:
        total = sum(self.counts.values())
        if not total:
            return "n/a"
        return ", ".join(f"{w} {100 * n / total:.0f}%" for w, n in self.counts.most_common(top))


class Statements:
    """``--statements``: which statements a run costs, from pg_stat_statements. A
    diagnostic: the extension costs throughput, so figures from such a run are not the
    headline ones. The server must preload it (the throwaway cluster does)."""

    def __init__(self, admin: asyncpg.Connection) -> None:
        self.admin = admin

    async def setup(self) -> None:
        await self.admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    async def reset(self) -> None:
        await self.admin.execute("SELECT pg_stat_statements_reset()")

    async def table(self, database: str, runs: int) -> str:
        """The 15 most called statements on ``database``, per run, as a markdown table
        (saga's statements start with their description: skipped, the SQL is shown)."""
        rows = await self.admin.fetch(
            r"""
            SELECT s.calls, s.total_exec_time, s.mean_exec_time,
                   left(regexp_replace(regexp_replace(s.query, '^(\s*--[^\n]*\n)+', ''),
                                       '\s+', ' ', 'g'), 90) AS query
            FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
            WHERE d.datname = $1
            ORDER BY s.calls DESC, s.total_exec_time DESC
            LIMIT 15
            """,
            database,
        )
        lines = ["| calls/run | mean ms | total ms | statement |", "| ---: | ---: | ---: | --- |"]
        for r in rows:
            query = r["query"].replace("|", "\\|")
            lines.append(
                f"| {r['calls'] / runs:.2f} | {r['mean_exec_time']:.3f} | "
                f"{r['total_exec_time']:,.0f} | `{query}` |"
            )
        return "\n".join(lines)
