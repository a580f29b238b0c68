"""A claimed run as the worker driving it holds it between attempts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from opentelemetry.context import Context as OtelContext
from opentelemetry.trace import Span

from saga._codec import decode_stored
from saga._context import INPUT, Context
from saga._definition import Saga
from saga._model import Outcome, Phase, RunStatus
from saga._telemetry import Telemetry
from saga._transition import PHASES, ClaimedItem, RunState

_SUCCESS = Outcome.SUCCESS


@dataclass(slots=True)
class ActiveRun:
    """A claimed run as this worker drives it (the plan sees :meth:`state`)."""

    id: UUID
    saga: Saga[Any]
    status: RunStatus
    step: str
    attempt: int
    input: Any  # the input model, or Unreadable
    results: dict[str, Any]  # decoded results of completed steps (or Unreadable)
    input_text: str  # the input as stored
    completed: list[str]
    cancel_requested: bool
    failed_forward: bool
    trace_parent: OtelContext | None
    wait: str | None = None  # status waiting: the wait whose timeout passed
    child: bool = False  # a child run: its end wakes its parent's step
    reclaimed: bool = False  # claimed after an expired lease or a release: start not logged
    # Runs again an attempt cut short while its run rolls back (Writer.lost_midway): a
    # cancel does not stop it from starting (waiting for a rate limit's token).
    finishing: bool = False
    keyed: bool = False  # a run with a concurrency key: its end frees its slot
    # The stored JSON texts of the completed steps' results: a compensation gets its
    # step's result read from them, whatever later steps did to the objects they read.
    stored: dict[str, str | None] = field(default_factory=dict, repr=False)
    born: float = 0.0  # time.perf_counter() when the run was created (for its duration)
    # The attempt being run: its span, start time, and how it went.
    span: Span | None = None
    started: float = 0.0
    outcome: Outcome = _SUCCESS
    error_type: str | None = None
    ctx: Context[Any] | None = field(default=None, repr=False)
    # The input (INPUT) and results already handed to a step: the next reads them again.
    exposed: set[str] = field(default_factory=set, repr=False)

    def state(self) -> RunState:
        return RunState(
            status=self.status,
            step=self.step,
            attempt=self.attempt,
            completed=tuple(self.completed),
            cancel_requested=self.cancel_requested,
            failed_forward=self.failed_forward,
            wait=self.wait,
        )

    @property
    def key_limit(self) -> int | None:
        """A keyed run: its saga's concurrency limit (as this worker's definition declares
        it: its end applies it to the key); None: not keyed."""
        return self.saga.traffic.limit if self.keyed else None

    @property
    def phase(self) -> Phase:
        return PHASES[self.status]  # a dict read: no enum attribute on the hot path


def claimed_run(item: ClaimedItem, saga: Saga[Any]) -> ActiveRun:
    """A claimed item as the worker drives it (payloads decoded)."""
    return ActiveRun(
        id=item.run_id,
        saga=saga,
        status=item.status,
        step=item.step_name,
        attempt=item.attempt,
        input=decode_stored(item.input, saga.input_type, "input"),
        input_text=item.input,
        results={
            name: decode_stored(text, saga.result_type(name), f"result of {name!r}")
            for name, text in item.results.items()
        },
        completed=list(item.completed_steps),
        stored=dict(item.results),
        born=time.perf_counter() - item.age,
        cancel_requested=item.cancel_requested,
        failed_forward=item.has_error,
        trace_parent=Telemetry.parent_context(item.trace_context),
        wait=item.timed_out_wait,
        child=item.child,
        keyed=item.keyed,
        reclaimed=item.expired_owner is not None or item.released,
    )


class Reads:
    """What one step's context reads of its run: its input, and the results of the steps
    before it. An object no step was given yet is handed over as decoded; one an earlier
    step was given is decoded again from its stored text, so that what a step does to
    an object it read never reaches the next (as it would not on another worker). It
    holds the run's parts, not the run: the run holds the context (no reference cycle
    for the garbage collector to find on every step)."""

    __slots__ = ("_exposed", "_input", "_input_text", "_results", "_saga", "_seen", "_stored")

    def __init__(self, run: ActiveRun) -> None:
        self._input = run.input
        self._input_text = run.input_text
        self._results = run.results
        self._stored = run.stored
        self._exposed = run.exposed
        self._saga = run.saga
        self._seen: dict[str, Any] | None = None

    def __contains__(self, name: object) -> bool:
        return name in self._results

    def __getitem__(self, name: str) -> Any:
        seen = self._seen
        if seen is None:
            seen = self._seen = {}
        elif name in seen:
            return seen[name]
        if name not in self._exposed:
            value = self._input if name == INPUT else self._results[name]
            self._exposed.add(name)
        elif name == INPUT:
            value = decode_stored(self._input_text, self._saga.input_type, "input")
        else:
            text = self._stored.get(name)
            value = (
                self._results[name]
                if text is None
                else decode_stored(text, self._saga.result_type(name), f"result of {name!r}")
            )
        seen[name] = value
        return value
