"""Retention: pruning a past day of finished runs whole (its partitions dropped) versus
row by row (the previous way; still how runs outside a day partition go), each on its own
fresh load: time, runs/s, the dead rows left for autovacuum, the tables' size."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, date, datetime, timedelta

import anyio
import asyncpg

import saga
from benchmarks import _internals
from benchmarks._base import BenchmarkError, say, verdict
from benchmarks._harness import Harness
from benchmarks._load import Load, load_finished_runs

DAY_AGO = 40  # the loaded day: older than OLDER_THAN, whole
OLDER_THAN = timedelta(days=30)
SECONDS_TARGET = 10.0  # "pruning a day of 1,000,000 runs takes seconds"
BATCH = 1000  # prune's default batch_size


@dataclasses.dataclass
class Pruned:
    """One way of pruning the loaded day, measured."""

    load: Load
    result: saga.PruneResult
    seconds: float
    dead_before: int
    dead_after: int
    bytes_before: int
    bytes_after: int
    autovacuums: int  # autovacuum runs on saga's tables meanwhile (off: expected 0)

    @property
    def runs_per_s(self) -> float:
        return self.result.runs / self.seconds

    @property
    def dead_left(self) -> int:
        """Dead rows the prune added (left for vacuum to clean)."""
        return max(0, self.dead_after - self.dead_before)


@dataclasses.dataclass
class Retention:
    day: date
    whole: Pruned  # the day in its partitions, prune(whole_days=True)
    rowwise: Pruned  # the day in the DEFAULT partitions, prune() row by row


async def measure(h: Harness) -> Retention:
    day = datetime.now(UTC).date() - timedelta(days=DAY_AGO)
    runs = h.opts.retention_runs
    whole = await _prune_one(h, "whole", runs, day, partitioned=True)
    rowwise_runs = min(h.opts.retention_rowwise_runs, runs)
    rowwise = await _prune_one(h, "rowwise", rowwise_runs, day, partitioned=False)
    return Retention(day, whole, rowwise)


async def _prune_one(h: Harness, label: str, runs: int, day: date, partitioned: bool) -> Pruned:
    db, dsn = await h.saga_database(f"retention_{label}")
    load = await load_finished_runs(h, dsn, runs, [day], partitioned=partitioned, autovacuum=False)
    dead_before, bytes_before, vacuums_before = await _state(dsn)
    async with saga.Client(dsn, migrate=False) as client:
        began = time.monotonic()
        result = await saga.prune(client, older_than=OLDER_THAN, whole_days=partitioned)
        seconds = time.monotonic() - began
    await _closed(dsn)
    dead_after, bytes_after, vacuums_after = await _state(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        left = await conn.fetchval("SELECT count(*) FROM saga.runs")
    finally:
        await conn.close()
    await h.drop(db)
    days = 1 if partitioned else 0
    if result.runs != runs or result.days != days or left != 1:
        raise BenchmarkError(
            f"retention ({label}): pruned {result.runs:,} runs in {result.days} whole day(s), "
            f"{left:,} left; expected {runs:,} in {days}, 1 left (the template, today)"
        )
    pruned = Pruned(
        load=load,
        result=result,
        seconds=seconds,
        dead_before=dead_before,
        dead_after=dead_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        autovacuums=vacuums_after - vacuums_before,
    )
    say(
        f"retention {label}: {result.runs:,} runs, {result.events:,} events in "
        f"{seconds:.2f} s ({pruned.runs_per_s:,.0f} runs/s); dead rows left "
        f"{pruned.dead_left:,}; saga tables {_size(bytes_before)} -> {_size(bytes_after)}"
    )
    return pruned


async def _closed(dsn: str) -> None:
    """Wait for the prune's connections to end: a backend flushes its statistics (the
    dead rows it left) as it exits."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            others = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if not others:
                break
            await anyio.sleep(0.1)
    finally:
        await conn.close()
    await anyio.sleep(0.5)


async def _state(dsn: str) -> tuple[int, int, int]:
    """Dead rows, bytes and autovacuum runs of saga's tables (a new connection: no
    statistics snapshot cached from before)."""
    conn = await asyncpg.connect(dsn)
    try:
        dead = await conn.fetchval(_internals.DEAD_ROWS)
        size = await conn.fetchval(_internals.SAGA_BYTES)
        vacuums = await conn.fetchval(_internals.AUTOVACUUM_COUNT)
    finally:
        await conn.close()
    return dead, size, vacuums


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def target(r: Retention | None) -> list[str]:
    """The Targets rows: a day goes in seconds, and leaves no dead rows."""
    if r is None:
        return []
    w, rw = r.whole, r.rowwise
    return [
        f"| pruning a day of {w.result.runs:,} runs takes seconds (whole day ≤ "
        f"{SECONDS_TARGET:g} s) | {w.seconds:.2f} s ({w.runs_per_s:,.0f} runs/s); row by row "
        f"{rw.runs_per_s:,.0f} runs/s ({rw.result.runs:,} runs in {rw.seconds:.1f} s) | "
        f"{verdict(w.seconds <= SECONDS_TARGET)} |",
        "| pruning leaves no bloat for autovacuum to chase (dead rows left = 0) | "
        f"whole day: {w.dead_left:,} dead rows, saga tables {_size(w.bytes_before)} → "
        f"{_size(w.bytes_after)}; row by row: {rw.dead_left:,} dead rows, "
        f"{_size(rw.bytes_before)} → {_size(rw.bytes_after)} | {verdict(w.dead_left == 0)} |",
    ]


def _row(way: str, p: Pruned) -> str:
    return (
        f"| {way} | {p.result.runs:,} | {p.result.events:,} | {p.seconds:.2f} s | "
        f"{p.runs_per_s:,.0f} | {p.dead_left:,} | {_size(p.bytes_before)} → "
        f"{_size(p.bytes_after)} | {p.autovacuums} |"
    )


def render(r: Retention | None) -> list[str]:
    if r is None:
        return []
    w, rw = r.whole, r.rowwise
    lines = [
        f"## Retention: pruning a day of {w.result.runs:,} finished runs",
        "",
        "Each way on its own fresh database: one past UTC day "
        f"({r.day}, {DAY_AGO} days ago) of finished runs cloned from one real run of the "
        f"no-op saga as in the scale section ({w.load.per_run} events each and the end "
        "mark, UUIDv7 ids of their creation times), autovacuum off on every saga table (so "
        "that the dead rows a prune leaves stay counted), `VACUUM ANALYZE`, `CHECKPOINT`; "
        "then `saga.prune(client, older_than=timedelta(days=30), ...)`, timed. **Whole "
        f"day**: the day loaded into its own partitions, `whole_days=True` ({w.result.days} "
        "day's four partitions dropped, no row deleted). **Row by row**, the previous way "
        "(still how prune removes runs outside a day partition, e.g. started before "
        "migration 0009): the day loaded into the DEFAULT partitions, `whole_days=False`: "
        f"{rw.result.batches:,} batches of {BATCH:,} runs, each one DELETE statement. Dead "
        "rows: `n_dead_tup` summed over schema saga after the prune, minus before (the "
        "prune's connections closed first, so their statistics are flushed). Size: every "
        "saga table with its indexes and TOAST.",
        "",
        "| way | runs pruned | events pruned | time | runs/s | dead rows left "
        "| saga tables before → after | autovacuum runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        _row("whole day (partitions dropped)", w),
        _row("row by row (DEFAULT partition)", rw),
        "",
    ]
    if rw.result.runs < w.result.runs:
        lines += [
            f"Row by row was measured on {rw.result.runs:,} runs (not {w.result.runs:,}, to "
            f"keep the suite short): at {rw.runs_per_s:,.0f} runs/s the day of "
            f"{w.result.runs:,} runs would take about "
            f"{w.result.runs / rw.runs_per_s:,.0f} s, and leave about "
            f"{rw.dead_left * w.result.runs // max(rw.result.runs, 1):,} dead rows.",
            "",
        ]
    return lines
