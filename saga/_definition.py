"""Saga definitions: pure data built from decorated async functions.

A definition does no I/O and holds no connection. It is bound to a runtime only when an
:class:`~saga.Orchestrator` registers it, so one module of definitions can serve a web
process, worker processes and tests alike.
"""

from __future__ import annotations

import inspect
import math
import random
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload
from uuid import UUID

from pydantic import BaseModel

from saga import _checks, _registry
from saga._errors import DefinitionError, PermanentError
from saga._fingerprint import fingerprint

if TYPE_CHECKING:
    from saga._run import RunHandle

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT")
R = TypeVar("R")

StepFn = Callable[["Context[InT]"], Awaitable[OutT]]
CompensateFn = Callable[["Context[InT]", OutT], Awaitable[None]]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")


def validate_name(name: str, what: str) -> str:
    """Names are stored as data, but they also appear in logs, CLIs and metrics."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise DefinitionError(
            f"invalid {what} name {name!r}: use 1-128 characters, letters, digits, "
            "'_', '.', ':' or '-', starting with a letter or '_'"
        )
    return name


#: The most attempts a policy may allow (attempt numbers are stored as 32-bit ints).
MAX_ATTEMPTS = 1_000_000
#: The longest wait between attempts, and the longest attempt timeout: one year.
MAX_DELAY = 365 * 24 * 3600.0
#: Lease bounds: a lease must outlive a heartbeat round trip, and a dead worker's lease
#: must run out within a day.
MIN_LEASE_SECONDS = 0.1
MAX_LEASE_SECONDS = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Retry:
    """How a step or compensation is retried.

    Attempt ``n`` (1-based) that fails with a retryable error waits
    ``min(max_delay, initial_delay * multiplier ** (n - 1))``, reduced by a random
    fraction of up to ``jitter`` so that many runs failing together do not retry in step.
    ``max_attempts`` counts every attempt, including one whose worker crashed.
    ``PermanentError`` and the types in ``non_retryable`` fail at once.
    """

    max_attempts: int = 3
    initial_delay: float = 0.5
    max_delay: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        err = DefinitionError
        _checks.integer(
            "Retry.max_attempts", self.max_attempts, err, minimum=1, maximum=MAX_ATTEMPTS
        )
        for name in ("initial_delay", "max_delay"):
            _checks.seconds(
                f"Retry.{name}", getattr(self, name), err, maximum=MAX_DELAY, allow_zero=True
            )
        multiplier = self.multiplier
        if not isinstance(multiplier, int | float) or isinstance(multiplier, bool):
            raise err(f"Retry.multiplier must be a number, got {_checks.show(multiplier)}")
        if not (_checks.finite(multiplier) and multiplier >= 1):
            raise err(
                f"Retry.multiplier must be a finite number >= 1, got {_checks.show(multiplier)}"
            )
        jitter = self.jitter
        if not isinstance(jitter, int | float) or isinstance(jitter, bool) or not 0 <= jitter <= 1:
            raise err(f"Retry.jitter must be a number within [0, 1], got {_checks.show(jitter)}")
        if not isinstance(self.non_retryable, tuple | list):
            got = _checks.show(self.non_retryable)
            raise err(f"Retry.non_retryable must be a tuple of exception types, got {got}")
        object.__setattr__(self, "non_retryable", tuple(self.non_retryable))
        for exc_type in self.non_retryable:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise err(f"Retry.non_retryable holds a non-exception {exc_type!r}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            growth = float(self.multiplier) ** (attempt - 1)
        except OverflowError:  # a large multiplier after many attempts: the cap applies
            growth = math.inf
        base = min(self.max_delay, self.initial_delay * growth) if self.initial_delay else 0.0
        return base * (1 - self.jitter * rand())

    def retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, (PermanentError, *self.non_retryable))


DEFAULT_STEP_RETRY = Retry()
DEFAULT_COMPENSATION_RETRY = Retry(max_attempts=10)


def _check_async(fn: Any, what: str, params: int) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise DefinitionError(
            f"{what} {getattr(fn, '__qualname__', fn)!r} must be an `async def` function"
        )
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover - builtins only
        return
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    if len(positional) != params and not varargs:
        expected = "(ctx)" if params == 1 else "(ctx, result)"
        raise DefinitionError(
            f"{what} {fn.__qualname__!r} must take {expected}, it takes {len(positional)} "
            "required positional parameter(s)"
        )


def _return_annotation(fn: Callable[..., Any]) -> Any:
    """The declared result type, metadata included (``Annotated`` discriminators,
    serializers and validators apply to results too); ``Any`` when undeclared."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:
        return Any
    return hints.get("return", Any)


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
            _check_async(f, "compensation", 2)
            _check_timeout(timeout)
            _check_retry(retry)
            self.compensation = Compensation(
                fn=f, step=self, retry=retry or DEFAULT_COMPENSATION_RETRY, timeout=timeout
            )
            return self.compensation

        return register if fn is None else register(fn)

    def __repr__(self) -> str:
        return f"<Step {self.saga.name}.{self.name}>"


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None:
        _checks.seconds("timeout", timeout, DefinitionError, maximum=MAX_DELAY)


def _check_retry(retry: Retry | None) -> None:
    if retry is not None and not isinstance(retry, Retry):
        raise DefinitionError(f"retry must be a saga.Retry, got {retry!r}")


def check_lease_seconds(value: float, error: type[Exception]) -> float:
    """A lease length both a step and the orchestrator accept."""
    return _checks.seconds(
        "lease_seconds",
        value,
        error,
        minimum=MIN_LEASE_SECONDS,
        maximum=MAX_LEASE_SECONDS,
    )


class Saga(Generic[InT]):
    """A named, versioned sequence of steps over one pydantic input model.

    ``version`` is recorded with every run: an orchestrator only claims runs whose
    (name, version) it has registered, so a deploy that changes the steps bumps it and
    old runs finish on workers that still have the old definition.
    """

    def __init__(self, name: str, *, input: type[InT], version: int = 1) -> None:
        self.name = validate_name(name, "saga")
        if not (isinstance(input, type) and issubclass(input, BaseModel)):
            raise DefinitionError(f"saga {name!r}: input must be a pydantic BaseModel subclass")
        _checks.integer(f"saga {name!r}: version", version, DefinitionError, minimum=1)
        self.input_type: type[InT] = input
        self.version = version
        self.steps: list[Step[InT, Any]] = []
        self._by_name: dict[str, Step[InT, Any]] = {}
        self._frozen = False
        self._fingerprint: str | None = None

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
    ) -> Callable[[StepFn[InT, OutT]], Step[InT, OutT]]:
        """Declare the next step: ``async def step(ctx) -> result``.

        Steps run in declaration order. The return annotation is the result's type:
        the result is stored as JSON and read back as that type by later steps and by
        the compensation. ``lease_seconds`` overrides the orchestrator's lease for this
        step and its compensation: how long a crashed worker holds it before another
        takes over (heartbeats renew it every third of that while it runs).
        """

        def register(fn: StepFn[InT, OutT]) -> Step[InT, OutT]:
            self._check_open()
            _check_async(fn, "step", 1)
            _check_timeout(timeout)
            _check_retry(retry)
            if lease_seconds is not None:
                check_lease_seconds(lease_seconds, DefinitionError)
            step_name = validate_name(fn.__name__ if name is None else name, "step")
            if step_name in self._by_name:
                raise DefinitionError(f"saga {self.name!r} already has a step named {step_name!r}")
            step: Step[InT, OutT] = Step(
                name=step_name,
                fn=fn,
                saga=self,
                index=len(self.steps),
                retry=retry or DEFAULT_STEP_RETRY,
                timeout=timeout,
                result_type=_return_annotation(fn),
                lease_seconds=lease_seconds,
            )
            self.steps.append(step)
            self._by_name[step_name] = step
            return step

        return register

    def get_step(self, name: str) -> Step[InT, Any]:
        try:
            return self._by_name[name]
        except KeyError:
            raise DefinitionError(f"saga {self.name!r} has no step {name!r}") from None

    @property
    def fingerprint(self) -> str:
        """Identifies what this definition's stored data depends on: the saga's name and
        version, the input model's fields, and the steps with their order, result types
        and whether they compensate. Recorded with every run; an orchestrator executes
        only runs whose fingerprint it has (see the README on deploys)."""
        if self._fingerprint is not None:
            return self._fingerprint
        value = self._compute_fingerprint()
        if self._frozen:
            self._fingerprint = value
        return value

    def _freeze(self) -> None:
        if not self.steps:
            raise DefinitionError(f"saga {self.name!r} has no steps")
        self._frozen = True
        self._fingerprint = self._compute_fingerprint()

    def _compute_fingerprint(self) -> str:
        steps = [(s.name, s.result_type, s.compensation is not None) for s in self.steps]
        return fingerprint(self.name, self.version, self.input_type, steps)

    async def start(
        self, input: InT, *, key: str | None = None, require_same_input: bool = True
    ) -> RunHandle:
        """Durably start a run of this saga through the orchestrator it is registered with.

        Returns once the run is committed. With ``key``, a second start with the same key
        and an equal input returns the existing run instead of creating one (a different
        input raises :class:`~saga.IdempotencyConflictError` unless
        ``require_same_input=False``). Equivalent to ``orchestrator.start(saga, input,
        key=key, require_same_input=require_same_input)``.
        """
        live = _registry.open_clients(self)
        if len(live) != 1:
            raise DefinitionError(
                f"saga {self.name!r} is registered with {len(live)} open clients; "
                "start it with `client.start(saga, input)`"
                if live
                else f"saga {self.name!r} is not registered with an open Client or Orchestrator"
            )
        return await live[0].start(self, input, key=key, require_same_input=require_same_input)


@dataclass(slots=True)
class Context(Generic[InT]):
    """What a step or compensation knows about its run.

    ``idempotency_key`` is the same for every attempt of a step on any worker, and
    different for its compensation: pass it to external services so that a retried
    side effect happens once.
    """

    run_id: UUID
    saga: str
    step: str
    attempt: int
    input: InT
    idempotency_key: str
    is_compensation: bool
    _results: dict[str, Any] = field(repr=False)
    _definition: Saga[InT] = field(repr=False)

    def result(self, step: Step[Any, R]) -> R:
        """The typed result of an earlier completed step of this run."""
        if step.saga is not self._definition:
            raise DefinitionError(f"{step!r} does not belong to saga {self.saga!r}")
        if step.name not in self._results:
            raise DefinitionError(
                f"step {step.name!r} has not completed in run {self.run_id}; only earlier "
                "steps' results can be read"
            )
        value: R = self._results[step.name]
        return value
