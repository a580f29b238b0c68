"""Memory: the RSS of a worker process holding 10,000 runs in flight."""

from __future__ import annotations

import dataclasses
import time

from benchmarks import _internals
from benchmarks._base import say
from benchmarks._cpu import status_kib
from benchmarks._harness import Harness
from benchmarks._measure import saga_client
from benchmarks._sagas import build
from benchmarks._stat import Stat
from benchmarks._window import Poller


@dataclasses.dataclass
class Memory:
    idle_mib: float
    held_mib: float
    held_hwm_mib: float
    peak_mib: float
    kib_per_run: float
    running: float
    seconds: float


async def measure(h: Harness) -> list[Memory]:
    return [await _once(h, repeat) for repeat in range(h.opts.repeats)]


async def _once(h: Harness, repeat: int) -> Memory:
    """A fresh worker process with Orchestrator(concurrency=N) and a saga whose first
    step awaits an asyncio.Event: the client starts N runs, the worker claims them all
    and N steps wait at once; RSS is read from /proc/<pid>/status (VmRSS, VmHWM)."""
    n = h.opts.memory_runs
    db, dsn = await h.saga_database(f"memory_r{repeat}")
    worker = await h.spawn()
    try:
        began = time.monotonic()
        cmd = {"cmd": "open", "kind": "saga", "saga": "gate", "dsn": dsn, "concurrency": n}
        await worker.call({**cmd, "gate_target": n}, "opened")
        idle_rss = status_kib(worker.pid, "VmRSS")
        async with saga_client(build("gate"), n)(dsn) as start_all:
            await start_all()
        await worker.expect("gate_full", timeout=300)
        held_rss = status_kib(worker.pid, "VmRSS")
        held_hwm = status_kib(worker.pid, "VmHWM")
        poller = await Poller.connect(dsn)
        try:
            running = await poller.fetchval(_internals.LEASED)
            await worker.call({"cmd": "release"}, "released")
            await poller.wait_done(_internals.COMPLETED, n)
        finally:
            await poller.close()
        peak = status_kib(worker.pid, "VmHWM")
        await worker.call({"cmd": "close"}, "closed")
        seconds = time.monotonic() - began
    finally:
        await worker.stop()
    await h.drop(db)
    row = Memory(
        idle_mib=idle_rss / 1024,
        held_mib=held_rss / 1024,
        held_hwm_mib=held_hwm / 1024,
        peak_mib=peak / 1024,
        kib_per_run=(held_rss - idle_rss) / n,
        running=float(running),
        seconds=seconds,
    )
    say(
        f"memory (repeat {repeat + 1}): {running:,} runs in flight: RSS "
        f"{row.idle_mib:.0f} MiB idle -> {row.held_mib:.0f} MiB held "
        f"({row.kib_per_run:.1f} KiB/run), peak {row.peak_mib:.0f} MiB"
    )
    return row


def render(rows: list[Memory], n: int, repeats: int) -> list[str]:
    if not rows:
        return []

    def st(key: str, digits: int = 0, unit: str = "") -> str:
        return Stat.of([getattr(r, key) for r in rows]).fmt(digits, unit)

    return [
        f"## Memory: {n:,} runs in flight in one worker process",
        "",
        f"A fresh worker process opens `Orchestrator(concurrency={n:,})` (pool of 20 "
        "connections) with a saga whose first step awaits an `asyncio.Event`; the client "
        f"starts {n:,} runs; once all {n:,} first steps are waiting, RSS is read from "
        "`/proc/<pid>/status`; then the event is set and every run completes. Median "
        f"(min-max) of {repeats} repeats, a fresh process each.",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| runs leased and waiting at the reading | {st('running')} |",
        f"| RSS, orchestrator open and idle | {st('idle_mib', 0, ' MiB')} |",
        f"| RSS with {n:,} runs in flight | {st('held_mib', 0, ' MiB')} |",
        f"| per run in flight | {st('kib_per_run', 1, ' KiB')} |",
        f"| peak RSS (VmHWM) over the whole cycle | {st('peak_mib', 0, ' MiB')} |",
        f"| seconds for the cycle (start, hold, complete {n:,}) | {st('seconds', 1)} |",
        "",
    ]
