"""What the pages show, gathered from the client: the overview's figures and one run's
whole story. Pure reads through the public operator functions and the store."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from saga._client import Client
from saga._model import EventKind, HistoryEvent, RunInfo, RunStatus
from saga._store_dash import ChildRun, FailureCount, Overdue, SignalState
from saga._store_ops import Census, DefinitionKey
from saga._timeline import StepAttempt, timeline
from saga.web._render import Redact, show_error, show_payload
from saga.web._svg import FINAL, Chart, Picture, finished_chart, timeline_picture

#: The window of the failure figures (s).
RECENT = 3600.0
#: How long the windowed figures are reused (s); states, lags and parked runs are live.
RECENT_TTL = 15.0
#: Runnable work due longer than this (s), and run by nobody, is "work nobody runs".
OVERDUE_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class SagaOutcomes:
    """The runs of one saga that finished in the recent window, per final status."""

    saga: str
    by_status: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def failure_rate(self) -> float:
        bad = sum(self.by_status.get(s, 0) for s in ("compensated", "failed", "stopped"))
        return bad / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class Overview:
    census: Census
    chart: Chart
    outcomes: list[SagaOutcomes]
    failures: list[FailureCount]
    overdue: dict[DefinitionKey, Overdue]
    recent: float = RECENT
    recent_ttl: float = RECENT_TTL
    overdue_after: float = OVERDUE_AFTER
    statuses: tuple[str, ...] = (*(s.value for s in RunStatus.active()), "failed", "stopped")
    final: tuple[str, ...] = FINAL

    @property
    def overdue_rows(self) -> list[tuple[str, int, str, Overdue]]:
        rows = [(n, v, fp or "-", o) for (n, v, fp), o in self.overdue.items()]
        return sorted(rows, key=lambda row: row[:3])


@dataclass(frozen=True, slots=True)
class Recent:
    """The figures over a window of finished runs (the chart, the last hour's outcomes
    and failures): their cost grows with the throughput, so they are read at most once
    per RECENT_TTL seconds per dashboard, whatever the number of pages open."""

    at: float
    chart: Chart
    outcomes: list[SagaOutcomes]
    failures: list[FailureCount]


class RecentCache:
    """The dashboard's one copy of :class:`Recent` (owned by the dashboard)."""

    def __init__(self) -> None:
        self._recent: Recent | None = None

    async def get(self, client: Client) -> Recent:
        now = time.monotonic()
        if self._recent is None or now - self._recent.at >= RECENT_TTL:
            self._recent = await _recent(client, now)
        return self._recent


async def _recent(client: Client, at: float) -> Recent:
    store = client._store_or_raise()
    chart = finished_chart(await store.finished_per_hour(24), datetime.now(UTC))
    outcomes: dict[str, dict[str, int]] = {}
    for saga_name, status, runs in await store.outcomes(RECENT):
        outcomes.setdefault(saga_name, {})[status] = runs
    return Recent(
        at=at,
        chart=chart,
        outcomes=[SagaOutcomes(name, counts) for name, counts in sorted(outcomes.items())],
        failures=await store.failures(RECENT),
    )


async def overview(client: Client, cache: RecentCache) -> Overview:
    store = client._store_or_raise()
    # The census reads the scheduler lag of the definitions it is given: every definition
    # with active runs, so that it is the lag of the whole system, not of this client.
    mine = list(client._definitions)
    definitions = mine + list(await store.count_unclaimable(mine))
    recent = await cache.get(client)
    return Overview(
        census=await store.census(definitions),
        chart=recent.chart,
        outcomes=recent.outcomes,
        failures=recent.failures,
        overdue=await store.overdue(OVERDUE_AFTER),
    )


@dataclass(frozen=True, slots=True)
class HistoryRow:
    event: HistoryEvent
    by: str | None
    note: str | None
    error: str | None
    details: str


@dataclass(frozen=True, slots=True)
class AttemptRow:
    attempt: StepAttempt
    error: str | None
    waits_for_token: bool = False  # running, but waiting for its rate limit's token


@dataclass(slots=True)
class RunView:
    info: RunInfo
    resolved: bool
    attempts: list[AttemptRow]
    picture: Picture
    history: list[HistoryRow]
    signals: list[SignalState]
    plan: list[str] | None  # the compensation plan, newest first, once rolling back
    compensated: list[str]
    error: str | None
    compensation_error: str | None
    payloads: list[tuple[str, str]] = field(default_factory=list)  # (path, pretty JSON)
    actions: set[str] = field(default_factory=set)
    children: list[ChildRun] = field(default_factory=list)  # the first CHILDREN_SHOWN

    @property
    def running(self) -> list[str]:
        """The steps (and compensations) with an attempt running now, in start order:
        several at once when steps run in parallel."""
        names: list[str] = []
        for row in self.attempts:
            a = row.attempt
            name = f"undo {a.step}" if a.compensation else a.step
            if a.outcome == "running" and not self.info.status.is_terminal and name not in names:
                names.append(name)
        return names


#: How many of a run's child runs its page lists.
CHILDREN_SHOWN = 200


_HIDDEN_DATA = ("error", "by", "note")


def _details(data: dict[str, Any], redact: Redact | None) -> str:
    """An event's other data, one ``key=value`` apiece; an error record among them
    (a failing child's, say) is shown as the page shows errors, through ``redact``."""
    parts = []
    for key, value in sorted(data.items()):
        if key in _HIDDEN_DATA:
            continue
        if isinstance(value, dict) and isinstance(message := value.get("message"), str):
            text = f"{value.get('type')}: {show_error(message, redact)}"
        else:
            text = json.dumps(value, ensure_ascii=False, default=str)
        parts.append(f"{key}={text[:200]}")
    return " ".join(parts)


def _history_row(event: HistoryEvent, redact: Redact | None) -> HistoryRow:
    by, note = event.data.get("by"), event.data.get("note")
    error = event.error
    return HistoryRow(
        event=event,
        by=None if by is None else str(by),
        note=None if note is None else str(note),
        error=None if error is None else f"{error.type}: {show_error(error.message, redact)}",
        details=_details(event.data, redact),
    )


def _actions(info: RunInfo, resolved: bool) -> set[str]:
    """The actions whose buttons the run's page offers (the core API decides anyway)."""
    status = info.status
    actions: set[str] = set()
    if not status.is_terminal or status is RunStatus.STOPPED:
        actions.add("cancel")
    if status in (RunStatus.FAILED, RunStatus.STOPPED):
        actions.add("retry")
        if not resolved:
            actions.add("resolve")
    if status is RunStatus.FAILED and info.compensation_error is not None:
        actions.add("skip")
    if not status.is_terminal or (status is RunStatus.STOPPED and info.wait is not None):
        actions.add("signal")  # a run stopped at its timed-out wait goes on with it
    return actions


_UNDOING = (
    EventKind.COMPENSATION_STARTED,
    EventKind.COMPENSATION_COMPLETED,
    EventKind.COMPENSATION_FAILED,
)


def _compensation_plan(history: list[HistoryEvent]) -> list[str] | None:
    """The steps the rollback undoes, in the order it undoes them: those it started
    undoing, then the rest of the plan recorded when it began. A branch that was
    running then and completed later is undone too, though not in that plan."""
    plan: list[str] | None = None
    undone: list[str] = []
    for event in history:
        if event.kind == EventKind.RUN_COMPENSATING and isinstance(event.data.get("plan"), list):
            plan, undone = [str(step) for step in event.data["plan"]], []
        elif event.kind in _UNDOING and plan is not None and event.step not in undone:
            undone.append(str(event.step))
    if plan is None:
        return None
    return [*undone, *(step for step in plan if step not in undone)]


async def run_view(
    client: Client, run_id: uuid.UUID, *, show_payloads: bool, redact: Redact | None
) -> RunView:
    """Everything the run's page shows; raises RunNotFoundError."""
    info = await client.info(run_id)
    history = await client.history(run_id)
    store = client._store_or_raise()
    attempts = timeline(history)
    ended = info.status.is_terminal and history
    end = history[-1].at if ended else datetime.now(UTC)
    plan = _compensation_plan(history)
    compensated = [e.step for e in history if e.kind == EventKind.COMPENSATION_COMPLETED and e.step]
    resolved = info.resolved
    view = RunView(
        info=info,
        resolved=resolved,
        attempts=[
            AttemptRow(
                a,
                None if a.error is None else show_error(a.error.message, redact),
                a.waits_for_token(end),
            )
            for a in attempts
        ],
        picture=timeline_picture(attempts, history, end),
        history=[_history_row(e, redact) for e in history],
        signals=await store.signals(run_id),
        plan=plan,
        compensated=compensated,
        error=None if info.error is None else show_error(info.error.message, redact),
        compensation_error=None
        if info.compensation_error is None
        else show_error(info.compensation_error.message, redact),
        actions=_actions(info, resolved),
        children=await store.children(run_id, CHILDREN_SHOWN),
    )
    if show_payloads:
        payloads = await store.payloads(run_id)
        if payloads is not None:
            view.payloads.append(("input", show_payload("input", payloads.input, redact)))
            order = {step: n for n, step in enumerate(info.completed_steps)}
            results = sorted(payloads.results.items(), key=lambda r: order.get(r[0], len(order)))
            for step, text in results:
                path = f"result.{step}"
                view.payloads.append((path, show_payload(path, text, redact)))
            if payloads.output is not None:
                view.payloads.append(("output", show_payload("output", payloads.output, redact)))
    return view
