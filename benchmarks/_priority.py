"""Priorities: how long urgent runs take when a flood of low-priority work is ahead of
them. One orchestrator in this process (concurrency 64) executes a 1-step no-op saga;
urgent runs (priority 10) are started at 20 runs/s for 10 s, each awaited with
``result()``; once with nothing else to do, once with 100,000 runs of priority 0 already
due (inserted in one statement just before, so the backlog is in front of every urgent
run for the whole window)."""

from __future__ import annotations

import dataclasses
import time

import anyio
import asyncpg
from pydantic import BaseModel

import saga
from benchmarks._base import say
from benchmarks._harness import Harness
from benchmarks._stat import Stat, pct

RATE = 20.0  # urgent runs per second
SECONDS = 10.0
BACKLOG = 100_000
VARIANTS = ("no backlog", f"{BACKLOG:,} runs of priority 0 ahead")


class Job(BaseModel):
    urgent: bool = False


def _saga() -> saga.Saga[Job]:
    s = saga.Saga("bench_priority", input=Job, priority=lambda job: 10 if job.urgent else 0)

    @s.step()
    async def s1(ctx: saga.Context[Job]) -> int:
        return 1

    return s


@dataclasses.dataclass
class Sample:
    e2e: list[float]  # start() to result() of the urgent runs, seconds
    backlog_left: int  # low-priority runs still due when the last urgent one ended


Priority = dict[str, list[Sample]]  # variant -> repeats


async def measure(h: Harness) -> Priority:
    out: Priority = {}
    for repeat in range(h.opts.repeats):
        for index, variant in enumerate(VARIANTS):
            out.setdefault(variant, []).append(await _once(h, index, repeat))
    return out


_BACKLOG_SQL = """
INSERT INTO saga.runs (id, saga_name, saga_version, fingerprint, input, step_name, due_at)
SELECT gen_random_uuid(), $1, 1, $2, '{"urgent":false}', 's1', now()
FROM generate_series(1, $3::integer)
"""


async def _once(h: Harness, index: int, repeat: int) -> Sample:
    db, dsn = await h.saga_database(f"priority_{index}_r{repeat}")
    s = _saga()
    conn = await asyncpg.connect(dsn)
    try:
        if index:
            await conn.execute(_BACKLOG_SQL, s.name, s.fingerprint, BACKLOG)
            await conn.execute("ANALYZE saga.runs")
        e2e = await _urgent_runs(dsn, s)
        left = await conn.fetchval("SELECT count(*) FROM saga.runs WHERE due_at <= now()")
    finally:
        await conn.close()
    await h.drop(db)
    say(
        f"priority, {VARIANTS[index]} (repeat {repeat + 1}): urgent start-to-result p50 "
        f"{1000 * pct(e2e, 0.5):.1f} ms, p99 {1000 * pct(e2e, 0.99):.1f} ms; backlog left "
        f"{left:,}"
    )
    return Sample(e2e, left)


async def _urgent_runs(dsn: str, s: saga.Saga[Job]) -> list[float]:
    e2e: list[float] = []
    orchestrator = saga.Orchestrator(dsn, sagas=[s], concurrency=64)
    async with orchestrator as orch, anyio.create_task_group() as tg:

        async def one() -> None:
            began = time.perf_counter()
            run = await orch.start(s, Job(urgent=True))
            await run.result(timeout=60)
            e2e.append(time.perf_counter() - began)

        start = time.perf_counter()
        for n in range(int(RATE * SECONDS)):
            await anyio.sleep(max(0.0, start + n / RATE - time.perf_counter()))
            tg.start_soon(one)
    return e2e


def render(result: Priority) -> list[str]:
    if not result:
        return []
    lines = [
        "## Priorities",
        "",
        f"An orchestrator in this process (concurrency 64) runs a 1-step no-op saga; "
        f"{int(RATE * SECONDS)} urgent runs (priority 10) are started at {RATE:g} runs/s, "
        f"each awaited with result(); without, then with {BACKLOG:,} runs of priority 0 "
        "due ahead of them (inserted just before). Medians of the repeats' percentiles.",
        "",
        "| setup | urgent p50 | urgent p99 | urgent max | backlog still due at the end |",
        "|---|---|---|---|---|",
    ]
    for variant, samples in result.items():
        p50 = Stat.of([pct(x.e2e, 0.5) * 1000 for x in samples])
        p99 = Stat.of([pct(x.e2e, 0.99) * 1000 for x in samples])
        top = Stat.of([max(x.e2e) * 1000 for x in samples])
        left = Stat.of([float(x.backlog_left) for x in samples])
        lines.append(
            f"| {variant} | {p50.med:.1f} ms | {p99.med:.1f} ms | {top.med:.1f} ms | "
            f"{left.med:,.0f} |"
        )
    return [*lines, ""]
