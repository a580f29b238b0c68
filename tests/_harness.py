"""The one harness for everything a test runs in another process.

- :class:`Child`: a long-lived child (a ``saga worker``, the chaos worker script), its
  output in a file (a chatty child never blocks on a full pipe), with readiness, signals
  (SIGTERM/SIGINT, SIGSTOP/SIGCONT, SIGKILL) and bounded waits. On Linux it is SIGKILLed
  if the test process dies, so no child outlives a killed test run.
- :class:`Children`: every child a test starts, killed and reaped at teardown (the
  ``children`` fixture); ``saga_worker()`` starts the real ``saga worker MODULE:OBJECT``.
- :func:`run`: a short-lived ``python ...`` to its end (a CLI command, a script),
  killed after a timeout; :func:`popen` for a test that must hold the child's pipes.
- :class:`Server`: the test cluster's ``pg_ctl`` (stop, start, crash-restart), for the
  tests of outages (the ``pg_server`` fixture).

Every child runs ``sys.executable`` from the repository root with the test's environment,
minus ``SAGA_DSN`` (a child gets the test's database explicitly, never the developer's)
and ``OTEL_*`` (no child exports to a developer's collector).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import anyio
import asyncpg

ROOT = Path(__file__).resolve().parent.parent


def python_env(dsn: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child: the test's, minus SAGA_DSN and OTEL_*, plus
    PYTHONPATH (the repository root), SAGA_DSN=``dsn`` when given, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "SAGA_DSN" and not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    if dsn is not None:
        env["SAGA_DSN"] = dsn
    return {**env, **extra}


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None


_PRCTL = _prctl()  # looked up here: the child between fork and exec only calls it


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the test process dies."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def popen(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.PIPE,
) -> subprocess.Popen[bytes]:
    """``python ARGS`` from the repository root (``env`` defaults to python_env())."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(env) if env is not None else python_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=_die_with_parent,
    )


async def run(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` to its end, stdout and stderr captured as text; killed (and
    TimeoutExpired raised) after ``timeout`` seconds."""
    call = functools.partial(
        subprocess.run,
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(env) if env is not None else python_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return await anyio.to_thread.run_sync(call)


class Child:
    """``python ARGS`` running beside the test, its stdout and stderr in ``log``.

    ``ready`` is the text the child prints once it is ready (see :meth:`wait_ready`).
    """

    def __init__(
        self,
        *args: str,
        log: Path,
        env: Mapping[str, str] | None = None,
        ready: str | None = None,
    ) -> None:
        self.log = log
        self.ready = ready
        self._file = log.open("wb")
        self.proc = popen(*args, env=env, stdout=self._file, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def output(self) -> str:
        """Everything the child printed so far."""
        return self.log.read_text(errors="replace")

    async def wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float = 20
    ) -> None:
        """Wait until ``condition()``; fail with the child's output if it exits first."""
        with anyio.fail_after(timeout):
            while not condition():
                assert self.alive, f"{what}: the child exited ({self.returncode}):\n{self.output}"
                await anyio.sleep(0.05)

    async def wait_ready(self, timeout: float = 20) -> None:
        """Wait for the ``ready`` text in the output."""
        assert self.ready is not None, "this child prints no readiness line"
        ready = self.ready
        await self.wait_until(lambda: ready in self.output, f"waiting for {ready!r}", timeout)

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` unless the child already exited."""
        with contextlib.suppress(ProcessLookupError):  # raced with its exit
            if self.alive:
                self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: the child stalls (its leases expire meanwhile)."""
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        self.send(signal.SIGCONT)

    async def wait(self, timeout: float = 20) -> int:
        """Wait for the child's exit code."""
        with anyio.fail_after(timeout):
            while (code := self.proc.poll()) is None:  # noqa: ASYNC110 - polling a child
                await anyio.sleep(0.05)
        return code

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` (after SIGCONT, so a stalled child handles it) and wait for the
        exit code."""
        self.resume()
        self.send(sig)
        return await self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL (a stalled child too) and reap it: instant."""
        self.resume()
        self.send(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def close(self) -> None:
        """Kill the child if it still runs, reap it and close its log: never leave a
        process behind. Idempotent."""
        try:
            if self.alive:
                self.kill()
        finally:
            self._file.close()


class Children:
    """The children of one test, their logs in ``logs``; all closed by :meth:`close`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Child] = []

    def python(
        self,
        *args: str,
        name: str,
        env: Mapping[str, str] | None = None,
        ready: str | None = None,
    ) -> Child:
        """``python ARGS``, its output in ``<logs>/<name>.out``."""
        child = Child(*args, log=self.logs / f"{name}.out", env=env, ready=ready)
        self.started.append(child)
        return child

    def saga_worker(self, dsn: str, target: str, *options: str, name: str = "worker") -> Child:
        """The real ``saga worker TARGET --dsn DSN OPTIONS`` (``python -m saga``), ready
        once it printed that claiming is live. SAGA_DSN is set too, for a sagas module
        whose steps connect to the database themselves."""
        return self.python(
            "-m",
            "saga",
            "worker",
            target,
            "--dsn",
            dsn,
            *options,
            name=name,
            env=python_env(dsn),
            ready=" ready: ",
        )

    def close(self) -> None:
        """Kill and reap every child still running (all of them, even if one fails)."""
        failures: list[BaseException] = []
        for child in self.started:
            try:
                child.close()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


class Server:
    """The test cluster's server, through ``pg_ctl`` (scripts/test.sh exports
    SAGA_TEST_PGCTL, a wrapper that runs it as the cluster's owner, and SAGA_TEST_PGDATA)."""

    def __init__(self, pg_ctl: str, pgdata: str) -> None:
        self.pg_ctl = pg_ctl
        self.pgdata = pgdata
        # -l: without a log file a new postmaster would keep our pipes open forever.
        self.log = os.path.join(os.path.dirname(pgdata), "server-control.log")

    @classmethod
    def from_env(cls) -> Server | None:
        pg_ctl, pgdata = os.environ.get("SAGA_TEST_PGCTL"), os.environ.get("SAGA_TEST_PGDATA")
        return cls(pg_ctl, pgdata) if pg_ctl and pgdata else None

    async def _pg_ctl(self, *args: str) -> None:
        result = await anyio.run_process(
            [self.pg_ctl, "-D", self.pgdata, "-w", "-t", "60", *args], check=False
        )
        assert result.returncode == 0, (args, result.stderr.decode())

    async def stop(self) -> None:
        """A clean, fast shutdown: every connection is closed."""
        await self._pg_ctl("-m", "fast", "stop")

    async def start(self) -> None:
        await self._pg_ctl("-l", self.log, "start")

    async def crash_restart(self) -> None:
        """``restart -m immediate``: the server dies as in a crash, then recovers."""
        await self._pg_ctl("-m", "immediate", "-l", self.log, "restart")

    @staticmethod
    async def make_durable(dsn: str) -> None:
        """Acknowledged commits to the database of ``dsn`` survive a crash (the test
        cluster runs with synchronous_commit off)."""
        database = urlsplit(dsn).path.lstrip("/")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = on')
        finally:
            await conn.close()
