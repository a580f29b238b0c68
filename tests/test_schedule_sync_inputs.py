"""A schedule's sync input function runs in a worker thread: one that blocks (a
synchronous HTTP call, say) holds up its own schedule only, never the orchestrator's
event loop, and one that never returns costs one thread, not one per try."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

import saga
from saga import _scheduler
from tests._harness import python_env
from tests._sagas import Job, small_saga
from tests.conftest import OrchestratorFactory

EVERY_SECOND = saga.Schedule.every(timedelta(seconds=1))

pytestmark = pytest.mark.timeout(60)


async def _slots(db: asyncpg.Connection, name: str) -> list[datetime]:
    rows = await db.fetch(
        "SELECT created_at FROM saga.runs WHERE idempotency_key LIKE $1 ORDER BY 1",
        f"schedule:{name}:%",
    )
    return [r[0] for r in rows]


async def test_a_blocking_sync_input_holds_up_no_other_schedule(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection
) -> None:
    """README (Schedules): `input` is "a function (sync or async)"; a slot "handled
    within grace of its time ... always runs", and a slow input holds up its own
    schedule's slots, "other schedules do not". A sync input blocking 3 s: another
    schedule's every-second slots keep starting runs meanwhile, none is skipped.
    Before, the sync function ran on the event loop: nothing ran for 3 s and the other
    schedule's slots (grace=0) were skipped as late."""
    window: list[datetime] = []
    done = threading.Event()

    def blocking(slot: datetime) -> Job:
        if not window:
            window.append(datetime.now().astimezone())
            time.sleep(3)  # a synchronous call to some service
            window.append(datetime.now().astimezone())
            done.set()
        return Job(n=1)

    slow_saga, tick_saga = small_saga("blocked", 1), small_saga("other", 1)
    slow = saga.Scheduled("slow", slow_saga, EVERY_SECOND, blocking)
    tick = saga.Scheduled("tick", tick_saga, EVERY_SECOND, Job(), grace=timedelta(0))
    orch = await orchestrator(slow_saga, tick_saga, schedules=[slow, tick], poll_interval=0.2)
    with anyio.fail_after(15):
        while not done.is_set():  # noqa: ASYNC110 - a thread sets it
            await anyio.sleep(0.05)
    await anyio.sleep(1.5)
    started, ended = window
    during = [t for t in await _slots(db, "tick") if started < t < ended]
    assert len(during) >= 2, during
    info = {i.name: i for i in await saga.list_schedules(orch)}["tick"]
    assert info.skipped == 0


async def test_a_sync_input_that_never_returns_takes_one_thread_and_fails_its_slots(
    orchestrator: OrchestratorFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Schedules): a slot whose input function takes more than the limit (10 s;
    0.3 s here) is logged (`schedule_input_failed`) and tried again every second within
    grace. A sync function that hangs is left running in its thread: the tries after it
    fail at once (TimeoutError) without calling it again, and once it returns, the
    schedule's next slot starts its run."""
    monkeypatch.setattr(_scheduler, "_INPUT_SECONDS", 0.3)
    calls: list[datetime] = []
    release = threading.Event()

    def hangs(slot: datetime) -> Job:
        calls.append(slot)
        release.wait(20)  # hung until the test lets it go
        return Job(n=2)

    s = small_saga("hung_sync", 1)
    hung = saga.Scheduled("hung", s, EVERY_SECOND, hangs, grace=timedelta(seconds=30))
    with capture_logs() as logs:
        await orchestrator(s, schedules=[hung], poll_interval=0.2)
        await anyio.sleep(3.5)
        assert len(calls) == 1  # one thread, however many tries
        release.set()
        with anyio.fail_after(10):
            while not await _slots(db, "hung"):  # noqa: ASYNC110
                await anyio.sleep(0.1)
    failed = [e for e in logs if e["event"] == "schedule_input_failed"]
    assert len(failed) >= 2
    assert {e["error_type"] for e in failed} == {"TimeoutError"}


_BLOCKED_SCRIPT = """
import asyncio, os, sys, threading, time
from datetime import timedelta
import saga
from tests._harness import python_env
from tests._sagas import Job, small_saga

called = threading.Event()

def blocking(slot):
    called.set()
    time.sleep(300)  # a synchronous call to a service that hangs
    return Job(n=1)

async def main():
    s = small_saga("blocked_exit", 1)
    sched = saga.Scheduled("blocked", s, saga.Schedule.every(timedelta(seconds=1)), blocking)
    async with saga.Orchestrator(os.environ["SAGA_DSN"], sagas=[s], schedules=[sched],
                                 poll_interval=0.2, shutdown_timeout=1):
        while not called.is_set():
            await asyncio.sleep(0.05)
        print("input called", flush=True)
    print("closed", flush=True)

asyncio.run(main())
print("main returned", flush=True)
"""


async def test_a_process_whose_sync_input_hangs_exits_after_the_orchestrator_closes(
    dsn: str, tmp_path: Path
) -> None:
    """README (Orchestrator): leaving `async with` "stops claiming, lets running steps
    finish for up to `shutdown_timeout`, then cancels the rest ... and the close
    returns"; (Schedules): a sync input "still running past the limit below is left to
    finish there". A process whose schedule's sync input hangs (a synchronous call to a
    service that never answers) exits once its orchestrator closed. Before, the input
    ran in anyio's worker thread, not a daemon: the interpreter's exit waited for the
    hung call (300 s here), and a worker told to stop by SIGTERM hung until SIGKILL."""
    script = tmp_path / "blocked.py"
    script.write_text(textwrap.dedent(_BLOCKED_SCRIPT))
    process = await anyio.open_process(
        [sys.executable, str(script)], env=python_env(dsn), stderr=None
    )
    try:
        with anyio.fail_after(40):
            out = b""
            assert process.stdout is not None
            while b"main returned" not in out:
                out += await process.stdout.receive()
        returned = time.monotonic()
        with anyio.move_on_after(15):
            await process.wait()
        waited = time.monotonic() - returned
        assert process.returncode is not None, (
            f"the process still runs {waited:.0f} s after its orchestrator closed and "
            "asyncio.run returned (a hung sync input's worker thread holds the exit)"
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
