"""What every module of the benchmarks needs: the repository root, progress messages,
the error that fails a measurement, and the child processes a signal must not orphan."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Protocol

import anyio
import structlog

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "benchmarks"
STARTERS = 32  # concurrent start() tasks of a client (or of an embedded orchestrator)


class BenchmarkError(RuntimeError):
    """A measurement could not be made or failed its checks: the run exits 1."""


def say(msg: str) -> None:
    """Progress on stderr (stdout is the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(x: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.{digits}f}"


class Killable(Protocol):
    def kill(self) -> None: ...


# Child processes (pgbench, worker processes, the dummy OTLP receiver, py-spy): killed by
# the signal handler, so that a SIGTERM never leaves one behind.
CHILDREN: set[Killable] = set()


def install_exit_handlers(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` at exit, and turn SIGTERM/SIGHUP into SystemExit after killing the
    children, so that ``finally`` blocks and atexit run."""
    atexit.register(cleanup)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        for child in list(CHILDREN):  # else the event loop waits for pgbench's thread
            with contextlib.suppress(OSError):
                child.kill()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def configure_logging() -> None:
    """WARNING and above, to stderr: for the benchmark's own processes only (a library
    never configures logging; these are applications)."""
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def verdict(ok: bool | None) -> str:
    """A target's verdict, as the report writes it."""
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


async def start_concurrently(runs: int, start_one: Callable[[int], Awaitable[object]]) -> None:
    """``start_one(i)`` for i in range(runs), by STARTERS tasks sharing one iterator."""
    numbers = iter(range(runs))

    async def starter() -> None:
        for i in numbers:
            await start_one(i)

    async with anyio.create_task_group() as tg:
        for _ in range(STARTERS):
            tg.start_soon(starter)
