"""Saga definitions: pure data built from decorated async functions.

A definition does no I/O and holds no connection. It is bound to a runtime only when an
:class:`~saga.Orchestrator` registers it, so one module of definitions can serve a web
process, worker processes and tests alike.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, Generic, Literal, overload

from pydantic import BaseModel
from typing_extensions import TypeVar

from saga import _checks, _children, _graph, _pivot, _policy, _registry
from saga._checks import show, validate_name
from saga._errors import DefinitionError
from saga._fingerprint import of_definition
from saga._policy import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_STEP_RETRY,
    Retry,
    check_async,
    check_lease_seconds,
    check_retry,
    check_timeout,
    return_annotation,
)
from saga._rate import RateLimit
from saga._traffic import Traffic
from saga._waits import Parking, Sleep, Wait, declare_sleep, declare_wait

if TYPE_CHECKING:
    from saga._children import Spawn
    from saga._context import Context
    from saga._db import Executor
    from saga._run import RunHandle

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT")
R = TypeVar("R")
P = TypeVar("P", bound=BaseModel)
CIn = TypeVar("CIn", bound=BaseModel)
COut = TypeVar("COut")
#: A saga's output type, when it declares one (``output=``); Any otherwise.
OutputT = TypeVar("OutputT", default=Any)

StepFn = Callable[["Context[InT]"], Awaitable[OutT]]
CompensateFn = Callable[["Context[InT]", OutT], Awaitable[None]]


@dataclass(slots=True)
class Compensation(Generic[InT, OutT]):
    """The action that undoes a completed step. Receives that step's result."""

    fn: CompensateFn[InT, OutT]
    step: Step[InT, OutT]
    retry: Retry
    timeout: float | None


@dataclass(slots=True, eq=False)
class Step(Generic[InT, OutT]):
    """One forward step of a saga. Created by :meth:`Saga.step`."""

    name: str
    fn: StepFn[InT, OutT]
    saga: Saga[InT]
    index: int
    retry: Retry
    timeout: float | None
    result_type: Any
    lease_seconds: float | None = None
    compensation: Compensation[InT, OutT] | None = None
    after: Parking | None = None  # the sleep or wait declared right after this step
    deps: tuple[str, ...] | None = None  # after= (None: after the step declared before)
    pivot: bool = False  # the point of no return (see saga._pivot)
    spawn: Spawn | None = None  # a children step: the runs it starts (saga._children)
    rate_limit: RateLimit | None = None  # a token per attempt (saga._rate)

    @overload
    def compensate(self, fn: CompensateFn[InT, OutT], /) -> Compensation[InT, OutT]: ...

    @overload
    def compensate(
        self, /, *, retry: Retry | None = None, timeout: float | None = None
    ) -> Callable[[CompensateFn[InT, OutT]], Compensation[InT, OutT]]: ...

    def compensate(
        self,
        fn: CompensateFn[InT, OutT] | None = None,
        /,
        *,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Compensation[InT, OutT] | Callable[[CompensateFn[InT, OutT]], Compensation[InT, OutT]]:
        """Declare the compensation of this step: ``async def undo(ctx, result)``.

        Usable bare (``@step.compensate``) or with options
        (``@step.compensate(retry=Retry(max_attempts=20), timeout=5)``). Compensations
        are retried ten times by default: giving up means an operator must step in.
        """

        def register(f: CompensateFn[InT, OutT]) -> Compensation[InT, OutT]:
            self.saga._check_open()
            if self.compensation is not None:
                raise DefinitionError(
                    f"step {self.name!r} of saga {self.saga.name!r} already has a compensation"
                )
            check_async(f, "compensation", 2)
            check_timeout(timeout)
            check_retry(retry)
            self.compensation = Compensation(
                fn=f, step=self, retry=retry or DEFAULT_COMPENSATION_RETRY, timeout=timeout
            )
            return self.compensation

        return register if fn is None else register(fn)

    def __repr__(self) -> str:
        return f"<Step {self.saga.name}.{self.name}>"


def _declaring_frames(frame: FrameType | None) -> tuple[FrameType, ...]:
    """The frames of the functions a step is declared in, innermost first, up to the
    module (a few: a builder may declare its steps through a decorator of its own). A
    return annotation the module cannot resolve is looked for there (see
    saga._policy._return_hint)."""
    frames: list[FrameType] = []
    while frame is not None and len(frames) < _DECLARING_DEPTH:
        if frame.f_locals is frame.f_globals:  # the module: its names are read anyway
            break
        frames.append(frame)
        frame = frame.f_back
    return tuple(frames)


#: How many functions out a step's result annotation is looked for.
_DECLARING_DEPTH = 4


class Saga(Generic[InT, OutputT]):
    """A named, versioned sequence of steps over one pydantic input model.

    ``version`` is recorded with every run: an orchestrator only claims runs whose
    (name, version) it has registered, so a deploy that changes the steps bumps it and
    old runs finish on workers that still have the old definition. ``output``: the type
    of a completed run's output (checked against the steps at registration), which then
    types ``run.result()`` and a parent's children step.
    """

    def __init__(
        self,
        name: str,
        *,
        input: type[InT],
        output: type[OutputT] | None = None,
        version: int = 1,
        priority: int | Callable[[InT], int] | None = None,
        concurrency_key: Callable[[InT], str] | None = None,
        concurrency_limit: int = 1,
        lane: str = "default",
    ) -> None:
        self.name = validate_name(name, "saga")
        #: Priority, one-at-a-time per key, lane (see saga._traffic and the README).
        self.traffic = Traffic.of(name, priority, concurrency_key, concurrency_limit, lane)
        if not (isinstance(input, type) and issubclass(input, BaseModel)):
            raise DefinitionError(f"saga {name!r}: input must be a pydantic BaseModel subclass")
        _checks.integer(f"saga {name!r}: version", version, DefinitionError, minimum=1)
        self.input_type: type[InT] = input
        self.declared_output: Any = output
        self.version = version
        self.steps: list[Step[InT, Any]] = []
        self._by_name: dict[str, Step[InT, Any]] = {}
        self._parkings: dict[str, Parking] = {}
        self._frozen = False
        self._fingerprint: str | None = None
        #: The dependencies between steps when they are not a line (set at registration).
        self.graph: _graph.Graph | None = None
        #: The pivot step's name, if any (set at registration).
        self.pivot: str | None = None

    def __repr__(self) -> str:
        return f"<Saga {self.name} v{self.version} ({len(self.steps)} steps)>"

    def _check_open(self) -> None:
        if self._frozen:
            raise DefinitionError(
                f"saga {self.name!r} is registered with an orchestrator; its steps can no "
                "longer change"
            )

    def step(
        self,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        lease_seconds: float | None = None,
        after: Sequence[Step[InT, Any] | str] | None = None,
        pivot: bool = False,
        rate_limit: RateLimit | None = None,
    ) -> Callable[[StepFn[InT, OutT]], Step[InT, OutT]]:
        """Declare the next step: ``async def step(ctx) -> result``.

        Steps run in declaration order, each after the one declared before it, unless
        ``after`` names the steps it runs after (``[]``: at the start): steps with no
        dependency between them then run concurrently. ``pivot=True`` makes it the point
        of no return: once it completed, a failure stops the run for an operator instead
        of compensating. The return annotation is the result's type: the result is stored
        as JSON and read back as that type by later steps and by the compensation.
        ``lease_seconds`` overrides the orchestrator's lease for this step and its
        compensation: how long a crashed worker holds it before another takes over
        (heartbeats renew it every third of that while it runs). ``rate_limit``: each
        attempt first takes a token of that :class:`RateLimit` (shared by every worker).
        """

        def register(fn: StepFn[InT, OutT]) -> Step[InT, OutT]:
            frames = _declaring_frames(sys._getframe(1))
            self._check_open()
            check_async(fn, "step", 1)
            check_timeout(timeout)
            check_retry(retry)
            if lease_seconds is not None:
                check_lease_seconds(lease_seconds, DefinitionError)
            if rate_limit is not None and not isinstance(rate_limit, RateLimit):
                raise DefinitionError(
                    f"rate_limit must be a saga.RateLimit, got {show(rate_limit)}"
                )
            step_name = validate_name(_policy.function_name(fn) if name is None else name, "step")
            self._check_new_name(step_name)
            deps = None if after is None else _graph.dependencies(self, step_name, after)
            step: Step[InT, OutT] = Step(
                name=step_name,
                fn=fn,
                saga=self,
                index=len(self.steps),
                retry=retry or DEFAULT_STEP_RETRY,
                timeout=timeout,
                result_type=return_annotation(fn, frames),
                lease_seconds=lease_seconds,
                deps=deps,
                pivot=_checks.flag(f"step {step_name!r}: pivot", pivot, DefinitionError),
                rate_limit=rate_limit,
            )
            self.steps.append(step)
            self._by_name[step_name] = step
            return step

        return register

    def _check_new_name(self, name: str) -> None:
        if name in self._by_name or name in self._parkings:
            what = "step" if name in self._by_name else repr(self._parkings[name]).split()[0][1:]
            raise DefinitionError(f"saga {self.name!r} already has a {what.lower()} named {name!r}")

    def sleep(
        self,
        duration: timedelta | float | None = None,
        *,
        until: Callable[[Context[InT]], datetime | Awaitable[datetime]] | None = None,
        name: str | None = None,
    ) -> Sleep:
        """Declare a durable sleep after the last declared step: for ``duration`` (a
        timedelta or seconds), or ``until`` the timezone-aware time a function (sync or
        async) computes from the context once that step completed (a past time wakes at
        once). The sleeping run holds no lease, worker or connection."""
        return declare_sleep(self, duration, until, name)

    def wait_for(
        self,
        name: str,
        model: type[P],
        *,
        timeout: timedelta | float | None = None,
        on_timeout: Literal["compensate", "stop"]
        | Callable[[Context[InT]], Awaitable[P | Mapping[str, Any]]] = "compensate",
    ) -> Wait[P]:
        """Declare a wait for the signal ``name`` after the last declared step. The
        signal's payload (a ``model``) is the wait's result: later steps read it with
        ``ctx.result(wait)``. Without a signal within ``timeout``: ``"compensate"``
        rolls back what completed, ``"stop"`` stops the run for an operator, and an
        ``async def (ctx)`` computes the result to go on with. A signal sent before the
        run gets here is kept for it."""
        return declare_wait(self, name, model, timeout, on_timeout)

    def children(
        self,
        name: str,
        saga: Saga[CIn, COut],
        inputs: Callable[
            [Context[InT]],
            Sequence[CIn | Mapping[str, Any]] | Awaitable[Sequence[CIn | Mapping[str, Any]]],
        ],
        *,
        max_children: int = 100,
        after: Sequence[Step[InT, Any] | str] | None = None,
    ) -> Step[InT, list[COut]]:
        """Declare a step that starts one run of ``saga`` per item ``inputs(ctx)``
        returns (a list of its inputs, sync or async; at most ``max_children``) and
        completes with the list of their outputs once they all completed. See the README,
        "Child sagas"."""
        step: Step[InT, list[COut]] = _children.declare(
            self, name, saga, inputs, max_children, after
        )
        return step

    def get_wait(self, name: str) -> Wait[Any] | None:
        """The wait for the signal ``name``, if this saga declares one."""
        found = self._parkings.get(name)
        return found if isinstance(found, Wait) else None

    def waits(self) -> list[Wait[Any]]:
        """The waits for signals this saga declares, in order."""
        return [p for p in self._parkings.values() if isinstance(p, Wait)]

    def result_type(self, name: str) -> Any:
        """The type of the stored result of the step or wait ``name``."""
        found = self._parkings.get(name)
        if isinstance(found, Wait):
            return found.model
        return self.get_step(name).result_type

    def get_step(self, name: str) -> Step[InT, Any]:
        try:
            return self._by_name[name]
        except KeyError:
            raise DefinitionError(f"saga {self.name!r} has no step {name!r}") from None

    def undoes(self, name: str) -> bool:
        """Whether step ``name`` has a compensation."""
        return self.get_step(name).compensation is not None

    @property
    def fingerprint(self) -> str:
        """Identifies what this definition's stored data depends on: the saga's name and
        version, the input model's fields, and the steps with their order, result types
        and whether they compensate. Recorded with every run; an orchestrator executes
        only runs whose fingerprint it has (see the README on deploys)."""
        if self._fingerprint is None and self._frozen:
            self._fingerprint = of_definition(self, self.graph)
        return self._fingerprint or of_definition(self, _graph.preview(self))

    def _freeze(self) -> None:
        if not self.steps:
            raise DefinitionError(f"saga {self.name!r} has no steps")
        if self.steps[-1].after is not None:
            raise DefinitionError(
                f"saga {self.name!r} ends with {self.steps[-1].after!r}: declare the step "
                "that runs after it"
            )
        _policy.resolve_annotations(self)
        self.graph = _graph.of_saga(self, self._parkings)
        if self.graph is not None and self.traffic.key is not None:
            raise DefinitionError(
                f"saga {self.name!r}: a concurrency_key is not supported yet on a saga whose "
                "steps run in parallel (after=) or that starts child sagas (children()); "
                "use it on linear sagas or on the child sagas themselves"
            )
        self.pivot = _pivot.check(self, self.graph)
        _graph.check_output(self)
        self._frozen = True
        self._fingerprint = of_definition(self, self.graph)

    @property
    def output_type(self) -> Any:
        """The type of a completed run's output: the last step's result, or (a graph)
        its one final step's, or a dict of its final steps' results by name."""
        return _graph.output_type(self)

    async def start(
        self,
        input: InT | Mapping[str, Any],
        *,
        key: str | None = None,
        require_same_input: bool = True,
        conn: Executor | None = None,
        priority: int | None = None,
    ) -> RunHandle[OutputT]:
        """Durably start a run of this saga through the orchestrator it is registered with.

        Returns once the run is committed; ``orchestrator.start(saga, input, ...)`` (see
        :meth:`saga.Client.start` for ``key``, ``require_same_input``, ``conn`` and
        ``priority``)."""
        client, same = _registry.the_client(self), require_same_input
        return await client.start(
            self, input, key=key, require_same_input=same, conn=conn, priority=priority
        )
