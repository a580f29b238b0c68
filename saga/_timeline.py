"""A run's history assembled into its attempts: what ``saga show`` prints, and what a
dashboard draws. Pure: works on any run's history, of sagas registered or not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from saga import _checks
from saga._errors import ErrorInfo, InvalidInputError
from saga._model import EventKind, HistoryEvent

_STARTED = (EventKind.STEP_STARTED, EventKind.COMPENSATION_STARTED)
_COMPLETED = (EventKind.STEP_COMPLETED, EventKind.COMPENSATION_COMPLETED)
_FAILED = (EventKind.STEP_FAILED, EventKind.COMPENSATION_FAILED)
# Events that end an attempt without its outcome, and what the attempt shows then.
_ENDS_OF_HOLD: dict[str, str] = {
    EventKind.LEASE_EXPIRED: "lease_expired",
    EventKind.LEASE_RELEASED: "released",
    EventKind.CHILDREN_WAITING: "waiting",
}


@dataclass(frozen=True, slots=True)
class StepAttempt:
    """One attempt of a step or compensation, assembled from a run's history.

    ``outcome`` is ``completed``, ``failed`` (``retry_in`` is set when another attempt is
    scheduled), ``lease_expired`` (its worker stopped heartbeating; the attempt counts:
    when it was the last, it shows ``failed`` with ``saga.AttemptLost``),
    ``released`` (its worker shut down and gave the run back; it does not count, unless
    the same attempt was released before: ``data["counted"]`` of the event) or
    ``waiting`` (a step running child sagas gave its slot back until one of them ends)
    or ``running`` (no outcome recorded yet). A ``running`` attempt that waits for a
    token of its step's rate limit has ``rate_limit`` (the limit's name) and
    ``rate_limited_until`` (when it goes on): until then, the step has not started.
    """

    step: str
    compensation: bool
    attempt: int
    worker: str | None
    started_at: datetime | None
    ended_at: datetime | None
    outcome: str
    error: ErrorInfo | None = None
    retry_in: float | None = None
    #: A graph run's step: the steps it waited on (``()``: none, it ran at the start);
    #: None for compensations and the steps of linear runs.
    after: tuple[str, ...] | None = None
    rate_limit: str | None = None
    rate_limited_until: datetime | None = None

    def waits_for_token(self, now: datetime) -> bool:
        """Whether this attempt, running, still waits for its rate limit's token at
        ``now`` (its step has not started yet)."""
        until = self.rate_limited_until
        return self.outcome == "running" and until is not None and now < until

    @property
    def duration(self) -> float | None:
        """Seconds from start to outcome, or ``None`` while either is unknown."""
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()


def timeline(history: Sequence[HistoryEvent]) -> list[StepAttempt]:
    """Assemble a run's history into its attempts, in the order they started.

    Each step and compensation attempt appears once, with its worker, start, outcome,
    duration and error: what ``saga show`` prints. Works on any run, including runs of
    sagas this process has not registered.
    """
    events = _checks.sequence_of("history", history, HistoryEvent, InvalidInputError)
    assembler = _Assembler()
    for event in events:
        assembler.feed(event)
    return assembler.attempts


Key = tuple[bool, str, int]  # (compensation, step, attempt)


class _Assembler:
    def __init__(self) -> None:
        self.attempts: list[StepAttempt] = []
        self._open: dict[Key, int] = {}  # -> index in attempts
        # Attempts whose worker stopped holding them (lease expired, released): the
        # failure a later worker records for such an attempt (saga.AttemptLost, when no
        # attempt is left) is that attempt's outcome, not another attempt.
        self._lost: dict[Key, int] = {}
        self._compensating = False
        self._after: dict[str, tuple[str, ...]] = {}  # graph steps: what they waited on

    def feed(self, event: HistoryEvent) -> None:
        kind, step, attempt = event.kind, event.step, event.attempt or 0
        if kind in (EventKind.RUN_COMPENSATING, EventKind.RUN_RETRIED):
            self._compensating = True
            if kind == EventKind.RUN_RETRIED:
                self._lost.clear()  # fresh attempts, numbered from 1 again
        elif step is None:
            return
        elif kind in (EventKind.STEP_READY, EventKind.RATE_LIMITED):
            self._note(event, step, attempt)
        elif kind in _STARTED:
            self._start(event, (kind == EventKind.COMPENSATION_STARTED, step, attempt))
        elif kind in _COMPLETED:
            key = (kind == EventKind.COMPENSATION_COMPLETED, step, attempt)
            self._close(key, event, "completed")
        elif kind in _FAILED:
            retry_in = event.data.get("retry_in")
            self._close(
                (kind == EventKind.COMPENSATION_FAILED, step, attempt),
                event,
                "failed",
                float(retry_in) if isinstance(retry_in, int | float) else None,
            )
        elif kind in _ENDS_OF_HOLD:
            key = (self._compensating, step, attempt)
            if key not in self._open and (not self._compensating, step, attempt) in self._open:
                key = (not self._compensating, step, attempt)
            self._close(key, event, _ENDS_OF_HOLD[kind])

    def _start(self, event: HistoryEvent, key: Key) -> None:
        self._lost.pop(key, None)
        self._compensating = self._compensating or key[0]
        self._open[key] = len(self.attempts)
        self.attempts.append(
            StepAttempt(
                step=key[1],
                compensation=key[0],
                attempt=key[2],
                worker=event.worker,
                started_at=event.at,
                ended_at=None,
                outcome="running",
                after=None if key[0] else self._after.get(key[1]),
            )
        )

    def _note(self, event: HistoryEvent, step: str, attempt: int) -> None:
        """What a step waited on before it started: its dependencies (``step_ready``) or
        its rate limit's token (``rate_limited``, of the attempt open)."""
        if event.kind == EventKind.STEP_READY:
            self._after[step] = tuple(event.data.get("after") or ())
            return
        index = self._open.get((False, step, attempt))
        delay = event.data.get("delay")
        if index is None or not isinstance(delay, int | float):
            return
        until = event.at + timedelta(seconds=float(delay))
        limit = event.data.get("limit")
        self.attempts[index] = replace(
            self.attempts[index],
            rate_limit=None if limit is None else str(limit),
            rate_limited_until=until,
        )

    def _close(
        self, key: Key, event: HistoryEvent, outcome: str, retry_in: float | None = None
    ) -> None:
        index = self._open.pop(key, None)
        if index is None and outcome == "failed":
            index = self._lost.pop(key, None)
        if index is None and outcome == "waiting":
            return  # a children step dropped in a rollback, waiting for its children's undo
        if index is None:  # no start recorded (e.g. claimed while a cancel was pending)
            begun = StepAttempt(key[1], key[0], key[2], event.worker, None, None, outcome)
            index = len(self.attempts)
            self.attempts.append(begun)
        begun = self.attempts[index]
        self.attempts[index] = StepAttempt(
            step=begun.step,
            compensation=begun.compensation,
            attempt=begun.attempt,
            worker=begun.worker or event.worker,
            started_at=begun.started_at,
            ended_at=event.at,
            outcome=outcome,
            error=event.error,
            retry_in=retry_in,
            after=begun.after,
            rate_limit=begun.rate_limit,
            rate_limited_until=begun.rate_limited_until,
        )
        if outcome in ("lease_expired", "released"):
            self._lost[key] = index
