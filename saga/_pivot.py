"""Pivot steps: the point of no return of a saga, checked at definition time.

Once the pivot step completed, a failure never compensates the steps before it: the
steps after it are retried forward and, if one gives up, the run stops for an operator
(who retries it). What would contradict that is refused when the saga is registered.
"""

from __future__ import annotations

from typing import Any

from saga._errors import DefinitionError
from saga._graph import Graph


def check(saga: Any, graph: Graph | None) -> str | None:
    """The saga's pivot step (None: it has none), every rule checked."""
    pivots = [s for s in saga.steps if s.pivot]
    if not pivots:
        return None
    if len(pivots) > 1:
        names = ", ".join(repr(s.name) for s in pivots)
        raise DefinitionError(f"saga {saga.name!r} has more than one pivot step: {names}")
    pivot = pivots[0]
    where = f"saga {saga.name!r}: pivot step {pivot.name!r}"
    if pivot.compensation is not None:
        raise DefinitionError(
            f"{where} has a compensation, but a pivot is the point of no return: it is never "
            "undone; remove the compensation or the pivot"
        )
    later = _after(saga, graph, pivot.name)
    for step in saga.steps:
        if step.name in later and step.spawn is not None:
            raise DefinitionError(
                f"{where}: step {step.name!r} runs child sagas after it: a child failing "
                "would undo its siblings, and after the pivot a run only goes forward"
            )
        if step.name in later and step.compensation is not None:
            raise DefinitionError(
                f"{where}: step {step.name!r} runs after it and has a compensation that "
                "could never run (after the pivot a run only goes forward)"
            )
        around = later | {pivot.name} | (graph.ancestors[pivot.name] if graph else set())
        if graph is not None and step.name not in around:
            raise DefinitionError(
                f"{where}: step {step.name!r} runs neither before nor after it; every "
                "step of a saga with a pivot must (declare it with after=)"
            )
        parked = step.after
        compensates = getattr(parked, "on_timeout", None) == "compensate"
        if step.name in later | {pivot.name} and compensates and parked.timeout is not None:
            raise DefinitionError(
                f"{where}: wait {parked.name!r} after it would compensate on timeout; use "
                'on_timeout="stop" or a value (after the pivot a run only goes forward)'
            )
    return str(pivot.name)


def _after(saga: Any, graph: Graph | None, pivot: str) -> set[str]:
    """The steps that run after the pivot."""
    if graph is None:
        names = [s.name for s in saga.steps]
        return set(names[names.index(pivot) + 1 :])
    return {name for name, before in graph.ancestors.items() if pivot in before}
