"""The pictures, as geometry the templates draw as inline SVG (escaped like any text):
a run's timeline (one bar per attempt, a row per step) and the finished-runs chart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from saga._model import EventKind, HistoryEvent
from saga._timeline import StepAttempt
from saga.web._render import seconds

LABEL_WIDTH = 170
PLOT_WIDTH = 640
ROW_HEIGHT = 22
AXIS_HEIGHT = 22
MIN_BAR = 3.0

_PARKED_BY = {EventKind.SLEEP_STARTED: "sleep", EventKind.WAIT_STARTED: "wait"}
_UNPARKED_BY = (EventKind.WOKE, EventKind.WAIT_TIMED_OUT)
_MARKS = {
    EventKind.CANCEL_REQUESTED: "cancel requested",
    EventKind.RUN_RETRIED: "retried",
    EventKind.RUN_STOPPED: "stopped",
    EventKind.RUN_COMPENSATING: "rollback begins",
}


@dataclass(frozen=True, slots=True)
class Shape:
    """A bar (``w`` > 0) or a line from ``x`` to ``x + w`` at row ``y`` (``cls`` says
    which), with the tooltip ``title``."""

    x: float
    y: float
    w: float
    cls: str
    title: str


@dataclass(slots=True)
class Picture:
    width: int
    height: int
    rows: list[tuple[str, float, str]] = field(default_factory=list)  # label, y, class
    bars: list[Shape] = field(default_factory=list)
    lines: list[Shape] = field(default_factory=list)
    marks: list[Shape] = field(default_factory=list)  # vertical lines at x
    ticks: list[tuple[float, str]] = field(default_factory=list)


class _Scale:
    def __init__(self, start: datetime, end: datetime) -> None:
        self.start = start
        self.span = max((end - start).total_seconds(), 0.001)

    def x(self, at: datetime) -> float:
        offset = (at - self.start).total_seconds() / self.span
        return round(LABEL_WIDTH + min(max(offset, 0.0), 1.0) * PLOT_WIDTH, 2)


def _rows(attempts: Sequence[StepAttempt], events: Sequence[HistoryEvent]) -> list[tuple[str, str]]:
    """(kind, name) of every row, in order of first appearance: steps, compensations
    ("undo") and sleeps or waits."""
    order: list[tuple[datetime, int, tuple[str, str]]] = []
    seen: set[tuple[str, str]] = set()
    items: list[tuple[datetime | None, tuple[str, str]]] = [
        (a.started_at or a.ended_at, ("undo" if a.compensation else "step", a.step))
        for a in attempts
    ]
    items += [
        (e.at, (_PARKED_BY[EventKind(e.kind)], e.step or "?"))
        for e in events
        if e.kind in _PARKED_BY
    ]
    for index, (at, key) in enumerate(items):
        if key not in seen and at is not None:
            seen.add(key)
            order.append((at, index, key))
    order.sort()
    return [key for _, _, key in order]


def timeline_picture(
    attempts: Sequence[StepAttempt], events: Sequence[HistoryEvent], end: datetime
) -> Picture:
    """The run's timeline up to ``end`` (now for an active run, else its last event)."""
    times = [e.at for e in events] + [a.started_at for a in attempts if a.started_at]
    start = min(times, default=end)
    end = max([end, *times])
    scale = _Scale(start, end)
    keys = _rows(attempts, events)
    index = {key: AXIS_HEIGHT + i * ROW_HEIGHT for i, key in enumerate(keys)}
    picture = Picture(LABEL_WIDTH + PLOT_WIDTH + 10, AXIS_HEIGHT + len(keys) * ROW_HEIGHT + 4)
    for kind, name in keys:
        label = f"undo {name}" if kind == "undo" else name if kind == "step" else f"{kind} {name}"
        picture.rows.append((label, index[(kind, name)], kind))
    for i in range(5):
        at = start + timedelta(seconds=scale.span * i / 4)
        picture.ticks.append((scale.x(at), "+" + seconds(scale.span * i / 4)))
    _attempt_shapes(picture, scale, attempts, index, end)
    _parked_shapes(picture, scale, events, index, end)
    for event in events:
        if event.kind in _MARKS:
            by = event.data.get("by")
            title = _MARKS[EventKind(event.kind)] + (f" by {by}" if by else "")
            picture.marks.append(Shape(scale.x(event.at), 0, 0, event.kind, title))
    return picture


def _attempt_shapes(
    picture: Picture,
    scale: _Scale,
    attempts: Sequence[StepAttempt],
    rows: Mapping[tuple[str, str], float],
    end: datetime,
) -> None:
    for n, a in enumerate(attempts):
        key = ("undo" if a.compensation else "step", a.step)
        y = rows.get(key)
        start = a.started_at or a.ended_at
        if y is None or start is None:
            continue
        stop = a.ended_at or end
        x = scale.x(start)
        width = max(scale.x(stop) - x, MIN_BAR)
        what = "compensation" if a.compensation else "step"
        title = f"{what} {a.step} attempt {a.attempt}: {a.outcome}, {seconds(a.duration)}"
        if a.worker:
            title += f" on {a.worker}"
        if a.error is not None:
            title += f" ({a.error.type})"
        cls = f"bar {a.outcome}" + (" undo" if a.compensation else "")
        picture.bars.append(Shape(x, y, width, cls, title))
        if a.retry_in is not None and a.ended_at is not None:
            due = min(a.ended_at + timedelta(seconds=a.retry_in), end)
            picture.lines.append(
                Shape(
                    scale.x(stop),
                    y,
                    scale.x(due) - scale.x(stop),
                    "backoff",
                    f"backoff {seconds(a.retry_in)}",
                )
            )
        if a.outcome == "waiting" and a.ended_at is not None:
            later = [
                b.started_at
                for b in attempts[n + 1 :]
                if (b.step, b.compensation) == (a.step, a.compensation) and b.started_at
            ]
            resumed = later[0] if later else end
            picture.lines.append(
                Shape(
                    scale.x(a.ended_at),
                    y,
                    scale.x(resumed) - scale.x(a.ended_at),
                    "parked",
                    "waiting for child runs",
                )
            )


def _parked_shapes(
    picture: Picture,
    scale: _Scale,
    events: Sequence[HistoryEvent],
    rows: Mapping[tuple[str, str], float],
    end: datetime,
) -> None:
    open_: dict[tuple[str, str], datetime] = {}
    for event in events:
        name = event.step or "?"
        if event.kind in _PARKED_BY:
            open_[(_PARKED_BY[EventKind(event.kind)], name)] = event.at
        elif event.kind in _UNPARKED_BY:
            for kind in ("sleep", "wait"):
                began = open_.pop((kind, name), None)
                if began is not None:
                    _parked_bar(
                        picture, scale, rows[(kind, name)], kind, name, began, event.at, event.kind
                    )
        elif event.kind == EventKind.SIGNAL_RECEIVED and ("wait", name) in rows:
            picture.marks.append(
                Shape(
                    scale.x(event.at), rows[("wait", name)], 0, "signal", f"signal {name} received"
                )
            )
    for (kind, name), began in open_.items():
        _parked_bar(picture, scale, rows[(kind, name)], kind, name, began, end, "")


def _parked_bar(
    picture: Picture,
    scale: _Scale,
    y: float,
    kind: str,
    name: str,
    began: datetime,
    ended: datetime,
    how: str,
) -> None:
    x = scale.x(began)
    title = f"{kind} {name}: {seconds((ended - began).total_seconds())}" + (
        f", {how}" if how else ""
    )
    picture.bars.append(Shape(x, y, max(scale.x(ended) - x, MIN_BAR), f"bar {kind}", title))


#: The final statuses, in the chart's stacking order (success at the bottom).
FINAL = ("completed", "compensated", "cancelled", "failed", "stopped")
CHART_HEIGHT = 150


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    bars: list[Shape]  # y is the bar's top, w its width; heights in ``heights``
    heights: list[float]
    ticks: list[tuple[float, str]]
    peak: int
    total: int


def finished_chart(
    counts: Sequence[tuple[datetime, str, int]], now: datetime, hours: int = 24
) -> Chart:
    """Stacked bars of the runs finished per hour over the last ``hours`` hours."""
    first = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    slots = [first + timedelta(hours=i) for i in range(hours)]
    per: dict[tuple[datetime, str], int] = {}
    for hour, status, runs in counts:
        per[(hour, status)] = per.get((hour, status), 0) + runs
    totals = [sum(per.get((slot, s), 0) for s in FINAL) for slot in slots]
    peak = max(totals, default=0)
    slot_width = PLOT_WIDTH / hours
    bars: list[Shape] = []
    heights: list[float] = []
    for i, slot in enumerate(slots):
        base = float(CHART_HEIGHT)
        for status in FINAL:
            runs = per.get((slot, status), 0)
            if not runs:
                continue
            height = runs / peak * (CHART_HEIGHT - 10)
            base -= height
            title = f"{slot:%H:00} UTC: {runs} {status}"
            bars.append(
                Shape(
                    round(40 + i * slot_width + 1, 2),
                    round(base, 2),
                    round(slot_width - 2, 2),
                    status,
                    title,
                )
            )
            heights.append(round(height, 2))
    ticks = [
        (round(40 + i * slot_width, 2), f"{slot:%H}h") for i, slot in enumerate(slots) if i % 3 == 0
    ]
    return Chart(40 + PLOT_WIDTH + 10, CHART_HEIGHT + 20, bars, heights, ticks, peak, sum(totals))
