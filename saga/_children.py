"""Child sagas: a step that starts runs of another saga, one per item of a list computed
from earlier results, and completes when they all completed.

This module declares the step; ``saga._spawner`` runs it. The step's item runs no user
step: it computes the inputs (``inputs(ctx)``), starts the
children idempotently (key ``<run>:child:<step>:<count>:<index>``: a retried step never
starts a second child), then gives its slot back, parked, until a child's end wakes it
(the child's final write marks the parent's item, in the same statement: no polling).
Woken, it looks at its children: all completed, its result is the list of their outputs;
one ended otherwise, the others are cancelled (or, completed, reverted) and the step
fails with that child's error. Compensating the step (or dropping it during a rollback)
cancels and reverts its children, and waits for them to end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from saga import _checks
from saga._checks import show
from saga._errors import DefinitionError, SagaError


@dataclass(frozen=True, slots=True)
class Spawn:
    """What a children step starts: runs of ``saga``, one per item ``inputs`` returns."""

    saga: Any  # a saga.Saga
    inputs: Callable[[Any], Sequence[Any] | Awaitable[Sequence[Any]]]
    max_children: int


class ChildFailed(SagaError):
    """A child run ended without completing: its parent's children step fails for good
    with this error (recorded as ``saga.ChildFailed``, with the child's reason)."""


class TooManyChildren(SagaError):
    """A children step's ``inputs`` returned more items than its ``max_children``: the
    step fails for good with this error (recorded as ``saga.TooManyChildren``)."""


class InputsChanged(SagaError):
    """A retried children step's ``inputs`` returned a list of another length than the
    one its first attempt started children for (recorded as ``saga.InputsChanged``):
    the step fails for good, its children undone."""


class TakenKey(SagaError):
    """A child's idempotency key belongs to a run started outside its step (recorded as
    ``saga.TakenKey``): the step fails for good, its children undone."""


def declare(
    parent: Any,
    name: str,
    child: Any,
    inputs: Callable[[Any], Any],
    max_children: int,
    after: Sequence[Any] | None,
) -> Any:
    """The step of ``parent`` that starts the children (see :meth:`Saga.children`)."""
    _checks.validate_name(name, "step")  # first: the messages below quote it
    if not isinstance(child, type(parent)) or child is parent:
        raise DefinitionError(
            f"saga {parent.name!r}: step {name!r} starts runs of another saga.Saga, "
            f"not {show(child)}"
        )
    if not callable(inputs):
        raise DefinitionError(f"saga {parent.name!r}: inputs of step {name!r} must be callable")
    _checks.takes(inputs, 1, f"saga {parent.name!r}: inputs of step {name!r}")
    if isinstance(max_children, bool) or not isinstance(max_children, int) or max_children < 1:
        raise DefinitionError(
            f"saga {parent.name!r}: max_children of step {name!r} must be an int >= 1, "
            f"got {show(max_children)}"
        )

    async def start_children(ctx: Any) -> list[Any]:
        raise AssertionError("a children step is run by saga, not called")  # pragma: no cover

    async def undo_children(ctx: Any, result: list[Any]) -> None:
        raise AssertionError("a children step is run by saga, not called")  # pragma: no cover

    step = parent.step(name=name, after=after)(start_children)
    step.spawn = Spawn(child, inputs, max_children)
    step.compensate(undo_children)
    return step


def check_registered(sagas: dict[tuple[str, int], Any]) -> None:
    """Every saga a children step starts is registered with the same client."""
    for saga in sagas.values():
        for step in saga.steps:
            child = None if step.spawn is None else step.spawn.saga
            if child is not None and sagas.get((child.name, child.version)) is not child:
                raise DefinitionError(
                    f"saga {saga.name!r}: step {step.name!r} starts runs of saga "
                    f"{child.name!r} v{child.version}, which is not registered with this "
                    "client; pass it in sagas= too"
                )


def check_acyclic(sagas: dict[tuple[str, int], Any]) -> None:
    """No saga starts runs of itself through other sagas' children steps: such runs
    would nest without bound (a saga naming itself is refused when declared)."""
    done: set[int] = set()

    def visit(saga: Any, path: list[Any]) -> None:
        if id(saga) in done:
            return
        if any(s is saga for s in path):
            chain = " -> ".join(f"{s.name!r}" for s in [*path[path.index(saga) :], saga])
            raise DefinitionError(
                f"saga {saga.name!r} starts runs of itself through child sagas ({chain}): "
                "its runs would nest without end; break the chain"
            )
        for step in saga.steps:
            if step.spawn is not None:
                visit(step.spawn.saga, [*path, saga])
        done.add(id(saga))

    for saga in sagas.values():
        visit(saga, [])
