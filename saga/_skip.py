"""What skipping a compensation that gave up leaves to do: pure, from a failed run's
stored state and its definition (the same rules as the plans that run rollbacks)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from saga._model import EventKind, RunStatus
from saga._plan_rollback import compensation_plan
from saga._store_ops import Skip

if TYPE_CHECKING:
    from saga._definition import Saga


def plan_skip(saga: Saga[Any], state: Mapping[str, Any], data: Mapping[str, Any]) -> Skip:
    """The rollback of a failed run without the compensation of ``state["failed_step"]``:
    a linear run goes on at the next compensation of its plan, a graph run with every
    compensation whose dependents are now all undone; with none left, the run ends
    ``compensated`` (a step had failed) or ``cancelled``. The skip is recorded as
    ``compensation_skipped``, with ``data`` (who and why)."""
    step: str = state["failed_step"]
    completed: tuple[str, ...] = tuple(state["completed_steps"])
    undone: tuple[str, ...] = tuple(state["compensated_steps"])
    events: list[dict[str, Any]] = [
        {"kind": EventKind.COMPENSATION_SKIPPED, "step": step, "data": dict(data)}
    ]
    next_step: str | None = None
    items: tuple[str, ...] = ()
    if saga.graph is None or not state["graph"]:
        plan = compensation_plan(saga, completed)
        rest = plan[plan.index(step) + 1 :] if step in plan else []
        next_step = rest[0] if rest else None
    else:
        undoes = saga.undoes
        items = tuple(saga.graph.undo_ready(undoes, set(completed), {*undone, step}, set()))
    ends: RunStatus | None = None
    if next_step is None and not items:
        ends = RunStatus.COMPENSATED if state["has_error"] else RunStatus.CANCELLED
        events.append({"kind": EventKind.ended(ends), "step": None, "data": None})
    return Skip(
        step=step,
        next_step=next_step,
        items=items,
        ends=ends,
        events_json=json.dumps(events, separators=(",", ":")),
        undone=len(undone),
    )
