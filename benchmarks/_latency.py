"""Latency at a fixed rate: runs started on schedule (20 runs/s for 20 s after 1 s of
warm-up), each awaited by its own task with ``run.result()``; two setups, the orchestrator
in this process, and this process as a client of one worker process."""

from __future__ import annotations

import dataclasses
import time
import uuid

import anyio
import asyncpg

import saga
from benchmarks import _internals
from benchmarks._base import say
from benchmarks._harness import Harness
from benchmarks._procs import WorkerProc
from benchmarks._sagas import Input, build
from benchmarks._stat import Stat, pct

LATE_CLAIM = 0.020  # seconds: a first claim this late means the run missed a wake-up
VARIANTS = ("in-process", "client + 1 worker process")


@dataclasses.dataclass
class Samples:
    """One repeat of one setup, in seconds."""

    start: list[float] = dataclasses.field(default_factory=list)  # start() itself
    e2e: list[float] = dataclasses.field(default_factory=list)  # start() to result()
    server: list[float] = dataclasses.field(default_factory=list)  # created to finished
    claim: list[float] = dataclasses.field(default_factory=list)  # created to first claim
    late: list[float] = dataclasses.field(default_factory=list)  # scheduler lateness

    def series(self, key: str) -> list[float]:
        values: list[float] = getattr(self, key)
        return values


Latency = dict[str, list[Samples]]  # setup -> repeats


async def measure(h: Harness) -> Latency:
    variants: Latency = {}
    for repeat in range(h.opts.repeats):
        for index, variant in enumerate(VARIANTS):
            samples = await _once(h, variant, index, repeat)
            variants.setdefault(variant, []).append(samples)
    return variants


async def _once(h: Harness, variant: str, index: int, repeat: int) -> Samples:
    db, dsn = await h.saga_database(f"latency_{index}_r{repeat}")
    in_process = variant == "in-process"
    workers: list[WorkerProc] = []
    if not in_process:
        workers = await h.ensure_workers(1)
        cmd = {"cmd": "open", "kind": "saga", "saga": "noop", "dsn": dsn, "concurrency": 32}
        await workers[0].call(cmd, "opened")
    try:
        out, ids = await _schedule(h, dsn, in_process)
    finally:
        for w in workers:
            await w.call({"cmd": "close"}, "closed")
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_internals.RUN_TIMES, ids)
    finally:
        await conn.close()
    await h.drop(db)
    out.server = [r["s"] for r in rows]
    out.claim = [r["claim"] for r in rows]
    say(
        f"latency {variant} (repeat {repeat + 1}): start-to-result p50 "
        f"{1000 * pct(out.e2e, 0.5):.1f} ms, p99 {1000 * pct(out.e2e, 0.99):.1f} ms, max "
        f"{1000 * max(out.e2e):.1f} ms; start() p50 {1000 * pct(out.start, 0.5):.2f} ms; "
        f"created-to-finished p50 {1000 * pct(out.server, 0.5):.1f} ms"
    )
    return out


async def _schedule(h: Harness, dsn: str, in_process: bool) -> tuple[Samples, list[uuid.UUID]]:
    """Orchestrator defaults (concurrency 32, poll_interval 1 s); the client-only variant
    executes nothing here."""
    definition = build("noop")
    rate, seconds = h.opts.latency_rate, h.opts.latency_seconds
    out, ids = Samples(), []
    orch = saga.Orchestrator(
        dsn, sagas=[definition], migrate=False, concurrency=32 if in_process else 0
    )
    async with orch:

        async def one(i: int, record: bool) -> None:
            t0 = time.perf_counter()
            handle = await orch.start(definition, Input(i=i))
            t1 = time.perf_counter()
            await handle.result(timeout=60)
            t2 = time.perf_counter()
            if record:
                out.start.append(t1 - t0)
                out.e2e.append(t2 - t1)
                ids.append(handle.id)

        warmup = int(rate)  # one second, not recorded
        total = warmup + int(rate * seconds)
        async with anyio.create_task_group() as tg:
            began = anyio.current_time()
            for i in range(total):
                due = began + i / rate
                await anyio.sleep_until(due)
                out.late.append(anyio.current_time() - due)
                tg.start_soon(one, i, i >= warmup)
    return out, ids


FIGURES = (
    ("e2e", "start-to-result"),
    ("start", "`start()`"),
    ("server", "created-to-finished"),
    ("claim", "created-to-first-claim"),
)


def render(lat: Latency, rate: float, seconds: float, repeats: int, commit: float) -> list[str]:
    """``commit``: the pgbench single-UPDATE latency at 1 client, ms."""
    if not lat:
        return []
    lines = [
        "## Latency at a fixed rate",
        "",
        f"{rate:g} runs/s for {seconds:g} s (after 1 s of "
        "warm-up, not recorded) per repeat; each run is started on schedule and awaited by "
        "its own task with `run.result()`. start-to-result = from `start()` returning to "
        "`result()` returning; created-to-finished = the run's `finished_at - created_at` "
        "(server clock); created-to-first-claim = until its first `step_started` event. "
        "Orchestrator defaults (concurrency 32, poll_interval 1 s). "
        f"Per-repeat percentiles, median (min-max) of {repeats} repeats; x commit = "
        f"÷ the pgbench single-UPDATE latency at 1 client ({commit:.3f} ms).",
        "",
        "| setup | figure | p50 | p99 | max | p50 x commit |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for variant, reps in lat.items():
        for key, name in FIGURES:
            p50 = Stat.of([1000 * pct(r.series(key), 0.5) for r in reps])
            p99 = Stat.of([1000 * pct(r.series(key), 0.99) for r in reps])
            mx = Stat.of([1000 * max(r.series(key)) for r in reps])
            lines.append(
                f"| {variant} | {name} | {p50.fmt(2)} | {p99.fmt(2)} | {mx.fmt(1)} | "
                f"{p50.ratio(commit, 1)} |"
            )
    for variant, reps in lat.items():
        share = Stat.of([100 * sum(x >= LATE_CLAIM for x in r.claim) / len(r.claim) for r in reps])
        lines.append(
            f"| {variant} | runs first claimed ≥ {1000 * LATE_CLAIM:.0f} ms after "
            f"created | {share.fmt(1, ' %')} | | | |"
        )
    late = max(max(r.late) for reps in lat.values() for r in reps)
    samples = len(next(iter(lat.values()))[0].e2e)
    return [
        *lines,
        "",
        f"A first claim {1000 * LATE_CLAIM:.0f} ms or more after the start means the run "
        "missed its wake-up: the worker's claim ran without seeing it as claimable (for "
        "example while another statement held the run's row lock: the claim skips locked "
        "rows) and nothing woke the claim loop again until the next start's NOTIFY (50 ms "
        f"later at {rate:g} runs/s) or `poll_interval`.",
        "",
        f"All times in ms. Samples per repeat: {samples}; "
        f"the scheduler started every run within {1000 * late:.1f} ms of its slot. "
        '"client + 1 worker process": this process only starts and waits (`concurrency=0`), '
        "a worker process executes (concurrency 32).",
        "",
    ]
