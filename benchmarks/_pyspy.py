"""py-spy (``record --nonblocking``, raw stacks) on the worker process and on this
process while a window runs, and what its samples say: own time by library, the hottest
functions, saga's functions by inclusive time."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio

from benchmarks._base import CHILDREN, REPO
from benchmarks._procs import WorkerProc, spawn_quiet
from benchmarks._window import Hook

RATE = 250  # samples per second
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
AREAS = (
    ("/saga/", "saga"),
    ("/asyncpg/", "asyncpg"),
    ("/pydantic", "pydantic"),
    ("/anyio/", "anyio"),
    ("/asyncio/", "asyncio (event loop)"),
    ("/selectors.py", "asyncio (event loop)"),
    ("/opentelemetry/", "opentelemetry"),
    ("/google/protobuf/", "opentelemetry (protobuf)"),
    ("/requests/", "opentelemetry (HTTP export)"),
    ("/urllib3/", "opentelemetry (HTTP export)"),
    ("/http/client.py", "opentelemetry (HTTP export)"),
    ("/structlog/", "structlog"),
    ("/json/", "json"),
    ("/uuid.py", "uuid"),
    ("/benchmarks/", "benchmark harness"),
    ("/threading.py", "threading"),
)


@dataclasses.dataclass
class Profile:
    samples: int
    busy: float  # samples / (rate x seconds)
    areas: list[tuple[str, int]]  # samples by library of the innermost frame
    own: list[tuple[str, int]]  # the hottest functions, own time
    saga: list[tuple[str, int]]  # saga's functions, inclusive time


Profiles = dict[str, Profile]  # "worker process" / "client (benchmark process)"


def frame_area(file: str) -> str:
    for needle, area in AREAS:
        if needle in file:
            return area
    return "other"


def short_file(file: str) -> str:
    """A path relative to site-packages, the repository or the standard library."""
    for marker in ("/site-packages/", f"{REPO}/", "/lib/python3."):
        if marker in file:
            rest = file.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3." else rest
    return file


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for raw in stack.split(";"):
        match = FRAME.match(raw)
        frames.append((match["func"], match["file"]) if match else (raw, ""))
    return frames


def summarize(path: Path, seconds: float) -> Profile:
    """From py-spy's raw (collapsed) stacks, one ``frame;frame;... count`` a line."""
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = _frames(stack)
        func, file = frames[-1]
        own[f"{func} ({short_file(file)})"] += n
        areas[frame_area(file)] += n
        for key in {f"{f} ({short_file(fl)})" for f, fl in frames if "/saga/" in fl}:
            inclusive[key] += n
    return Profile(
        samples=total,
        busy=total / (RATE * seconds) if seconds else math.nan,
        areas=areas.most_common(),
        own=own.most_common(12),
        saga=inclusive.most_common(12),
    )


def hook(exe: str, logdir: Path, into: Profiles, notes: list[str], client: bool = True) -> Hook:
    """Records the first worker process (and this process, with ``client``) while the
    window runs; summaries land in ``into``, failures in ``notes``."""

    @contextlib.asynccontextmanager
    async def recording(workers: Sequence[WorkerProc]) -> AsyncIterator[None]:
        targets = {"worker process": workers[0].pid}
        if client:
            targets["client (benchmark process)"] = os.getpid()
        recorders: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        for name, pid in targets.items():
            path = logdir / f"pyspy-{pid}-{time.monotonic_ns()}.txt"
            cmd = [exe, "record", "--nonblocking", "--full-filenames", "--pid", str(pid)]
            cmd += ["--format", "raw", "--rate", str(RATE), "--output", str(path)]
            recorders[name] = (spawn_quiet(cmd), path)
        began = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - began
            for name, (proc, path) in recorders.items():
                err = await _stop(proc)
                if not path.exists():
                    notes.append(f"py-spy on {name} failed: {err[-300:]}")
                    continue
                into[name] = summarize(path, seconds)

    return recording


async def _stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGINT (py-spy writes its output), then wait; its stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = await anyio.to_thread.run_sync(proc.communicate, None, 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = b"timed out"
    CHILDREN.discard(proc)
    return err.decode(errors="replace")
