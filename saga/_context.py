"""What a step or compensation gets: :class:`Context`, its run's identity and attempt,
its idempotency key, and the input and earlier results as stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, overload
from uuid import UUID

from saga import _checks, _graph
from saga._definition import InT, P, R, Saga, Step
from saga._errors import DefinitionError
from saga._waits import Wait

#: The input's key among what a step's context reads (saga._active.Reads): no step has
#: this name (names are identifiers).
INPUT = " input"


@dataclass(slots=True)
class Context(Generic[InT]):
    """What a step or compensation knows about its run. ``idempotency_key`` is the same
    for every attempt of a step on any worker, and different for its compensation: pass
    it to external services so that a retried side effect happens once."""

    run_id: UUID
    saga: str
    step: str
    attempt: int
    idempotency_key: str
    is_compensation: bool
    # The run's input and earlier results as this step reads them (saga._active.Reads).
    _results: Any = field(repr=False)
    _definition: Saga[InT] = field(repr=False)

    @property
    def input(self) -> InT:
        """The run's input (its saga's input model), as stored when the run started."""
        value: InT = self._results[INPUT]
        return value

    @overload
    def result(self, step: Wait[P]) -> P: ...

    @overload
    def result(self, step: Step[InT, R]) -> R: ...

    def result(self, step: Step[Any, Any] | Wait[Any]) -> Any:
        """The typed result of an earlier completed step of this run, or the payload
        of a wait it passed."""
        if not isinstance(step, Step | Wait) or step.saga is not self._definition:
            raise DefinitionError(
                f"ctx.result() takes a step or a wait of saga {self.saga!r} (the object its "
                f"decorator or wait_for returned), got {_checks.show(step)}"
            )
        _graph.check_read(self._definition.graph, self.step, step.name, self.is_compensation)
        if step.name not in self._results:
            raise DefinitionError(
                f"{'wait' if isinstance(step, Wait) else 'step'} {step.name!r} has not "
                f"completed in run {self.run_id}; only earlier results can be read"
            )
        return self._results[step.name]
