"""The vocabulary of runs, defined once: statuses, phases, history event kinds, attempt
outcomes, and the read models users get back (``RunInfo``, ``HistoryEvent``).

Every module that speaks of a status or an event kind uses these enums; "terminal" is a
property of :class:`RunStatus`, and nowhere else.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from saga._errors import (
    ErrorInfo,
    RunCancelledError,
    RunCompensatedError,
    RunError,
    RunFailedError,
    RunStoppedError,
)


class RunStatus(enum.StrEnum):
    """Where a run is. The last five are terminal (``failed`` and ``stopped`` ones may be
    resumed by an operator).

    ``sleeping`` and ``waiting`` runs hold no lease, no worker slot and no connection:
    they are rows with a due time (the end of a sleep, a wait's timeout), claimed again
    when it comes, or (``waiting``) when their signal arrives.
    """

    PENDING = "pending"
    RUNNING = "running"
    SLEEPING = "sleeping"
    WAITING = "waiting"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        """Whether the run has ended (``failed`` and ``stopped`` ones may be resumed by
        an operator)."""
        return self in _TERMINAL

    @classmethod
    def active(cls) -> tuple[RunStatus, ...]:
        """The statuses of runs that have not ended."""
        return tuple(s for s in cls if not s.is_terminal)

    @classmethod
    def terminal(cls) -> tuple[RunStatus, ...]:
        return tuple(s for s in cls if s.is_terminal)


#: History data ``HistoryEvent.describe`` shows (never payloads): the operator's name and
#: note, the signal and why it was refused, the rate limit and its delay.
_DESCRIBED = ("by", "note", "signal", "reason", "limit", "delay")
_TERMINAL = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.COMPENSATED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.STOPPED,
    }
)

#: The statuses of runs parked at a sleep or a wait (no lease, no worker).
PARKED = frozenset({RunStatus.SLEEPING, RunStatus.WAITING})


class KeyState(enum.StrEnum):
    """Where a run of a saga with a concurrency key is: waiting in its key's queue,
    holding one of the key's slots, or done with it."""

    QUEUED = "queued"
    HELD = "held"
    RELEASED = "released"


class Phase(enum.StrEnum):
    """What a work item runs: a forward step, or a step's compensation."""

    STEP = "step"
    COMPENSATION = "compensation"


class EventKind(enum.StrEnum):
    """The kinds of entries in a run's history."""

    RUN_STARTED = "run_started"
    STEP_READY = "step_ready"
    STEP_STARTED = "step_started"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    RUN_COMPENSATING = "run_compensating"
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_COMPLETED = "compensation_completed"
    COMPENSATION_FAILED = "compensation_failed"
    RUN_COMPLETED = "run_completed"
    RUN_COMPENSATED = "run_compensated"
    RUN_CANCELLED = "run_cancelled"
    RUN_FAILED = "run_failed"
    CANCEL_REQUESTED = "cancel_requested"
    RUN_RETRIED = "run_retried"
    LEASE_EXPIRED = "lease_expired"
    LEASE_RELEASED = "lease_released"
    SLEEP_STARTED = "sleep_started"
    WAIT_STARTED = "wait_started"
    SIGNAL_RECEIVED = "signal_received"
    SIGNAL_REFUSED = "signal_refused"
    WOKE = "woke"
    WAIT_TIMED_OUT = "wait_timed_out"
    RUN_STOPPED = "run_stopped"
    CHILDREN_WAITING = "children_waiting"
    RUN_RESOLVED = "run_resolved"
    COMPENSATION_SKIPPED = "compensation_skipped"
    RATE_LIMITED = "rate_limited"
    KEY_ADMITTED = "key_admitted"

    @staticmethod
    def started(phase: Phase) -> EventKind:
        return EventKind.STEP_STARTED if phase is Phase.STEP else EventKind.COMPENSATION_STARTED

    @staticmethod
    def completed(phase: Phase) -> EventKind:
        return EventKind.STEP_COMPLETED if phase is Phase.STEP else EventKind.COMPENSATION_COMPLETED

    @staticmethod
    def failed(phase: Phase) -> EventKind:
        return EventKind.STEP_FAILED if phase is Phase.STEP else EventKind.COMPENSATION_FAILED

    @staticmethod
    def ended(status: RunStatus) -> EventKind:
        """The event that records a run ending in ``status``."""
        return _ENDED[status]


_ENDED = {
    RunStatus.COMPLETED: EventKind.RUN_COMPLETED,
    RunStatus.COMPENSATED: EventKind.RUN_COMPENSATED,
    RunStatus.CANCELLED: EventKind.RUN_CANCELLED,
    RunStatus.FAILED: EventKind.RUN_FAILED,
    RunStatus.STOPPED: EventKind.RUN_STOPPED,
}


class Outcome(enum.StrEnum):
    """How one attempt went, as spans and metrics report it (``saga.outcome``)."""

    SUCCESS = "success"
    RETRY = "retry"
    FAILURE = "failure"
    LEASE_LOST = "lease_lost"
    REFUSED = "refused"
    INTERRUPTED = "interrupted"
    PARKED = "parked"  # a step running child sagas waits for them, its slot given back


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
    #: The sleep or wait the run is at (``sleeping``, ``waiting``) or stopped at
    #: (``stopped``); None otherwise.
    wait: str | None = None
    #: When the run is next due: a sleep's end, a wait's timeout (None: no timeout),
    #: a retry's backoff, a lease's expiry; None once ended.
    due_at: datetime | None = None
    #: A failed or stopped run an operator marked resolved (:meth:`RunHandle.resolve`):
    #: it no longer needs attention.
    resolved: bool = False
    #: Claimed before due work of a lower priority (0-100).
    priority: int = 0
    #: The run's concurrency key (a saga with ``concurrency_key``), and whether it is
    #: still queued behind the runs holding that key (pending until admitted).
    concurrency_key: str | None = None
    waiting_for_key: bool = False

    def ended_error(self) -> RunError:
        """What ``result()`` raises for this run, ended without completing."""
        kind = _RUN_ERRORS.get(self.status, RunError)
        return kind(self.id, self.status.value, self.error, self.compensation_error)


_RUN_ERRORS: dict[RunStatus, type[RunError]] = {
    RunStatus.COMPENSATED: RunCompensatedError,
    RunStatus.CANCELLED: RunCancelledError,
    RunStatus.FAILED: RunFailedError,
    RunStatus.STOPPED: RunStoppedError,
}


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One entry of a run's append-only history, in the run's total order (``seq``).

    ``kind`` is an :class:`EventKind` value (a str): run_started, step_ready (a step
    of a graph saga whose dependencies all completed; ``data["after"]`` names them),
    step_started,
    step_completed, step_failed, run_compensating, compensation_started,
    compensation_completed, compensation_failed, run_completed, run_compensated,
    run_cancelled, run_failed, cancel_requested, run_retried, lease_expired,
    lease_released, sleep_started, wait_started, signal_received, signal_refused, woke,
    wait_timed_out, run_stopped, children_waiting (a step running child sagas gave its
    slot back until one of them ends; ``data``: ``ended`` of ``of``, ``started``),
    run_resolved, compensation_skipped. An operator's action (cancel_requested,
    run_retried, run_resolved, compensation_skipped, signal_received) carries who did it
    and why in ``data["by"]`` and ``data["note"]`` when they were given.
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
        if "after" in self.data:
            parts.append("after=" + (",".join(self.data["after"]) or "start"))
        if "plan" in self.data:
            parts.append("undo=" + ",".join(self.data["plan"]) if self.data["plan"] else "undo=-")
        for name in _DESCRIBED:  # who acted and why, which signal, which limit
            value = self.data.get(name)
            if value is not None:
                parts.append(f"{name}={json.dumps(value, ensure_ascii=False)}")
        if self.worker:
            parts.append(f"[{self.worker}]")
        return " ".join(parts).rstrip()
