"""A real ``saga worker`` subprocess for tests (``python -m saga worker ...``).

Its output goes to a file, not a pipe, so a chatty worker can never block on a full pipe;
readiness is the line the command prints once claiming is live.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent.parent


class WorkerProcess:
    """``python -m saga worker TARGET --dsn DSN ...`` run from the repository root."""

    def __init__(self, dsn: str, target: str, log: Path, *args: str) -> None:
        self.log = log
        self._file = log.open("wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SAGA_DSN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "saga", "worker", target, "--dsn", dsn, *args],
            cwd=ROOT,
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 20) -> None:
        """Wait for the 'ready' line; fail with the worker's output if it exits first."""
        with anyio.fail_after(timeout):
            while " ready: " not in self.output:
                assert self.proc.poll() is None, f"worker exited early:\n{self.output}"
                await anyio.sleep(0.05)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return await self.wait(timeout)

    async def wait(self, timeout: float = 20) -> int:
        with anyio.fail_after(timeout):
            while (code := self.proc.poll()) is None:  # noqa: ASYNC110 - polling a child
                await anyio.sleep(0.05)
        return code

    def kill(self) -> None:
        """Last resort at teardown: never leave a process behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._file.close()
