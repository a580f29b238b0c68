"""The benchmark's side of its worker processes (``benchmarks/_worker.py``): spawn one,
send it commands, wait for its answers, read its CPU, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from benchmarks._base import CHILDREN, REPO, BenchmarkError, say
from benchmarks._cpu import process_cpu_seconds


def spawn_quiet(cmd: list[str]) -> subprocess.Popen[bytes]:
    """A helper process (py-spy) whose stderr is read when it ends."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    CHILDREN.add(proc)
    return proc


def _open_log(log: Path | None) -> BinaryIO:
    return open(log or os.devnull, "ab")


class WorkerProc:
    """A ``python -m benchmarks._worker`` subprocess (see its docstring for the protocol)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = log

    @classmethod
    async def spawn(cls, *args: str, log: Path | None = None) -> WorkerProc:
        """Start a worker; its stderr (structlog and logging at WARNING) goes to ``log``:
        the compensation path logs a warning per failed step, which would flood a
        terminal. It runs from the repository root, so it imports this checkout's saga."""
        with _open_log(log) as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks._worker",
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=REPO,
            )
        CHILDREN.add(proc)
        return cls(proc, log)

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n" + "\n".join(tail) if tail else ""

    async def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, event: str | None, timeout: float = 120.0) -> dict[str, Any]:
        """The next message that is ``event`` (any message when None); fails on an error
        message, on exit, or after ``timeout`` seconds."""
        try:
            with anyio.fail_after(timeout):
                return await self._next(event)
        except TimeoutError:
            raise BenchmarkError(f"worker {self.pid}: no {event!r} in {timeout:.0f} s") from None

    async def _next(self, event: str | None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                code = await self.proc.wait()
                raise BenchmarkError(f"worker {self.pid} exited with {code}{self.log_tail()}")
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == "error":
                raise BenchmarkError(f"worker {self.pid}: {msg['message']}{self.log_tail()}")
            if event is None or msg.get("event") == event:
                return msg

    async def call(self, cmd: dict[str, Any], event: str, timeout: float = 120.0) -> dict[str, Any]:
        await self.send(cmd)
        return await self.expect(event, timeout)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def kernel_seconds(self) -> float:
        return process_cpu_seconds(self.pid, kernel_only=True)

    async def stop(self) -> None:
        """Close its stdin (it closes what is open and exits); kill it after 30 s."""
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            with anyio.fail_after(30):
                await self.proc.wait()
        except TimeoutError:
            say(f"worker {self.pid} did not exit; killing it")
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        CHILDREN.discard(self.proc)
