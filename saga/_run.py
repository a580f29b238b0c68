"""Handles on runs: status, history, waiting for the outcome, operator actions."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio

from saga._codec import decode
from saga._errors import (
    DatabaseError,
    ErrorInfo,
    InvalidRunStateError,
    RunCancelledError,
    RunCompensatedError,
    RunError,
    RunFailedError,
    RunNotFoundError,
    RunTimeoutError,
)

if TYPE_CHECKING:
    import asyncpg

    from saga._orchestrator import Orchestrator


class RunStatus(enum.StrEnum):
    """Where a run is. The last four are terminal."""

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.FAILED, RunStatus.CANCELLED}
)

_RUN_ERRORS: dict[RunStatus, type[RunError]] = {
    RunStatus.COMPENSATED: RunCompensatedError,
    RunStatus.CANCELLED: RunCancelledError,
    RunStatus.FAILED: RunFailedError,
}


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A snapshot of a run's state (payloads excluded)."""

    id: UUID
    saga: str
    version: int
    key: str | None
    status: RunStatus
    step: str | None
    attempt: int
    completed_steps: tuple[str, ...]
    error: ErrorInfo | None
    compensation_error: ErrorInfo | None
    cancel_requested: bool
    worker: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> RunInfo:
        return cls(
            id=r["id"],
            saga=r["saga_name"],
            version=r["saga_version"],
            key=r["idempotency_key"],
            status=RunStatus(r["status"]),
            step=r["step_name"],
            attempt=r["attempt"],
            completed_steps=tuple(r["completed_steps"]),
            error=ErrorInfo.from_json(_loads(r["error"])),
            compensation_error=ErrorInfo.from_json(_loads(r["compensation_error"])),
            cancel_requested=r["cancel_requested"],
            worker=r["lease_owner"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            finished_at=r["finished_at"],
        )


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One entry of a run's append-only history, in the run's total order (``seq``).

    ``kind`` is one of: run_started, step_started, step_completed, step_failed,
    run_compensating, compensation_started, compensation_completed,
    compensation_failed, run_completed, run_compensated, run_cancelled, run_failed,
    cancel_requested, run_retried, lease_expired, lease_released.
    """

    seq: int
    at: datetime
    kind: str
    step: str | None
    attempt: int | None
    worker: str | None
    data: dict[str, Any]

    @property
    def error(self) -> ErrorInfo | None:
        return ErrorInfo.from_json(self.data.get("error"))

    def describe(self) -> str:
        """One human-readable line, as the demo and the CLI print it."""
        parts = [self.at.strftime("%H:%M:%S.%f")[:-3], f"{self.kind:<22}"]
        if self.step:
            parts.append(self.step)
        if self.attempt:
            parts.append(f"attempt={self.attempt}")
        if "retry_in" in self.data:
            parts.append(f"retry_in={self.data['retry_in']:.2f}s")
        if self.error is not None:
            parts.append(f"error={self.error.type}: {self.error.message}")
        if "plan" in self.data:
            parts.append("undo=" + ",".join(self.data["plan"]) if self.data["plan"] else "undo=-")
        if self.worker:
            parts.append(f"[{self.worker}]")
        return " ".join(parts).rstrip()


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class RunHandle:
    """A reference to one run, bound to the orchestrator that gave it out.

    Holding a handle costs nothing: every method reads the database when called.
    """

    def __init__(self, orchestrator: Orchestrator, run_id: UUID, *, created: bool = True) -> None:
        self._orch = orchestrator
        self.id = run_id
        self.created = created
        """False when ``start()`` found an existing run with the same idempotency key."""

    def __repr__(self) -> str:
        return f"<RunHandle {self.id}>"

    async def info(self) -> RunInfo:
        """The run's current state."""
        record = await self._orch._store_or_raise().get_run(self.id)
        if record is None:
            raise RunNotFoundError(self.id)
        return RunInfo.from_record(record)

    async def status(self) -> RunStatus:
        return (await self.info()).status

    async def history(self) -> list[HistoryEvent]:
        """The run's events in order: what ran, when, where, which attempt, what failed."""
        records = await self._orch._store_or_raise().get_events(self.id)
        if not records:
            await self.info()  # raises RunNotFoundError for an unknown id
        return [
            HistoryEvent(
                seq=r["id"],
                at=r["at"],
                kind=r["kind"],
                step=r["step"],
                attempt=r["attempt"],
                worker=r["worker"],
                data=_loads(r["data"]) or {},
            )
            for r in records
        ]

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end; return its output (the last step's typed result).

        Raises :class:`RunCompensatedError`, :class:`RunCancelledError` or
        :class:`RunFailedError` when the run ended otherwise, :class:`RunTimeoutError`
        when ``timeout`` seconds pass first (the run goes on), and :class:`LifecycleError`
        when the orchestrator closes meanwhile. Woken by NOTIFY; the orchestrator polls
        for all its waiters at once as a fallback, so a lost notification costs only
        latency.
        """
        orch = self._orch
        store = orch._store_or_raise()
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        watched = False
        while True:
            waiter = orch._subscribe(self.id)
            try:
                try:
                    if not watched:  # only watched runs NOTIFY when they end (no lock)
                        watched = await store.watch_run(self.id)
                    record = await store.get_run(self.id)
                except DatabaseError:
                    # The database is away (restart, failover): keep waiting until the
                    # deadline, as the run itself will resume when it is back.
                    if anyio.current_time() >= deadline:
                        raise
                    await anyio.sleep(min(orch.poll_interval, deadline - anyio.current_time()))
                    continue
                if record is None:
                    raise RunNotFoundError(self.id)
                status = RunStatus(record["status"])
                if status.is_terminal:
                    return self._outcome(record, status)
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise RunTimeoutError(
                        f"run {self.id} is still {status} after {timeout} seconds"
                    )
                with anyio.move_on_after(remaining):
                    await waiter.wait()
                orch._check_waiting()
            finally:
                orch._unsubscribe(self.id, waiter)

    def _outcome(self, record: asyncpg.Record, status: RunStatus) -> Any:
        if status is RunStatus.COMPLETED:
            definition = self._orch._definition(record["saga_name"], record["saga_version"])
            same = definition is not None and record["fingerprint"] in (
                None,
                definition.fingerprint,
            )
            result_type = definition.steps[-1].result_type if definition and same else Any
            return decode(record["output"], result_type)
        raise _RUN_ERRORS[status](
            self.id,
            status.value,
            ErrorInfo.from_json(_loads(record["error"])),
            ErrorInfo.from_json(_loads(record["compensation_error"])),
        )

    async def cancel(self) -> None:
        """Cancel the run: the steps that completed are compensated, newest first.

        A step running right now finishes its attempt first (and is compensated if it
        completed). The run then ends ``cancelled``, or ``failed`` if a compensation gives
        up. Raises :class:`InvalidRunStateError` when the run already ended.
        """
        store = self._orch._store_or_raise()
        if await store.request_cancel(self.id):
            return
        info = await self.info()
        if info.status.is_terminal:
            raise InvalidRunStateError(f"run {self.id} already ended {info.status}")
        # Already requested: cancelling twice is harmless.

    async def retry(self) -> None:
        """Resume a ``failed`` run at the compensation that gave up, with fresh attempts."""
        store = self._orch._store_or_raise()
        if await store.retry_run(self.id):
            return
        info = await self.info()
        raise InvalidRunStateError(
            f"run {self.id} is {info.status}; only failed runs can be retried"
        )
