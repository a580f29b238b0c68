"""The timeline picture and the finished-runs chart, as geometry (pure: no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from saga._model import HistoryEvent
from saga._timeline import timeline
from saga.web._svg import finished_chart, timeline_picture

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class _History:
    def __init__(self) -> None:
        self.events: list[HistoryEvent] = []

    def add(
        self, ms: int, kind: str, step: str | None = None, attempt: int | None = None, **data: Any
    ) -> None:
        at = T0 + timedelta(milliseconds=ms)
        self.events.append(
            HistoryEvent(len(self.events) + 1, at, kind, step, attempt, "w1", dict(data))
        )


def _draw(h: _History, end_ms: int) -> Any:
    return timeline_picture(timeline(h.events), h.events, T0 + timedelta(milliseconds=end_ms))


def test_parallel_branches_get_their_own_rows_and_overlap() -> None:
    """Steps of a graph run that ran at the same time are drawn on separate rows whose
    bars overlap in time."""
    h = _History()
    h.add(0, "run_started")
    for step in ("left", "right"):
        h.add(0, "step_ready", step, after=[])
        h.add(10, "step_started", step, 1)
    h.add(100, "step_completed", "right", 1)
    h.add(200, "step_completed", "left", 1)
    picture = _draw(h, 200)
    assert [label for label, _, _ in picture.rows] == ["left", "right"]
    left, right = picture.bars
    assert left.y != right.y
    assert left.x == right.x  # started together
    assert right.x + right.w < left.x + left.w  # right ended first, within left's span


def test_retries_backoffs_compensations_and_waits_are_distinguishable() -> None:
    """A failed attempt with retry_in draws a backoff line; compensations get their own
    "undo" rows and class; a wait is a bar on its own row; an operator's cancel is a
    vertical mark naming who."""
    h = _History()
    h.add(0, "run_started")
    h.add(0, "step_started", "pay", 1)
    h.add(10, "step_failed", "pay", 1, retry_in=0.05, error={"type": "X", "message": "m"})
    h.add(60, "step_started", "pay", 2)
    h.add(70, "step_completed", "pay", 2)
    h.add(70, "wait_started", "approval", signal="approval")
    h.add(300, "cancel_requested", by="alice", note="n")
    h.add(310, "run_compensating", plan=["pay"])
    h.add(310, "compensation_started", "pay", 1)
    h.add(320, "compensation_completed", "pay", 1)
    picture = _draw(h, 330)
    labels = [label for label, _, _ in picture.rows]
    assert labels == ["pay", "wait approval", "undo pay"]
    classes = [bar.cls for bar in picture.bars]
    assert "bar failed" in classes
    assert "bar completed undo" in classes
    assert "bar wait" in classes
    assert [line.cls for line in picture.lines] == ["backoff"]
    marks = {mark.cls: mark.title for mark in picture.marks}
    assert marks["cancel_requested"] == "cancel requested by alice"


def test_a_step_waiting_for_children_shows_the_gap() -> None:
    """A step that gave its slot back to wait for child runs draws a "parked" line until
    it resumes."""
    h = _History()
    h.add(0, "run_started")
    h.add(0, "step_started", "fan", 1)
    h.add(10, "children_waiting", "fan", 1, ended=0, of=2)
    h.add(500, "step_started", "fan", 1)
    h.add(510, "step_completed", "fan", 1)
    picture = _draw(h, 510)
    parked = [line for line in picture.lines if line.cls == "parked"]
    assert len(parked) == 1
    assert parked[0].w > 0


def test_the_chart_stacks_the_last_24_hours() -> None:
    """The chart has 24 hourly slots ending at the current hour; counts outside are
    ignored, and bars of one hour stack."""
    now = T0 + timedelta(minutes=30)
    hour = T0
    counts = [
        (hour, "completed", 8),
        (hour, "failed", 2),
        (hour - timedelta(hours=30), "completed", 99),
    ]
    chart = finished_chart(counts, now)
    assert chart.total == 10
    assert chart.peak == 10
    assert len(chart.bars) == 2
    assert chart.bars[0].x == chart.bars[1].x
    assert chart.bars[1].y < chart.bars[0].y  # failed stacked on top of completed
