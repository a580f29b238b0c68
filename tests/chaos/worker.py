"""A chaos worker process: ``python -m tests.chaos.worker DSN NAME SEED LOG FAULTS``.

Runs an orchestrator (worker id NAME, short leases) for the chaos sagas built from SEED
until SIGTERM, then shuts down cleanly (exit code 0). It is an application, so it
configures structlog itself: JSON lines, flushed line by line to LOG so that the test
can read what a worker logged even after SIGKILL. FAULTS is a JSON object of
``saga.testing.Faults`` to inject, e.g. ``{"expire_lease": {"s2": 2}}``, so that fencing
and crash recovery are exercised in every run, not only when the timing of a SIGSTOP
happens to produce them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import IO, Any

import asyncpg
import structlog

import saga
from saga.testing import Faults
from tests.chaos.sagas import Ledger, build_sagas, install_ledger

LEASE_SECONDS = 1.5


def configure_logging(stream: IO[str], name: str) -> None:
    def add_proc(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event["proc"] = name
        return event

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt=None, key="ts"),  # UNIX time, comparable
            add_proc,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # writes and flushes
        cache_logger_on_first_use=True,
    )


def make_faults(spec: dict[str, dict[str, int]]) -> Faults:
    faults = Faults()
    for step, times in spec.get("expire_lease", {}).items():
        faults.expire_lease(step, times=times)
    for step, times in spec.get("crash_after", {}).items():
        faults.crash_after(step, times=times)
    for step, times in spec.get("crash_after_compensation", {}).items():
        faults.crash_after(step, times=times, compensation=True)
    for step, times in spec.get("drop_connection_committed", {}).items():
        faults.drop_connection_at_commit(step, times=times, committed=True)
    for step, times in spec.get("drop_connection_uncommitted", {}).items():
        faults.drop_connection_at_commit(step, times=times, committed=False)
    return faults


async def report_faults(faults: Faults, log: Any) -> None:
    """Log the faults fired so far whenever they change: a SIGKILLed worker's count is
    then still in its log."""
    last: dict[str, int] = {}
    while True:
        await asyncio.sleep(0.3)
        if dict(faults.fired) != last:
            last = dict(faults.fired)
            log.info("chaos_faults_fired", fired=last)


async def main(dsn: str, name: str, seed: int, fault_spec: dict[str, dict[str, int]]) -> None:
    log = structlog.get_logger("chaos")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sagas = build_sagas(seed)
    faults = make_faults(fault_spec)
    log.info("chaos_worker_starting", pid=os.getpid())
    # The database may be restarting right now (a replacement worker): keep trying.
    while True:
        try:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
            break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("chaos_worker_connect_failed", error_type=type(exc).__name__)
            await asyncio.sleep(0.5)
    install_ledger(Ledger(pool, name))
    try:
        while not stop.is_set():
            orch = saga.Orchestrator(
                dsn,
                sagas=sagas,
                worker_id=name,
                lease_seconds=LEASE_SECONDS,
                poll_interval=0.2,
                concurrency=8,
                shutdown_timeout=3,
            )
            faults.attach(orch)
            try:
                async with orch, asyncio.TaskGroup() as tg:
                    log.info("chaos_worker_ready", pid=os.getpid())
                    reporter = tg.create_task(report_faults(faults, log))
                    await stop.wait()
                    reporter.cancel()
            except saga.DatabaseError as exc:
                log.warning("chaos_worker_open_failed", error_type=type(exc.__cause__).__name__)
                await asyncio.sleep(0.5)
    finally:
        log.info("chaos_worker_stopping")
        await pool.close()
    log.info("chaos_worker_stopped")


if __name__ == "__main__":
    _dsn, _name, _seed, _log_path, _faults = sys.argv[1:6]
    with open(_log_path, "a", buffering=1, encoding="utf-8") as _stream:
        configure_logging(_stream, _name)
        asyncio.run(main(_dsn, _name, int(_seed), json.loads(_faults)))
